"""The session's real systemd: booted once, powered off at the end, nothing left behind.

Tests that need it take the `systemd_sandbox` fixture (and live in this directory, where this
conftest applies). Where the sandbox cannot boot the tests skip with the reason; with CI=true
they fail instead, so CI cannot go green without having run them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest
from sandbox import NAME, HostGuard, Sandbox, SandboxUnavailable


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def host_guard() -> Iterator[HostGuard]:
    """Outlives the sandbox: after poweroff, the host's /etc, /run and /tmp must be as before."""
    guard = HostGuard()
    try:
        yield guard
        changes = guard.changes()
        assert not changes, "the sandbox changed the host:\n" + "\n".join(changes)
    finally:
        guard.remove_markers()


@pytest.fixture(scope="session")
def host_leftovers() -> Iterator[list[Path]]:
    """What an earlier install leaves on the host, put there before the sandbox boots: a marker
    file in the host's /var/lib/poolkeeper and /var/cache/poolkeeper (each made for the session
    if missing, and removed after), and in /etc/poolkeeper if the host has one (never made:
    HostGuard compares the names in /etc). The sandbox must see none of them."""
    markers: list[Path] = []
    made: list[Path] = []
    if os.geteuid() != 0:  # no sandbox without root either: it skips with the reason
        yield markers
        return
    for directory in map(Path, ("/var/lib/poolkeeper", "/var/cache/poolkeeper", "/etc/poolkeeper")):
        if not directory.is_dir():
            if directory.parent == Path("/etc"):
                continue
            directory.mkdir()
            made.append(directory)
        marker = directory / f".{NAME}-leftover-{os.getpid()}"
        marker.write_text("left by an earlier install\n")
        markers.append(marker)
    try:
        yield markers
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
        for directory in made:
            try:
                directory.rmdir()
            except OSError:  # another session put its marker in meanwhile: it is still in use
                pass


@pytest.fixture(scope="session")
def systemd_sandbox(host_guard: HostGuard, host_leftovers: list[Path]) -> Iterator[Sandbox]:
    try:
        sandbox = Sandbox.boot()
    except SandboxUnavailable as exc:
        if _in_ci():
            pytest.fail(f"the systemd sandbox did not boot (CI=true): {exc}", pytrace=False)
        pytest.skip(f"the systemd sandbox cannot boot here: {exc}")
    # unshare is pytest's child and lives for the whole session: not a leak.
    owned = {sandbox.unshare_pid, sandbox.pid}
    procs.ALLOWED.update(owned)
    try:
        yield sandbox
    finally:
        try:
            sandbox.poweroff()
        finally:
            procs.ALLOWED.difference_update(owned)
