"""Per-job bookkeeping for the main loop: when a job is due, what waits for a worker, and
what a finished run means for the next one (retry, loop restart, backoff).

Times: schedules are wall-clock (epoch seconds, cron is about the calendar); everything
relative (retry delays, backoff, restarts) is monotonic, so a clock step never makes a
backing-off job fire early or wait for hours.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING, NamedTuple

from poolkeeper.config.settings import Backoff, Job, Retry
from poolkeeper.outcomes import Outcome
from poolkeeper.pool.supervisor import RunEnded, Task
from poolkeeper.scheduling.backoff import (
    BackoffDelays,
    FailureTracker,
    RetryDecider,
    should_restart,
)
from poolkeeper.scheduling.triggers import JobSchedule, make_schedule

if TYPE_CHECKING:
    from poolkeeper.daemon.agenda import Agenda


# Run ids: 64 random bits, from a generator seeded by os.urandom when the daemon starts (so
# never the same sequence twice, whatever RNG a test injects into the daemon). Not a getrandom
# system call per run as os.urandom would be: at 10,000 runs/s that was 4% of the main loop.
# Uniqueness is all a run id needs; nothing guesses them.
_run_ids = random.Random()


def new_run_id() -> str:
    return f"{_run_ids.getrandbits(64):016x}"


class PendingRun(NamedTuple):
    """A run waiting for a worker: a fire of the schedule, a retry, or a loop replica."""

    job: str
    attempt: int
    scheduled_at: float  # wall clock: when the schedule wanted it
    due: float  # monotonic: not before
    replica: int | None = None
    # Fleet mode: what the run holds in the fleet's database, a claimed fire or a replica's
    # slot (poolkeeper.fleet.jobs); a retry or a restart inherits it.
    claim: object | None = None


class JobRuntime:
    """One job's state. What changes the loop's agenda (a run queued, a backoff, a pause) is
    announced to `agenda` (poolkeeper.daemon.agenda), which orders every job's runs and fires;
    a runtime used alone (tests, no agenda) announces nothing."""

    # A plain class, not a dataclass: the daemon imports this on its way to READY=1, and a
    # dataclass costs ~1 ms of start-up to build. Slots: there is one per job, 10,000 of them.
    __slots__ = (
        "spec",
        "rng",
        "schedule",
        "pending",
        "running",
        "paused",
        "retry",
        "replica_failures",
        "_backing_off_until",
        "replica_of",
        "agenda",
        "blocked",
    )

    def __init__(self, spec: Job, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.schedule: JobSchedule | None = None
        # A list, not a deque: it holds a few runs at most, and an empty deque costs 600 bytes
        # (6 MB for 10,000 jobs).
        self.pending: list[PendingRun] = []
        self.running: dict[str, Task] = {}
        self.paused = False
        self.retry: RetryDecider | None = None
        self.replica_failures: dict[int, FailureTracker] = {}
        self._backing_off_until: float | None = None  # monotonic, for STATUS and `status`
        self.replica_of: dict[str, int | None] = {}  # run id -> loop replica
        self.agenda: Agenda | None = None
        # A queued fire (overlap: queue) met a running run at dispatch and left the agenda's
        # ready queue: it is announced again when no run of this job is left.
        self.blocked = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_loop(self) -> bool:
        return self.spec.loop is not None

    @property
    def backing_off_until(self) -> float | None:
        return self._backing_off_until

    @backing_off_until.setter
    def backing_off_until(self, until: float | None) -> None:
        if until != self._backing_off_until:
            self._backing_off_until = until
            if self.agenda is not None:
                self.agenda.backoff_changed(self)

    def _queue(self, run: PendingRun, *, first: bool = False) -> None:
        """`run` waits for a worker (first in this job's line if `first`)."""
        if first:
            self.pending.insert(0, run)
        else:
            self.pending.append(run)
        if self.agenda is not None:
            self.agenda.queued(self, run)

    # -- scheduling ---------------------------------------------------------------------

    def start(self, now_wall: float, now_mono: float, last_fire: float | None) -> None:
        """Arm the trigger (or queue every loop replica) when the daemon starts."""
        spec = self.spec
        if spec.loop is not None:  # self.is_loop, spelled out for the type checker
            for replica in range(spec.loop.replicas):
                self.replica_failures[replica] = FailureTracker(_backoff(spec.backoff), self.rng)
                self._queue(PendingRun(spec.name, 1, now_wall, now_mono, replica))
            return
        self.retry = RetryDecider(spec.retry.attempts, _backoff(spec.retry), self.rng)
        self.schedule = make_schedule(spec, now=now_wall, last_fire=last_fire, rng=self.rng)

    @property
    def next_fire(self) -> float | None:
        """Wall-clock time of the next fire (jitter included), None if it never fires again."""
        if self.schedule is None or self.schedule.next is None:
            return None
        return self.schedule.next.due

    def fire_due(self, now_wall: float, now_mono: float) -> list[float]:
        """Turn the schedule's due fire into a pending run (per `overlap`; a skipped fire is
        gone); returns the nominal fire times, for the caller to persist (`catchup`)."""
        fired: list[float] = []
        if self.schedule is None:
            return fired
        while (fire := self.schedule.pop_due(now_wall)) is not None:
            fired.append(fire.nominal)
            # Asked before a run is built: a job busier than its schedule (every: 1ms) drops
            # most of its fires, and a dropped fire should cost next to nothing.
            if not self.paused and self._admits():
                self._queue(PendingRun(self.spec.name, 1, fire.nominal, now_mono))
        return fired

    def _admits(self) -> bool:
        """Whether `overlap` lets one more run wait now."""
        policy = self.spec.overlap
        if policy == "queue":
            return not self.pending  # coalesce: at most one queued fire
        active = len(self.running) + len(self.pending)
        if policy == "skip":
            return not active
        return active < self.spec.max_concurrent  # allow

    def _admit(self, run: PendingRun) -> bool:
        if not self._admits():
            return False
        self._queue(run)
        return True

    def waits_for_running(self, run: PendingRun) -> bool:
        """overlap: queue: a queued fire waits for the current run to end."""
        return self.spec.overlap == "queue" and bool(self.running) and run.replica is None

    def ready(self, now_mono: float) -> list[PendingRun]:
        """This job's pending runs whose time has come and that may start now (the agenda
        keeps every job's in one queue; this is the same rule for one job)."""
        return [
            run for run in self.pending if run.due <= now_mono and not self.waits_for_running(run)
        ]

    def make_task(self, run: PendingRun) -> Task:
        spec = self.spec
        return Task(
            run_id=new_run_id(),
            job=spec.name,
            target=spec.target,
            args=tuple(spec.args),
            kwargs=dict(spec.kwargs),
            attempt=run.attempt,
            scheduled_at=run.scheduled_at,
            timeout=spec.timeout,
            heartbeat_timeout=spec.heartbeat_timeout,
            env=dict(spec.env),
            loop=self.is_loop,
        )

    def dispatched(self, run: PendingRun, task: Task) -> None:
        self.pending.remove(run)
        self.running[task.run_id] = task
        self.replica_of[task.run_id] = run.replica

    def drop_pending(self) -> int:
        """Nothing waiting will start (a drain, a reload replacing the job); returns how many
        runs were waiting."""
        dropped = len(self.pending)
        self.pending.clear()
        return dropped

    def dropped(self, task: Task) -> None:
        """A submitted run that will never start (handed back during a drain)."""
        self._forget(task)

    def handed_back(self, task: Task, now_mono: float) -> None:
        """A submitted run that its worker never started: it waits again, first in line."""
        replica = self._forget(task)
        self._queue(
            PendingRun(self.name, task.attempt, task.scheduled_at, now_mono, replica), first=True
        )

    def _forget(self, task: Task) -> int | None:
        """Its run is no longer in flight; returns the loop replica it was."""
        self.running.pop(task.run_id, None)
        if self.blocked and not self.running:
            self.blocked = False
            if self.agenda is not None:
                for run in self.pending:
                    self.agenda.queued(self, run)
        return self.replica_of.pop(task.run_id, None)

    # -- outcomes -----------------------------------------------------------------------

    def ended(self, ev: RunEnded, now_wall: float, now_mono: float, draining: bool) -> str:
        """Book a finished run; returns what happens next, for the log."""
        replica = self._forget(ev.task)
        if draining or ev.outcome == Outcome.KILLED:
            return ""
        if self.paused:
            if self.is_loop:
                return "paused: not restarted"
            return "paused: not retried" if ev.outcome != Outcome.SUCCEEDED else ""
        if self.is_loop:
            return self._after_loop_run(ev, replica, now_wall, now_mono)
        return self._after_run(ev, now_mono)

    def _after_run(self, ev: RunEnded, now_mono: float) -> str:
        assert self.retry is not None  # start() sets it for every job that is not a loop
        delay = self.retry.should_retry(ev.outcome, ev.task.attempt)
        if delay is None:
            self.backing_off_until = None
            failed = ev.outcome != Outcome.SUCCEEDED and ev.task.attempt > 1
            return f"gave up after {ev.task.attempt} attempts" if failed else ""
        due = now_mono + delay
        self.backing_off_until = due
        self._queue(PendingRun(self.name, ev.task.attempt + 1, ev.task.scheduled_at, due))
        return f"retry {ev.task.attempt + 1}/{self.spec.retry.attempts} in {delay:.1f}s"

    def _after_loop_run(
        self, ev: RunEnded, replica: int | None, now_wall: float, now_mono: float
    ) -> str:
        # Every run of a loop job is one of its replicas (start(), handed_back(), resume()).
        assert replica is not None
        restart = self.spec.restart
        if not should_restart(restart, ev.outcome):
            return f"not restarted (restart: {restart})"
        # A loop that crashes, or returns quickly, restarts with backoff: never a busy loop.
        tracker = self.replica_failures[replica]
        tracker.started(now_mono - ((ev.ended_at - ev.started_at) if ev.started_at else 0.0))
        due = tracker.ended(ev.outcome, now_mono)
        delay = max(0.0, due - now_mono)
        self.backing_off_until = due if delay else None
        self._queue(PendingRun(self.name, ev.task.attempt + 1, now_wall, due, replica))
        return f"restart in {delay:.1f}s" if delay else "restarted"

    # -- by hand (poolkeeper pause / resume / run-now) --------------------------------------

    def pause(self) -> list[Task]:
        """No new runs from now on: waiting runs and retries are dropped, fires are skipped.
        Returns the loop replicas in flight, which the caller stops (a loop only ends when
        told); scheduled runs in flight finish."""
        if not self.paused and self.agenda is not None:
            self.agenda.pause_changed(self, True)
        self.paused = True
        self.pending.clear()
        self.backing_off_until = None
        return [task for task in self.running.values() if task.loop]

    def resume(self, now_wall: float, now_mono: float, stopping: set[str]) -> None:
        """Fires count again; a loop gets back every replica that is not running (or is
        still finishing its stop: `stopping`, run ids), without the backoff it had earned."""
        if self.paused and self.agenda is not None:
            self.agenda.pause_changed(self, False)
        self.paused = False
        if not self.is_loop:
            return
        busy = {self.replica_of.get(run_id) for run_id in self.running if run_id not in stopping}
        waiting = {run.replica for run in self.pending}
        for replica, tracker in self.replica_failures.items():
            if replica not in busy and replica not in waiting:
                tracker.reset()
                self._queue(PendingRun(self.name, 1, now_wall, now_mono, replica))

    def run_now(self, now_wall: float, now_mono: float) -> str | None:
        """Queue one run now (paused or not); returns why not, or None."""
        if self.is_loop:
            return f"'{self.name}' is a loop job: its replicas run all the time"
        if not self._admit(PendingRun(self.name, 1, now_wall, now_mono)):
            return (
                f"'{self.name}' already has a run in flight or waiting "
                f"(overlap: {self.spec.overlap})"
            )
        return None

    def backing_off(self, now_mono: float) -> float | None:
        """Seconds until a backing-off job may run again, or None."""
        if self.backing_off_until is None or self.backing_off_until <= now_mono:
            return None
        return self.backing_off_until - now_mono


@functools.lru_cache(maxsize=256)
def _backoff(policy: Retry | Backoff) -> BackoffDelays:
    # Cached: most jobs share a policy (the defaults), and BackoffDelays is immutable; with
    # 10,000 jobs, one each would be 1 MB.
    return BackoffDelays(
        initial=policy.initial, factor=policy.factor, max=policy.max, jitter=policy.jitter
    )
