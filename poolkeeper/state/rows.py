"""What both backends buffer and write (sqlite.py, postgres.py): the row of a run's start and
of its end, the batch one flush writes, and the columns a RunRecord is read from. The SQL
differs between the two (placeholders, table names); the rows and their order do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from poolkeeper.outcomes import RUNNING, Outcome
from poolkeeper.state.store import MAX_ERROR_CHARS, RunRecord

# The parameters of one statement (the driver adapts each value), and a result row.
Row = tuple[Any, ...]

# The run columns as the INSERTs write them: start_row() and end_row() give them in this order.
RUN_COLUMNS = (
    "run_id, job, attempt, scheduled, started, ended, outcome, exit_code, signal, worker_pid, error"
)


def record_columns(table: str) -> str:
    """The SELECT list of a RunRecord, its fields in order, from `table`'s columns."""
    return ", ".join(f"{table}.{field}" for field in RunRecord._fields)


def history_filter(
    job: str | None, since: float | None, outcome: str | None, mark: str, prefix: str = ""
) -> tuple[str, Row]:
    """The WHERE clause (or "") and its parameters of a `history` read, for a backend whose
    placeholder is `mark` (? or %s). `since`: the run started then or later (a run that never
    started: was scheduled then or later), so `--since 1h` also shows what failed to start."""
    clauses: list[str] = []
    args: list[Any] = []
    if job is not None:
        clauses.append(f"{prefix}job = {mark}")
        args.append(job)
    if since is not None:
        clauses.append(f"coalesce({prefix}started, {prefix}scheduled, {prefix}ended) >= {mark}")
        args.append(since)
    if outcome is not None:
        clauses.append(f"{prefix}outcome = {mark}")
        args.append(outcome)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def by_job(rows: Iterable[Row]) -> dict[str, dict[str, int]]:
    """(job, outcome, count) rows as job -> outcome -> count."""
    counts: dict[str, dict[str, int]] = {}
    for job, outcome, n in rows:
        counts.setdefault(job, {})[outcome] = int(n)
    return counts


class Batch(NamedTuple):
    """What one flush writes: run rows by run_id (arrival order, each with the statement that
    writes it), fires and last runs by job."""

    runs: dict[str, tuple[str, Row]]
    fires: dict[str, float]
    last_run: dict[str, str]


def start_row(
    run_id: str | int,
    job: str,
    attempt: int,
    scheduled_at: float | None,
    started_at: float | None,
    worker_pid: int | None,
) -> Row:
    return (
        str(run_id),
        job,
        attempt,
        scheduled_at,
        started_at,
        None,
        str(RUNNING),
        None,
        None,
        worker_pid,
        None,
    )


def end_row(
    run_id: str | int,
    job: str,
    attempt: int,
    scheduled_at: float | None,
    started_at: float | None,
    ended_at: float,
    outcome: str,
    exit_code: int | None,
    signal: int | None,
    worker_pid: int | None,
    error: str | None,
) -> Row:
    """The outcome as plain text (the daemon passes an Outcome: no enum lookup per run; a plain
    string from a careless caller is looked up, ValueError for an unknown one: a bug, not I/O),
    the error cut at MAX_ERROR_CHARS."""
    outcome = outcome.value if type(outcome) is Outcome else Outcome(outcome).value
    if error is not None and len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 1] + "…"
    return (
        str(run_id),
        job,
        attempt,
        scheduled_at,
        started_at,
        ended_at,
        outcome,
        exit_code,
        signal,
        worker_pid,
        error,
    )


def runs_of_same_kind(entries: Iterable[tuple[str, Row]]) -> Iterator[tuple[str, list[Row]]]:
    """Group consecutive buffered rows by statement, keeping arrival order across groups."""
    group_sql: str | None = None
    group: list[Row] = []
    for sql, row in entries:
        if sql is not group_sql and group:
            assert group_sql is not None  # set with the group's first row
            yield group_sql, group
            group = []
        group_sql = sql
        group.append(row)
    if group:
        assert group_sql is not None  # likewise
        yield group_sql, group
