"""What a job leaves behind: processes that left the worker's process group.

A job's ordinary subprocesses share its worker's process group, which every kill of a worker
reaches. A process that starts a session of its own (`setsid`, `start_new_session=True`, a
daemon's double fork) leaves that group; under systemd the unit's cgroup still holds it, but
outside systemd nothing did. So:

- every worker is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): whatever a job starts
  stays below its worker however it detaches, and the worker kills all of it when it exits
  (kill_left_behind) or when the main process dies (from the watcher thread);
- the pool kills a worker's whole tree, not only its group, at a timeout and at the drain
  deadline (kill_tree);
- the main process is a child subreaper too: a worker that dies abruptly (SIGKILL, OOM)
  hands its descendants to the main process, which kills them (kill_orphans).

Processes are found by scanning /proc/*/stat (/proc/PID/task/TID/children needs
CONFIG_PROC_CHILDREN, which not every kernel has). A process is identified by its pid and start
time, and signalled through a pidfd opened after checking both, so a recycled pid is never hit.

What stays out of reach without a cgroup (docs/design.md, "Detached processes"): processes
started outside the tree (systemd-run, at, a D-Bus service), a process forked during a kill
after its last rescan (each kill freezes the tree with SIGSTOP and rescans until no new process
appears), and everything when the worker and the main process die at the same instant.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, NamedTuple, cast

if TYPE_CHECKING:
    from poolkeeper.pool.helper_processes import ForkServerState

log = logging.getLogger("poolkeeper.pool.reaper")

PR_SET_CHILD_SUBREAPER = 36
# A tree that keeps forking faster than we can freeze it: give up after this many rescans.
MAX_PASSES = 20
CMDLINE_MAX = 60
LISTED_MAX = 5  # processes named in one log line


class Proc(NamedTuple):
    pid: int
    ppid: int
    state: str  # 'R', 'S', 'T', 'Z'...
    start: int  # start time in clock ticks since boot: with the pid, names one process

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def become_subreaper() -> bool:
    """Make this process a child subreaper: orphans among its descendants are re-parented to
    it instead of to init. False if the kernel refused (the caller goes on without)."""
    import ctypes  # here: only worker and daemon start-up need it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc: int = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # ctypes' default restype: int
        return rc == 0
    except (OSError, AttributeError):
        return False


# -- finding processes ------------------------------------------------------------------------


def read_stat(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (in parentheses) may hold anything, ')' and spaces included: parse after the last ')'
    try:
        fields = raw[raw.rindex(b")") + 2 :].split()
        return Proc(pid, int(fields[1]), fields[0].decode(), int(fields[19]))
    except (ValueError, IndexError):  # not a stat line we know: leave that process alone
        return None


def scan() -> dict[int, Proc]:
    """Every process visible in /proc, by pid (none without /proc: nothing is found, and the
    kills that follow a scan, the process group's and the worker's own, still happen)."""
    procs: dict[int, Proc] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if name.isdigit():
            p = read_stat(int(name))
            if p is not None:
                procs[p.pid] = p
    return procs


def children(pid: int, procs: dict[int, Proc]) -> list[Proc]:
    return [p for p in procs.values() if p.ppid == pid]


def descendants(root: int, procs: dict[int, Proc]) -> list[Proc]:
    """Every process below `root`, parents before their children."""
    by_parent: dict[int, list[Proc]] = {}
    for p in procs.values():
        by_parent.setdefault(p.ppid, []).append(p)
    out: list[Proc] = []
    todo = [root]
    while todo:
        for child in by_parent.get(todo.pop(), ()):
            out.append(child)
            todo.append(child.pid)
    return out


def describe(pid: int) -> str:
    """A process for a log line, as pid 123 'sleep 301': its command line (or [comm])."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        if not cmd:
            with open(f"/proc/{pid}/comm", "rb") as f:
                cmd = "[" + f.read().decode("utf-8", "replace").strip() + "]"
    except OSError:
        cmd = "?"
    cmd = cmd if len(cmd) <= CMDLINE_MAX else cmd[: CMDLINE_MAX - 3] + "..."
    # repr() escapes control characters: a job chooses its command lines
    return f"pid {pid} {cmd!r}"


# -- killing ----------------------------------------------------------------------------------


def _signal(p: Proc, sig: int) -> bool:
    """Send `sig` to the process `p` names, never to a later process that reuses its pid."""
    try:
        fd = os.pidfd_open(p.pid)
    except OSError:
        return False
    try:
        now = read_stat(p.pid)
        if now is None or now.start != p.start:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kill_tree(root: int) -> list[tuple[Proc, str]]:
    """SIGKILL every process below `root`, and `root` itself unless it is this process.

    The tree is frozen first (SIGSTOP, root first, then every descendant found, rescanning
    until a scan finds nothing new), so nothing in it can fork a process we would miss or
    die and hand its children to someone else while we kill. Returns the descendants killed
    (root not included), each with its description for a log line."""
    me = os.getpid()
    frozen: dict[tuple[int, int], tuple[Proc, str]] = {}
    tried: set[tuple[int, int]] = set()  # gone, or not ours to signal (EPERM): once is enough
    root_proc = None
    for _ in range(MAX_PASSES):
        procs = scan()
        if root != me and root_proc is None:
            root_proc = procs.get(root)
            if root_proc is not None and not _signal(root_proc, signal.SIGSTOP):
                root_proc = None
        new = [p for p in descendants(root, procs) if p.state != "Z" and p.key not in tried]
        if not new:
            break
        for p in new:
            tried.add(p.key)
            if _signal(p, signal.SIGSTOP):
                frozen[p.key] = (p, describe(p.pid))
    for p, _ in frozen.values():
        _signal(p, signal.SIGKILL)
    if root_proc is not None:
        _signal(root_proc, signal.SIGKILL)
    return list(frozen.values())


def log_killed(named: list[str], whose: str) -> None:
    """One warning for processes killed: 'killed 2 processes left by job x: pid 1 ...'."""
    if not named:
        return
    listed = ", ".join(named[:LISTED_MAX])
    if len(named) > LISTED_MAX:
        listed += f" and {len(named) - LISTED_MAX} more"
    noun = "process" if len(named) == 1 else "processes"
    log.warning("killed %d %s %s: %s", len(named), noun, whose, listed)


def kill_below(pid: int, whose: str) -> None:
    """The pool's kill of a worker: its whole tree (the worker too), logged as `whose`."""
    log_killed([text for _, text in kill_tree(pid)], whose)


# -- what this process may wait for ---------------------------------------------------------


def _mp_children() -> dict[int, str]:
    """multiprocessing.Process objects of this process: pid -> start method."""
    import multiprocessing.process

    out = {}
    # typeshed omits this private set of the Process objects not yet joined
    for proc in list(multiprocessing.process._children):  # type: ignore[attr-defined]
        popen = getattr(proc, "_popen", None)
        if popen is not None:
            out[popen.pid] = getattr(popen, "method", "")
    return out


def own_helpers() -> set[int]:
    """Children of this process that multiprocessing waits for itself: its fork and spawn
    Process objects (a forkserver's children are waited for by the forkserver), the forkserver
    and the resource tracker."""
    from multiprocessing import forkserver, resource_tracker

    pids = {pid for pid, method in _mp_children().items() if method != "forkserver"}
    # cast: typeshed omits ForkServer's private attributes (see helper_processes.ForkServerState)
    pids.add(cast("ForkServerState", forkserver._forkserver)._forkserver_pid or 0)
    pids.add(getattr(resource_tracker._resource_tracker, "_pid", None) or 0)
    return pids


def _popen_pids() -> set[int]:
    """Pids of subprocess.Popen objects not yet waited for (a walk of the heap: only called
    when there is a dead child to decide about)."""
    import subprocess

    popen = subprocess.Popen
    # type(), not isinstance(): a job's proxy objects may raise from __class__
    found = [obj for obj in gc.get_objects() if issubclass(type(obj), popen)]
    return {obj.pid for obj in found if obj.returncode is None}


def _reap(pids: Iterable[int]) -> None:
    """waitpid() these children only, never -1: other exits belong to their waiters."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def kill_orphans(keep: Collection[int] = ()) -> None:
    """In the main process: kill whatever it inherited as a subreaper, i.e. every child that
    is neither a worker nor a multiprocessing helper (nor in `keep`), with everything below
    it, and reap those already dead. Such a child is a job's process whose worker died
    before it could kill it."""
    me = os.getpid()
    waited = own_helpers() | set(keep)
    # A forkserver's worker becomes our child if the forkserver dies: the pool still owns it
    # (never killed here), but nobody else will reap it.
    workers = set(_mp_children())
    inherited = [p for p in children(me, scan()) if p.pid not in waited]
    named: list[str] = []
    for p in inherited:
        if p.state != "Z" and p.pid not in workers:
            named.append(describe(p.pid))
            named += [text for _, text in kill_tree(p.pid)]
    _reap(p.pid for p in inherited)
    log_killed(named, "left by a job whose worker died first")


# -- in the worker ------------------------------------------------------------------------------


class _Left:
    """The worker's record of which job started each process below it."""

    by: dict[tuple[int, int], str] = {}
    last_job = ""


def after_run(job: str) -> None:
    """In a worker, between runs: note which job the processes below us belong to, and reap
    the dead orphans that were re-parented to us (a subreaper must, or they stay zombies for
    the worker's life). A dead child that a subprocess.Popen or multiprocessing object still
    holds is left to it: the job's own wait() must see its exit status."""
    _Left.last_job = job
    try:  # the common case costs one system call: no child at all
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        _Left.by.clear()
        return
    me = os.getpid()
    below = descendants(me, scan())
    alive = {p.key for p in below}
    _Left.by = {key: j for key, j in _Left.by.items() if key in alive}
    for p in below:
        _Left.by.setdefault(p.key, job)
    dead = [p.pid for p in below if p.ppid == me and p.state == "Z"]
    if dead:
        held = own_helpers() | _popen_pids()
        _reap(pid for pid in dead if pid not in held)


def kill_left_behind() -> None:
    """In a worker about to exit: kill every process below it, naming the job that left it."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return
    by_job: dict[str, list[str]] = {}
    for p, text in kill_tree(os.getpid()):
        by_job.setdefault(_Left.by.get(p.key, _Left.last_job), []).append(text)
    for job, named in by_job.items():
        log_killed(named, f"left by job {job}" if job else "left by a job")
