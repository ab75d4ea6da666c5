"""The contract between the daemon (and the readers `status` and `history`) and whatever keeps
the run history: the `StateStore` protocol. `sqlite.py` is its first backend; a second one
(PostgreSQL, for fleet mode) implements the same promises and runs the same contract tests
(tests/test_state_contract.py). Get a store from `poolkeeper.state.identity.open_store`, never
from a backend's class.

A store is opened by the factory, either by the daemon (a writer) or by a reader
(`readonly=True`). What every store promises:

Writes (the daemon's hot path: called for every run, never slow, never raise for I/O)
    run_started(...)      records a run as 'running'. Buffered: it may reach the storage later.
    run_ended(...)        records its outcome (an end with no start is recorded all the same;
                          fields the end doesn't know, None, keep the start's values). Buffered.
                          Raises ValueError for an unknown outcome: that is a bug, not I/O.
                          Errors longer than MAX_ERROR_CHARS are cut short.
    set_last_fire(j, t)   remembers job j's last fire time. Buffered.
    flush()               writes everything buffered (one transaction where the backend has
                          them), after what an earlier flush(wait=False) handed over; written
                          when it returns. May be slow (I/O). A store may also flush by itself
                          when its buffer fills.
    flush(wait=False)     the same, behind the caller's back: hands the buffered writes over
                          to be written in order (SQLite: by a writer thread) and returns at
                          once; never slow. The daemon's loop calls this about twice a
                          second, so no transaction ever stalls a turn. Reads, maintenance,
                          flush() and close() wait for what was handed over.

Crashes. What a daemon had not written when it died is lost: the writes of its last flush
period or two (what was buffered, and what flush(wait=False) had handed over), each flush
all or nothing. A run whose start was written and whose end was not is 'running' in the
storage, and the next daemon's mark_abandoned() records it as 'lost'; a run neither of whose
records was written is not in the history.

Maintenance (the daemon, at start and hourly; may be slow)
    mark_abandoned(now)   runs still 'running' were in flight when an earlier daemon died:
                          they become 'lost' (ended = now, error = ABANDONED_ERROR) and each
                          job's last finished run. Call once, before any run starts. Returns
                          how many.
    prune(keep, now)      deletes finished runs that ended more than `keep` seconds before
                          `now`, except each job's last finished run; never a running one.
                          Returns how many.

Reads (readers, the daemon's start; they see every write made before them, flushing first;
may be slow)
    last_fire(job)        the last set_last_fire of a job, or None.
    history(job, limit, since=, outcome=)
                          runs, newest first in the order they were first recorded (start
                          order), of one job or all; at most `limit` (None: all); only those
                          started at `since` or later (never started: scheduled), only those
                          of `outcome`, when given.
    ended_between(a, b)   job -> outcome -> how many runs ended in [a, b) (`top`: a range
                          of an index, whatever the size of the history).
    last_outcomes()       job -> its last finished run (RunRecord).
    counts(overall)       outcome -> finished runs recorded since this store was opened (O(1),
                          in memory: the daemon's STATUS= figures); `overall=True` counts the
                          whole retained history instead (may be slow).

Life
    location              where the history is kept, for messages (a path; a URL without
                          credentials); None when it is kept in memory only.
    fds()                 the descriptors the store holds, which a worker started by fork must
                          close (poolkeeper.pool.helper_processes): a job's helper that outlives
                          the daemon must not hold its database.
    close()               flushes and lets go of the storage. Idempotent. A store is not
                          reopened: open a new one (it sees what this one wrote).

Failure. The state never stops the jobs: a daemon's store that cannot use its storage at
open (unreachable, corrupt, not writable, a newer schema) logs one error and keeps the state
in memory ('run history will not survive a restart'); a write that fails later is logged once
(until writes work again) and its rows are lost; a failed read logs and answers empty. None of
these raise. A reader's store is the opposite: an empty answer would pass for 'no runs', so
anything it cannot read raises StateUnreadable (at open or at the read), except storage that
does not exist yet, which reads as an empty history.

Threads. One thread uses a store: the daemon's main loop (which also serves the control
socket), or the one reader command. Different processes may use the same storage at once: one
daemon writing (the single-instance lock, poolkeeper.state.identity, sees to 'one') and any
number of readers.

Outcome strings are those of the daemon (`succeeded`, `failed`, `timeout`, `lost`, `killed`)
plus `running` for a run in flight; they are stored as they are.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

# Error summaries are for a human skimming `history`; tracebacks belong in the journal.
MAX_ERROR_CHARS = 2000

ABANDONED_ERROR = "daemon exited while the run was in flight"


class StateUnreadable(RuntimeError):
    """A reader (`readonly=True`: `history`, `status`) cannot read the state DB. Readers don't
    fall back to memory like the daemon: an empty answer would pass for 'no runs'."""

    def __init__(self, path: str | None, reason: BaseException | str):
        self.path = path
        self.reason = str(reason)
        super().__init__(f"cannot read the state DB {path}: {self.reason}")


class RunRecord(NamedTuple):
    job: str
    run_id: str
    attempt: int
    scheduled: float | None
    started: float | None
    ended: float | None
    outcome: str
    exit_code: int | None
    signal: int | None
    worker_pid: int | None
    error: str | None

    @property
    def duration(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started


class StateStore(Protocol):
    """Run history and last fire times: the promises are in this module's docstring."""

    @property
    def location(self) -> str | None: ...

    def run_started(
        self,
        *,
        run_id: str | int,
        job: str,
        attempt: int,
        scheduled_at: float | None,
        started_at: float | None,
        worker_pid: int | None,
    ) -> None: ...

    def run_ended(
        self,
        *,
        run_id: str | int,
        job: str,
        attempt: int,
        scheduled_at: float | None,
        started_at: float | None,
        ended_at: float,
        outcome: str,
        exit_code: int | None = None,
        signal: int | None = None,
        worker_pid: int | None = None,
        error: str | None = None,
    ) -> None: ...

    def set_last_fire(self, job: str, when: float) -> None: ...

    def flush(self, wait: bool = True) -> None: ...

    def mark_abandoned(self, now: float) -> int: ...

    def prune(self, keep_seconds: float, now: float) -> int: ...

    def last_fire(self, job: str) -> float | None: ...

    def history(
        self,
        job: str | None = None,
        limit: int | None = 50,
        *,
        since: float | None = None,
        outcome: str | None = None,
    ) -> list[RunRecord]: ...

    def ended_between(self, start: float, end: float) -> dict[str, dict[str, int]]: ...

    def last_outcomes(self) -> dict[str, RunRecord]: ...

    def counts(self, overall: bool = False) -> dict[str, int]: ...

    def fds(self) -> list[int]: ...

    def close(self) -> None: ...
