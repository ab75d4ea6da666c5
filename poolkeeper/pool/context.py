"""What a job sees of poolkeeper: the `ctx` argument (`poolkeeper.RunContext`).

A RunContext only lives inside a worker process, for the duration of one run. It is built by
`poolkeeper.pool.worker` and handed to the job when the job's function declares a parameter named
ctx, first or as a keyword: the rule is `ctx_passing` and the call `with_ctx`, here once for the
worker that calls and for `poolkeeper check` (config/rules.py) that checks the call. Light on
purpose: the config package may import this module, and every worker does.
"""

from __future__ import annotations

import logging
import math
import select
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import inspect  # not at run time: kept off the start of the main process and of every worker

__all__ = ["CtxPassing", "RunContext", "Stopping", "ctx_passing", "with_ctx"]

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
        replica: in fleet mode, this loop replica's index (0, 1, ...); else None.
        fence: in fleet mode, the fencing token of this run (the slot's epoch for a loop
            replica, the fire's fence for a scheduled run), else None. It only grows: a job that
            writes somewhere shared can store it and refuse writes carrying an older one. The
            run's environment has it as POOLKEEPER_FENCE (and a replica's index as
            POOLKEEPER_REPLICA), for the programs the job starts.
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


CtxPassing = Literal["", "first", "keyword"]
"""How a job's callable is passed ctx: "" not at all, "first" as the first positional argument,
"keyword" as the keyword argument ctx=."""


def ctx_passing(signature: inspect.Signature) -> CtxPassing:
    """How a job's callable is passed `ctx`, from its signature. It gets ctx when it declares
    a parameter named ctx (not `*ctx` or `**ctx`): as the first positional argument when that
    is its first parameter and not keyword-only (`def tick(ctx, path)`, like a bound method's
    self), otherwise as a keyword (`def tick(path, ctx)`, `def tick(path, *, ctx)`)."""
    param = signature.parameters.get("ctx")
    if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        return ""
    first = next(iter(signature.parameters.values()))
    if first is param and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
        return "first"
    return "keyword"


def with_ctx(
    passing: CtxPassing, args: tuple[Any, ...], kwargs: Mapping[str, Any], ctx: Any
) -> tuple[tuple[Any, ...], Mapping[str, Any]]:
    """The positional and keyword arguments of the call to a callable that takes ctx the way
    `passing` says (the spec may not set a 'ctx' kwarg): fn(ctx, *args, **kwargs) or
    fn(*args, ctx=ctx, **kwargs)."""
    if passing == "first":
        return (ctx, *args), kwargs
    return args, {"ctx": ctx, **kwargs}
