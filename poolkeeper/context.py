"""What a job sees of poolkeeper: the `ctx` argument (`poolkeeper.RunContext`).

A RunContext only lives inside a worker process, for the duration of one run. It is built by
`poolkeeper.worker` and handed to the job as the `ctx` keyword when the job's function declares
a parameter of that name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["RunContext"]


class RunContext:
    """The job's handle on its run.

    Attributes:
        job: the job's name in the spec.
        run_id: unique id of this run (the daemon's).
        attempt: 1 for the first try, 2 for the first retry, ...
        scheduled_at: when the run was due (epoch seconds).
        log: a logger for the job; records logged while the run is active (through this logger
            or any other) carry the journal fields JOB, RUN_ID, ATTEMPT and WORKER_PID.
        stopping: the drain event (`is_set()`, `wait(timeout) -> bool`). A loop job checks it
            between units of work and returns when it is set.
    """

    __slots__ = ("job", "run_id", "attempt", "scheduled_at", "log", "stopping", "_heartbeat")

    def __init__(
        self,
        *,
        job: str,
        run_id: str,
        attempt: int,
        scheduled_at: float,
        log: logging.Logger | logging.LoggerAdapter,
        stopping: Any,
        heartbeat: Callable[[], None],
    ) -> None:
        self.job = job
        self.run_id = run_id
        self.attempt = attempt
        self.scheduled_at = scheduled_at
        self.log = log
        self.stopping = stopping
        self._heartbeat = heartbeat

    def heartbeat(self) -> None:
        """Tell the daemon this run is alive. Cheap: call it as often as you like; the worker
        forwards at most a few per second. Required for jobs with `heartbeat_timeout`."""
        self._heartbeat()

    def __repr__(self) -> str:
        return (
            f"RunContext(job={self.job!r}, run_id={self.run_id!r}, attempt={self.attempt}, "
            f"scheduled_at={self.scheduled_at})"
        )
