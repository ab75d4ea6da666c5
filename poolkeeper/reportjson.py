"""The JSON documents of `status --json`, `history --json` and `next --json`: a stable interface,
every field described in docs/json.md (change one only with that page and the tests).

Times are RFC 3339 strings in UTC with milliseconds (`2026-11-30T23:59:01.250Z`), or null;
durations are seconds (a number), or null. A document is built from the same reads as the
text (poolkeeper.report), so both say the same thing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from poolkeeper.report import next_fire, schedule_text
from poolkeeper.state.store import RunRecord

if TYPE_CHECKING:
    from poolkeeper.config.settings import Config, Job

# The daemon's fields of `status --json`: null each when the daemon does not answer.
_NO_DAEMON: dict[str, Any] = {
    "phase": None,
    "pid": None,
    "message": None,
    "workers": {"busy": None, "total": None},
    "queued": None,
    "finished": None,
}


def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds as `2026-11-30T23:59:01.250Z`; None stays None."""
    if ts is None:
        return None
    when = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return when.removesuffix("+00:00") + "Z"


def run_document(r: RunRecord) -> dict[str, Any]:
    """One run of `history --json`."""
    return {
        "job": r.job,
        "run_id": r.run_id,
        "attempt": r.attempt,
        "scheduled": rfc3339(r.scheduled),
        "started": rfc3339(r.started),
        "ended": rfc3339(r.ended),
        "duration": r.duration,
        "outcome": r.outcome,
        "exit_code": r.exit_code,
        "signal": r.signal,
        "worker_pid": r.worker_pid,
        "error": r.error,
    }


def status_document(
    config: Config, last: dict[str, RunRecord], live: dict[str, Any] | None, now: float
) -> dict[str, Any]:
    """`status --json`: from the daemon's reply (`live`) when it answered, else from the file
    (jobs, next fires) and the state DB (`last`: each job's last finished run)."""
    jobs: list[dict[str, Any]] = []
    if live is not None:
        daemon = {key: live.get(key) for key in _NO_DAEMON}
        workers = live.get("workers") or {}
        daemon["workers"] = {"busy": workers.get("busy"), "total": workers.get("total")}
        for name, view in live.get("jobs", {}).items():
            spec = config.jobs.get(name)
            scope = view.get("scope") or (spec.scope if spec is not None else None)
            jobs.append(
                _job(name, view["kind"], scope, view["schedule"], view["state"], view["next"])
                | {"running": view.get("running")}
            )
    else:
        daemon = dict(_NO_DAEMON)
        for name, spec in config.jobs.items():
            job = _job(name, spec.kind, spec.scope, schedule_text(spec), None, None)
            job["next_fire"] = rfc3339(next_fire(spec, now))
            jobs.append(job | {"running": None})
    for job in jobs:
        job.update(_last(last.get(job["name"])))
    return {
        "source": "daemon" if live is not None else "state",
        "config": config.path,
        "daemon": daemon,
        "jobs": jobs,
    }


def _job(
    name: str, kind: str, scope: str | None, schedule: str, state: str | None, nxt: float | None
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "scope": scope,
        "schedule": schedule,
        "state": state,
        "next_fire": rfc3339(nxt),
    }


def _last(record: RunRecord | None) -> dict[str, Any]:
    """A job's last finished run, as the `last_*` fields of its status."""
    if record is None:
        return dict.fromkeys(_LAST_FIELDS)
    return {
        "last_run_id": record.run_id,
        "last_outcome": record.outcome,
        "last_started": rfc3339(record.started),
        "last_ended": rfc3339(record.ended),
        "last_duration": record.duration,
        "last_error": record.error,
    }


_LAST_FIELDS = (
    "last_run_id",
    "last_outcome",
    "last_started",
    "last_ended",
    "last_duration",
    "last_error",
)


def next_document(job: Job, fires: list[float]) -> dict[str, Any]:
    """`next --json`: the job and its upcoming fire times (empty for a loop job)."""
    return {
        "job": job.name,
        "kind": job.kind,
        "schedule": schedule_text(job),
        "timezone": job.timezone,
        "fires": [rfc3339(ts) for ts in fires],
    }


def dump(document: Any, out: TextIO) -> None:
    """One JSON document and a newline. ASCII (non-ASCII escaped): a job's error text may hold
    anything, and an escape is valid JSON whatever the terminal's or the pipe's encoding."""
    json.dump(document, out, indent=2)
    out.write("\n")
