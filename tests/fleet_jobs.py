"""Jobs for the fleet chaos test and bench (imported by workers via pythonpath): each records its
own runs into tables of its own in the fleet's database, under constraints that make a broken
promise fail at the moment it is broken, whatever the daemons believe.

- fire_runs: one row per run of a scheduled job, UNIQUE (job, fire_ms): a fire key that runs
  twice fails its second insert. fire_ms is the nominal time in milliseconds, not the float
  itself: two hosts may compute the same nominal time a few ulps apart.
- slot_spans: one row per loop iteration, the time the run was alive (tstzrange), under
  EXCLUDE (job =, replica =, span &&): two runs of one slot at once fail the second insert.
  The insert is fenced (ctx.fence against pk_slots.epoch, row locked FOR SHARE so the epoch
  cannot change under it): a run whose slot was taken over records `fenced_out` instead.
- fenced_out: a run that was still alive after its slot moved on (what the fence stopped).
  A frozen daemon's workers keep running, so the SIGSTOPped host leaves rows here; any other
  host's row is a slot handed on before its run ended.
- violations: no constraints, so it survives what it records; a job that hits a constraint
  records it here and fails its run.

Connections are named `fleetjob:<host>`, not `poolkeeper...`: the fault that kills the
daemons' connections can tell them apart. The host comes from $FLEET_TEST_HOST, set by
tests/fleet_harness.py for each daemon (workers inherit it).
"""

from __future__ import annotations

import os
import time

import psycopg

HOST_ENV = "FLEET_TEST_HOST"

TABLES = """
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE TABLE IF NOT EXISTS fire_runs (
    job text NOT NULL, fire_ms bigint NOT NULL, scheduled_at double precision NOT NULL,
    started_at double precision NOT NULL, host text, fence bigint, run_id text,
    UNIQUE (job, fire_ms));
CREATE TABLE IF NOT EXISTS slot_spans (
    job text NOT NULL, replica int NOT NULL, fence bigint, host text, run_id text,
    span tstzrange NOT NULL,
    EXCLUDE USING gist (job WITH =, replica WITH =, span WITH &&));
CREATE TABLE IF NOT EXISTS fenced_out (
    job text, replica int, fence bigint, epoch bigint, host text, run_id text,
    span tstzrange);
CREATE TABLE IF NOT EXISTS violations (
    at timestamptz NOT NULL DEFAULT clock_timestamp(), kind text, job text, host text,
    detail text);
"""

# Each fenced-out run: its host, and how long it was still alive (its last, refused write)
# after its slot's next run began (the first span of the epoch that replaced it).
OUTLIVED = """
SELECT f.host, coalesce(extract(epoch FROM upper(f.span) - s.first)::float8, 0)
FROM fenced_out f LEFT JOIN (
    SELECT job, replica, fence, min(lower(span)) AS first FROM slot_spans GROUP BY 1, 2, 3
) s ON s.job = f.job AND s.replica = f.replica AND s.fence = f.epoch
"""


def create_tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TABLES)


def _host() -> str:
    return os.environ.get(HOST_ENV, "?")


def _connect(url: str) -> psycopg.Connection:
    # connect_timeout: while the server is down, a run fails at once instead of hanging.
    return psycopg.connect(
        url, autocommit=True, connect_timeout=2, application_name=f"fleetjob:{_host()}"
    )


def _violation(conn: psycopg.Connection, kind: str, job: str, exc: BaseException) -> None:
    conn.execute(
        "INSERT INTO violations (kind, job, host, detail) VALUES (%s, %s, %s, %s)",
        (kind, job, _host(), str(exc)[:500]),
    )


def record_fire(ctx, db):
    """A scheduled job (interval, cron): one row per run, keyed by its nominal time."""
    started = time.time()
    with _connect(db) as conn:
        try:
            conn.execute(
                "INSERT INTO fire_runs (job, fire_ms, scheduled_at, started_at, host, fence,"
                " run_id) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    ctx.job,
                    round(ctx.scheduled_at * 1000),
                    ctx.scheduled_at,
                    started,
                    _host(),
                    getattr(ctx, "fence", None),
                    ctx.run_id,
                ),
            )
        except psycopg.errors.UniqueViolation as exc:
            _violation(conn, "duplicate fire", ctx.job, exc)
            raise
    return started - ctx.scheduled_at


def replica_loop(ctx, db, work=0.1):
    """A loop replica: ~`work` seconds per iteration, each recorded (fenced) as the span of
    time its run was alive. Returns when stopping, or when its slot has moved on."""
    replica = getattr(ctx, "replica", None)
    fence = getattr(ctx, "fence", None)
    conn = None
    alive_since = time.time()  # the start of the span not yet recorded
    try:
        while not ctx.stopping.wait(work):
            try:
                if conn is None:
                    conn = _connect(db)
                epoch, end = _record_span(conn, ctx, replica, fence, alive_since)
            except psycopg.errors.ExclusionViolation as exc:
                _violation(conn, "slot overlap", ctx.job, exc)
                raise
            except psycopg.Error:
                # The database is away (killed connection, server down): keep running, as
                # a job would, and record the whole span once it is back.
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if epoch is not None:
                return f"fenced out: epoch {epoch}, mine {fence}"
            alive_since = end
            ctx.heartbeat()
    finally:
        if conn is not None:
            conn.close()
    return "stopped"


def _record_span(conn, ctx, replica, fence, since):
    """Insert [since, now) for this run and return (None, now), unless its slot's epoch is no
    longer its fence: then record that in fenced_out and return (the epoch, now) (-1: none)."""
    with conn.transaction():
        if fence is not None:
            row = conn.execute(
                "SELECT epoch FROM pk_slots WHERE job = %s AND replica = %s FOR SHARE",
                (ctx.job, replica),
            ).fetchone()
            epoch = row[0] if row else None
            if epoch != fence:
                conn.execute(
                    "INSERT INTO fenced_out (job, replica, fence, epoch, host, run_id, span)"
                    " VALUES (%s, %s, %s, %s, %s, %s,"
                    " tstzrange(to_timestamp(%s), clock_timestamp()))",
                    (ctx.job, replica, fence, epoch, _host(), ctx.run_id, since),
                )
                return (-1 if epoch is None else epoch), time.time()
        row = conn.execute(
            "INSERT INTO slot_spans (job, replica, fence, host, run_id, span)"
            " VALUES (%s, %s, %s, %s, %s, tstzrange(to_timestamp(%s), clock_timestamp()))"
            " RETURNING extract(epoch FROM upper(span))",
            (ctx.job, replica, fence, _host(), ctx.run_id, since),
        ).fetchone()
    return None, float(row[0])
