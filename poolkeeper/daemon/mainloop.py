"""The daemon's life: one main loop owns every decision.

    start   load config (done by the caller) -> lock the state DB -> start the pool
            -> run `before_ready` jobs -> READY=1
    turn    wait (worker pipes and sentinels, the signal pipe, the head of the timers)
            -> signals -> every pool event pending (started, ended, lost) -> fire the jobs
            due (only the head of a timer heap) -> dispatch the head of the ready queue
            while workers are free -> phase changes -> STATUS=, WATCHDOG=1, flush state
    drain   (SIGTERM, SIGINT) STOPPING=1 -> every ctx.stopping is set (loops return) ->
            in-flight runs get `drain_timeout`, then their process groups are killed -> join
            -> exit 0; a second signal, or SIGQUIT: fast stop (kill in-flight runs now)
    reload  (SIGHUP) RELOADING=1 -> validate the file in full -> rejected: log why, keep
            everything -> else apply the difference by job name (poolkeeper.daemon.reload) -> READY=1

Signals only wake the loop (poolkeeper.signals, which has the table of what each one does;
SIGUSR1 dumps the state to the log); the pool never blocks (poolkeeper.pool.supervisor); so a turn is
short, and a loop that stops turning stops the watchdog pings. A turn costs what changed, not
the number of jobs: fires, delayed runs and the ready queue are heaps (poolkeeper.daemon.agenda),
STATUS= comes from counters and is built only when it is sent.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from poolkeeper import exitcodes, signals
from poolkeeper.config.settings import Config
from poolkeeper.daemon.agenda import Agenda
from poolkeeper.daemon.handlers import ControlHandlers
from poolkeeper.daemon.jobs import JobRuntime, PendingRun
from poolkeeper.daemon.reload import Reloader
from poolkeeper.daemon.retiring import Retiring
from poolkeeper.daemon.runlog import RunLog
from poolkeeper.daemon.status import count, state_dump, status_line
from poolkeeper.daemon.waiter import Waiter
from poolkeeper.outcomes import Outcome
from poolkeeper.pool import helper_processes, reaper
from poolkeeper.pool.prestart import add_to_sys_path
from poolkeeper.pool.supervisor import (
    NotStarted,
    PoolFull,
    RunEnded,
    RunStarted,
    Task,
    WorkerEvent,
    WorkerPool,
    pool_for,
)
from poolkeeper.service import control
from poolkeeper.service.logs import ended_event, event, get_logger
from poolkeeper.service.metrics_hooks import MetricsFailed, MetricsHooks, NoMetrics, start_metrics
from poolkeeper.service.notify import MAIN_ONLY_ENV, Notifier
from poolkeeper.signals import SignalQueue
from poolkeeper.state.identity import InstanceLock, StateLocked, open_store, socket_path
from poolkeeper.state.store import StateStore

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

    from poolkeeper.config.settings import Job
    from poolkeeper.fleet.loop import FleetSide
    from poolkeeper.pool.protocol import Event

MAX_WAIT = 1.0  # the loop turns at least this often: status, watchdog, wall-clock jumps
EXTEND_EVERY = 1.0  # EXTEND_TIMEOUT_USEC cadence while starting or draining
EXTEND_BY = 5.0
STATE_FLUSH_EVERY = 0.5
STATUS_EVERY = 0.5  # STATUS= is built at most this often (and sent only when it changed)
# A wall clock that goes back more than this between two turns is a step (settimeofday, an
# NTP step), told to every schedule; less is the noise of reading two clocks (or a slew).
CLOCK_STEP = 0.01
PRUNE_EVERY = 3600.0  # run history retention (state.keep) is enforced hourly
# A pool still unhealthy this long into the start (workers fail to start: a broken preload,
# say) fails the start: READY=1 would never come, and EXTEND_TIMEOUT_USEC would keep
# systemd waiting for ever.
START_UNHEALTHY_GRACE = 1.0


class StartupFailed(Exception):
    def __init__(self, message: str, exit_code: int, errno: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.errno = errno  # sent as ERRNO= (systemctl status shows it as "Error:")


class Daemon:
    """The main loop. It holds what it drives in its one thread: the runs told to stop
    (`retiring`, poolkeeper.daemon.retiring), reload (`reloader`, poolkeeper.daemon.reload)
    and the control socket's verbs (`handlers`, poolkeeper.daemon.handlers); each of these
    holds a reference back to the daemon."""

    def __init__(
        self,
        config: Config,
        *,
        log_target: str = "stderr",
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        pool: WorkerPool | None = None,
        host_id: str | None = None,
    ) -> None:
        """`pool`: the config's pool, possibly started already (cli.py starts it early when
        the config comes from the cache; the state lock is then taken after it, and a second
        daemon on the same state DB stops its fresh workers and exits 75). `host_id`: `run
        --host-id`, already in `config`, and applied again to what a reload reads."""
        self.config = config
        self.host_id_override = host_id
        self.log = get_logger()
        self.log_target = log_target
        # The notifier captures NOTIFY_SOCKET and WATCHDOG_* now; they are then removed from
        # the environment so no worker (or job subprocess) can talk to systemd as us.
        self.notifier = notifier or Notifier()
        for name in MAIN_ONLY_ENV:
            os.environ.pop(name, None)
        self.rng = rng or random.Random()
        # Every catchable signal whose default action would end or stop us: a stray one must
        # never cost the runs in flight their outcome (poolkeeper.signals has the table).
        self.signals = SignalQueue(signals.caught())
        self._waiter = Waiter()
        self.control: control.ControlServer | None = None
        self.metrics: MetricsHooks = NoMetrics()  # the real ones from _start(), if the spec says
        self.state: StateStore | None = None
        self.instance_lock: InstanceLock | None = None  # held from start to the very end
        self.pool: WorkerPool | None = pool
        self.jobs: dict[str, JobRuntime] = {}
        self.agenda = Agenda()  # every job's next fire and waiting runs, in heaps
        self._before_ready: list[JobRuntime] = []  # the jobs READY=1 waits for
        self._clock_offset: float | None = None  # wall minus monotonic, at the last turn
        self.phase = "starting"  # starting -> running -> draining -> stopped
        self.outcomes: Counter[str] = Counter()
        self.drain_outcomes: Counter[str] = Counter()
        self.drain_started: float | None = None
        self.drain_deadline: float | None = None
        self.drained_in_flight = 0
        self.exit_code = exitcodes.OK
        self._next_extend = 0.0
        self._next_flush = 0.0
        self._next_status = 0.0
        self._next_prune = 0.0  # at start, then every PRUNE_EVERY
        self._next_ping = 0.0
        self._watchdog = self.notifier.watchdog_interval()
        self.last_turn = time.monotonic()
        self.workers_up: set[int] = set()  # pids of workers that reported ready
        self._unhealthy_since: float | None = None
        self.retiring = Retiring()  # runs of jobs reloaded or paused, told to stop
        self.runlog = RunLog(self.log)  # which runs get journal lines (docs/journal.md)
        self.reloader = Reloader(self)
        self.handlers = ControlHandlers(self)
        self.fleet: FleetSide | None = None  # fleet mode (poolkeeper.fleet.loop)

    @property
    def live_pool(self) -> WorkerPool:
        """`pool`, for what runs once _start() has set it: every turn and what it calls."""
        assert self.pool is not None, "the pool is set by _start(), before the first turn"
        return self.pool

    @property
    def store(self) -> StateStore:
        """`state`, for what runs once _start() has opened it: every turn, and every run
        event (a run is only submitted, so only ends, after the state is open)."""
        assert self.state is not None, "the state is opened by _start(), before any run"
        return self.state

    # -- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
            while self.phase != "stopped":
                self._turn()
        except StartupFailed as exc:
            self.log.error("%s", exc)
            self.notifier.fatal(str(exc), errno=exc.errno)
            self.exit_code = exc.exit_code
        except Exception as exc:  # a bug: say so in `systemctl status` before the traceback
            self.notifier.fatal(f"internal error: {type(exc).__name__}: {exc}", errno.EIO)
            raise
        finally:
            self._shutdown()
        return self.exit_code

    def _turn(self) -> None:
        ready = self._wait()
        if self.signals.fileno() in ready or self.signals.pending():
            self._handle_signals()
        self.handlers.serve(ready)
        self._collect()
        if self.fleet is not None:
            self.fleet.turn(ready)
        self._fire_schedules()
        self._dispatch()
        self._advance_phase()
        self._report()
        self.last_turn = time.monotonic()

    def _start(self) -> None:
        faulthandler.enable()
        reaper.become_subreaper()  # a dead worker's leftovers come to us (kill_orphans)
        self.signals.install()
        helper_processes.add_main_only_fds(self._main_only_fds)
        self._open_state()
        self._open_control()
        try:
            self.metrics = start_metrics(self.config, self.store, self.log)
        except MetricsFailed as exc:
            raise StartupFailed(str(exc), exitcodes.UNAVAILABLE, exc.errno) from None
        cfg = self.config
        # The forkserver inherits this process's sys.path: without the spec's pythonpath
        # its preload of the job modules would fail (silently) and every worker would
        # import them itself.
        add_to_sys_path(cfg.pythonpath)
        if self.pool is None:
            self.pool = pool_for(cfg, self.log_target, logging.getLogger().level)
        self.pool.start()
        if cfg.fleet is not None:
            self.fleet = _fleet_side(self)
        now_wall, now_mono = time.time(), time.monotonic()
        for spec in cfg.jobs.values():
            self.add_job(self.runtime_for(spec), now_wall, now_mono)
        if self.fleet is not None:
            self.fleet.start()
        self._before_ready = [job for job in self.jobs.values() if job.spec.before_ready]
        self.log.info(
            "started: %s, %s (%s), state %s",
            count(len(self.jobs), "job"),
            count(cfg.pool.workers, "worker"),
            cfg.pool.start_method,
            self.store.location,
        )
        # READY=1 once the workers report ready (see _advance_phase).

    def _open_control(self) -> None:
        """The socket `poolkeeper reload --wait` talks to (poolkeeper.service.control). Opened after
        the state lock is held: a stale socket of this config can then only be a dead
        daemon's. Without it the daemon still runs, and SIGHUP still reloads."""
        path = socket_path(self.config)
        if path is None:
            return
        try:
            self.control = control.ControlServer(path, self.log)
        except OSError as exc:
            self.log.warning(
                "no control socket (%s): `poolkeeper reload --wait` cannot reach this daemon; "
                "SIGHUP still reloads",
                exc,
            )

    def _open_state(self) -> None:
        self.instance_lock = InstanceLock.of(self.config, self.log)
        try:
            self.instance_lock.acquire()
        except StateLocked as exc:
            raise StartupFailed(
                f"another poolkeeper holds the state database {exc.path} ({exc}); stop it "
                "first or give this config its own state.path",
                exitcodes.TEMPFAIL,
                errno.EBUSY,
            ) from None
        self.state = open_store(self.config, log=self.log)
        abandoned = self.state.mark_abandoned(time.time())
        if abandoned:
            self.log.warning(
                "%s of a previous daemon had no outcome: recorded as lost", count(abandoned, "run")
            )

    def _shutdown(self) -> None:
        # Not "stopped" here means start-up failed or a bug: whatever runs is killed, not
        # waited for, and no outcome can raise another start-up failure.
        aborted, self.phase = self.phase != "stopped", "stopped"
        if self.pool is not None:
            for ev in self.pool.close(timeout=0 if aborted else None):
                self._on_ended(ev)
            reaper.kill_orphans()
        self.runlog.report(time.monotonic(), final=True)  # what those last ends counted
        self.metrics.close()
        if self.fleet is not None:  # every end written, the slots given back, the lease ended
            self.fleet.close()
        if self.drain_started is not None:
            self._log_drain_summary()
        if self.state is not None:
            self.state.close()
        if self.control is not None:
            self.control.close()
        # Last: a daemon that starts once it is released may take over the socket path, which
        # control.close() above unlinks.
        if self.instance_lock is not None:
            self.instance_lock.release()
        helper_processes.remove_main_only_fds(self._main_only_fds)
        self.signals.close()

    def _main_only_fds(self) -> list[int]:
        """What a worker started by fork must close (helper_processes.main_only_fds): a job's helper
        that forks without exec and outlives us must not hold our lock, DB or sockets."""
        fds = list(self.signals.fds())
        if self.control is not None:
            fds += self.control.fds()
        sock = self.notifier.fileno()
        if sock is not None:
            fds.append(sock)
        if self.instance_lock is not None:
            fds += self.instance_lock.fds()
        if self.fleet is not None:
            fds += self.fleet.member.fds()
        if self.state is not None:
            fds += self.state.fds()  # the DB and its WAL
        fds += self.metrics.fds()
        return fds

    # -- one turn -----------------------------------------------------------------------

    def runtime_for(self, spec: Job) -> JobRuntime:
        """A new job's runtime: a fleet job's runs come from the fleet (poolkeeper.fleet)."""
        if self.fleet is not None and spec.scope == "fleet":
            return self.fleet.runtime(spec, self)
        # One random stream for every job (jitter, backoff): a Random is 2.5 KB of state,
        # 25 MB for 10,000 jobs; no decision needs a job's draws apart from the others'.
        return JobRuntime(spec, self.rng)

    def add_job(self, job: JobRuntime, now_wall: float, now_mono: float) -> None:
        """Start `job` (at daemon start, or its new definition after a reload)."""
        job.start(now_wall, now_mono, self.store.last_fire(job.name))
        self.jobs[job.name] = job
        self.agenda.add(job)

    def freeze_what_is_built(self) -> None:
        """Move every object alive now (the config, the jobs' runtimes, the imported modules)
        out of the cyclic garbage collector's reach. A full collection walks every tracked
        object: with 10,000 jobs that is 150,000 objects, a 100 ms stall of the loop every few
        seconds at thousands of runs a second (runs late by as much). What a run allocates is
        still collected as usual, and a frozen object whose references all go is freed as
        ever. When the daemon is ready, and when a reload has started new jobs (gc.freeze() is
        a list splice: O(1))."""
        gc.freeze()

    def remove_job(self, name: str) -> JobRuntime:
        """`name` is no longer scheduled (a reload removed or changed it)."""
        job = self.jobs.pop(name)
        self.agenda.remove(job)
        if self.fleet is not None:
            self.fleet.jobs_changed = True
        return job

    def _wait(self) -> set[int]:
        """Until something is ready or the earliest deadline; returns the ready descriptors."""
        now_mono, now_wall = time.monotonic(), time.time()
        deadlines = [now_mono + MAX_WAIT, self.live_pool.next_deadline()]
        if self.phase != "draining":  # a drain fires and dispatches nothing
            deadlines.append(self.agenda.next_due(now_mono))
            next_fire = self.agenda.next_fire()
            if next_fire is not None:
                deadlines.append(now_mono + (next_fire - now_wall))
        if self.drain_deadline is not None:
            deadlines.append(self.drain_deadline)
        deadlines.append(self.retiring.next_deadline())
        if self._watchdog:
            deadlines.append(self._next_ping)
        readers: list[FileDescriptorLike] = [*self.live_pool.waitables(), self.signals]
        if self.fleet is not None:  # its events; the deadline of what this host holds
            deadlines.append(self.fleet.next_deadline())
            readers.append(self.fleet.member.fileno())
        writers: Sequence[FileDescriptorLike] = []
        if self.control is not None:  # its clients' deadlines, their sockets (control.py)
            deadlines.append(self.control.next_deadline())
            readers += self.control.readers()
            writers = self.control.writers()
        timeout = max(0.0, min(d for d in deadlines if d is not None) - now_mono)
        return self._waiter.wait(readers, writers, timeout)

    def _handle_signals(self) -> None:
        ignored: Counter[int] = Counter()
        for signum in self.signals.pop_all():
            if self.phase == "stopped":  # a fast stop earlier in this batch: nothing is left
                break
            name = signals.name(signum)
            if signum == signals.RELOAD:
                self.reloader.reload(name)
            elif signum == signals.DUMP:
                self._dump_state(name)
            elif signum in signals.DRAIN or signum == signals.FAST_STOP:
                self._stop(signum, name)
            else:
                ignored[signum] += 1
        for signum, times in ignored.items():
            # One line per signal and turn: a flood (a timer firing at 1 kHz) stays readable.
            self.log.warning(
                "%s received%s: ignored (it has no meaning to poolkeeper)",
                signals.name(signum),
                f" {times} times" if times > 1 else "",
            )

    def _stop(self, signum: int, name: str) -> None:
        """SIGTERM, SIGINT: drain; SIGQUIT, or any of them during a drain: fast stop."""
        if self.phase == "draining":
            self._fast_stop(f"{name} during the drain")
        elif signum == signals.FAST_STOP:
            self._begin_drain(name)
            self._fast_stop(name)
        else:
            self._begin_drain(name)

    def stop_for(self, why: str, exit_code: int) -> None:
        """Something the daemon cannot run with (a fleet database too new for it): fail the
        start, or drain and exit with `exit_code`."""
        if self.phase == "starting":
            raise StartupFailed(why, exit_code, errno.EPROTO)
        self.exit_code = exit_code
        if self.phase == "running":
            self._begin_drain(why)

    def _dump_state(self, why: str) -> None:
        """SIGUSR1: what the daemon is doing, in one log record (one journal entry)."""
        lines = state_dump(self, time.time(), time.monotonic())
        self.log.info("%s: state dump\n%s", why, "\n".join(lines))

    def _collect(self) -> None:
        self.handle_events(self.live_pool.poll())

    def handle_events(self, events: Iterable[Event]) -> None:
        for ev in events:
            if isinstance(ev, RunEnded):
                self._on_ended(ev)
            elif isinstance(ev, RunStarted):
                self._on_started(ev)
            elif isinstance(ev, NotStarted):
                self._on_not_started(ev)
            elif isinstance(ev, WorkerEvent):
                self._on_worker_event(ev)

    def _may_run(self, job: JobRuntime) -> bool:
        """Whether `job` fires and dispatches in this phase: every job while running, only
        `before_ready` ones while starting, none while draining."""
        return self.phase == "running" or (self.phase == "starting" and job.spec.before_ready)

    def _fire_schedules(self) -> None:
        if self.phase == "draining":
            return
        now_wall, now_mono = time.time(), time.monotonic()
        self._notice_clock_step(now_wall, now_mono)
        for job, fired in self.agenda.fire_due(now_wall, now_mono, self._may_run):
            self.store.set_last_fire(job.name, fired[-1])

    def _notice_clock_step(self, now_wall: float, now_mono: float) -> None:
        """A wall clock stepped back is told to every schedule (a step forward needs nothing:
        the fires it passed are simply due)."""
        offset = now_wall - now_mono
        last, self._clock_offset = self._clock_offset, offset
        if last is not None and last - offset > CLOCK_STEP:
            self.log.info("the wall clock went back %.3fs: schedules re-read", last - offset)
            self.agenda.clock_stepped_back(now_wall, last - offset)

    def _dispatch(self) -> None:
        if self.phase != "draining":
            self.agenda.dispatch(time.monotonic(), self._may_run, self._take)

    def _take(self, job: JobRuntime, run: PendingRun) -> bool:
        """Submit `run` if a worker is free for it. A loop replica needs an idle worker; while
        it waits for one, nothing else is dispatched (it is at the head of the ready queue),
        so the worker that validation promised it is not taken."""
        pool = self.live_pool
        slots = pool.idle_slots() if run.replica is not None else pool.free_slots()
        if slots <= 0:
            return False
        task = job.make_task(run)
        try:
            pool.submit(task, announce=self._on_started)  # "run started" before the job's output
        except PoolFull:  # no worker reads its pipe yet (a big payload, announce): its R wakes us
            return False
        job.dispatched(run, task)
        return True

    def _advance_phase(self) -> None:
        now = time.monotonic()
        if self.phase == "running":
            self._kill_overdue_retiring(now)
            if self.reloader.next_pool is not None and not self.live_pool.in_flight():
                self.reloader.replace_pool()
        elif self.phase == "starting":
            self._check_start(now)
            if (
                not self.before_ready_waiting()
                and len(self.workers_up) >= self.live_pool.target_size
            ):
                self._become_ready()
        elif self.phase == "draining":
            if not self.live_pool.in_flight():
                self.phase = "stopped"
            elif self.drain_deadline is not None and now >= self.drain_deadline:
                left = self.live_pool.in_flight()
                self.log.warning(
                    "drain budget of %ss spent: killing %s still in flight (%s)",
                    _secs(self.config),
                    count(len(left), "run"),
                    ", ".join(sorted({t.job for t in left})),
                )
                why = f"killed at the drain deadline (drain_timeout {_secs(self.config)}s)"
                for ev in self.live_pool.kill_runs(Outcome.KILLED, reason=why):
                    self._on_ended(ev)
                self.phase = "stopped"

    def _report(self) -> None:
        now = time.monotonic()
        if self.notifier.enabled and now >= self._next_status:
            self._next_status = now + STATUS_EVERY
            self.notifier.status(self.status_text(now))
        self.runlog.report(now, final=self.phase == "stopped")  # runs counted, not logged
        self.metrics.report(self, now)
        if self.phase in ("starting", "draining") and now >= self._next_extend:
            self._next_extend = now + EXTEND_EVERY
            budget = EXTEND_BY
            if self.drain_deadline is not None:
                budget = max(self.drain_deadline - now, 0.0) + EXTEND_BY
            self.notifier.extend_timeout(budget)
        if self._watchdog and now >= self._next_ping:
            healthy, why = self.health(now)
            if healthy:
                self.notifier.watchdog_ping()
            else:
                self.log.error("unhealthy, withholding the watchdog ping: %s", why)
            self._next_ping = now + self._watchdog / 2
        if now >= self._next_flush:
            self._next_flush = now + STATE_FLUSH_EVERY
            self.store.flush(wait=False)  # written by the store's writer thread
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            pruned = self.store.prune(self.config.state.keep, time.time())
            if pruned:
                self.log.info(
                    "pruned %s older than state.keep from the history", count(pruned, "run")
                )

    # -- events -------------------------------------------------------------------------

    def _on_started(self, ev: RunStarted) -> None:
        task = ev.task
        self.store.run_started(
            run_id=task.run_id,
            job=task.job,
            attempt=task.attempt,
            scheduled_at=task.scheduled_at,
            started_at=ev.started_at,
            worker_pid=ev.worker_pid,
        )
        if self.fleet is not None:
            self.fleet.run_started(task, ev.started_at, ev.worker_pid)
        spec = self.config.jobs.get(task.job)
        if self.runlog.started(task.job, task.run_id, spec, time.monotonic()):
            self.log.info(
                "run started (attempt %d, worker %d)",
                task.attempt,
                ev.worker_pid,
                extra=event("run_started", **_run_fields(task, ev.worker_pid)),
            )

    def _on_ended(self, ev: RunEnded) -> None:
        task = ev.task
        self.outcomes[ev.outcome] += 1
        self.metrics.run_ended(ev)
        if self.drain_started is not None:
            self.drain_outcomes[ev.outcome] += 1
        self.store.run_ended(
            run_id=task.run_id,
            job=task.job,
            attempt=task.attempt,
            scheduled_at=task.scheduled_at,
            started_at=ev.started_at,
            ended_at=ev.ended_at,
            outcome=ev.outcome,
            exit_code=ev.exit_code,
            signal=ev.signal,
            worker_pid=ev.worker_pid,
            error=ev.error,
        )
        if self.fleet is not None:
            self.fleet.run_ended(ev)
        retired = self.retiring.pop(task.run_id)
        job = retired if retired is not None else self.jobs.get(task.job)
        follow_up = ""
        if job is not None:
            # A run told to stop (reload, pause) is neither retried nor restarted.
            stopping = self.phase == "draining" or retired is not None
            follow_up = job.ended(ev, time.time(), time.monotonic(), stopping)
        spec = job.spec if job is not None else None
        now = time.monotonic()
        if self.runlog.ended(task.job, task.run_id, spec, ev.outcome, now, ev.error):
            took = f" in {ev.ended_at - ev.started_at:.3f}s" if ev.started_at else ""
            message = f"run {ev.outcome}{took}"
            if ev.error:
                message += f": {ev.error}"
            if follow_up:
                message += f"; {follow_up}"
            if ev.traceback:
                message += "\n" + ev.traceback.rstrip()
            # The message goes without args: the journal handler would copy args into
            # CODE_ARGS, storing every traceback twice.
            self.log.log(
                ev.outcome.level,
                message,
                extra=ended_event(ev.outcome, **_run_fields(task, ev.worker_pid)),
            )
        if retired is not None:
            self.reloader.start_held()
        if job is not None and job.spec.before_ready and ev.outcome != Outcome.SUCCEEDED:
            if self.phase == "starting" and not job.pending:
                raise StartupFailed(
                    f"before_ready job '{task.job}' did not succeed ({ev.outcome}"
                    f"{': ' + ev.error if ev.error else ''}); not reporting ready",
                    exitcodes.UNAVAILABLE,
                    errno.ECANCELED,
                )

    def _on_not_started(self, ev: NotStarted) -> None:
        retired = self.retiring.pop(ev.task.run_id)
        if retired is not None:  # its job was removed, changed or paused: drop it
            retired.dropped(ev.task)
            self.log.info("run not started: %s", ev.reason, extra=_run_fields(ev.task, None))
            self.reloader.start_held()
            return
        job = self.jobs.get(ev.task.job)
        if self.phase == "draining" or job is None:
            self.log.info("run not started: %s", ev.reason, extra=_run_fields(ev.task, None))
            if job is not None:
                job.dropped(ev.task)
            return
        job.handed_back(ev.task, time.monotonic())

    def _on_worker_event(self, ev: WorkerEvent) -> None:
        self.metrics.worker_event(ev)
        if ev.kind == "started":
            self.workers_up.add(ev.pid)
        elif ev.kind == "exited":
            self.workers_up.discard(ev.pid)
            reaper.kill_orphans()  # what it left below it, if it died before killing it
        if ev.kind in ("replaced", "recycled"):
            self.log.warning(
                "worker %d %s: %s",
                ev.pid,
                ev.kind,
                ev.detail,
                extra=event("worker_replaced", WORKER_PID=ev.pid),
            )
        elif ev.kind == "init_failed":
            self.log.error("worker %d failed to start: %s", ev.pid, ev.detail)
        else:
            self.log.debug("worker %d %s: %s", ev.pid, ev.kind, ev.detail)

    # -- phases -------------------------------------------------------------------------

    def before_ready_waiting(self) -> list[JobRuntime]:
        """before_ready jobs that have not succeeded yet."""
        return [
            job
            for job in self._before_ready
            if job.pending or job.running or job.next_fire is not None
        ]

    def _check_start(self, now: float) -> None:
        healthy, why = self.live_pool.healthy()
        if healthy:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = now
        elif now - self._unhealthy_since >= START_UNHEALTHY_GRACE:
            raise StartupFailed(
                f"the pool cannot start: {why}; not reporting ready",
                exitcodes.UNAVAILABLE,
                errno.ECHILD,
            )

    def _become_ready(self) -> None:
        self.phase = "running"
        self.agenda.release_held()  # the fires and runs of the jobs that waited for READY
        self.freeze_what_is_built()
        # The status first, unthrottled: `systemctl start` returns on READY=1, and the unit
        # must not go on saying "starting" until the next turn.
        self.notifier.status(self.status_text(time.monotonic()), force=True)
        self.notifier.ready()
        self.log.info("ready", extra=event("daemon_ready"))

    def _begin_drain(self, why: str) -> None:
        now = time.monotonic()
        self.notifier.stopping()
        self.metrics.drain_started()
        self.phase = "draining"
        self.reloader.forget()  # definitions a reload left waiting never start now
        self.drain_started = now
        self.drain_deadline = now + self.config.shutdown.drain_timeout
        pool = self.live_pool
        if self.fleet is not None:
            self.fleet.member.quiesce()  # nothing more claimed; the rest is for other hosts
        in_flight = pool.in_flight()
        self.drained_in_flight = len(in_flight)
        dropped = sum(job.drop_pending() for job in self.jobs.values())
        self.agenda.drop_waiting()
        self.log.info(
            "%s: draining %s in flight (%s) within %ss; %s will not start",
            why,
            count(len(in_flight), "run"),
            count(sum(1 for t in in_flight if t.loop), "loop replica"),
            _secs(self.config),
            count(dropped, "waiting run"),
            extra=event("drain_started"),
        )
        # After the line, so that what the runs say as they stop comes after it.
        pool.drain()  # sets every ctx.stopping; queued, unstarted runs come back NotStarted

    def _fast_stop(self, why: str) -> None:
        self.log.warning("%s: fast stop, killing every run in flight", why)
        for ev in self.live_pool.kill_runs(Outcome.KILLED, reason=f"killed by a fast stop ({why})"):
            self._on_ended(ev)
        self.phase = "stopped"

    def _log_drain_summary(self) -> None:
        assert self.drain_started is not None  # _shutdown() calls this only after a drain began
        took = time.monotonic() - self.drain_started
        done = {k: v for k, v in self.drain_outcomes.items() if k != Outcome.KILLED}
        summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(done.items()))
        self.log.info(
            "drain finished in %.2fs: %s in flight; drained: %s; killed: %d",
            took,
            count(self.drained_in_flight, "run"),
            summary or "none",
            self.drain_outcomes.get(Outcome.KILLED, 0),
            extra=event("drain_finished"),
        )

    # -- runs told to stop (reload, pause) -----------------------------------------------

    def stop_runs(self, job: JobRuntime, tasks: list[Task], now: float) -> None:
        """These runs see ctx.stopping and get the drain budget to end (then are killed);
        they are neither retried nor restarted."""
        if tasks:
            self.live_pool.stop_runs(tasks)
            kill_at = now + self.config.shutdown.drain_timeout
            self.retiring.add(job, [task.run_id for task in tasks], kill_at)

    def _kill_overdue_retiring(self, now: float) -> None:
        overdue = self.retiring.due(now)
        if overdue:
            self.log.warning(
                "%d stopped runs (of jobs reloaded or paused) still running after %ss: "
                "killing them (%s)",
                len(overdue),
                self.config.shutdown.drain_timeout,
                ", ".join(sorted({task.job for task in overdue})),
            )
            why = (
                f"killed: still running {self.config.shutdown.drain_timeout:g}s after its job "
                "was reloaded or paused (shutdown.drain_timeout)"
            )
            for ev in self.live_pool.kill_runs(Outcome.KILLED, overdue, reason=why):
                self._on_ended(ev)

    # -- health and status ---------------------------------------------------------------

    def health(self, now: float) -> tuple[bool, str]:
        """Watchdog health, defined in docs/health.md: the loop turned recently and the pool
        says it is handling everything it owns."""
        since = now - self.last_turn
        if since > max(MAX_WAIT * 2, 2.0):
            return False, f"main loop has not turned for {since:.1f}s"
        return self.live_pool.healthy()

    def status_text(self, now: float) -> str:
        return status_line(self, now)


def _fleet_side(daemon: Daemon) -> FleetSide:
    try:
        from poolkeeper.fleet.loop import FleetSide  # psycopg: only in fleet mode
    except ImportError as exc:
        raise StartupFailed(
            f"the spec has a fleet: section, but {exc.name or 'psycopg'} cannot be imported: "
            "install the fleet extra (pip install 'poolkeeper[fleet]')",
            exitcodes.UNAVAILABLE,
            errno.ENOPKG,
        ) from None
    return FleetSide(daemon, daemon.log)


def _secs(config: Config) -> str:
    return f"{config.shutdown.drain_timeout:g}"


def _run_fields(task: Task, worker_pid: int | None) -> dict[str, str | int]:
    fields: dict[str, str | int] = {"JOB": task.job, "RUN_ID": task.run_id, "ATTEMPT": task.attempt}
    if worker_pid is not None:
        fields["WORKER_PID"] = worker_pid
    return fields
