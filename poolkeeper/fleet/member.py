"""The daemon's side of the fleet: a thread of its own that talks to the database, so the main
loop never waits on it (a slow, partitioned or stopped server costs the loop nothing).

    main loop                                   fleet thread (this module)
    ---------                                   --------------------------
    fires_due / ended / release / rows  --->    commands (a queue; a pipe wakes the thread)
    pause / resume / run_now / set_load         each wake-up, in one connection:
                                                  register (a new incarnation) when it has none
                                                  heartbeat every lease/6: renew, read hosts,
                                                    reap the dead, poll control, rebalance slots
                                                  write what the loop sent (fires, ends, rows)
                                                  claim fires up to the free workers
    events (take_events) <----------------      Claimed, Granted, Revoke, Paused, LeaseLost,
    (a pipe wakes the loop: fileno())            Hosts; `deadline` (monotonic) is a plain float

The safety rule lives in the main loop, which reads `deadline`: the local time (monotonic)
until which this host may still hold what it claimed. It is the send time of the last
heartbeat that succeeded plus the lease minus the margin, so it passes before the database
could find the lease run out, whatever happens to the thread or the connection.

LISTEN runs on a second connection, in autocommit, never through a transaction pooler (a
NOTIFY is delivered at commit and never replayed: control state is also polled at heartbeat).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import select
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg

from poolkeeper import __version__
from poolkeeper.fleet import db
from poolkeeper.fleet.db import Claim, Ended, Host, JobInfo, NewFire, Slot
from poolkeeper.state.postgres import CONNECT_TIMEOUT, SCHEMA_VERSION, _migrate, redact
from poolkeeper.state.rows import Row

# What the heartbeat cadence and the safety margin are, as parts of the lease.
HEARTBEAT_PARTS = 6
MARGIN_PARTS = 6
RECONNECT_AFTER = 1.0  # seconds between attempts while the database cannot be reached
# Rows of the fleet's history kept while the database cannot take them (the host's own
# SQLite has them all; past this the oldest are dropped from the fleet's copy, and said so).
MAX_UNSENT_ROWS = 100_000
MAX_UNSENT_FIRES = 10_000
PRUNE_EVERY = 3600.0  # the fleet's history is pruned (state.keep) about hourly, by every host


class Claimed(NamedTuple):
    claims: list[Claim]


class Granted(NamedTuple):
    slots: list[Slot]


class Revoke(NamedTuple):
    """Give this slot back (this host holds more than its share): stop its run."""

    slot: Slot


class Paused(NamedTuple):
    job: str
    paused: bool


class LeaseLost(NamedTuple):
    """Renewal found the lease run out: everything this incarnation held may be another's
    now. The loop stops its fleet runs; the thread registers a new incarnation."""

    why: str


class Superseded(NamedTuple):
    ends: list[Ended]


class Refused(NamedTuple):
    """The database cannot be used by this poolkeeper (its schema is newer): fleet mode stops."""

    why: str


Event = Claimed | Granted | Revoke | Paused | LeaseLost | Superseded | Refused


class Load(NamedTuple):
    capacity: int  # workers
    busy: int  # workers running something
    free: int  # workers a fleet fire could have now (claimed fires waiting here counted out)
    received: int  # claims the loop has taken in (take_events): the rest are on their way


class FleetMember:
    def __init__(
        self,
        url: str,
        *,
        host_id: str,
        lease: float,
        spec_hash: str,
        capacity: int,
        log: logging.Logger,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.host_id = host_id
        self.lease = lease
        self.heartbeat_every = lease / HEARTBEAT_PARTS
        self.margin = lease / MARGIN_PARTS
        self.spec_hash = spec_hash
        self.log = log
        self.rng = rng or random.Random()
        self.load = Load(capacity, 0, capacity, 0)  # replaced whole by the loop: no lock needed
        # The loop's own counters (only its thread touches them): claims taken in, and runs
        # of claimed fires waiting here for a worker.
        self.received = 0
        self.waiting: set[int] = set()  # fire ids
        self._claimed_total = 0  # the thread's: claims sent to the loop
        # Read by the loop. 0.0: nothing may be held (not registered yet, or the lease is lost).
        self.deadline = 0.0
        self.incarnation: str | None = None
        self.hosts: list[Host] = []
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake_thread_r, self._wake_thread_w = _pipe()
        self._wake_loop_r, self._wake_loop_w = _pipe()
        self._thread = threading.Thread(target=self._run, name="poolkeeper-fleet", daemon=True)
        self._stopping = False
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._listen: psycopg.Connection[tuple[Any, ...]] | None = None
        # Owned by the thread:
        self._jobs: list[JobInfo] = []
        self._fire_jobs: list[str] = []
        self._loop_jobs: list[str] = []
        self._synced = False
        self._fires: deque[NewFire] = deque(maxlen=MAX_UNSENT_FIRES)
        self._ends: list[Ended] = []
        self._releases: list[Slot] = []
        self._rows: deque[tuple[str, Row]] = deque()
        self._rows_dropped = 0
        self._controls: list[tuple[str, Any]] = []
        self._held: dict[tuple[str, int], Slot] = {}
        self._revoking: set[tuple[str, int]] = set()
        self._next_heartbeat = 0.0
        self._claim_wanted = True
        self._control_gen = -1
        self._down_since: float | None = None
        self._next_attempt = 0.0
        self._quiet = False  # draining: nothing more is claimed
        self.keep: float | None = None  # state.keep, for the fleet's history (set by the loop)
        self._next_prune = 0.0
        self._spec_hashes: frozenset[str] = frozenset()

    # -- the loop's side -----------------------------------------------------------------

    def start(self, jobs: Sequence[JobInfo]) -> None:
        self.set_jobs(jobs)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is left, give back the slots, end the lease (a clean stop: the others
        take over at once), and join the thread."""
        self._send("stop", None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Still in a statement (bounded by the margin): its pipes stay open, or a write to
            # a closed descriptor could land in whatever file reuses its number. The process
            # is about to exit; the thread is a daemon thread.
            self.log.warning("fleet: the fleet thread did not finish within %gs", timeout)
            return
        for fd in (self._wake_thread_r, self._wake_thread_w, self._wake_loop_r, self._wake_loop_w):
            os.close(fd)

    def fileno(self) -> int:
        """Readable when events wait for take_events()."""
        return self._wake_loop_r

    def fds(self) -> list[int]:
        """Descriptors a forked worker must close."""
        fds = [self._wake_thread_r, self._wake_thread_w, self._wake_loop_r, self._wake_loop_w]
        for conn in (self._conn, self._listen):
            if conn is not None and not conn.closed:
                try:
                    fds.append(conn.fileno())
                except psycopg.Error:
                    pass
        return fds

    def take_events(self) -> list[Event]:
        try:
            os.read(self._wake_loop_r, 4096)
        except BlockingIOError:
            pass
        out: list[Event] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return out
            if isinstance(event, Claimed):
                self.received += len(event.claims)
            out.append(event)

    def set_jobs(self, jobs: Sequence[JobInfo]) -> None:
        self._send("jobs", list(jobs))

    def quiesce(self) -> None:
        """A drain: claim nothing more (fires or slots); what is held is given back as it
        ends, and the lease ends with stop()."""
        self._send("quiesce", None)

    def fires_due(self, fires: Sequence[NewFire]) -> None:
        self._send("fires", list(fires))

    def fire_ended(self, end: Ended) -> None:
        self._send("ended", end)

    def release(self, slot: Slot) -> None:
        self._send("release", slot)

    def give_back(self, claim: Claim) -> None:
        self._send("give_back", claim)

    def row(self, sql: str, row: Row) -> None:
        """A run row for the fleet's history (db.WRITE_START / db.WRITE_END, with host_id and
        incarnation appended by the thread)."""
        self._commands.put(("row", (sql, row)))  # no wake-up: written at the next one

    def pause(self, job: str, paused: bool) -> None:
        self._send("pause", (job, paused))

    def run_now(self, job: str, key: str, now: float) -> None:
        self._send("run_now", (job, key, now))

    def set_load(self, capacity: int, busy: int, free: int) -> None:
        """The loop's view of its workers, each turn (cheap: a tuple, a wake-up only when
        more workers are free than the thread knew)."""
        old = self.load
        load = Load(capacity, busy, max(0, free - len(self.waiting)), self.received)
        if load == old:
            return
        self.load = load
        if load.free > old.free:
            self._claim_wanted = True
            _poke(self._wake_thread_w)

    def _send(self, what: str, arg: Any) -> None:
        self._commands.put((what, arg))
        _poke(self._wake_thread_w)

    # -- the thread ------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.put(event)
        _poke(self._wake_loop_w)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wait()
                self._take_commands()
                if self._stopping:
                    break
                self._step()
        except _SchemaTooNew as exc:
            self.deadline = 0.0
            self._emit(Refused(str(exc)))
        except Exception:  # a bug: the loop's deadline still protects; say it loudly
            self.log.exception("fleet: the fleet thread failed; this host holds no fleet work")
            self.deadline = 0.0
        finally:
            self._leave()

    def _wait(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, self._next_heartbeat - now)
        if self._conn is None:
            timeout = min(timeout, RECONNECT_AFTER)
        readers = [self._wake_thread_r]
        if self._listen is not None and not self._listen.closed:
            readers.append(self._listen.fileno())
        try:
            ready, _, _ = select.select(readers, [], [], timeout)
        except (OSError, ValueError):
            ready = []
        if self._wake_thread_r in ready:
            try:
                os.read(self._wake_thread_r, 4096)
            except BlockingIOError:
                pass

    def _take_commands(self) -> None:
        while True:
            try:
                what, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if what == "row":
                if len(self._rows) >= MAX_UNSENT_ROWS:
                    self._rows.popleft()
                    self._rows_dropped += 1
                self._rows.append(arg)
            elif what == "fires":
                self._fires.extend(arg)
                self._claim_wanted = True
            elif what == "ended":
                self._ends.append(arg)
            elif what == "release":
                self._releases.append(arg)
                self._held.pop((arg.job, arg.replica), None)
                self._revoking.discard((arg.job, arg.replica))
            elif what == "jobs":
                self._jobs = arg
                self._fire_jobs = [job.name for job in arg if not job.replicas]
                self._loop_jobs = [job.name for job in arg if job.replicas]
                self._synced = False
            elif what in ("pause", "run_now", "give_back"):
                self._controls.append((what, arg))
            elif what == "quiesce":
                self._quiet = True
            elif what == "stop":
                self._stopping = True

    def _step(self) -> None:
        try:
            conn = self._connection()
            if conn is None:
                return
            if self.incarnation is None:
                self._register(conn)
            if not self._synced:
                db.sync_jobs(conn, self._jobs)
                self._synced = True
            if time.monotonic() >= self._next_heartbeat:
                if not self._heartbeat(conn):
                    return
            self._write(conn)
            self._notifications(conn)
            self._claim(conn)
        except psycopg.Error as exc:
            self._lost_connection(exc)

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]] | None:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        now = time.monotonic()
        if now < self._next_attempt:
            return None
        self._next_attempt = now + RECONNECT_AFTER * self.rng.uniform(0.8, 1.2)
        try:
            self._conn = self._connect("poolkeeper:" + self.host_id)
            version = _migrate(self._conn)
            if version > SCHEMA_VERSION:
                raise _SchemaTooNew(
                    f"the fleet database {self.where} has schema version {version}, newer than "
                    f"this poolkeeper's ({SCHEMA_VERSION}): upgrade poolkeeper on this host"
                )
            self._listen = self._connect("poolkeeper-listen:" + self.host_id)
            self._listen.execute(f"LISTEN {db.WAKE_CHANNEL}")
            self._listen.execute(f"LISTEN {db.CONTROL_CHANNEL}")
        except psycopg.Error as exc:
            self._lost_connection(exc)
            return None
        if self._down_since is not None:
            self.log.info(
                "fleet: database %s reachable again after %.1fs",
                self.where,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        self._control_gen = -1  # NOTIFYs sent while we were away are gone: read the state
        self._claim_wanted = True
        return self._conn

    def _connect(self, name: str) -> psycopg.Connection[tuple[Any, ...]]:
        given = psycopg.conninfo.conninfo_to_dict(self.url)
        bound = max(1, min(CONNECT_TIMEOUT, int(self.margin)))
        extra: dict[str, Any] = {"application_name": name}
        # Every wait bounded below the margin: a server that stops answering (a partition,
        # a stopped process) fails the statement rather than hanging the thread.
        extra["options"] = (
            f"-c statement_timeout={int(self.margin * 1000)} "
            f"-c lock_timeout={int(self.margin * 1000)} "
            # and the server ends a transaction left open by a frozen host (SIGSTOP mid-step)
            # within the margin: its row locks (pk_jobs) would stall every host's fires.
            f"-c idle_in_transaction_session_timeout={int(self.margin * 1000)}"
        )
        if given.get("options"):  # the URL's own options come after: the last -c wins
            extra["options"] += f" {given['options']}"
        for key, value in (
            ("connect_timeout", bound),
            ("keepalives", 1),
            ("keepalives_idle", bound),
            ("keepalives_interval", 1),
            ("keepalives_count", 3),
            ("tcp_user_timeout", int(self.margin * 1000)),
        ):
            if key not in given:  # what the URL says wins
                extra[key] = value
        return psycopg.connect(self.url, autocommit=True, **extra)

    def _lost_connection(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.log.warning(
                "fleet: database %s unreachable (%s); fleet fires wait, fleet replicas stop "
                "at the lease's deadline unless on_db_loss: keep",
                self.where,
                " ".join(str(exc).split()) or type(exc).__name__,
            )
        for conn in (self._conn, self._listen):
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        self._conn = self._listen = None

    def _register(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        sent = time.monotonic()
        self.incarnation = db.register(
            conn,
            host_id=self.host_id,
            version=__version__,
            spec_hash=self.spec_hash,
            pid=os.getpid(),
            capacity=self.load.capacity,
            lease=self.lease,
        )
        self.deadline = sent + self.lease - self.margin
        # A host coming back waits a heartbeat (and some jitter) before taking slots: the
        # first host back after an outage would otherwise grab every one.
        self._next_heartbeat = time.monotonic() + self.heartbeat_every * self.rng.uniform(0.5, 1)
        self.log.info(
            "fleet: registered as %s incarnation %s (lease %gs, database %s)",
            self.host_id,
            self.incarnation,
            self.lease,
            self.where,
        )

    def _heartbeat(self, conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
        assert self.incarnation is not None
        sent = time.monotonic()
        load = self.load
        alive = db.heartbeat(
            conn, self.incarnation, lease=self.lease, capacity=load.capacity, busy=load.busy
        )
        self._next_heartbeat = sent + self.heartbeat_every
        if not alive:
            self.deadline = 0.0
            why = f"the lease of incarnation {self.incarnation} had run out"
            self.log.error("fleet: lease lost (%s): stopping this host's fleet runs", why)
            self.incarnation = None
            self._held.clear()
            self._revoking.clear()
            self._ends.clear()  # their fires were the reaper's to record
            self._releases.clear()
            self._emit(LeaseLost(why))
            return False
        self.deadline = sent + self.lease - self.margin
        self.hosts = db.hosts(conn)
        self._warn_spec_hashes()
        for reaped in db.reap(conn):
            self.log.warning(
                "fleet: fire %s of %s held by host %s, whose lease ran out: %s",
                reaped.key,
                reaped.job,
                reaped.host_id,
                "waits again (on_lost: retry)" if reaped.retried else "recorded lost",
            )
            self._claim_wanted = self._claim_wanted or reaped.retried
        self._poll_control(conn)
        self._balance_slots(conn)
        now = time.monotonic()
        if self.keep is not None and now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY * self.rng.uniform(0.9, 1.1)
            pruned = db.prune(conn, self.keep)
            if pruned:
                self.log.info("fleet: pruned %d fires and runs older than state.keep", pruned)
        return True

    def _warn_spec_hashes(self) -> None:
        hashes = frozenset(h.spec_hash for h in self.hosts if h.live)
        if len(hashes) > 1 and hashes != self._spec_hashes:
            listing = ", ".join(
                f"{h.host_id}={h.spec_hash[:12]}" for h in self.hosts if h.live
            )
            self.log.warning("fleet: hosts run different specs (%s)", listing)
        self._spec_hashes = hashes

    def _poll_control(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        names = [job.name for job in self._jobs]
        paused, gen = db.control_state(conn, names)
        if gen != self._control_gen:
            self._control_gen = gen
            for job, flag in paused.items():
                self._emit(Paused(job, flag))

    def _balance_slots(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        assert self.incarnation is not None
        if not self._loop_jobs or self._quiet:
            return
        total = db.slot_count(conn, self._loop_jobs)
        live = [h for h in self.hosts if h.live]
        fleet_capacity = sum(h.capacity for h in live) or 1
        share = -(-total * self.load.capacity // fleet_capacity)  # ceil
        held = len(self._held) - len(self._revoking)
        if held < share:
            granted = db.claim_slots(conn, self.incarnation, self._loop_jobs, share - held)
            for slot in granted:
                self._held[(slot.job, slot.replica)] = slot
                self.log.info(
                    "fleet: slot %s#%d taken (epoch %d)", slot.job, slot.replica, slot.epoch
                )
            if granted:
                self._emit(Granted(granted))
        elif held > share and not self._revoking:
            # One at a time, and only once its run has ended (the loop releases it then):
            # a voluntary move never has two runs of a slot at once.
            key = max(self._held)
            self._revoking.add(key)
            self._emit(Revoke(self._held[key]))

    def _write(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        assert self.incarnation is not None
        if self._fires:
            fires = list(self._fires)
            db.create_fires(conn, fires)
            self._fires.clear()
        if self._ends:
            ends, self._ends = self._ends, []
            superseded = db.finish_fires(conn, self.incarnation, ends)
            if superseded:
                self._emit(Superseded(superseded))
        if self._releases:
            releases, self._releases = self._releases, []
            db.release_slots(conn, self.incarnation, releases)
            self._claim_wanted = True  # a slot given back: the balance may take another
            self._next_heartbeat = min(self._next_heartbeat, time.monotonic())
        for what, arg in self._controls:
            if what == "pause":
                db.set_paused(conn, *arg)
            elif what == "give_back":
                db.give_back(conn, self.incarnation, [arg])
            else:
                db.run_now(conn, *arg)
        self._controls.clear()
        if self._rows:
            extra = (self.host_id, self.incarnation)
            rows = [(sql, (*row, *extra)) for sql, row in self._rows]
            db.write_runs(conn, rows)
            self._rows.clear()
            if self._rows_dropped:
                self.log.warning(
                    "fleet: %d run rows were dropped from the fleet's history while the "
                    "database was away (this host's state DB has them)",
                    self._rows_dropped,
                )
                self._rows_dropped = 0

    def _notifications(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        listen = self._listen
        if listen is None:
            return
        control = False
        for note in listen.notifies(timeout=0, stop_after=0):
            if note.channel == db.CONTROL_CHANNEL:
                control = True
            else:
                self._claim_wanted = True
        if control:
            self._poll_control(conn)

    def _claim(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        assert self.incarnation is not None
        load = self.load
        # Claims on their way to the loop are not in its count of free workers yet.
        free = load.free - (self._claimed_total - load.received)
        if not self._claim_wanted or free <= 0 or not self._fire_jobs or self._quiet:
            return
        self._claim_wanted = False
        claims = db.claim_fires(conn, self.incarnation, self.host_id, self._fire_jobs, free)
        if claims:
            self._claimed_total += len(claims)
            self._claim_wanted = True  # there may be more: look again next wake-up
            self._emit(Claimed(claims))

    def _leave(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and self.incarnation is not None:
            try:
                self._write(conn)
                db.leave(conn, self.incarnation)
            except psycopg.Error as exc:
                self.log.warning("fleet: could not leave cleanly (%s)", exc)
        self.deadline = 0.0
        for c in (self._conn, self._listen):
            if c is not None:
                c.close()


class _SchemaTooNew(Exception):
    pass


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except (BlockingIOError, OSError):
        pass  # full (a wake-up is pending anyway) or closed (stopping)

