"""Job functions for the fleet end-to-end test (test_e2e_fleet.py): copied into the sandbox and
run by poolkeeper@a and poolkeeper@b, recording into the fleet's own PostgreSQL (psycopg comes
with the `fleet` extra, like the daemon's own connection).

Each record names the unit it came from, read from the process's own cgroup: two daemons of one
machine differ by nothing else a job can see.
"""

from __future__ import annotations

import psycopg


def _unit() -> str:
    """poolkeeper@a.service -> "a" (workers and their jobs live in their daemon's cgroup)."""
    with open("/proc/self/cgroup") as f:
        path = f.read().strip().split("::", 1)[-1]
    name = next(p for p in path.split("/") if p.startswith("poolkeeper@"))
    return name.removeprefix("poolkeeper@").removesuffix(".service")


def once(ctx, dsn: str) -> None:
    """One row per scheduled time: UNIQUE (scheduled_at). A second run of one fire (a host that
    ran it although another one did) leaves its trace in e2e_cron_twice and fails."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(
                "INSERT INTO e2e_cron (scheduled_at, unit, fence) VALUES (%s, %s, %s)",
                (ctx.scheduled_at, _unit(), ctx.fence),
            )
        except psycopg.errors.UniqueViolation:
            conn.execute(
                "INSERT INTO e2e_cron_twice (scheduled_at, unit) VALUES (%s, %s)",
                (ctx.scheduled_at, _unit()),
            )
            raise


def beat(ctx, dsn: str) -> None:
    """A loop replica: logs every 100 ms which unit runs it, under which fencing token."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not ctx.stopping.is_set():
            conn.execute(
                "INSERT INTO e2e_beats (replica, unit, fence, at) VALUES (%s, %s, %s, now())",
                (ctx.replica, _unit(), ctx.fence),
            )
            ctx.stopping.wait(0.1)
