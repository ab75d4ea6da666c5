"""Process bookkeeping for the test suite: every process a test starts must be gone after it.

The pytest process makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so any
orphan a test leaves behind (a worker whose daemon was killed, a job's grandchild) is
re-parented to pytest instead of init, and shows up as one of its children.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36

# Entries a test session made itself are newer than this (see systemd/sandbox.py HostGuard).
SESSION_STARTED = time.time()

# Every start method the pool supports (the spec's `pool.start_method`): what the tests that
# hold for all of them are parametrized over.
START_METHODS = ["fork", "forkserver", "spawn"]

# Long-lived processes that a session-scoped fixture owns (the systemd sandbox) are
# registered here and not counted as leaks.
ALLOWED: set[int] = set()


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, state) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, int(fields[1]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


def children(of: int | None = None) -> dict[int, str]:
    """Live (non-zombie) children of `of` (default: this process), pid -> command line."""
    parent = os.getpid() if of is None else of
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st and st[1] == parent and st[2] != "Z":
            found[int(name)] = _cmdline(int(name)) or st[0]
    return found


def reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftovers(grace: float = 5.0) -> dict[int, str]:
    """Children still alive after `grace` seconds (polled, returns as soon as none are left)."""
    deadline = time.monotonic() + grace
    while True:
        reap_zombies()
        left = {p: c for p, c in children().items() if p not in ALLOWED}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p in children() for p in pids):
        reap_zombies()
        time.sleep(0.01)
    reap_zombies()
