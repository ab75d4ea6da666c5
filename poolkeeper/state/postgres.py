"""Run history and last fire times in PostgreSQL (psycopg 3, the `fleet` extra): the second
backend of the StateStore protocol (poolkeeper.state.store has the contract; docs/state.md the
details). Fleet mode will build on this database; today it is only the run history.

psycopg is imported here only: a poolkeeper without the `fleet` extra never loads this module
(poolkeeper.state.identity.store_at imports it for a `postgresql://` location alone).

Like the SQLite store:
- Writes are cheap: `run_started`/`run_ended`/`set_last_fire` only touch in-memory buffers;
  a flush writes them in one transaction.
- The history never stops the jobs: an unusable database at open is reported by raising
  StateUnreadable, and the factory (store_at) then gives the daemon an in-memory store; a
  write that fails later is logged once and its rows are lost.

Unlike it, for now: `flush(wait=False)` writes synchronously, in the caller's thread (no writer
thread yet). A transaction on a local server takes a few milliseconds per thousand rows, but a
slow or unreachable server stalls the caller for up to its round trips (reconnection attempts
are at most one per RECONNECT_INTERVAL, each bounded by connect_timeout). Fleet mode, which
will run this on the daemon's loop, is to add the writer thread.

Times are double precision epoch seconds from the daemon's clock, as in SQLite; fleet
semantics on the database's clock come with fleet mode.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from poolkeeper.outcomes import RUNNING, Outcome
from poolkeeper.state.rows import (
    RUN_COLUMNS,
    Batch,
    Row,
    by_job,
    end_row,
    history_filter,
    record_columns,
    runs_of_same_kind,
    start_row,
)
from poolkeeper.state.store import ABANDONED_ERROR, RunRecord, StateUnreadable

# The key of the transaction-scoped advisory lock that migrations are applied under, so two
# daemons (or a daemon and a reader) opening a new database at once apply each migration once.
# Any constant works; this one spells "pkSC" (poolkeeper schema) so it is recognisable in
# pg_locks.
MIGRATION_LOCK = 0x706B5343

# Numbered migrations: MIGRATIONS[n - 1] brings the schema from version n - 1 to n, in one
# transaction with its row in pk_schema_version. Append, never edit: a database records
# the versions it has. Table names carry `pk_` because the fleet's database may be shared.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE pk_runs (
            -- start order (what SQLite's rowid gives): an upsert keeps the first insert's seq
            seq bigserial PRIMARY KEY,
            run_id text NOT NULL UNIQUE,
            job text NOT NULL,
            attempt integer NOT NULL,
            scheduled double precision,
            started double precision,
            ended double precision,
            outcome text NOT NULL,
            exit_code integer,
            signal integer,
            worker_pid integer,
            error text
        )""",
        "CREATE INDEX pk_runs_job ON pk_runs (job, seq)",
        "CREATE INDEX pk_runs_ended ON pk_runs (ended)",
        """CREATE TABLE pk_job_state (
            job text PRIMARY KEY,
            last_fire double precision,
            last_run_id text
        )""",
    ),
    # 2: fleet mode (poolkeeper.fleet.db has the statements that use these tables).
    (
        # One row per daemon incarnation (one run of the process); live while lease_until is
        # ahead of the database's now(). fillfactor: the heartbeat rewrites the row every few
        # seconds, and a HOT update needs room on its page.
        """CREATE TABLE pk_hosts (
            incarnation uuid PRIMARY KEY,
            host_id text NOT NULL,
            version text NOT NULL,
            spec_hash text NOT NULL,
            pid integer,
            capacity integer NOT NULL,
            busy integer NOT NULL DEFAULT 0,
            started_at timestamptz NOT NULL DEFAULT now(),
            lease_until timestamptz NOT NULL
        ) WITH (fillfactor = 50)""",
        # The fleet's view of each job: the cursor (nominal time of the last fire created) stops
        # old fires being created again whatever the history holds; the rest is what the hosts
        # need to agree on without reading each other's specs.
        """CREATE TABLE pk_jobs (
            job text PRIMARY KEY,
            cursor_at double precision,
            paused boolean NOT NULL DEFAULT false,
            overlap text NOT NULL DEFAULT 'allow',
            on_lost text NOT NULL DEFAULT 'record',
            replicas integer NOT NULL DEFAULT 0,
            control_gen bigint NOT NULL DEFAULT 0
        )""",
        "CREATE SEQUENCE pk_fence",
        # A fire: one row per scheduled time of a fleet job (UNIQUE (job, fire_key)).
        """CREATE TABLE pk_fires (
            id bigserial PRIMARY KEY,
            job text NOT NULL,
            fire_key text NOT NULL,
            scheduled double precision NOT NULL,
            due_at timestamptz NOT NULL,
            state text NOT NULL DEFAULT 'ready',
            attempt integer NOT NULL DEFAULT 1,
            claimed_inc uuid,
            host_id text,
            fence bigint,
            outcome text,
            error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            claimed_at timestamptz,
            ended_at timestamptz,
            UNIQUE (job, fire_key)
        )""",
        "CREATE INDEX pk_fires_ready ON pk_fires (due_at, id) WHERE state = 'ready'",
        "CREATE INDEX pk_fires_claimed ON pk_fires (claimed_inc) WHERE state = 'claimed'",
        "CREATE INDEX pk_fires_ended ON pk_fires (ended_at) WHERE state = 'ended'",
        # A loop replica of a fleet job: owned by at most one live incarnation; the epoch goes
        # up at every change of owner (the fencing token the replica's run sees).
        """CREATE TABLE pk_slots (
            job text NOT NULL,
            replica integer NOT NULL,
            owner_inc uuid,
            epoch bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (job, replica)
        ) WITH (fillfactor = 50)""",
        # Fleet-wide history: which host (and incarnation) ran it; a run still marked running
        # whose incarnation is no longer live gets its outcome from the reaper (fleet.db.reap).
        "ALTER TABLE pk_runs ADD COLUMN host_id text",
        "ALTER TABLE pk_runs ADD COLUMN incarnation uuid",
        f"CREATE INDEX pk_runs_running ON pk_runs (incarnation) WHERE outcome = '{RUNNING}'",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS pk_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

# Rows buffered before a write forces a flush: it only bounds memory (see sqlite.py).
DEFAULT_BATCH = 20_000

# A broken connection is reopened at the next write or read, but not more often than this:
# with the server down, each attempt may take connect_timeout.
RECONNECT_INTERVAL = 5.0
CONNECT_TIMEOUT = 5

_SQL_START = f"""INSERT INTO pk_runs ({RUN_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)
    ON CONFLICT (run_id) DO NOTHING"""
# An end may arrive without a start row (a run that failed to dispatch): upsert.
_SQL_END = f"""INSERT INTO pk_runs ({RUN_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)
    ON CONFLICT (run_id) DO UPDATE SET job=excluded.job, attempt=excluded.attempt,
    scheduled=excluded.scheduled, started=coalesce(excluded.started, pk_runs.started),
    ended=excluded.ended, outcome=excluded.outcome, exit_code=excluded.exit_code,
    signal=excluded.signal, worker_pid=coalesce(excluded.worker_pid, pk_runs.worker_pid),
    error=excluded.error"""
_SQL_FIRE = """INSERT INTO pk_job_state (job, last_fire) VALUES (%s, %s)
    ON CONFLICT (job) DO UPDATE SET last_fire=excluded.last_fire"""
_SQL_LAST_RUN = """INSERT INTO pk_job_state (job, last_run_id) VALUES (%s, %s)
    ON CONFLICT (job) DO UPDATE SET last_run_id=excluded.last_run_id"""

_RECORD_COLUMNS = record_columns("r")


def redact(url: str) -> str:
    """The URL without its password (in the userinfo or as a `password=` parameter): for
    messages and `location`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}@{hostport}"
    # Split by hand rather than parse and re-encode: the rest stays as the user wrote it.
    query = "&".join(p for p in parts.query.split("&") if not p.startswith("password="))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class PostgresStore:
    """A StateStore in one PostgreSQL database (`url`: a libpq URL). One writer per database
    (the daemon) and any number of readers (`readonly=True`), each with its own connection.
    One thread uses it (store.py: Threads)."""

    def __init__(
        self,
        url: str,
        *,
        log: logging.Logger | None = None,
        batch: int = DEFAULT_BATCH,
        readonly: bool = False,
    ):
        self.url = url
        self.log = log or logging.getLogger("poolkeeper.state.postgres")
        self.batch = batch
        self.readonly = readonly
        self._location = redact(url)
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._closed = False
        self._last_attempt = 0.0  # monotonic time of the last (re)connection attempt
        # A reader opened before any daemon created the schema: it reads an empty history.
        self._empty = False
        self._runs: dict[str, tuple[str, Row]] = {}
        self._fires: dict[str, float] = {}
        self._last_run: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._failing = False  # a write error was logged; stay quiet until writes work again
        self._dropped = 0

    # --- open / close -------------------------------------------------------------

    def open(self) -> None:
        """Connect and bring the schema to SCHEMA_VERSION (a reader only reads it). Raises
        StateUnreadable (one line) for an unreachable server, a missing database, a schema
        newer than this poolkeeper's: store_at turns that into the daemon's in-memory store."""
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            raise StateUnreadable(self._location, _one_line(exc)) from None

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        self._last_attempt = time.monotonic()
        params = psycopg.conninfo.conninfo_to_dict(self.url)
        extra: dict[str, Any] = {}
        if "connect_timeout" not in params:  # libpq's default is to wait forever
            extra["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in params:  # pg_stat_activity tells whose it is
            extra["application_name"] = "poolkeeper-reader" if self.readonly else "poolkeeper"
        # autocommit: each read sees the latest commits; writes open explicit transactions.
        conn = psycopg.connect(self.url, autocommit=True, **extra)
        try:
            if self.readonly:
                # For the session, not conn.read_only: psycopg applies that at BEGIN, which
                # autocommit never sends.
                conn.execute("SET default_transaction_read_only = on")
                version = _version(conn)
                self._empty = version == 0
            else:
                version = _migrate(conn)
            if version > SCHEMA_VERSION:
                raise StateUnreadable(
                    self._location,
                    f"schema version {version} is newer than this poolkeeper's ({SCHEMA_VERSION})",
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]] | None:
        """The open connection, reopened if it broke (a server restart, a killed backend):
        for the daemon at most once per RECONNECT_INTERVAL (None in between: its rows are
        lost, its reads empty, as the contract has it); a reader tries each time, since it
        must raise rather than answer empty. None when there is none."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            return None
        if not self.readonly and time.monotonic() - self._last_attempt < RECONNECT_INTERVAL:
            return None
        try:
            self._conn = self._connect()
        except (psycopg.Error, StateUnreadable) as exc:
            self._conn = None
            if self.readonly:
                raise StateUnreadable(self._location, _one_line(exc)) from None
            self._report(exc, 0)
        return self._conn

    @property
    def location(self) -> str | None:
        return self._location

    def fds(self) -> list[int]:
        """The connection's socket: a forked worker must not share the session's protocol
        stream (a byte written from the child would corrupt it)."""
        conn = self._conn
        if conn is None or conn.closed:
            return []
        return [conn.fileno()]

    def close(self) -> None:
        """Flush and disconnect. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- writes (buffered) ------------------------------------------------------------------

    def run_started(
        self,
        *,
        run_id: str | int,
        job: str,
        attempt: int,
        scheduled_at: float | None,
        started_at: float | None,
        worker_pid: int | None,
    ) -> None:
        row = start_row(run_id, job, attempt, scheduled_at, started_at, worker_pid)
        self._runs.setdefault(row[0], (_SQL_START, row))
        self._maybe_flush()

    def run_ended(
        self,
        *,
        run_id: str | int,
        job: str,
        attempt: int,
        scheduled_at: float | None,
        started_at: float | None,
        ended_at: float,
        outcome: str,
        exit_code: int | None = None,
        signal: int | None = None,
        worker_pid: int | None = None,
        error: str | None = None,
    ) -> None:
        row = end_row(
            run_id,
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
        # Re-assigning keeps a buffered start's position: history order is start order.
        self._runs[row[0]] = (_SQL_END, row)
        self._last_run[job] = row[0]
        self._counts[row[6]] = self._counts.get(row[6], 0) + 1  # by outcome
        self._maybe_flush()

    def set_last_fire(self, job: str, when: float) -> None:
        self._fires[job] = when

    def _maybe_flush(self) -> None:
        if len(self._runs) >= self.batch:
            self.flush()

    def flush(self, wait: bool = True) -> None:
        """Write everything buffered in one transaction. `wait=False` writes synchronously too
        for now (see the module's docstring): the contract only asks that batches be written
        whole and in order, which this does. Never raises: on an error the batch is dropped and
        the error logged once (until writes work again)."""
        if not (self._runs or self._fires or self._last_run) or self._closed:
            return
        batch = Batch(self._runs, self._fires, self._last_run)
        self._runs, self._fires, self._last_run = {}, {}, {}
        rows = len(batch.runs) + len(batch.fires)
        conn = self._connection()
        if conn is None:
            self._dropped += rows
            return
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    for statement, group in runs_of_same_kind(batch.runs.values()):
                        cur.executemany(statement, group)
                    if batch.fires:
                        cur.executemany(_SQL_FIRE, list(batch.fires.items()))
                    if batch.last_run:
                        cur.executemany(_SQL_LAST_RUN, list(batch.last_run.items()))
        except psycopg.Error as exc:
            self._report(exc, rows)
            return
        if self._failing:
            self._failing = False
            self.log.warning("state DB writes work again (%d records were lost)", self._dropped)
            self._dropped = 0

    def _report(self, exc: BaseException, rows: int) -> None:
        self._dropped += rows
        if not self._failing:
            self._failing = True
            self.log.error(
                "state DB %s: write failed (%s); run history is being lost, the jobs keep running",
                self._location,
                _one_line(exc),
            )

    # --- maintenance --------------------------------------------------------------------------

    def mark_abandoned(self, now: float) -> int:
        """Runs still 'running' were in flight when an earlier daemon died: they become 'lost'
        and each job's last finished run. Returns how many."""
        self.flush()
        conn = self._connection()
        if conn is None:
            return 0
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    """UPDATE pk_runs SET outcome=%s, ended=%s, error=%s WHERE outcome=%s
                       RETURNING job, run_id, seq""",
                    (Outcome.LOST.value, now, ABANDONED_ERROR, RUNNING),
                )
                abandoned = sorted(cur.fetchall(), key=lambda r: r[2])
                # dict(): each job's newest (by start order) abandoned run is its last.
                last = {job: run_id for job, run_id, _seq in abandoned}
                if last:
                    cur.executemany(_SQL_LAST_RUN, list(last.items()))
            return len(abandoned)
        except psycopg.Error as exc:
            self._report(exc, 0)
            return 0

    def prune(self, keep_seconds: float, now: float) -> int:
        """Delete finished runs that ended more than `keep_seconds` ago, except each job's
        last finished run. Returns how many."""
        self.flush()
        conn = self._connection()
        if conn is None:
            return 0
        try:
            cur = conn.execute(
                """DELETE FROM pk_runs WHERE ended < %s AND outcome != %s AND run_id NOT IN
                   (SELECT last_run_id FROM pk_job_state WHERE last_run_id IS NOT NULL)""",
                (now - keep_seconds, RUNNING),
            )
            return cur.rowcount
        except psycopg.Error as exc:
            self._report(exc, 0)
            return 0

    # --- reads ------------------------------------------------------------------------------
    # Reads flush first so they see every write made so far (a reader has nothing to flush).

    def last_fire(self, job: str) -> float | None:
        if job in self._fires:
            return self._fires[job]
        rows = self._query("SELECT last_fire FROM pk_job_state WHERE job = %s", (job,))
        value: float | None = rows[0][0] if rows else None
        return value

    def history(
        self,
        job: str | None = None,
        limit: int | None = 50,
        *,
        since: float | None = None,
        outcome: str | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first in start order; at most `limit` (None: all)."""
        self.flush()
        where, args = history_filter(job, since, outcome, "%s", "r.")
        rows = self._query(
            f"SELECT {_RECORD_COLUMNS} FROM pk_runs r {where} ORDER BY r.seq DESC LIMIT %s",
            (*args, limit),  # LIMIT NULL: no limit
        )
        return [RunRecord(*r) for r in rows]

    def ended_between(self, start: float, end: float) -> dict[str, dict[str, int]]:
        self.flush()
        rows = self._query(
            "SELECT job, outcome, count(*) FROM pk_runs WHERE ended >= %s AND ended < %s "
            "GROUP BY job, outcome",
            (start, end),
        )
        return by_job(rows)

    def last_outcomes(self) -> dict[str, RunRecord]:
        self.flush()
        rows = self._query(
            f"SELECT {_RECORD_COLUMNS} FROM pk_job_state j JOIN pk_runs r "
            "ON r.run_id = j.last_run_id"
        )
        return {r[0]: RunRecord(*r) for r in rows}

    def counts(self, overall: bool = False) -> dict[str, int]:
        if not overall:
            return dict(self._counts)
        self.flush()
        rows = self._query(
            "SELECT outcome, count(*) FROM pk_runs WHERE outcome != %s GROUP BY outcome",
            (RUNNING,),
        )
        return {outcome: int(n) for outcome, n in rows}

    def _query(self, statement: str, args: Row = ()) -> list[Row]:
        if self._empty:
            return []
        conn = self._connection()
        if conn is None:
            return []
        try:
            return conn.execute(statement, args).fetchall()
        except psycopg.Error as exc:
            if self.readonly:
                raise StateUnreadable(self._location, _one_line(exc)) from None
            self.log.error("state DB %s: read failed (%s)", self._location, _one_line(exc))
            return []


def _one_line(exc: BaseException) -> str:
    """psycopg's messages may span lines (libpq's DETAIL, HINT): the journal wants one."""
    text = str(exc.reason) if isinstance(exc, StateUnreadable) else str(exc)
    return " ".join(text.split())


def _version(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """The schema version of the database: 0 when it has none yet."""
    row = conn.execute("SELECT to_regclass('pk_schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM pk_schema_version").fetchone()
    return int(row[0]) if row is not None else 0


def _migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Bring the schema to SCHEMA_VERSION. The usual case, a database already there, reads
    the version and takes no lock. Otherwise all the missing migrations are applied in one
    transaction under the advisory lock, the version read again inside it: of two stores
    opening a new database at once, the second waits for the first and then finds nothing to
    do. A newer version is left alone: returned, for the caller to refuse."""
    current = _version(conn)
    if current >= SCHEMA_VERSION:
        return current
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(_VERSION_TABLE)
        current = _version(conn)
        for number in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO pk_schema_version (version) VALUES (%s)", (number,))
    return max(current, SCHEMA_VERSION)
