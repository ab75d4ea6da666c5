"""Run history and last fire times in SQLite (standard library, WAL): the first backend of the
StateStore protocol (poolkeeper.state.store has the contract; docs/state.md the details).

Two promises shape this module:
- Writes are cheap: `run_started`/`run_ended`/`set_last_fire` only touch in-memory buffers;
  rows reach the disk in batched transactions (`flush()`, or when the buffer fills). The
  daemon's periodic `flush(wait=False)` hands the batch to a writer thread and returns at
  once: a transaction of thousands of rows (and the WAL checkpoint's fsync some commits do)
  never stalls the main loop. sqlite3 lets go of the GIL while SQLite works.
- The state DB never stops the jobs: a corrupt file is moved aside, an unwritable location
  falls back to an in-memory DB, and a write error is logged once and swallowed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
import time
import weakref

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

SCHEMA_VERSION = 1

# Rows buffered before a write forces a flush. The daemon flushes from its loop every ~0.5 s,
# so this only bounds memory (a few MB): at 10,000 runs/s the loop's own flush writes 5,000
# rows in one transaction, never a forced one in the middle of a turn.
DEFAULT_BATCH = 20_000

# The GIL's switch interval while the writer thread writes (see _write_behind).
WRITER_SWITCH_INTERVAL = 0.0002

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT NOT NULL UNIQUE,
        job TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        scheduled REAL,
        started REAL,
        ended REAL,
        outcome TEXT NOT NULL,
        exit_code INTEGER,
        signal INTEGER,
        worker_pid INTEGER,
        error TEXT
    )""",
    # (job, rowid): history of one job, newest first. ended: pruning.
    "CREATE INDEX IF NOT EXISTS runs_job ON runs(job)",
    "CREATE INDEX IF NOT EXISTS runs_ended ON runs(ended)",
    # One row per job: its last fire (for catchup / interval resume) and its last finished
    # run (so `status` doesn't scan the history).
    """CREATE TABLE IF NOT EXISTS jobs (
        job TEXT PRIMARY KEY,
        last_fire REAL,
        last_run_id TEXT
    )""",
)

_SQL_START = f"""INSERT INTO runs ({RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)
    ON CONFLICT(run_id) DO NOTHING"""
# An end may arrive without a start row (a run that failed to dispatch): upsert.
_SQL_END = f"""INSERT INTO runs ({RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)
    ON CONFLICT(run_id) DO UPDATE SET job=excluded.job, attempt=excluded.attempt,
    scheduled=excluded.scheduled, started=coalesce(excluded.started, runs.started),
    ended=excluded.ended, outcome=excluded.outcome, exit_code=excluded.exit_code,
    signal=excluded.signal, worker_pid=coalesce(excluded.worker_pid, runs.worker_pid),
    error=excluded.error"""
_SQL_FIRE = """INSERT INTO jobs (job, last_fire) VALUES (?, ?)
    ON CONFLICT(job) DO UPDATE SET last_fire=excluded.last_fire"""
_SQL_LAST_RUN = """INSERT INTO jobs (job, last_run_id) VALUES (?, ?)
    ON CONFLICT(job) DO UPDATE SET last_run_id=excluded.last_run_id"""


class SqliteStore:
    """A StateStore in one SQLite file. One writer per file (the daemon, which holds the
    single-instance lock of poolkeeper.state.identity) and any number of readers
    (`readonly=True`), each in its own process. One thread uses it: the daemon's main loop,
    which serves the control socket too. The mutex only keeps a flush whole should another
    thread ever call in (a test, a debugger); uncontended it costs nothing measurable."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        log: logging.Logger | None = None,
        batch: int = DEFAULT_BATCH,
        readonly: bool = False,
    ):
        # str, not pathlib.Path: pathlib would be the daemon's only reason to import it
        # (and urllib.parse with it) on the way to READY=1.
        self.path = os.fspath(path) if os.fspath(path) != ":memory:" else None
        self.log = log or logging.getLogger("poolkeeper.state.sqlite")
        self.batch = batch
        self.readonly = readonly
        self.persistent = False  # True once a file DB is open (False: in-memory fallback)
        self._conn: sqlite3.Connection | None = None
        # Two locks, so the caller's thread never waits for a transaction the writer thread is
        # in: _mutex guards the buffers (and orders flushes), _db the connection.
        self._mutex = threading.RLock()
        self._db = threading.Lock()
        # The batch handed to the writer thread and not written yet (at most one: a
        # flush(wait=False) while one is pending leaves its rows in the buffers for the next).
        self._handed: Batch | None = None
        self._handed_cv = threading.Condition(threading.Lock())
        self._writer: threading.Thread | None = None
        self._stop_writer = False
        # run_id -> (sql, row); dict order is arrival order, and an end replaces its start.
        self._runs: dict[str, tuple[str, Row]] = {}
        self._fires: dict[str, float] = {}
        self._last_run: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._failing = False  # a write error was logged; stay quiet until writes work again
        self._dropped = 0

    # --- open / close -------------------------------------------------------------

    def open(self) -> None:
        """Open (creating directories and schema). The daemon's store never raises for a bad
        file or location: a corrupt file is moved aside, an unusable location gives an
        in-memory DB. A reader's store (`readonly`) reads a missing DB as an empty history and
        raises StateUnreadable for any other problem."""
        with self._mutex, self._db:
            self._open()

    def _open(self) -> None:
        """open(), with both locks held (or only _db, by the writer thread reopening a DB
        corrupted under it: the caller's thread may hold _mutex while it waits for us)."""
        if self.path is None:
            self._use_memory(None)
            return
        try:
            self._conn = self._connect_file()
            self.persistent = True
        except FileNotFoundError as exc:
            # Read-only (`poolkeeper history`) before any daemon ran: an empty history.
            self._use_memory(None if self.readonly else exc)
        except (sqlite3.DatabaseError, OSError) as exc:
            if self.readonly:
                raise StateUnreadable(self.path, exc) from None
            if isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc):
                self._open_after_corruption(exc)
            else:
                self._use_memory(exc)

    def _connect_file(self) -> sqlite3.Connection:
        assert self.path is not None
        if self.readonly:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"no state DB at {self.path}")
            try:
                return self._connect_readonly("mode=ro")
            except sqlite3.OperationalError:
                # Reading a WAL database creates its -shm file, which a user who may not write
                # the directory (a stopped root daemon's) cannot. With no -wal file the DB file
                # holds every committed write: read it as immutable.
                if os.path.exists(self.path + "-wal"):
                    raise
                return self._connect_readonly("mode=ro&immutable=1")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # timeout: a `poolkeeper history` reader never blocks us in WAL, but a checkpoint may.
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=2.0)
        try:
            # Reading the header here is what detects a file that isn't a database.
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                self.log.warning(
                    "state DB %s: WAL mode unavailable, using rollback journal", self.path
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            _migrate(conn)
            _probe_write(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_readonly(self, query: str) -> sqlite3.Connection:
        from urllib.parse import quote  # a reader's import: the daemon never opens read-only

        assert self.path is not None
        conn = sqlite3.connect(
            f"file:{quote(self.path)}?{query}", uri=True, check_same_thread=False, timeout=2.0
        )
        try:
            if _check_version(conn) < 1:  # created, no schema yet: nothing ran
                raise FileNotFoundError(f"no schema in {self.path} yet")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_after_corruption(self, exc: BaseException) -> None:
        assert self.path is not None
        first = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        aside, n = first, 1
        while os.path.exists(aside):  # corrupted twice within a second: keep both
            aside, n = f"{first}~{n}", n + 1
        try:
            os.rename(self.path, aside)
            for suffix in ("-wal", "-shm"):  # they belong to the corrupt file, not the new one
                if os.path.exists(self.path + suffix):
                    os.rename(self.path + suffix, aside + suffix)
            self.log.error(
                "state DB %s is corrupt (%s): moved it to %s, starting a new one",
                self.path,
                exc,
                aside,
            )
            self._conn = self._connect_file()
            self.persistent = True
        except (OSError, sqlite3.Error) as again:
            self._use_memory(again)

    def _use_memory(self, reason: BaseException | None) -> None:
        if reason is not None:
            self.log.error(
                "state DB %s unusable (%s): keeping state in memory; run history will not "
                "survive a restart",
                self.path,
                reason,
            )
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        _migrate(conn)
        self._conn = conn
        self.persistent = False

    @property
    def location(self) -> str | None:
        return self.path

    def fds(self) -> list[int]:
        """This process's descriptors on the DB file and its journals."""
        return [] if self.path is None else _fds_open_on(self.path)

    def close(self) -> None:
        """Flush, stop the writer thread, close the DB. Idempotent."""
        with self._mutex:
            self.flush()
            writer = self._writer
            if writer is not None:
                with self._handed_cv:
                    self._stop_writer = True
                    self._handed_cv.notify_all()
                writer.join()
                self._writer = None
                _with_writers.discard(self)
            with self._db:
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except sqlite3.Error:
                        pass
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
        with self._mutex:
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
        with self._mutex:
            # Re-assigning keeps a buffered start's position: history order is start order.
            self._runs[row[0]] = (_SQL_END, row)
            self._last_run[job] = row[0]
            self._counts[row[6]] = self._counts.get(row[6], 0) + 1  # by outcome
            self._maybe_flush()

    def set_last_fire(self, job: str, when: float) -> None:
        with self._mutex:
            self._fires[job] = when

    def _maybe_flush(self) -> None:
        if len(self._runs) >= self.batch:
            self.flush()

    def flush(self, wait: bool = True) -> None:
        """Write everything buffered in one transaction. `wait=True`: written when this returns
        (after what an earlier flush(wait=False) handed over). `wait=False`: handed to the
        writer thread, which writes it in one transaction while the caller goes on; if the
        previous batch is still being written, the rows stay buffered for the next flush
        (batches are written in order, one at a time). Never raises: on an SQLite error the
        batch is dropped and the error logged once (until writes work again)."""
        with self._mutex:
            if not (self._runs or self._fires or self._last_run) or self._conn is None:
                if wait:
                    self._settle()
                return
            if not wait:
                with self._handed_cv:
                    if self._handed is not None:
                        return
                    self._handed = self._take()
                    if self._writer is None:
                        self._start_writer()
                    self._handed_cv.notify_all()
                return
            self._settle()
            self._write(self._take())

    def _take(self) -> Batch:
        """The buffers as one batch; empty buffers in their place."""
        batch = Batch(self._runs, self._fires, self._last_run)
        self._runs, self._fires, self._last_run = {}, {}, {}
        return batch

    def _write(self, batch: Batch) -> None:
        """One transaction (the caller's thread or the writer's). Never raises."""
        runs, fires, last_run = batch
        with self._db:
            conn = self._conn
            if conn is None:  # closed meanwhile (cannot happen: close() flushes first)
                return
            try:
                with conn:  # one transaction: commit, or roll back on error
                    for sql, rows in runs_of_same_kind(runs.values()):
                        conn.executemany(sql, rows)
                    conn.executemany(_SQL_FIRE, fires.items())
                    conn.executemany(_SQL_LAST_RUN, last_run.items())
            except (sqlite3.Error, OSError) as exc:
                self._write_failed(exc, len(runs) + len(fires))
                return
            if self._failing:
                self._failing = False
                self.log.warning("state DB writes work again (%d records were lost)", self._dropped)
                self._dropped = 0

    def _settle(self) -> None:
        """Wait until the batch handed to the writer thread, if any, is written."""
        with self._handed_cv:
            while self._handed is not None:
                self._handed_cv.wait()

    def _start_writer(self) -> None:
        # A daemon thread: a daemon that exits without close() must not hang on it (the
        # transaction it was in is rolled back, like any crash).
        _with_writers.add(self)
        self._writer = threading.Thread(
            target=self._write_behind, name="poolkeeper-state-writer", daemon=True
        )
        self._writer.start()

    def _write_behind(self) -> None:
        """The writer thread: write each handed batch, until close()."""
        cv = self._handed_cv
        while True:
            with cv:
                while self._handed is None and not self._stop_writer:
                    cv.wait()
                batch = self._handed
                if batch is None:  # stopping, nothing left
                    return
            # sqlite3 lets go of the GIL for each row SQLite writes, and takes it back at once:
            # the loop's thread, waiting for it after each of its system calls, would get it
            # only when the switch interval (5 ms) forces a hand-over, several times a turn.
            # While the thread writes, the interval is short.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, WRITER_SWITCH_INTERVAL))
            try:
                self._write(batch)
            finally:
                sys.setswitchinterval(interval)
                with cv:
                    self._handed = None
                    cv.notify_all()

    def _write_failed(self, exc: BaseException, rows: int) -> None:
        """(With _db held.)"""
        self._dropped += rows
        if not self._failing:
            self._failing = True
            self.log.error(
                "state DB %s: write failed (%s); run history is being lost, the jobs keep running",
                self.path or ":memory:",
                exc,
            )
        if isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc) and self.persistent:
            # Corrupted under us: reopen, which moves the bad file aside.
            self._reopen()

    def _reopen(self) -> None:
        """(With _db held, from either thread: see _open.)"""
        try:
            if self._conn is not None:
                self._conn.close()
        except sqlite3.Error:
            pass
        self._conn = None
        self.persistent = False
        self._open()

    def mark_abandoned(self, now: float) -> int:
        """Runs still 'running' were in flight when a previous daemon died: mark them 'lost'.
        Call with the single-instance lock held, before starting runs. Returns how many."""
        with self._mutex:
            self.flush()
            with self._db:
                return self._mark_abandoned(now)

    def _mark_abandoned(self, now: float) -> int:
        if self._conn is None:
            return 0
        try:
            with self._conn:
                abandoned = self._conn.execute(
                    "SELECT job, run_id FROM runs WHERE outcome = ? ORDER BY rowid", (RUNNING,)
                ).fetchall()
                self._conn.execute(
                    "UPDATE runs SET outcome=?, ended=?, error=? WHERE outcome=?",
                    (Outcome.LOST, now, ABANDONED_ERROR, RUNNING),
                )
                # They are now each job's newest finished runs (`status`'s last outcome);
                # dict() keeps the last run_id per job.
                self._conn.executemany(_SQL_LAST_RUN, dict(abandoned).items())
            return len(abandoned)
        except sqlite3.Error as exc:
            self._write_failed(exc, 0)
            return 0

    def prune(self, keep_seconds: float, now: float) -> int:
        """Delete finished runs that ended more than `keep_seconds` ago, except each job's
        last finished run (so `status` can still show it). Returns how many."""
        with self._mutex:
            self.flush()
            with self._db:
                return self._prune(keep_seconds, now)

    def _prune(self, keep_seconds: float, now: float) -> int:
        if self._conn is None:
            return 0
        try:
            with self._conn:
                cur = self._conn.execute(
                    """DELETE FROM runs WHERE ended < ? AND outcome != ? AND run_id NOT IN
                       (SELECT last_run_id FROM jobs WHERE last_run_id IS NOT NULL)""",
                    (now - keep_seconds, RUNNING),
                )
            return cur.rowcount
        except sqlite3.Error as exc:
            self._write_failed(exc, 0)
            return 0

    # --- reads --------------------------------------------------------------------------
    # Reads flush first so they see every write made so far; they are for `status` and
    # `history`, not for the hot path. On an SQLite error they log and return nothing.

    def last_fire(self, job: str) -> float | None:
        with self._mutex:
            if job in self._fires:
                return self._fires[job]
            self._settle()  # it may be in the batch the writer thread has
            row = self._query("SELECT last_fire FROM jobs WHERE job = ?", (job,))
            return row[0][0] if row else None

    def history(
        self,
        job: str | None = None,
        limit: int | None = 50,
        *,
        since: float | None = None,
        outcome: str | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first (by when they were first recorded, i.e. start order); at most
        `limit` (None: all); only those since `since` or of `outcome` if given."""
        where, args = history_filter(job, since, outcome, "?")
        with self._mutex:
            self.flush()
            rows = self._query(
                f"SELECT {_RECORD_COLUMNS} FROM runs {where} ORDER BY rowid DESC LIMIT ?",
                (*args, -1 if limit is None else limit),  # LIMIT -1: no limit
            )
        return [RunRecord(*r) for r in rows]

    def ended_between(self, start: float, end: float) -> dict[str, dict[str, int]]:
        """job -> outcome -> runs that ended at `start` or later, before `end` (the `ended`
        index: a range of it, whatever the size of the history)."""
        with self._mutex:
            self.flush()
            rows = self._query(
                "SELECT job, outcome, count(*) FROM runs WHERE ended >= ? AND ended < ? "
                "GROUP BY job, outcome",
                (start, end),
            )
        return by_job(rows)

    def last_outcomes(self) -> dict[str, RunRecord]:
        """The last finished run of each job."""
        with self._mutex:
            self.flush()
            rows = self._query(
                f"SELECT {_RECORD_COLUMNS} FROM jobs JOIN runs ON runs.run_id = jobs.last_run_id"
            )
        return {r[0]: RunRecord(*r) for r in rows}

    def counts(self, overall: bool = False) -> dict[str, int]:
        """Finished runs per outcome since this store was opened (= since the daemon started:
        STATUS= figures, O(1)); `overall=True` counts the whole retained history instead."""
        with self._mutex:
            if not overall:
                return dict(self._counts)
            self.flush()
            rows = self._query(
                "SELECT outcome, count(*) FROM runs WHERE outcome != ? GROUP BY outcome", (RUNNING,)
            )
        return dict(rows)

    def _query(self, sql: str, args: Row = ()) -> list[Row]:
        with self._db:
            return self._query_locked(sql, args)

    def _query_locked(self, sql: str, args: Row) -> list[Row]:
        if self._conn is None:
            return []
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            if self.readonly:  # corruption past the header shows up here, not at open()
                raise StateUnreadable(self.path, exc) from None
            self.log.error("state DB %s: read failed (%s)", self.path or ":memory:", exc)
            return []


# Stores whose writer thread may be inside SQLite when this process forks (a worker started
# by fork). SQLite's global mutexes (its allocator's, with memory statistics on by default)
# would stay locked in the child, and a job there that uses sqlite3 would hang on its first
# call. So a fork waits for the transaction in progress and happens between two.
_with_writers: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


_held_over_fork: list[threading.Lock] = []


def _before_fork() -> None:
    for store in list(_with_writers):
        store._db.acquire()
        _held_over_fork.append(store._db)


def _after_fork() -> None:
    while _held_over_fork:
        _held_over_fork.pop().release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


_RECORD_COLUMNS = record_columns("runs")


def _fds_open_on(path: str) -> list[int]:
    """This process's descriptors on `path` or a file named after it (`-wal`, `-shm`...)."""
    base = os.path.realpath(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith(base) and target[len(base) :] in _DB_SUFFIXES:
            found.append(int(name))
    return found


_DB_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _is_corruption(exc: BaseException) -> bool:
    """DatabaseError proper ('file is not a database', 'malformed'), as opposed to its
    subclass OperationalError (locked, disk full, read-only, I/O), which is not the file's fault."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.OperationalError | sqlite3.IntegrityError | sqlite3.ProgrammingError
    )


def _check_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        # Written by a newer poolkeeper: don't touch it (the caller falls back to memory).
        raise sqlite3.OperationalError(
            f"schema version {version} is newer than this poolkeeper's ({SCHEMA_VERSION})"
        )
    return version


def _probe_write(conn: sqlite3.Connection) -> None:
    """SQLite opens a file it may not write read-only without a word (another user's file, a
    read-only mount) and in WAL mode even BEGIN IMMEDIATE succeeds; every later write would
    fail. One real write (the schema version, unchanged) tells at open(), where the caller
    can still fall back to memory."""
    try:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.OperationalError as exc:
        raise sqlite3.OperationalError(f"not writable by uid {os.getuid()}: {exc}") from None


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION. Version 0 is a new, empty file. Future versions
    add their steps here, each in its own transaction with the user_version bump."""
    if _check_version(conn) < 1:
        with conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
