"""The fleet's SQL (poolkeeper.fleet.db) against a real PostgreSQL 15: what makes a fire run once,
a claim belong to one live incarnation, and a slot to one owner. Liveness is the database's
clock: a lease is made to run out by waiting past it (short leases), never by a mocked clock."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pg_server
import pytest

if not os.environ.get("CI"):  # in CI a missing psycopg fails, as a missing server does
    pytest.importorskip("psycopg", reason="psycopg (the `fleet` extra) is not installed")
import psycopg  # noqa: E402

from poolkeeper.fleet import db  # noqa: E402
from poolkeeper.fleet.db import Ended, JobInfo, NewFire
from poolkeeper.outcomes import RUNNING, Outcome
from poolkeeper.state.postgres import _migrate

LEASE = 30.0


@pytest.fixture
def conn() -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_server.fresh_database(), autocommit=True) as c:
        _migrate(c)
        yield c


def _other(conn: psycopg.Connection) -> psycopg.Connection:
    """A second session on the same database (another host)."""
    return psycopg.connect(conn.info.dsn, autocommit=True)


def _host(conn, name: str, lease: float = LEASE, capacity: int = 4) -> str:
    return db.register(
        conn, host_id=name, version="t", spec_hash="h", pid=1, capacity=capacity, lease=lease
    )


def _expire(conn, incarnation: str) -> None:
    """The host stopped renewing long ago (as the database sees it)."""
    conn.execute(
        "UPDATE pk_hosts SET lease_until = now() - interval '1 second' WHERE incarnation = %s",
        (incarnation,),
    )


def _fires(conn) -> list[tuple]:
    return conn.execute(
        "SELECT fire_key, state, host_id, outcome, attempt FROM pk_fires ORDER BY id"
    ).fetchall()


TICK = JobInfo("tick", "allow", "record", 0)


def test_the_same_fire_from_every_host_is_one_row(conn):
    db.sync_jobs(conn, [TICK])
    fires = [NewFire("tick", f"every:{k}", 100.0 + k, 100.0 + k) for k in range(5)]
    others = [_other(conn) for _ in range(3)]
    try:
        barrier = threading.Barrier(len(others))
        created: list[int] = []

        def create(c):
            barrier.wait()
            created.append(db.create_fires(c, fires))

        threads = [threading.Thread(target=create, args=(c,)) for c in others]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c in others:
            c.close()
    assert sorted(created) == [0, 0, 5]
    assert [row[0] for row in _fires(conn)] == [f"every:{k}" for k in range(5)]


def test_the_cursor_stops_old_fires_after_the_history_is_pruned(conn):
    db.sync_jobs(conn, [TICK])
    assert db.create_fires(conn, [NewFire("tick", "every:1", 101.0, 101.0)]) == 1
    conn.execute("DELETE FROM pk_fires")  # pruned history
    # A host whose clock is behind, or that starts late, finds the fire due again: not again.
    assert db.create_fires(conn, [NewFire("tick", "every:1", 101.0, 101.0)]) == 0
    assert db.create_fires(conn, [NewFire("tick", "every:2", 102.0, 102.0)]) == 1


@pytest.mark.parametrize(
    ("overlap", "expected"),
    [("allow", ["every:1", "every:2", "every:3"]), ("skip", ["every:3"]), ("queue", ["every:3"])],
)
def test_overlap_holds_across_the_fleet_when_fires_are_created(conn, overlap, expected):
    db.sync_jobs(conn, [JobInfo("tick", overlap, "record", 0)])
    burst = [NewFire("tick", f"every:{k}", 100.0 + k, 100.0 + k) for k in (1, 2, 3)]
    db.create_fires(conn, burst)  # three fires that came together (a host catching up)
    assert [row[0] for row in _fires(conn)] == expected
    inc = _host(conn, "a")
    db.claim_fires(conn, inc, "a", ["tick"], 10)
    db.create_fires(conn, [NewFire("tick", "every:4", 104.0, 104.0)])
    # skip: none while a fire is claimed; queue: one waits; allow: all
    keys = [row[0] for row in _fires(conn)]
    assert ("every:4" in keys) == (overlap != "skip")


def test_each_fire_is_claimed_by_one_host_and_claims_follow_free_workers(conn):
    db.sync_jobs(conn, [TICK])
    db.create_fires(conn, [NewFire("tick", f"every:{k}", 100.0 + k, 100.0 + k) for k in range(40)])
    hosts = [(c, _host(conn, name)) for c, name in ((_other(conn), n) for n in "abcd")]
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(hosts))

    def claim(c, inc):
        barrier.wait()
        got = []
        while batch := db.claim_fires(c, inc, "x", ["tick"], 3):
            got += [cl.fire_id for cl in batch]
        claimed[inc] = got

    try:
        threads = [threading.Thread(target=claim, args=h) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c, _ in hosts:
            c.close()
    every = [fire for got in claimed.values() for fire in got]
    assert len(every) == len(set(every)) == 40
    assert db.claim_fires(conn, hosts[0][1], "a", ["tick"], 0) == []


def test_a_host_whose_lease_ran_out_claims_nothing_and_cannot_renew(conn):
    db.sync_jobs(conn, [TICK])
    db.create_fires(conn, [NewFire("tick", "every:1", 101.0, 101.0)])
    inc = _host(conn, "a", lease=0.2)
    time.sleep(0.3)  # the lease runs out on the database's clock
    assert db.claim_fires(conn, inc, "a", ["tick"], 5) == []
    assert db.heartbeat(conn, inc, lease=LEASE, capacity=4, busy=0) is False
    live = _host(conn, "a")
    assert db.heartbeat(conn, live, lease=LEASE, capacity=4, busy=1) is True
    assert [cl.key for cl in db.claim_fires(conn, live, "a", ["tick"], 5)] == ["every:1"]


def test_a_dead_hosts_fires_are_recorded_lost_or_wait_again_with_on_lost_retry(conn):
    db.sync_jobs(conn, [TICK, JobInfo("again", "allow", "retry", 0)])
    db.create_fires(
        conn, [NewFire("tick", "every:1", 101.0, 101.0), NewFire("again", "every:1", 101.0, 101.0)]
    )
    dead = _host(conn, "a")
    claims = db.claim_fires(conn, dead, "a", ["tick", "again"], 5)
    assert len(claims) == 2
    # Its run was in the fleet's history as running.
    conn.execute(
        "INSERT INTO pk_runs (run_id, job, attempt, outcome, host_id, incarnation) "
        "VALUES ('r1', 'tick', 1, %s, 'a', %s)",
        (str(RUNNING), dead),
    )
    assert db.reap(conn) == []  # live: nothing to reap
    _expire(conn, dead)
    reaped = sorted(db.reap(conn))
    assert [(r.job, r.retried) for r in reaped] == [("again", True), ("tick", False)]
    rows = {row[0:2]: row for row in conn.execute(
        "SELECT job, state, outcome, attempt FROM pk_fires"
    ).fetchall()}
    assert rows[("tick", "ended")][2] == Outcome.LOST
    assert rows[("again", "ready")][3] == 2  # the retry is the next attempt
    assert conn.execute("SELECT outcome FROM pk_runs").fetchall() == [(Outcome.LOST.value,)]
    # The old claimer's end does not count: its fence is no longer the fire's.
    end = Ended(claims[0].fire_id, claims[0].fence, Outcome.SUCCEEDED, None)
    assert db.finish_fires(conn, dead, [end]) == [end]
    live = _host(conn, "b")
    retry = db.claim_fires(conn, live, "b", ["tick", "again"], 5)
    assert [(c.job, c.attempt) for c in retry] == [("again", 2)]
    done = Ended(retry[0].fire_id, retry[0].fence, Outcome.SUCCEEDED, None)
    assert db.finish_fires(conn, live, [done]) == []


def test_a_paused_job_drops_its_waiting_fires_and_is_not_claimed(conn):
    db.sync_jobs(conn, [TICK])
    db.create_fires(conn, [NewFire("tick", "every:1", 101.0, 101.0)])
    inc = _host(conn, "a")
    assert db.set_paused(conn, "tick", True)
    assert _fires(conn) == []
    db.create_fires(conn, [NewFire("tick", "every:2", 102.0, 102.0)])
    assert _fires(conn) == []  # nothing is created while paused; the cursor moves on
    assert db.control_state(conn, ["tick"])[0] == {"tick": True}
    assert db.set_paused(conn, "tick", False)
    assert db.run_now(conn, "tick", "manual:1", 200.0)
    assert [cl.key for cl in db.claim_fires(conn, inc, "a", ["tick"], 5)] == ["manual:1"]
    assert not db.set_paused(conn, "nosuch", True)


def test_slots_have_one_live_owner_and_a_new_epoch_at_each_change(conn):
    loop = JobInfo("eat", "allow", "record", 3)
    db.sync_jobs(conn, [loop])
    a, b = _host(conn, "a"), _host(conn, "b")
    mine = db.claim_slots(conn, a, ["eat"], 2)
    assert [s.replica for s in mine] == [0, 1]
    theirs = db.claim_slots(conn, b, ["eat"], 5)
    assert [s.replica for s in theirs] == [2]  # only the free one
    assert db.claim_slots(conn, b, ["eat"], 5) == []
    # a gives one back (its run ended): b takes it with a higher epoch
    db.release_slots(conn, a, [mine[1]])
    moved = db.claim_slots(conn, b, ["eat"], 5)
    assert [(s.replica, s.epoch > mine[1].epoch) for s in moved] == [(1, True)]
    # a stale release (old epoch) changes nothing
    db.release_slots(conn, a, [mine[1]])
    assert db.claim_slots(conn, a, ["eat"], 5) == []
    # a dies: its slot goes to b once its lease is out
    _expire(conn, a)
    assert [s.replica for s in db.claim_slots(conn, b, ["eat"], 5)] == [0]
    # fewer replicas: free slots beyond the count go
    db.sync_jobs(conn, [JobInfo("eat", "allow", "record", 1)])
    assert db.slot_count(conn, ["eat"]) == 1


def test_a_clean_leave_frees_the_slots_and_ends_the_lease_at_once(conn):
    db.sync_jobs(conn, [JobInfo("eat", "allow", "record", 2)])
    a, b = _host(conn, "a"), _host(conn, "b")
    assert len(db.claim_slots(conn, a, ["eat"], 2)) == 2
    db.leave(conn, a)
    assert len(db.claim_slots(conn, b, ["eat"], 2)) == 2
    assert [(h.host_id, h.live) for h in db.hosts(conn)] == [("b", True), ("a", False)]


def test_run_rows_carry_their_host(conn):
    from poolkeeper.state.rows import end_row, start_row

    inc = _host(conn, "a")
    db.write_runs(
        conn,
        [
            (db.WRITE_START, (*start_row("r1", "tick", 1, 100.0, 100.5, 7), "a", inc)),
            (
                db.WRITE_END,
                (
                    *end_row("r1", "tick", 1, 100.0, 100.5, 101.0, Outcome.SUCCEEDED, 0, None, 7, None),
                    "a",
                    inc,
                ),
            ),
        ],
    )
    row = conn.execute("SELECT run_id, outcome, host_id, started FROM pk_runs").fetchone()
    assert row == ("r1", "succeeded", "a", 100.5)


def test_a_slot_claim_is_skipped_not_waited_for(conn):
    """SKIP LOCKED: a host holding a slot row locked (a fenced write in progress: FOR SHARE)
    does not make another host's claim wait; the slot is simply not taken this time."""
    db.sync_jobs(conn, [JobInfo("eat", "allow", "record", 1)])
    a = _host(conn, "a")
    with _other(conn) as writer, writer.transaction():
        writer.execute("SELECT epoch FROM pk_slots WHERE job = 'eat' FOR SHARE")
        assert db.claim_slots(conn, a, ["eat"], 1) == []
    assert [s.replica for s in db.claim_slots(conn, a, ["eat"], 1)] == [0]



def test_pruning_the_fleets_history_never_brings_old_fires_back(conn):
    db.sync_jobs(conn, [TICK])
    db.create_fires(conn, [NewFire("tick", "every:1", 101.0, 101.0)])
    inc = _host(conn, "a")
    (claim,) = db.claim_fires(conn, inc, "a", ["tick"], 1)
    db.finish_fires(conn, inc, [Ended(claim.fire_id, claim.fence, Outcome.SUCCEEDED, None)])
    conn.execute("UPDATE pk_fires SET ended_at = now() - interval '2 hours'")
    assert db.prune(conn, 3600.0) == 1
    assert _fires(conn) == []
    assert db.create_fires(conn, [NewFire("tick", "every:1", 101.0, 101.0)]) == 0


def test_the_fleets_connections_bound_every_wait_and_the_urls_settings_win(conn):
    """Statements, lock waits and idle transactions are bounded by the margin (lease/6), and
    what the URL sets itself (its `options`, its connect_timeout) is kept over that."""
    import logging

    from poolkeeper.fleet.member import FleetMember

    base = conn.info.dsn
    plain = FleetMember(base, host_id="a", lease=6.0, spec_hash="h", capacity=1,
                        log=logging.getLogger("t"))
    own = FleetMember(f"{base} options='-c statement_timeout=12345'", host_id="a", lease=6.0,
                      spec_hash="h", capacity=1, log=logging.getLogger("t"))
    for member, statement in ((plain, "1s"), (own, "12345ms")):
        with member._connect("poolkeeper:test") as c:
            shown = [c.execute(f"SHOW {name}").fetchone()[0] for name in
                     ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")]
            assert shown == [statement, "1s", "1s"]
            assert c.execute("SHOW application_name").fetchone()[0] == "poolkeeper:test"
