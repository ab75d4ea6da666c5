"""What a job sees of poolkeeper: the `ctx` argument (`poolkeeper.RunContext`).

A RunContext only lives inside a worker process, for the duration of one run. It is built by
`poolkeeper.pool.worker` and handed to the job as the `ctx` keyword when the job's function declares
a parameter of that name: the rule is `accepts_ctx` and the call `with_ctx`, here once for the
worker that calls and for `poolkeeper check` (config/rules.py) that checks the call. Light on
purpose: the config package may import this module, and every worker does.
"""

from __future__ import annotations

import logging
import math
import select
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import inspect  # not at run time: kept off the start of the main process and of every worker

__all__ = ["RunContext", "Stopping", "accepts_ctx", "with_ctx"]

_MAX_POLL_MS = 2**31 - 1  # poll(2)'s timeout is a C int


class Stopping:
    """`ctx.stopping`: set when the daemon drains, or when a reload changes or removes the
    run's job. Read it like a `threading.Event`: `is_set()`, `wait(timeout) -> bool`; only the
    daemon sets it, and it is never cleared.

    Underneath is the read end of a pipe of the worker's own, into which the main process
    writes one byte; nobody reads it, so once readable it stays readable. A pipe per worker
    (rather than one multiprocessing.Event for the pool) lets the daemon stop one run
    without touching the others, and leaves no named semaphores behind a SIGKILL."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def is_set(self) -> bool:
        return self._poll(0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or `timeout` seconds have passed; return whether it is set."""
        if timeout is None or timeout == math.inf:
            return self._poll(-1)
        # poll() takes an int of milliseconds: a longer wait (a day, a year) goes in slices.
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            ms = math.ceil((deadline - time.monotonic()) * 1000)
            if self._poll(max(0, min(ms, _MAX_POLL_MS))):
                return True
            if ms <= _MAX_POLL_MS:
                return False

    def _poll(self, ms: int) -> bool:
        # A poll object per call: one shared by a job's threads would refuse concurrent use.
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(ms))

    def __repr__(self) -> str:
        return f"<Stopping {'set' if self.is_set() else 'unset'}>"


class RunContext:
    """The job's handle on its run.

    Attributes:
        job: the job's name in the spec.
        run_id: unique id of this run (the daemon's).
        attempt: 1 for the first try, 2 for the first retry, ...
        scheduled_at: when the run was due (epoch seconds).
        log: a logger for the job; records logged while the run is active (through this logger
            or any other) carry the journal fields JOB, RUN_ID, ATTEMPT and WORKER_PID.
        stopping: set when the daemon drains, or a reload changes or removes this job
            (`is_set()`, `wait(timeout) -> bool`; see `Stopping`). A loop job checks it
            between units of work and returns when it is set.
        replica: this loop replica's index (0, 1, ...); None for a scheduled run.
        fence: in fleet mode, the fencing token of this run (the slot's epoch for a loop
            replica, the fire's fence for a scheduled run), else None. It only grows: a job that
            writes somewhere shared can store it and refuse writes carrying an older one. The
            run's environment has it as POOLKEEPER_FENCE (and POOLKEEPER_REPLICA), for the
            programs the job starts (POOLKEEPER_REPLICA only in fleet mode).
    """

    __slots__ = (
        "job", "run_id", "attempt", "scheduled_at", "log", "stopping", "replica", "fence",
        "_heartbeat",
    )  # fmt: skip

    def __init__(
        self,
        *,
        job: str,
        run_id: str,
        attempt: int,
        scheduled_at: float,
        log: logging.Logger | logging.LoggerAdapter[Any],
        stopping: Stopping,
        heartbeat: Callable[[], None],
        replica: int | None = None,
        fence: int | None = None,
    ) -> None:
        self.job = job
        self.run_id = run_id
        self.attempt = attempt
        self.scheduled_at = scheduled_at
        self.log = log
        self.stopping = stopping
        self.replica = replica
        self.fence = fence
        self._heartbeat = heartbeat

    def heartbeat(self) -> None:
        """Tell the daemon this run is alive. Cheap: call it as often as you like; the worker
        forwards at most a few per second. Required for jobs with `heartbeat_timeout`."""
        self._heartbeat()

    def __repr__(self) -> str:
        return (
            f"RunContext(job={self.job!r}, run_id={self.run_id!r}, attempt={self.attempt}, "
            f"scheduled_at={self.scheduled_at}, replica={self.replica}, fence={self.fence})"
        )


def accepts_ctx(signature: inspect.Signature) -> bool:
    """Whether a job's callable is passed `ctx`: it declares a parameter named ctx (positional
    or keyword, but not `*ctx` or `**ctx`)."""
    param = signature.parameters.get("ctx")
    return param is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)


def with_ctx(kwargs: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
    """The keyword arguments of a call to a callable that accepts ctx: the call is always
    fn(*args, ctx=ctx, **kwargs), ctx passed as a keyword (the spec may not set a 'ctx' kwarg)."""
    return {"ctx": ctx, **kwargs}
