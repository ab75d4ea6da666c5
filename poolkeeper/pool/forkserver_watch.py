"""The forkserver a pool's workers come from, watched through a pidfd by the supervisor
(poolkeeper.pool.supervisor). A job can kill it (SIGTERM to its parent), and the exit status of
every worker it started is lost with it: a worker's exit then reads as code 255, which the
supervisor must not take for the worker's own.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable

from poolkeeper.pool import helper_processes

log = logging.getLogger("poolkeeper.pool.supervisor")


class ForkserverWatch:
    """Which forkserver started our workers, and which ones died. `watch(fd)` / `unwatch(fd)`
    put its pidfd in the supervisor's epoll (readable: it died, call died()); `alive(pid)` is
    how many live workers that forkserver started."""

    def __init__(
        self,
        watch: Callable[[int], None],
        unwatch: Callable[[int], None],
        alive: Callable[[int], int],
    ) -> None:
        self._watch = watch
        self._unwatch = unwatch
        self._alive = alive
        self._forkserver_pid: int | None = None
        self._forkserver_pidfd: int | None = None
        self._dead_forkservers: set[int] = set()

    def follow(self) -> int | None:
        """Watch the forkserver that started our latest worker (a new one after a death)."""
        pid = helper_processes.forkserver_pid()
        if pid is not None and pid != self._forkserver_pid:
            # A new one: multiprocessing found the old one dead before its pidfd told us.
            self.is_dead(self._forkserver_pid)
            self.stop()
            try:
                self._forkserver_pidfd = os.pidfd_open(pid)
            except ProcessLookupError:  # dead already: its workers' deaths will say so
                self._dead_forkservers.add(pid)
                return pid
            self._forkserver_pid = pid
            self._watch(self._forkserver_pidfd)
        return pid

    def stop(self) -> None:
        if self._forkserver_pidfd is not None:
            self._unwatch(self._forkserver_pidfd)
            os.close(self._forkserver_pidfd)
            self._forkserver_pidfd = self._forkserver_pid = None

    def died(self) -> None:
        pid = self._forkserver_pid
        self.stop()
        if pid is None:
            return
        self._dead_forkservers.add(pid)
        how = helper_processes.forget_dead_forkserver(pid) or "reaped elsewhere"
        alive = self._alive(pid)
        workers = f"{alive} worker runs" if alive == 1 else f"{alive} workers run"
        log.error(
            "the forkserver (pid %d) died (%s), killed by a job or by hand? Its %s on, "
            "but their exit status is lost with it; new workers come from a new forkserver",
            pid, how, workers,
        )  # fmt: skip

    def is_dead(self, pid: int | None) -> bool:
        if pid is None:
            return False
        if pid == self._forkserver_pid:
            assert self._forkserver_pidfd is not None  # follow() and stop() set both, or neither
            if select.select([self._forkserver_pidfd], [], [], 0)[0]:
                self.died()  # it died just now; its pidfd is not in yet
        return pid in self._dead_forkservers
