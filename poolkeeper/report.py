"""What `status`, `history` and `next` print: read from the state DB, never from the daemon's
memory, so they answer whether or not a daemon is running."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from poolkeeper.config.durations import format_duration
from poolkeeper.kinds import JobKind
from poolkeeper.printable import printable
from poolkeeper.scheduling.triggers import make_trigger, upcoming, zone
from poolkeeper.state.identity import open_store
from poolkeeper.state.store import RunRecord, StateStore

if TYPE_CHECKING:
    from poolkeeper.config.settings import Config, Job

# One line of a table: every cell a string.
_Row = tuple[str, ...]


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _took(record: RunRecord) -> str:
    return took_text(record.duration)


def took_text(took: float | None) -> str:
    """A run's duration for people: `250ms`, `3.00s`, `2m5s`, `-` when unknown."""
    if took is None:
        return "-"
    if took < 1:
        return f"{took * 1000:.0f}ms"
    if took < 60:
        return f"{took:.2f}s"
    return format_duration(round(took))


def open_readonly(config: Config) -> StateStore:
    """The config's store, read-only: raises StateUnreadable, never falls back to memory. In
    fleet mode, the fleet's history (every host's runs, in its database), so `history` and
    `status` answer the same on every host."""
    if config.fleet is not None:
        from poolkeeper.state.identity import store_at

        return store_at(config.fleet.database, readonly=True)
    return open_store(config, readonly=True)


def print_history(records: Iterable[RunRecord], out: TextIO) -> None:
    rows: list[_Row] = [("STARTED", "JOB", "RUN", "ATTEMPT", "OUTCOME", "TOOK", "DETAIL")]
    for r in records:
        detail = r.error or ""
        if r.signal:
            detail = detail or f"signal {r.signal}"
        rows.append(
            (
                _when(r.started or r.scheduled),
                r.job,
                r.run_id[:12],
                str(r.attempt),
                r.outcome,
                _took(r),
                detail,
            )
        )
    table(rows, out)


def print_status(
    config: Config,
    store: StateStore,
    out: TextIO,
    now: float | None = None,
    live: dict[str, Any] | None = None,
) -> None:
    """The jobs, their next fire and last outcome. `live`: the running daemon's own answer
    (its jobs as it runs them, what each is doing now); without it, the file's jobs."""
    now = time.time() if now is None else now
    last = store.last_outcomes()
    rows: list[_Row] = [("JOB", "KIND", "SCHEDULE", "NEXT", "NOW", "LAST RUN", "OUTCOME")]
    jobs: list[tuple[str, str, str, str, str]]  # name, kind, schedule, next, now
    if live is not None:
        out.write(f"daemon: {printable(live.get('message', ''))}\n")
        jobs = [
            (name, j["kind"], j["schedule"], _when(j["next"]), j["now"])
            for name, j in live.get("jobs", {}).items()
        ]
    else:
        out.write("daemon: not reachable; the jobs of the file, outcomes from the state DB\n")
        jobs = [
            (name, job.kind, schedule_text(job), _next_fire(job, now), "-")
            for name, job in config.jobs.items()
        ]
    for name, kind, schedule, nxt, doing in jobs:
        record = last.get(name)
        rows.append(
            (
                name,
                kind,
                schedule,
                nxt,
                doing,
                _when(record.started) if record else "never",
                (record.outcome + (f" ({record.error})" if record.error else ""))
                if record
                else "-",
            )
        )
    table(rows, out)


def next_fire(job: Job, now: float) -> float | None:
    """The job's next fire after `now` by its schedule (no daemon asked), or None."""
    fires = fire_times(job, 1, now)
    return fires[0] if fires else None


def _next_fire(job: Job, now: float) -> str:
    return _when(next_fire(job, now))


def fire_times(job: Job, n: int, now: float) -> list[float]:
    """The next `n` fire times of a job (epoch seconds); none for a loop job."""
    trigger = make_trigger(job)
    return [] if trigger is None else upcoming(trigger, n, now)


def print_next(job: Job, n: int, out: TextIO, now: float | None = None) -> int:
    """Upcoming fire times of one job; returns how many were printed."""
    if make_trigger(job) is None:
        out.write(f"{printable(job.name)}: a loop job runs continuously; it has no fire times\n")
        return 0
    fires = fire_times(job, n, time.time() if now is None else now)
    tz = zone(job.timezone) if job.timezone else None
    for ts in fires:
        local = datetime.fromtimestamp(ts, tz) if tz else datetime.fromtimestamp(ts).astimezone()
        out.write(local.strftime("%Y-%m-%d %H:%M:%S %Z") + "\n")
    if not fires:
        out.write(f"{printable(job.name)}: no upcoming fire time\n")
    return len(fires)


def schedule_text(job: Job) -> str:
    if job.kind == JobKind.LOOP:
        assert job.loop is not None  # the kind is the one schedule key that is set
        return f"{job.loop.replicas} replica(s)"
    if job.kind == JobKind.EVERY:
        assert job.every is not None  # likewise
        return f"every {format_duration(job.every)}"
    if job.kind == JobKind.CRON:
        return f"cron '{job.cron}'" + (f" {job.timezone}" if job.timezone else "")
    return f"at {job.at}"


def table(rows: list[_Row], out: TextIO) -> None:
    """Aligned columns. Every cell is printable(): error texts are the jobs' own words, and
    names and states may come from a daemon's reply."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
