"""Runs written into a StateStore the way the daemon writes them, for the state tests of every
backend (test_state.py, test_state_contract.py, test_state_postgres.py)."""

from __future__ import annotations

from typing import Any

from poolkeeper.state.store import StateStore

T0 = 1_700_000_000.0
DAY = 86400.0


def start(s: StateStore, run_id: Any, job="rollup", at=T0, attempt=1, pid=4242) -> None:
    s.run_started(
        run_id=run_id, job=job, attempt=attempt, scheduled_at=at, started_at=at, worker_pid=pid
    )


def end(s: StateStore, run_id: Any, job="rollup", at=T0, outcome="succeeded", **kw) -> None:
    fields = dict(
        attempt=1,
        scheduled_at=at,
        started_at=at,
        exit_code=None,
        signal=None,
        worker_pid=4242,
        error=None,
    )
    fields.update(kw)
    s.run_ended(run_id=run_id, job=job, ended_at=at + 1, outcome=outcome, **fields)
