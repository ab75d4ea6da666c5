"""Fleet mode under faults (issue 11's chaos test): three real daemons on one real PostgreSQL
15, a 200 ms interval job, a cron job and a loop of 3 replicas, while one daemon is SIGKILLed,
one SIGSTOPped past its lease, the database's connections are killed and the server is stopped
for longer than the lease. The oracles are the jobs' own records (tests/fleet_jobs.py) under
constraints of the database: a broken promise fails an insert the moment it happens."""

from __future__ import annotations

import os
import threading

import pg_server
import pytest

if not os.environ.get("CI"):  # in CI a missing psycopg fails, as a missing server does
    pytest.importorskip("psycopg", reason="psycopg (the `fleet` extra) is not installed")
import fleet_jobs  # noqa: E402
import psycopg  # noqa: E402
from fleet_harness import query  # noqa: E402

# A stand-in for the fleet's pk_slots (FLEET.md) where no daemon has created it: the oracle
# test below runs the jobs by hand, without a fleet.
PK_SLOTS = "CREATE TABLE pk_slots (job text, replica int, owner_inc uuid, epoch bigint)"


class _Ctx:
    """What the jobs read of a RunContext, for running them by hand."""

    def __init__(self, job: str, scheduled_at: float = 0.0, replica=None, fence=None) -> None:
        self.job = job
        self.run_id = f"{job}-{replica}-{fence}"
        self.scheduled_at = scheduled_at
        self.replica = replica
        self.fence = fence
        self.stopping = threading.Event()

    def heartbeat(self) -> None:
        pass


def _violations(url: str) -> list[str]:
    return [kind for (kind,) in query(url, "SELECT kind FROM violations ORDER BY at")]


def test_the_oracles_catch_a_duplicate_fire_and_two_runs_of_one_slot():
    """The chaos test's oracles can fail: a fire key run twice and one slot run twice at once
    (the same epoch on two hosts) fail the jobs' inserts and leave a violation behind, and a
    run whose slot moved on to a new epoch stops writing."""
    url = pg_server.fresh_database()
    fleet_jobs.create_tables(url)
    query(url, PK_SLOTS)
    query(url, "INSERT INTO pk_slots VALUES ('spin', 0, NULL, 7)")

    fleet_jobs.record_fire(_Ctx("tick", 1000.2), url)
    fleet_jobs.record_fire(_Ctx("tick", 1000.4), url)
    with pytest.raises(psycopg.errors.UniqueViolation):
        fleet_jobs.record_fire(_Ctx("tick", 1000.2000000001), url)  # a few ulps off: same key
    assert _violations(url) == ["duplicate fire"]

    # Two runs of slot spin#0 with the same epoch at once: one of them must fail.
    ctxs = [_Ctx("spin", replica=0, fence=7) for _ in range(2)]
    errors: list[BaseException] = []

    def run(ctx: _Ctx) -> None:
        try:
            fleet_jobs.replica_loop(ctx, url, work=0.02)
        except BaseException as exc:
            errors.append(exc)
            for other in ctxs:
                other.stopping.set()

    threads = [threading.Thread(target=run, args=(c,)) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [type(e) for e in errors] == [psycopg.errors.ExclusionViolation]
    assert _violations(url) == ["duplicate fire", "slot overlap"]

    # The slot moves on (a new epoch): the old run's next write is refused, and it returns.
    ctx = _Ctx("spin", replica=0, fence=7)
    done: list[str] = []
    loop = threading.Thread(target=lambda: done.append(fleet_jobs.replica_loop(ctx, url, 0.02)))
    loop.start()
    query(url, "UPDATE pk_slots SET epoch = 8 WHERE job = 'spin' AND replica = 0")
    loop.join(10)
    assert done == ["fenced out: epoch 8, mine 7"]
    assert query(url, "SELECT fence, epoch FROM fenced_out") == [(7, 8)]
    assert _violations(url) == ["duplicate fire", "slot overlap"]
