"""multiprocessing's helper processes: the forkserver and the resource tracker.

Both are process-wide singletons of multiprocessing. A pool that starts one stops it when it
closes and no other open pool still needs it. The daemon also starts the forkserver before
any pool exists (prestart.py, cli.py), as a fork of its still single-threaded main process
rather than a new interpreter (_fork_forkserver). This module does not import
poolkeeper.pool.supervisor: a validating start forks the forkserver before it has imported the pool.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import connection, forkserver, resource_tracker, util
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

from poolkeeper import signals

if TYPE_CHECKING:
    from contextlib import AbstractContextManager


class ForkServerState(Protocol):
    """The private attributes of multiprocessing.forkserver.ForkServer this package reads and
    writes (typeshed declares none of them); see forkserver_state()."""

    _lock: AbstractContextManager[Any]
    _forkserver_address: str | None
    _forkserver_alive_fd: int | None
    _forkserver_pid: int | None


class ResourceTrackerState(Protocol):
    """The private attributes of multiprocessing.resource_tracker.ResourceTracker this module
    uses (typeshed declares none of them); see _tracker_state()."""

    _lock: AbstractContextManager[Any]
    _fd: int | None
    _pid: int | None


def forkserver_state() -> ForkServerState:
    """multiprocessing's forkserver singleton, typed by the private attributes we use: the
    cast holds as CPython's ForkServer.__init__ sets all four."""
    return cast(ForkServerState, forkserver._forkserver)


def _tracker_state() -> ResourceTrackerState:
    """multiprocessing's resource tracker singleton, typed likewise: the cast holds as
    CPython's ResourceTracker.__init__ sets all three."""
    return cast(ResourceTrackerState, resource_tracker._resource_tracker)


# poolkeeper.pool.supervisor.WorkerPool objects
open_pools: weakref.WeakSet[Any] = weakref.WeakSet()
_started_by_us = {"forkserver": False, "resource_tracker": False}
log = logging.getLogger("poolkeeper.pool.supervisor")

# A helper asked to stop (its pipe closed) gets this long before it is killed: a process a
# job forked without exec inherits the resource tracker's pipe, and the tracker only exits
# when every copy is closed.
HELPER_STOP_GRACE = 5.0

# Who can list the descriptors that belong to the main process alone (the state lock and
# DB, the control socket, the signal pipe, the notify socket). A worker started by fork
# closes them first thing (WorkerConfig.close_fds): close-on-exec does nothing for a fork
# without exec, and a job's forked helper that outlived a SIGKILLed daemon held its lock,
# so that the restart exited 75.
_main_only_sources: list[Callable[[], Iterable[int]]] = []


def add_main_only_fds(source: Callable[[], Iterable[int]]) -> None:
    _main_only_sources.append(source)


def remove_main_only_fds(source: Callable[[], Iterable[int]]) -> None:
    with contextlib.suppress(ValueError):
        _main_only_sources.remove(source)


def main_only_fds() -> set[int]:
    """The descriptors of the main process that no worker may keep (see above)."""
    return {fd for source in _main_only_sources for fd in source()}


# What every worker needs from poolkeeper: the worker itself, the logging every worker sets
# up (python-systemd's journal where installed; a module that fails to import is skipped), and
# what unpickling a worker's Process object imports.
OWN_PRELOAD = (
    "poolkeeper.pool.worker",
    "poolkeeper.service.logs",
    "systemd.journal",
    "multiprocessing.popen_forkserver",
)


def forkserver_preload(preload: Sequence[str]) -> list[str]:
    """What the forkserver imports once, before forking any worker: OWN_PRELOAD, then the
    spec's preload. (Not `inspect`, which a worker imports for its first run: in the
    forkserver it would delay every worker's start, and READY=1, by its import.)"""
    return [*OWN_PRELOAD, *preload]


def import_own_preload() -> None:
    """Import OWN_PRELOAD here, so that a forkserver forked afterwards (prestart_forkserver)
    inherits it instead of importing it itself."""
    for module in OWN_PRELOAD:
        with contextlib.suppress(ImportError):  # as the forkserver does: python-systemd is optional
            importlib.import_module(module)


def forkserver_running() -> bool:
    return forkserver_state()._forkserver_pid is not None


def note_new_pool(start_method: str) -> None:
    """Before a pool creates anything: remember which helpers it is about to start."""
    if start_method == "fork":
        return  # fork pools need neither
    if not forkserver_running() and start_method == "forkserver":
        if not any(p.start_method == "forkserver" for p in open_pools):
            _started_by_us["forkserver"] = True
    if _tracker_state()._fd is None and not open_pools:
        _started_by_us["resource_tracker"] = True


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if it is not running) with every signal the
    main process survives blocked: it is a stdlib program we cannot change, it ignores only
    SIGINT and SIGTERM, and `systemctl kill -s SIGUSR1` (say) reaches it too. The blocked
    mask survives its execve; its death would make every later start of a worker warn."""
    with signals.blocked(signals.caught()):
        resource_tracker.ensure_running()


def start_spawned_forkserver() -> None:
    """multiprocessing's own forkserver (a new interpreter), shielded like the resource
    tracker; the workers it forks empty their mask (poolkeeper.pool.worker). Does nothing if a
    forkserver runs."""
    with signals.blocked(signals.caught()):
        forkserver.ensure_running()  # starts the resource tracker first


def start_helpers(start_method: str) -> None:
    """WorkerPool.start(): the helpers a pool of `start_method` needs, started now and shielded from
    signals, rather than by multiprocessing at the first worker's start."""
    if start_method == "forkserver":
        start_spawned_forkserver()
    elif start_method == "spawn":
        start_resource_tracker()


def stop_if_unused() -> None:
    if open_pools:
        return
    if _started_by_us["forkserver"]:
        _started_by_us["forkserver"] = False
        _stop_forkserver()
    if _started_by_us["resource_tracker"]:
        _started_by_us["resource_tracker"] = False
        _stop_resource_tracker()


def _stop_forkserver() -> None:
    """ForkServer._stop(), except that the wait for its exit has a deadline."""
    server = forkserver_state()
    with server._lock:
        if server._forkserver_pid is None:
            return
        alive_fd, server._forkserver_alive_fd = server._forkserver_alive_fd, None
        assert alive_fd is not None  # set and cleared together with _forkserver_pid
        _stop_helper("forkserver", server._forkserver_pid, alive_fd)
        server._forkserver_pid = None
        _unlink_forkserver_address(server)


def _stop_resource_tracker() -> None:
    """ResourceTracker._stop(), except that the wait for its exit has a deadline."""
    tracker = _tracker_state()
    with tracker._lock:
        if tracker._fd is None:
            return
        fd, tracker._fd = tracker._fd, None
        assert tracker._pid is not None  # ensure_running() sets _fd and _pid together
        _stop_helper("resource tracker", tracker._pid, fd)
        tracker._pid = None


def _stop_helper(name: str, pid: int, pipe_fd: int) -> None:
    """Close our end of the helper's pipe (it exits at EOF) and reap it; SIGKILL it if it is
    still there after HELPER_STOP_GRACE: stopping must not hang on whoever else holds the
    pipe."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None
    os.close(pipe_fd)
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(HELPER_STOP_GRACE * 1000):
                log.warning(
                    "the %s (pid %d) did not exit within %gs of being asked to (a process a "
                    "job forked still holds its pipe?): killed it",
                    name, pid, HELPER_STOP_GRACE,
                )  # fmt: skip
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _unlink_forkserver_address(server: ForkServerState) -> None:
    address, server._forkserver_address = server._forkserver_address, None
    if address is not None and not util.is_abstract_socket_namespace(address):
        with contextlib.suppress(OSError):
            os.unlink(address)


def forkserver_pid() -> int | None:
    return forkserver_state()._forkserver_pid


def forget_dead_forkserver(pid: int) -> str | None:
    """The forkserver `pid` has exited (its pidfd said so; a job may have killed it, say):
    reap it and forget it, so that the next worker starts a new one (as
    ForkServer.ensure_running() does when it finds its server dead). Returns how it ended,
    or None if it is not the current forkserver (another pool forgot it already)."""
    server = forkserver_state()
    with server._lock:
        if server._forkserver_pid != pid:
            return None
        alive_fd = server._forkserver_alive_fd
        assert alive_fd is not None  # set and cleared together with _forkserver_pid
        try:
            _, status = os.waitpid(pid, 0)  # exited already: this does not block
            how = _describe_status(status)
        except ChildProcessError:
            how = "exit status unknown"
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        server._forkserver_alive_fd = None
        server._forkserver_pid = None
        _unlink_forkserver_address(server)
    return how


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def prestart_forkserver(preload: Sequence[str]) -> None:
    """Boot the forkserver now (preloading `preload`), ahead of any WorkerPool. A later
    WorkerPool.start() finds it running; the last WorkerPool.close() (or stop_prestarted())
    stops it."""
    if forkserver_running():
        return
    tracker_was_running = _tracker_state()._fd is not None
    modules = forkserver_preload(preload)
    multiprocessing.get_context("forkserver").set_forkserver_preload(modules)
    if threading.active_count() == 1:
        _fork_forkserver(modules)
    else:  # a fork would copy locks other threads hold: start a new interpreter
        start_spawned_forkserver()
    _started_by_us["forkserver"] = True
    if not tracker_was_running:
        _started_by_us["resource_tracker"] = True


def _fork_forkserver(preload: list[str]) -> None:
    """multiprocessing's ForkServer.ensure_running(), except that the forkserver is a fork of
    this process instead of a new interpreter running `forkserver.main`.

    This process is still young and single-threaded here (prestart_forkserver checks the
    thread count; the daemon calls it before it opens its state DB or starts any pool),
    so the fork is as clean a parent for workers as a new interpreter, and it is ready sooner:
    it skips the interpreter start and inherits the imports done so far (multiprocessing,
    logging, ...), which is most of a forkserver's ~100 ms of boot on a small machine. The
    child then runs the very same `forkserver.main` a spawned forkserver runs."""
    server = forkserver_state()
    with server._lock:
        start_resource_tracker()
        with socket.socket(socket.AF_UNIX) as listener:
            # typeshed omits this undocumented helper (ForkServer.ensure_running() calls it)
            address: str = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            # Every client holds the write end of the "alive" pipe; the forkserver exits when
            # the read end reaches EOF, i.e. when this process (and its workers) are gone.
            alive_r, alive_w = os.pipe()
            try:
                pid = os.fork()
                if pid == 0:
                    _run_forked_forkserver(alive_w, listener.fileno(), alive_r, preload)
            except BaseException:
                os.close(alive_w)
                raise
            finally:
                os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid


def _run_forked_forkserver(
    alive_w: int, listener_fd: int, alive_r: int, preload: list[str]
) -> NoReturn:
    code = 0
    try:
        # Other descriptors stay open, as under the fork start method: libraries cache theirs
        # (libsystemd its journal socket) and would write to whatever reused a closed number.
        # Only our end of the "alive" pipe must go, or the forkserver would never see EOF.
        os.close(alive_w)
        # `systemctl kill -s SIG` reaches us too: survive what the main process survives
        # (poolkeeper.signals). SIG_IGN is safe here, this process never execs; every worker
        # it forks sets its own dispositions first thing.
        for sig in signals.caught():
            signal.signal(sig, signal.SIG_IGN)
        forkserver.main(listener_fd, alive_r, preload, sys_path=list(sys.path))
    except SystemExit:  # how forkserver.main ends: its clients are gone
        pass
    except BaseException:  # noqa: B036 - leave no Python frame of the parent running here
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def stop_prestarted() -> None:
    """Stop a forkserver that prestart_forkserver() started, when no pool will use it."""
    stop_if_unused()
