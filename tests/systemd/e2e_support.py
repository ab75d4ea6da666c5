"""Shared set-up of the end-to-end tests: the shipped units, as `poolkeeper unit` renders them
for this checkout's virtualenv, running real daemons in the sandbox.

Each test runs its own instance of the template (`poolkeeper@NAME.service`: config
/etc/poolkeeper/NAME.yaml, state /var/lib/poolkeeper/NAME, runtime dir /run/poolkeeper/NAME),
so tests do not share state. A drop-in per instance holds what the test tunes (a short
WatchdogSec=, ...) plus what this machine needs (see `environment_dropin`).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sandbox import Sandbox

import poolkeeper
from poolkeeper.service import unit as units

JOBS_DIR = "/srv/pk-e2e"  # e2e_jobs.py is copied here: readable by the unit's user anywhere
JOBS_SOURCE = Path(__file__).with_name("e2e_jobs.py")
# This checkout's poolkeeper, at the same path inside the sandbox (never hard-coded: CI runs a
# fresh clone elsewhere).
COMMAND = units.installed_command()
# Runs the interpreter of this checkout inside the sandbox (as root, outside any unit).
PYTHON = sys.executable

_PREPARED_ATTR = "_poolkeeper_e2e_prepared"


def _host_paths_needed() -> list[Path]:
    """What the unit's user must reach: the executable, the venv, the real interpreter."""
    paths = {Path(COMMAND[0]), Path(sys.prefix), Path(os.path.realpath(sys.executable))}
    paths.add(Path(sys.base_prefix))
    return sorted(paths)


def environment_dropin() -> str:
    """What this machine needs beyond the shipped unit, and nothing else: an interpreter under
    /root or /home (pyenv, a home venv) is hidden by ProtectHome=yes; a checkout under /tmp
    (CI's clone) is hidden by PrivateTmp=yes, so it is bound into the unit's private /tmp."""
    paths = [str(p) for p in _host_paths_needed()]
    lines = []
    if any(p.startswith(("/root", "/home", "/run/user")) for p in paths):
        lines.append("ProtectHome=read-only")
    # The package itself too: an editable install imports it from the checkout.
    paths.append(str(Path(poolkeeper.__file__).resolve().parent.parent))
    in_tmp = sorted(p for p in paths if p.startswith(("/tmp/", "/var/tmp/")))
    # Only the outermost paths: a bind inside another bind is redundant.
    in_tmp = [p for p in in_tmp if not any(p.startswith(q + "/") for q in in_tmp)]
    if in_tmp:
        lines.append("BindReadOnlyPaths=" + " ".join(in_tmp))
    return "".join(line + "\n" for line in lines)


def prepare(sb: Sandbox) -> None:
    """Once per sandbox: the poolkeeper user from the shipped sysusers.d file, the jobs module,
    directories the unit's user can traverse (only in the sandbox's overlay)."""
    if getattr(sb, _PREPARED_ATTR, False):
        return
    sb.write_file("/usr/lib/sysusers.d/poolkeeper.conf", units.SYSUSERS)
    sb.run("systemd-sysusers", "/usr/lib/sysusers.d/poolkeeper.conf")
    sb.write_file("/usr/lib/tmpfiles.d/poolkeeper.conf", units.TMPFILES)
    sb.run("systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/poolkeeper.conf")
    sb.write_file(f"{JOBS_DIR}/e2e_jobs.py", JOBS_SOURCE.read_text())
    for path in _host_paths_needed():
        for parent in [path, *path.parents]:
            try:
                mode = parent.stat().st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                # e.g. /root (0700) holding pyenv: the sandbox's overlay copy only.
                sb.run("chmod", "o+x", str(parent))
    setattr(sb, _PREPARED_ATTR, True)


def shared_dir(sb: Sandbox, path: str) -> str:
    """A directory the unit's user writes and the test reads (list it in ReadWritePaths=)."""
    prepare(sb)
    sb.run("mkdir", "-p", path)
    sb.run("chown", "poolkeeper:poolkeeper", path)
    return path


def instance_unit(name: str) -> str:
    return f"poolkeeper@{name}.service"


def install_instance(
    sb: Sandbox, name: str, config: str, dropin: str = "", *, template: str | None = None
) -> str:
    """Write /etc/poolkeeper/NAME.yaml and the template (rendered for this checkout) plus a
    drop-in for poolkeeper@NAME; returns the unit name."""
    prepare(sb)
    sb.write_file(f"/etc/poolkeeper/{name}.yaml", textwrap.dedent(config))
    sb.write_file(
        "/etc/systemd/system/poolkeeper@.service",
        template or units.render(units.TEMPLATE, COMMAND),
    )
    unit = instance_unit(name)
    sb.write_file(
        f"/etc/systemd/system/{unit}.d/e2e.conf",
        # No start limit: tests and benchmarks start the same unit many times in a row.
        "[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
        + environment_dropin()
        + textwrap.dedent(dropin),
    )
    sb.systemctl("daemon-reload")
    return unit


def config(jobs: str, *, workers: int = 2, drain: str = "5s", extra: str = "") -> str:
    """A job spec whose jobs come from e2e_jobs; state in $STATE_DIRECTORY."""
    body = textwrap.indent(textwrap.dedent(jobs).strip("\n"), "  ")
    return (
        f"version: 1\npythonpath: [{JOBS_DIR}]\n"
        f"pool: {{workers: {workers}, start_method: forkserver}}\n"
        f"shutdown: {{drain_timeout: {drain}}}\n{extra}jobs:\n{body}\n"
    )


def keep_loaded(sb: Sandbox, unit: str) -> None:
    """systemd unloads an inactive unit nobody references, and with it Result= and the
    timestamps of its last run; an active target ordered after it keeps it loaded."""
    holder = _holder(unit)
    sb.install_unit(holder, f"[Unit]\nAfter={unit}\n")
    sb.systemctl("start", holder)


def _holder(unit: str) -> str:
    return "e2e-hold-" + unit.replace("@", "-").removesuffix(".service") + ".target"


def cleanup(sb: Sandbox, *unit_names: str) -> None:
    """Every test ends with its units stopped and forgotten (no failed state left behind)."""
    for name in unit_names:
        sb.systemctl("stop", name, _holder(name), check=False, timeout=60)
        sb.systemctl("reset-failed", name, check=False)


@contextmanager
def running(sb: Sandbox, *unit_names: str) -> Iterator[None]:
    try:
        yield
    finally:
        cleanup(sb, *unit_names)


def props(sb: Sandbox, unit: str, *names: str) -> dict[str, str]:
    return sb.show(unit, *names)


def journal_messages(sb: Sandbox, *args: str) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in sb.journal(*args)]


def wait_journal(sb: Sandbox, text: str, *args: str, timeout: float = 10) -> list[dict[str, Any]]:
    """Entries (of `args`' selection) whose MESSAGE contains `text`; waits for the first."""

    def found() -> list[dict[str, Any]]:
        return [e for e in sb.journal(*args) if text in _message(e)]

    return sb.wait_for(found, timeout, f"a journal entry containing {text!r} ({args})")


def _message(entry: dict[str, Any]) -> str:
    msg = entry.get("MESSAGE", "")
    if isinstance(msg, list):  # journalctl -o json gives non-UTF-8 messages as byte lists
        return bytes(msg).decode("utf-8", "replace")
    return str(msg)


def state_runs(sb: Sandbox, db: str) -> list[dict[str, Any]]:
    """Every run of a state DB inside the sandbox, oldest first (read there, as root, through
    the StateStore protocol)."""
    code = (
        "import json, sys\n"
        "from poolkeeper.state.identity import store_at\n"
        "store = store_at(sys.argv[1], readonly=True)\n"
        "print(json.dumps([r._asdict() for r in reversed(store.history(limit=None))]))\n"
    )
    out = sb.run(PYTHON, "-c", code, db).stdout
    return json.loads(out)


def monotonic_usec(sb: Sandbox, unit: str, prop: str) -> int:
    return int(sb.show(unit, prop)[prop])


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started
