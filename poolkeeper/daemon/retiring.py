"""The runs told to stop (`Retiring`): runs of a job that a reload removed or changed, or that
was paused by hand. Each saw ctx.stopping and has until its kill time to end; after that the
main loop kills it. Such a run is neither retried nor restarted, and a reloaded job's new
definition waits until its last retiring run has ended (poolkeeper.daemon.reload).

Held by the `Daemon` and used in its one thread: by the reloader and the pause handler (which
add runs), and by the main loop (which ends them, waits for their deadlines, kills them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from poolkeeper.daemon.jobs import JobRuntime
from poolkeeper.pool.supervisor import Task


class Retiring:
    """run id -> (the runtime of its job, the monotonic time it is killed at; `math.inf` once
    it has been killed and only its end is left to report)."""

    def __init__(self) -> None:
        self._runs: dict[str, tuple[JobRuntime, float]] = {}

    def add(self, job: JobRuntime, run_ids: Iterable[str], kill_at: float) -> None:
        """These runs of `job` were told to stop: kill them at `kill_at` if still running."""
        for run_id in run_ids:
            self._runs[run_id] = (job, kill_at)

    def pop(self, run_id: str) -> JobRuntime | None:
        """A run ended (or never started): its job's runtime if it was told to stop, else None."""
        entry = self._runs.pop(run_id, None)
        return entry[0] if entry is not None else None

    def due(self, now: float) -> list[Task]:
        """The tasks still running past their kill time, each returned once: killing them is
        the caller's, and their end is then the pool's to report."""
        overdue = []
        for run_id, (job, kill_at) in self._runs.items():
            if kill_at <= now:
                self._runs[run_id] = (job, math.inf)
                if run_id in job.running:
                    overdue.append(job.running[run_id])
        return overdue

    def next_deadline(self) -> float | None:
        """The earliest kill time still to come, or None."""
        return min((at for _, at in self._runs.values() if at < math.inf), default=None)

    def jobs_with_runs(self) -> set[str]:
        """Names of the jobs that still have a run told to stop."""
        return {job.name for job, _ in self._runs.values()}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def __len__(self) -> int:
        return len(self._runs)
