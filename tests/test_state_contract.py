"""The StateStore contract (poolkeeper/state/store.py), tested through the protocol only, once
per backend. A backend is one entry of BACKENDS: a function that gives a fresh, empty location
for `store_at` (the factory picks the backend from it). The PostgreSQL backend of fleet mode
adds its entry and runs these tests unchanged."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from state_runs import DAY, T0, end, start

from poolkeeper.state.identity import store_at
from poolkeeper.state.store import ABANDONED_ERROR, MAX_ERROR_CHARS, StateStore


def _sqlite(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


def _postgres(tmp_path: Path) -> str:
    import pg_server  # the session's real server, started on first use

    return pg_server.fresh_database()


# name -> a fresh location of that backend in a test's tmp_path
BACKENDS: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


class Backend:
    """Opens stores on one location, and closes what a test left open."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.opened: list[StateStore] = []

    def open(self, *, readonly: bool = False) -> StateStore:
        store = store_at(self.location, readonly=readonly)
        self.opened.append(store)
        return store

    def reopen(self, store: StateStore, *, readonly: bool = False) -> StateStore:
        """Close `store` (as a daemon's stop does) and open the location again."""
        store.close()
        return self.open(readonly=readonly)


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(BACKENDS[request.param](tmp_path))
    yield b
    for store in b.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> StateStore:
    return backend.open()



# -- writes and reading them back ----------------------------------------------------------


def test_a_run_round_trips_through_flush_and_reopen(backend, store):
    start(store, "r1")
    end(store, "r1", outcome="failed", exit_code=3, error="ValueError: boom")
    start(store, 2, job="nightly", at=T0 + 10)
    store.flush()
    for again in (backend.reopen(store), backend.open(readonly=True)):
        newest, oldest = again.history()
        assert (newest.run_id, newest.job, newest.outcome, newest.ended) == (
            "2",
            "nightly",
            "running",
            None,
        )
        assert oldest.job == "rollup" and oldest.outcome == "failed" and oldest.exit_code == 3
        assert oldest.error == "ValueError: boom" and oldest.worker_pid == 4242
        assert oldest.started == T0 and oldest.ended == T0 + 1 and oldest.duration == 1
        assert oldest.attempt == 1 and oldest.scheduled == T0 and oldest.signal is None
        assert [r.run_id for r in again.history("rollup")] == ["r1"]


def test_history_filters_and_ended_between(backend, store):
    """`history --since/--outcome` and `top`'s hour counts, read in the storage."""
    for i, (job, outcome) in enumerate([("a", "succeeded"), ("b", "failed"), ("a", "lost")]):
        start(store, f"r{i}", job=job, at=T0 + 10 * i)
        end(store, f"r{i}", job=job, at=T0 + 10 * i, outcome=outcome)
    start(store, "r3", at=T0 + 30)  # running: started, never ended
    store.flush()
    reader = backend.open(readonly=True)
    ids = lambda **kw: [r.run_id for r in reader.history(**kw)]  # noqa: E731
    assert ids(since=T0 + 10) == ["r3", "r2", "r1"]
    assert ids(outcome="lost") == ["r2"] and ids(outcome="running") == ["r3"]
    assert ids(job="a", since=T0 + 5, outcome="lost") == ["r2"]
    assert reader.ended_between(T0, T0 + 21) == {"a": {"succeeded": 1}, "b": {"failed": 1}}
    assert reader.ended_between(T0 + 21, T0 + 100) == {"a": {"lost": 1}}


def test_reads_see_writes_not_flushed_yet(store):
    start(store, 1)
    end(store, 1)
    store.set_last_fire("rollup", T0)
    assert [r.run_id for r in store.history()] == ["1"]
    assert store.last_outcomes()["rollup"].run_id == "1"
    assert store.last_fire("rollup") == T0
    assert store.counts(overall=True) == {"succeeded": 1}


def test_close_writes_what_is_buffered_and_is_idempotent(backend, store):
    start(store, 1)
    end(store, 1)
    store.set_last_fire("rollup", T0)
    store.close()
    store.close()
    again = backend.open()
    assert [r.run_id for r in again.history()] == ["1"] and again.last_fire("rollup") == T0


def test_end_without_start_is_recorded(store):
    end(store, "never-dispatched", outcome="failed", started_at=None, error="no worker")
    (rec,) = store.history()
    assert rec.outcome == "failed" and rec.started is None and rec.error == "no worker"


def test_end_keeps_start_fields_it_does_not_know(store):
    start(store, "r1", pid=77)
    store.flush()
    end(store, "r1", outcome="lost", signal=9, started_at=None, worker_pid=None)
    (rec,) = store.history()
    assert (rec.outcome, rec.signal, rec.started, rec.worker_pid) == ("lost", 9, T0, 77)


def test_unknown_outcome_is_a_bug(store):
    with pytest.raises(ValueError):
        end(store, 1, outcome="exploded")


def test_long_errors_are_truncated(store):
    end(store, 1, outcome="failed", error="x" * 100_000)
    assert len(store.history()[0].error) == MAX_ERROR_CHARS


# -- last fire ------------------------------------------------------------------------------


def test_last_fire_round_trip(backend, store):
    assert store.last_fire("nightly") is None
    store.set_last_fire("nightly", T0)
    store.set_last_fire("nightly", T0 + 60)  # the latest wins
    store.set_last_fire("rollup", T0 + 5)
    assert store.last_fire("nightly") == T0 + 60
    store.flush()
    store.set_last_fire("rollup", T0 + 6)  # buffered, over a stored one
    assert store.last_fire("rollup") == T0 + 6
    again = backend.reopen(store)
    assert again.last_fire("nightly") == T0 + 60 and again.last_fire("rollup") == T0 + 6
    assert again.last_fire("other") is None


# -- history, last outcomes, counts ------------------------------------------------------------


def test_history_is_newest_first_and_limited(store):
    for i in range(10):
        start(store, i, job="a" if i % 2 else "b")
        end(store, i, job="a" if i % 2 else "b")
    assert [r.run_id for r in store.history(limit=3)] == ["9", "8", "7"]
    assert [r.run_id for r in store.history("a", limit=2)] == ["9", "7"]


def test_history_is_in_start_order_and_without_limit_complete(store):
    start(store, "first", at=T0 + 100)  # started first, with a later time: order is arrival
    start(store, "second", at=T0)
    end(store, "first", at=T0 + 100)  # ending doesn't move a run
    assert [r.run_id for r in store.history()] == ["second", "first"]
    for i in range(60):
        end(store, f"more{i}")
    assert len(store.history()) == 50  # the default limit
    assert len(store.history(limit=None)) == 62
    assert store.history("nobody") == []


def test_last_outcomes_and_counts(store):
    start(store, 1)
    end(store, 1, outcome="failed")
    start(store, 2)
    end(store, 2, outcome="succeeded")
    start(store, 3, job="ingest")
    end(store, 3, job="ingest", outcome="timeout")
    start(store, 4, job="ingest")  # still running: not a last outcome
    last = store.last_outcomes()
    assert {job: r.outcome for job, r in last.items()} == {
        "rollup": "succeeded",
        "ingest": "timeout",
    }
    assert store.counts() == {"failed": 1, "succeeded": 1, "timeout": 1}
    assert store.counts(overall=True) == {"failed": 1, "succeeded": 1, "timeout": 1}


def test_counts_since_open_vs_overall(backend, store):
    end(store, 1)
    s = backend.reopen(store)
    end(s, 2, outcome="failed")
    assert s.counts() == {"failed": 1}
    assert s.counts(overall=True) == {"failed": 1, "succeeded": 1}


# -- maintenance ----------------------------------------------------------------------------


def test_abandoned_runs_are_marked_lost(backend, store):
    start(store, 1)
    end(store, 1)
    start(store, 2)
    start(store, 3, job="ingest")
    store.flush()  # ...and the daemon dies (no close)
    s2 = backend.open()
    assert s2.mark_abandoned(T0 + 50) == 2
    recs = {r.run_id: r for r in s2.history()}
    assert recs["1"].outcome == "succeeded"
    assert recs["2"].outcome == recs["3"].outcome == "lost"
    assert recs["2"].error == ABANDONED_ERROR and recs["2"].ended == T0 + 50
    assert {j: r.run_id for j, r in s2.last_outcomes().items()} == {"rollup": "2", "ingest": "3"}
    assert s2.mark_abandoned(T0 + 60) == 0


def test_prune_deletes_old_finished_runs_but_keeps_each_jobs_last(store):
    day = DAY
    for i in range(5):  # rollup ran days 0..4
        start(store, f"r{i}", at=T0 + i * day)
        end(store, f"r{i}", at=T0 + i * day)
    start(store, "old-nightly", job="nightly", at=T0)
    end(store, "old-nightly", job="nightly", at=T0)
    start(store, "stuck", at=T0)  # running: never pruned
    now = T0 + 10 * day
    # Cut-off at day 3: r0..r2 go; old-nightly stays as nightly's last run.
    assert store.prune(keep_seconds=7 * day, now=now) == 3
    left = {r.run_id for r in store.history()}
    assert left == {"r3", "r4", "old-nightly", "stuck"}
    assert store.prune(keep_seconds=0, now=now) == 1  # r3; r4 is rollup's last
    assert {r.run_id for r in store.history()} == {"r4", "old-nightly", "stuck"}
    assert store.last_outcomes()["nightly"].run_id == "old-nightly"


def test_pruned_runs_stay_gone_after_reopen(backend, store):
    for i in range(3):
        end(store, f"r{i}", at=T0 + i * DAY)
    assert store.prune(keep_seconds=DAY / 2, now=T0 + 3 * DAY) == 2
    assert [r.run_id for r in backend.reopen(store).history()] == ["r2"]


# -- readers and life ----------------------------------------------------------------------


def test_a_reader_before_any_daemon_reads_an_empty_history(backend):
    reader = backend.open(readonly=True)
    assert reader.history() == [] and reader.last_outcomes() == {}
    assert reader.last_fire("rollup") is None and reader.counts(overall=True) == {}


def test_a_reader_sees_what_the_daemon_flushed(backend, store):
    end(store, "r1")
    store.flush()
    reader = backend.open(readonly=True)
    assert [r.run_id for r in reader.history()] == ["r1"]
    end(store, "r2")
    store.flush()
    assert [r.run_id for r in reader.history()] == ["r2", "r1"]


def test_location_and_fds(store):
    assert store.location is not None  # a persistent store: messages can say where
    for fd in store.fds():
        os.fstat(fd)  # each an open descriptor of this process


# -- the daemon's flush: behind its back ---------------------------------------------------


def test_the_loops_flush_loses_and_reorders_nothing(backend, store):
    # What the daemon's loop does at 10,000 runs/s: two runs in flight at any time, a
    # flush(wait=False) every 500 runs (half a second), set_last_fire as it fires.
    n = 6_000
    for i in range(n):
        start(store, i, at=T0 + i)
        if i >= 2:
            end(store, i - 2, at=T0 + i - 2, outcome="failed" if i % 1000 == 0 else "succeeded")
        store.set_last_fire("rollup", T0 + i)
        if i % 500 == 499:
            store.flush(wait=False)
    store.flush(wait=False)
    # reads wait for what was handed over
    assert store.last_fire("rollup") == T0 + n - 1
    runs = store.history(limit=None)
    assert [r.run_id for r in runs] == [str(i) for i in reversed(range(n))]  # start order
    assert [r.outcome for r in runs[:2]] == ["running", "running"]
    assert store.counts() == store.counts(overall=True) == {"succeeded": n - 7, "failed": 5}
    assert store.last_outcomes()["rollup"].run_id == str(n - 3)
    reader = backend.reopen(store, readonly=True)  # close() too waits for the writer
    assert len(reader.history(limit=None)) == n and reader.last_fire("rollup") == T0 + n - 1


def test_an_end_in_a_later_batch_completes_its_start(backend, store):
    start(store, "a")
    store.flush(wait=False)
    end(store, "a", outcome="timeout", error="timed out after 1s")
    store.flush(wait=False)
    store.flush()
    reader = backend.open(readonly=True)
    (rec,) = reader.history()
    assert (rec.run_id, rec.outcome, rec.error, rec.started) == ("a", "timeout",
                                                               "timed out after 1s", T0)  # fmt: skip
