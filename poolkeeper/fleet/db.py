"""The fleet's SQL, one function per decision, each in its own short transaction. The tables
are migration 2 of poolkeeper.state.postgres.

Every comparison of time that decides liveness is made with the database's `now()`, never a
host's clock: a lease is live while `lease_until >= now()`. A host's clock only dates what it
reports (a fire's nominal time, a run's start and end).

Rules the statements keep:
- a fire is created once: `UNIQUE (job, fire_key)` and the job's cursor, both under the job
  row's lock (`create_fires`); a host whose clock is behind only finds its fires there already;
- a fire is claimed once, and only by a live incarnation (`claim_fires`: SKIP LOCKED, and the
  claimer's lease checked in the same statement); its end counts only with its fence
  (`finish_fires`): a fire the reaper took back is not ended by its old claimer;
- a slot (a loop replica of a fleet job) has one live owner at most; it changes owner only
  when the owner released it or is no longer live, and each change draws a new epoch.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import psycopg

from poolkeeper.outcomes import RUNNING, Outcome
from poolkeeper.state.rows import RUN_COLUMNS, Row

Conn = psycopg.Connection[tuple[Any, ...]]

WAKE_CHANNEL = "pk_wake"  # a fire was created: claim
CONTROL_CHANNEL = "pk_control"  # a job was paused or resumed: read pk_jobs
# A dead incarnation's row is kept this long for `status` ("b died at ..."), then deleted.
DEAD_HOSTS_KEPT = "1 hour"
_LIVE = "lease_until >= now()"
_IS_LIVE = f"EXISTS (SELECT 1 FROM pk_hosts h WHERE h.incarnation = %s AND h.{_LIVE})"


class JobInfo(NamedTuple):
    """What the fleet's hosts agree on about a job (pk_jobs), from one host's spec."""

    name: str
    overlap: str
    on_lost: str
    replicas: int  # fleet loop replicas; 0 for a scheduled job


class NewFire(NamedTuple):
    job: str
    key: str
    nominal: float  # epoch seconds
    due: float  # nominal + jitter, epoch seconds (the order of claims)


class Claim(NamedTuple):
    fire_id: int
    job: str
    key: str
    scheduled: float
    attempt: int
    fence: int


class Slot(NamedTuple):
    job: str
    replica: int
    epoch: int


class Host(NamedTuple):
    incarnation: str
    host_id: str
    version: str
    spec_hash: str
    pid: int | None
    capacity: int
    busy: int
    started: float
    lease_until: float
    live: bool


class Ended(NamedTuple):
    """A fleet fire's final outcome, as its claimer reports it."""

    fire_id: int
    fence: int
    outcome: Outcome
    error: str | None


# -- hosts -----------------------------------------------------------------------------------


def register(
    conn: Conn,
    *,
    host_id: str,
    version: str,
    spec_hash: str,
    pid: int,
    capacity: int,
    lease: float,
) -> str:
    """A new incarnation of this host, live for `lease` seconds from now; returns its id."""
    incarnation = str(uuid.uuid4())
    with conn.transaction():
        conn.execute(
            """INSERT INTO pk_hosts (incarnation, host_id, version, spec_hash, pid, capacity,
                   lease_until)
               VALUES (%s, %s, %s, %s, %s, %s, now() + %s * interval '1 second')""",
            (incarnation, host_id, version, spec_hash, pid, capacity, lease),
        )
        conn.execute(
            f"DELETE FROM pk_hosts WHERE lease_until < now() - interval '{DEAD_HOSTS_KEPT}'"
        )
    return incarnation


def heartbeat(conn: Conn, incarnation: str, *, lease: float, capacity: int, busy: int) -> bool:
    """Extend the lease; False when it had already run out (it is not revived: others may have
    taken this incarnation's work, so it must stop what it holds and register again)."""
    row = conn.execute(
        f"""UPDATE pk_hosts SET lease_until = now() + %s * interval '1 second',
               capacity = %s, busy = %s
            WHERE incarnation = %s AND {_LIVE} RETURNING 1""",
        (lease, capacity, busy, incarnation),
    ).fetchone()
    return row is not None


def leave(conn: Conn, incarnation: str) -> None:
    """A clean stop: give back the slots and end the lease now, so the others take over at
    once rather than when the lease would have run out."""
    with conn.transaction():
        conn.execute("UPDATE pk_slots SET owner_inc = NULL WHERE owner_inc = %s", (incarnation,))
        conn.execute(
            "UPDATE pk_hosts SET lease_until = now() - interval '1 millisecond' "
            "WHERE incarnation = %s",
            (incarnation,),
        )


def hosts(conn: Conn) -> list[Host]:
    """Every incarnation still listed (live first), for `status` and the capacity shares."""
    rows = conn.execute(
        f"""SELECT incarnation::text, host_id, version, spec_hash, pid, capacity, busy,
               extract(epoch FROM started_at)::float8, extract(epoch FROM lease_until)::float8,
               {_LIVE}
            FROM pk_hosts ORDER BY {_LIVE} DESC, host_id, started_at"""
    ).fetchall()
    return [Host(*row) for row in rows]


# -- jobs ------------------------------------------------------------------------------------


def sync_jobs(conn: Conn, jobs: Sequence[JobInfo]) -> None:
    """Make the fleet's rows of this host's fleet jobs: the job (its cursor and pause are
    kept), one slot per replica of a loop. Slots beyond the count that nobody live holds go;
    a live owner gives back its own when its spec says so. The last host to sync sets the
    shared settings (a fleet whose hosts disagree is warned about: the spec hashes differ)."""
    if not jobs:
        return
    with conn.transaction():
        # In name order: two hosts syncing at once lock the rows in the same order.
        ordered = sorted(jobs)
        conn.cursor().executemany(
            """INSERT INTO pk_jobs (job, overlap, on_lost, replicas) VALUES (%s, %s, %s, %s)
               ON CONFLICT (job) DO UPDATE SET overlap = excluded.overlap,
                   on_lost = excluded.on_lost, replicas = excluded.replicas""",
            ordered,
        )
        slots = [(job.name, r) for job in ordered for r in range(job.replicas)]
        if slots:
            conn.cursor().executemany(
                "INSERT INTO pk_slots (job, replica) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                slots,
            )
        conn.execute(
            f"""DELETE FROM pk_slots s USING pk_jobs j
                WHERE s.job = j.job AND j.job = ANY(%s) AND s.replica >= j.replicas
                  AND (s.owner_inc IS NULL OR NOT EXISTS (SELECT 1 FROM pk_hosts h
                       WHERE h.incarnation = s.owner_inc AND h.{_LIVE}))""",
            ([job.name for job in ordered],),
        )


def control_state(conn: Conn, jobs: Sequence[str]) -> tuple[dict[str, bool], int]:
    """The pause flag of each of `jobs`, and the fleet's control generation (polled: a NOTIFY
    is not replayed to a host that was not listening)."""
    rows = conn.execute(
        "SELECT job, paused, control_gen FROM pk_jobs WHERE job = ANY(%s)", (list(jobs),)
    ).fetchall()
    gen = conn.execute("SELECT coalesce(max(control_gen), 0) FROM pk_jobs").fetchone()
    return {job: paused for job, paused, _ in rows}, int(gen[0]) if gen else 0


def set_paused(conn: Conn, job: str, paused: bool) -> bool:
    """Pause or resume a job fleet-wide; False if the fleet has no such job. A pause drops
    the fires that wait (they would all run at the resume)."""
    with conn.transaction():
        row = conn.execute(
            """UPDATE pk_jobs SET paused = %s, control_gen = control_gen + 1
               WHERE job = %s RETURNING 1""",
            (paused, job),
        ).fetchone()
        if row is None:
            return False
        if paused:
            conn.execute("DELETE FROM pk_fires WHERE job = %s AND state = 'ready'", (job,))
        conn.execute("SELECT pg_notify(%s, %s)", (CONTROL_CHANNEL, job))
    return True


# -- fires -----------------------------------------------------------------------------------


def create_fires(conn: Conn, fires: Sequence[NewFire]) -> int:
    """Create the fires this host's schedules found due; returns how many were new. Under the
    job row's lock: a fire at or before the job's cursor was created already (by any host: the
    unique key would drop it anyway, the cursor also after the history was pruned), and the
    job's `overlap` holds across the fleet: `skip` creates none while a fire is claimed,
    `queue` keeps one waiting at most."""
    if not fires:
        return 0
    by_job: dict[str, list[NewFire]] = {}
    for fire in fires:
        by_job.setdefault(fire.job, []).append(fire)
    created = 0
    with conn.transaction():
        rows = conn.execute(
            """SELECT j.job, j.cursor_at, j.overlap, j.paused,
                   EXISTS (SELECT 1 FROM pk_fires f WHERE f.job = j.job AND f.state = 'claimed'),
                   EXISTS (SELECT 1 FROM pk_fires f WHERE f.job = j.job AND f.state = 'ready')
               FROM pk_jobs j WHERE j.job = ANY(%s) ORDER BY j.job FOR UPDATE OF j""",
            (sorted(by_job),),
        ).fetchall()
        inserts: list[Row] = []
        cursors: list[Row] = []
        for job, cursor_at, overlap, paused, claimed, waiting in rows:
            new = [f for f in by_job[job] if cursor_at is None or f.nominal > cursor_at + 1e-6]
            if not new:
                continue
            cursors.append((max(f.nominal for f in new), job))
            if paused or (overlap == "skip" and claimed) or (overlap == "queue" and waiting):
                continue  # the slot passes: the cursor moves on, no run
            if overlap != "allow":
                new = new[-1:]  # one run for the fires that came together
            inserts += [(f.job, f.key, f.nominal, f.due) for f in new]
        if cursors:
            conn.cursor().executemany(
                "UPDATE pk_jobs SET cursor_at = %s WHERE job = %s", cursors
            )
        for row in inserts:
            hit = conn.execute(
                """INSERT INTO pk_fires (job, fire_key, scheduled, due_at)
                   VALUES (%s, %s, %s, to_timestamp(%s)) ON CONFLICT DO NOTHING RETURNING 1""",
                row,
            ).fetchone()
            created += hit is not None
        if created:
            conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))
    return created


def run_now(conn: Conn, job: str, key: str, now: float) -> bool:
    """A fire of `job` outside its schedule; False if the fleet has no such job."""
    with conn.transaction():
        row = conn.execute(
            """INSERT INTO pk_fires (job, fire_key, scheduled, due_at)
               SELECT job, %s, %s, now() FROM pk_jobs WHERE job = %s RETURNING 1""",
            (key, now, job),
        ).fetchone()
        if row is not None:
            conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))
    return row is not None


def claim_fires(
    conn: Conn, incarnation: str, host_id: str, jobs: Sequence[str], limit: int
) -> list[Claim]:
    """Claim up to `limit` waiting fires of `jobs` (this host's fleet jobs), oldest first;
    none if this incarnation's lease has run out. SKIP LOCKED: hosts claiming at once take
    different fires; the CTE bounds the update by LIMIT."""
    if limit <= 0 or not jobs:
        return []
    with conn.transaction():
        rows = conn.execute(
            f"""WITH c AS (
                   SELECT f.id FROM pk_fires f JOIN pk_jobs j USING (job)
                   WHERE f.state = 'ready' AND f.job = ANY(%s) AND NOT j.paused
                     AND (j.overlap = 'allow' OR NOT EXISTS (SELECT 1 FROM pk_fires g
                          WHERE g.job = f.job AND g.state = 'claimed'))
                     AND {_IS_LIVE}
                   ORDER BY f.due_at, f.id LIMIT %s FOR UPDATE OF f SKIP LOCKED)
               UPDATE pk_fires f SET state = 'claimed', claimed_inc = %s, host_id = %s,
                   fence = nextval('pk_fence'), claimed_at = now()
               FROM c WHERE f.id = c.id
               RETURNING f.id, f.job, f.fire_key, f.scheduled, f.attempt, f.fence""",
            (list(jobs), incarnation, limit, incarnation, host_id),
        ).fetchall()
    return [Claim(*row) for row in rows]


def finish_fires(conn: Conn, incarnation: str, ended: Iterable[Ended]) -> list[Ended]:
    """Record the final outcome of claimed fires; returns those whose claim was no longer
    this incarnation's (the reaper took it back: their run is superseded)."""
    superseded: list[Ended] = []
    with conn.transaction():
        for end in ended:
            row = conn.execute(
                """UPDATE pk_fires SET state = 'ended', outcome = %s, error = %s,
                       ended_at = now()
                   WHERE id = %s AND fence = %s AND claimed_inc = %s AND state = 'claimed'
                   RETURNING 1""",
                (end.outcome.value, end.error, end.fire_id, end.fence, incarnation),
            ).fetchone()
            if row is None:
                superseded.append(end)
    return superseded


def give_back(conn: Conn, incarnation: str, claims: Iterable[Claim]) -> None:
    """Claimed fires whose runs never started here (a drain): they wait again, for any host."""
    with conn.transaction():
        conn.cursor().executemany(
            """UPDATE pk_fires SET state = 'ready', claimed_inc = NULL, host_id = NULL,
                   fence = NULL, claimed_at = NULL
               WHERE id = %s AND fence = %s AND claimed_inc = %s AND state = 'claimed'""",
            [(c.fire_id, c.fence, incarnation) for c in claims],
        )
        conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))


class Reaped(NamedTuple):
    job: str
    key: str
    host_id: str | None
    retried: bool


def reap(conn: Conn) -> list[Reaped]:
    """The work of incarnations no longer live: their claimed fires are recorded lost, or
    wait again (attempt + 1) where the job says `on_lost: retry`; their runs still marked
    running in the history get the lost outcome. Any host may do it: SKIP LOCKED."""
    lost = Outcome.LOST.value
    with conn.transaction():
        rows = conn.execute(
            f"""WITH dead AS (
                   SELECT f.id FROM pk_fires f WHERE f.state = 'claimed'
                     AND NOT EXISTS (SELECT 1 FROM pk_hosts h
                         WHERE h.incarnation = f.claimed_inc AND h.{_LIVE})
                   FOR UPDATE SKIP LOCKED)
               UPDATE pk_fires f SET
                   state = CASE WHEN j.on_lost = 'retry' THEN 'ready' ELSE 'ended' END,
                   outcome = CASE WHEN j.on_lost = 'retry' THEN NULL ELSE %s END,
                   error = 'host ' || coalesce(f.host_id, '?') || ' lost its lease',
                   attempt = f.attempt + CASE WHEN j.on_lost = 'retry' THEN 1 ELSE 0 END,
                   claimed_inc = CASE WHEN j.on_lost = 'retry' THEN NULL ELSE f.claimed_inc END,
                   ended_at = CASE WHEN j.on_lost = 'retry' THEN NULL ELSE now() END
               FROM dead, pk_jobs j WHERE f.id = dead.id AND j.job = f.job
               RETURNING f.job, f.fire_key, f.host_id, f.state = 'ready'""",
            (lost,),
        ).fetchall()
        if any(retried for *_, retried in rows):  # a fire waits again: wake the fleet
            conn.execute("SELECT pg_notify(%s, '')", (WAKE_CHANNEL,))
        conn.execute(
            f"""UPDATE pk_runs r SET outcome = %s, ended = extract(epoch FROM now()),
                   error = 'host ' || coalesce(r.host_id, '?') || ' lost its lease'
                WHERE r.outcome = '{RUNNING}' AND r.incarnation IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM pk_hosts h
                      WHERE h.incarnation = r.incarnation AND h.{_LIVE})""",
            (lost,),
        )
    return [Reaped(*row) for row in rows]


def prune(conn: Conn, keep: float) -> int:
    """The fleet's history older than `keep` seconds (state.keep): ended fires and finished
    runs, but not a job's last run (`status` shows it). Safe for the schedules: each job's
    cursor, not its fires, stops old fires being created again."""
    with conn.transaction():
        fires = conn.execute(
            """DELETE FROM pk_fires WHERE state = 'ended'
               AND ended_at < now() - %s * interval '1 second'""",
            (keep,),
        ).rowcount
        runs = conn.execute(
            f"""DELETE FROM pk_runs WHERE outcome <> '{RUNNING}'
                AND ended < extract(epoch FROM now()) - %s
                AND run_id NOT IN (SELECT last_run_id FROM pk_job_state
                                   WHERE last_run_id IS NOT NULL)""",
            (keep,),
        ).rowcount
    return fires + runs


# -- slots (loop replicas of fleet jobs) -----------------------------------------------------


def claim_slots(conn: Conn, incarnation: str, jobs: Sequence[str], want: int) -> list[Slot]:
    """Take up to `want` slots of `jobs` that no live incarnation owns (never released ones
    first: none is preferred; the order is by job and replica), each with a new epoch."""
    if want <= 0 or not jobs:
        return []
    with conn.transaction():
        rows = conn.execute(
            f"""WITH x AS (
                   SELECT s.job, s.replica FROM pk_slots s JOIN pk_jobs j USING (job)
                   WHERE s.job = ANY(%s) AND NOT j.paused AND s.replica < j.replicas
                     AND (s.owner_inc IS NULL OR NOT EXISTS (SELECT 1 FROM pk_hosts h
                          WHERE h.incarnation = s.owner_inc AND h.{_LIVE}))
                     AND {_IS_LIVE}
                   ORDER BY s.job, s.replica LIMIT %s FOR UPDATE OF s SKIP LOCKED)
               UPDATE pk_slots s SET owner_inc = %s, epoch = nextval('pk_fence')
               FROM x WHERE s.job = x.job AND s.replica = x.replica
               RETURNING s.job, s.replica, s.epoch""",
            (list(jobs), incarnation, want, incarnation),
        ).fetchall()
    return [Slot(*row) for row in rows]


def release_slots(conn: Conn, incarnation: str, slots: Iterable[Slot]) -> None:
    """Give back slots whose run has ended (only if still ours, at the same epoch)."""
    with conn.transaction():
        conn.cursor().executemany(
            """UPDATE pk_slots SET owner_inc = NULL
               WHERE job = %s AND replica = %s AND epoch = %s AND owner_inc = %s""",
            [(s.job, s.replica, s.epoch, incarnation) for s in slots],
        )


def slot_count(conn: Conn, jobs: Sequence[str]) -> int:
    """How many slots the fleet runs for `jobs` (unpaused): what the shares divide."""
    row = conn.execute(
        "SELECT coalesce(sum(replicas), 0) FROM pk_jobs WHERE job = ANY(%s) AND NOT paused",
        (list(jobs),),
    ).fetchone()
    return int(row[0]) if row else 0


# -- history ---------------------------------------------------------------------------------

_RUN_COLUMNS = f"{RUN_COLUMNS}, host_id, incarnation"
_PLACES = ", ".join(["%s"] * (_RUN_COLUMNS.count(",") + 1))
WRITE_START = f"""INSERT INTO pk_runs ({_RUN_COLUMNS}) VALUES ({_PLACES})
    ON CONFLICT (run_id) DO NOTHING"""
WRITE_END = f"""INSERT INTO pk_runs ({_RUN_COLUMNS}) VALUES ({_PLACES})
    ON CONFLICT (run_id) DO UPDATE SET started = coalesce(excluded.started, pk_runs.started),
    ended = excluded.ended, outcome = excluded.outcome, exit_code = excluded.exit_code,
    signal = excluded.signal, worker_pid = coalesce(excluded.worker_pid, pk_runs.worker_pid),
    error = excluded.error"""


def write_runs(conn: Conn, rows: Sequence[tuple[str, Row]]) -> None:
    """This host's run rows (start or end, each with its statement), in one transaction; an
    end is also its job's last run (what `status` shows), as the state store keeps it."""
    with conn.transaction():
        cur = conn.cursor()
        last: dict[str, str] = {}
        for sql, row in rows:
            cur.execute(sql, row)
            if sql is WRITE_END:
                last[row[1]] = row[0]
        if last:
            cur.executemany(
                """INSERT INTO pk_job_state (job, last_run_id) VALUES (%s, %s)
                   ON CONFLICT (job) DO UPDATE SET last_run_id = excluded.last_run_id""",
                sorted(last.items()),
            )
