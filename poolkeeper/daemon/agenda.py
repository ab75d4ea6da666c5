"""What is due, and what waits for a worker, for every job: the main loop's cost per turn is
proportional to what changed, not to the number of jobs.

                 fires (wall clock)         delayed (monotonic)          ready
    schedule --> job -> next fire  --+     retries, loop restarts  -->  (replica first, due, seq)
                                     |     handed back runs                 |
                 fire_due(now) ------+--> PendingRun ------------------->   +--> take(job, run)
                                            (JobRuntime.pending holds        while a worker is
                                             the run; this only orders it)   free for the head

- `fires`: each job's next fire in a keyed timer heap (poolkeeper.scheduling.timers); a turn
  pops only the jobs that are due, and the wait's timeout is the head.
- A run a job queues (`JobRuntime.pending`) is announced here (`queued`) and waits in
  `delayed` until its due time, then in `ready`, ordered as the loop always dispatched:
  loop replicas first (validation promised them a worker), then by due time. `take` is
  called for the head only, and only while it is accepted: what cannot run is never sorted.
- Entries are checked when they surface, not searched for when they go stale: a run that is
  no longer in its job's `pending` (paused, dispatched, dropped by a reload or a drain) or a
  job no longer on this agenda (removed by a reload) is skipped.
- `backoffs` and `paused` keep STATUS= a matter of counters: how many jobs back off, which
  one is back first, how many are paused.

The phase rule (while starting only `before_ready` jobs run) is the caller's `may_run`: a job
that may not run yet keeps its fire and its runs `held` here until `release_held()`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from poolkeeper.daemon.jobs import JobRuntime, PendingRun
from poolkeeper.scheduling.timers import TimerHeap

# A decision of the caller's about one job: whether it may fire and dispatch now.
MayRun = Callable[[JobRuntime], bool]
# Hand the run to a worker; False when no worker is free for it (it stays at the head).
Take = Callable[[JobRuntime, PendingRun], bool]

_Entry = tuple[int, float, int, JobRuntime, PendingRun]  # (0 for a loop replica, due, seq, ...)


class Agenda:
    def __init__(self) -> None:
        self.fires: TimerHeap[JobRuntime] = TimerHeap()  # wall clock
        self.backoffs: TimerHeap[JobRuntime] = TimerHeap()  # monotonic: backing off until
        self.paused = 0
        # By due alone (monotonic): a replica-first order here would keep a due run waiting
        # behind a replica whose restart is later (found by test_agenda's property test).
        self._delayed: list[tuple[float, int, _Entry]] = []
        self._ready: list[_Entry] = []  # by (replica first, due)
        self._held_fires: list[JobRuntime] = []
        self._held_runs: list[_Entry] = []
        self._seq = 0

    # -- jobs come and go -----------------------------------------------------------------

    def add(self, job: JobRuntime) -> None:
        """`job` is started (JobRuntime.start) and scheduled from now on."""
        job.agenda = self
        if job.paused:
            self.paused += 1
        self.rearm(job)
        self.backoff_changed(job)
        for run in job.pending:
            self.queued(job, run)

    def remove(self, job: JobRuntime) -> None:
        """`job` is no longer scheduled (a reload removed or replaced it): its entries go
        stale and are skipped when they surface."""
        if job.agenda is not self:
            return
        job.agenda = None
        self.fires.cancel(job)
        self.backoffs.cancel(job)
        if job.paused:
            self.paused -= 1

    # -- announcements from JobRuntime ----------------------------------------------------

    def queued(self, job: JobRuntime, run: PendingRun) -> None:
        self._seq += 1
        entry = (0 if run.replica is not None else 1, run.due, self._seq, job, run)
        heapq.heappush(self._delayed, (run.due, self._seq, entry))

    def backoff_changed(self, job: JobRuntime) -> None:
        until = job.backing_off_until
        if until is None:
            self.backoffs.cancel(job)
        else:
            self.backoffs.set(job, until)

    def pause_changed(self, job: JobRuntime, paused: bool) -> None:
        self.paused += 1 if paused else -1

    def rearm(self, job: JobRuntime) -> None:
        """Its next fire changed (or is now known)."""
        nxt = job.next_fire
        if nxt is None:
            self.fires.cancel(job)
        else:
            self.fires.set(job, nxt)

    # -- one turn ---------------------------------------------------------------------------

    def fire_due(
        self, now_wall: float, now_mono: float, may_run: MayRun
    ) -> Iterator[tuple[JobRuntime, list[float]]]:
        """Each job whose fire is due, with the nominal fire times it popped (what the
        caller persists as the last fire). A job that may not run yet keeps its fire."""
        for job in self.fires.pop_due(now_wall):
            if not may_run(job):
                self._held_fires.append(job)
                continue
            fired = job.fire_due(now_wall, now_mono)
            self.rearm(job)
            if fired:
                yield job, fired

    def dispatch(self, now_mono: float, may_run: MayRun, take: Take) -> int:
        """Offer the ready runs to `take`, head first, until it declines one. Returns how
        many it took."""
        delayed, ready = self._delayed, self._ready
        while delayed and delayed[0][0] <= now_mono:
            heapq.heappush(ready, heapq.heappop(delayed)[2])
        taken = 0
        while ready:
            entry = ready[0]
            job, run = entry[3], entry[4]
            if job.agenda is not self or run not in job.pending:
                heapq.heappop(ready)  # stale: dispatched, dropped, or its job removed
            elif not may_run(job):
                self._held_runs.append(heapq.heappop(ready))
            elif job.waits_for_running(run):
                # overlap: queue. JobRuntime queues it again when its running run ends.
                heapq.heappop(ready)
                job.blocked = True
            elif take(job, run):
                heapq.heappop(ready)
                taken += 1
            else:
                break
        return taken

    def release_held(self) -> None:
        """The phase changed (starting -> running): what waited for it is due again."""
        held_fires, self._held_fires = self._held_fires, []
        for job in held_fires:
            if job.agenda is self:
                self.rearm(job)
        held_runs, self._held_runs = self._held_runs, []
        for entry in held_runs:
            heapq.heappush(self._delayed, (entry[1], entry[2], entry))

    def clock_stepped_back(self, now_wall: float, step: float) -> None:
        """The wall clock went back `step` seconds: every schedule decides whether to rebase
        (poolkeeper.scheduling.triggers.JobSchedule.stepped_back), and the fire times are
        read again. O(jobs), but only when the clock is stepped."""
        for job in list(self.fires):
            if job.schedule is not None:
                job.schedule.stepped_back(now_wall, step)
            self.rearm(job)

    # -- what the loop waits for and reports --------------------------------------------------

    def next_fire(self) -> float | None:
        """Wall-clock time of the earliest fire, or None."""
        return self.fires.peek()

    def next_due(self, now_mono: float) -> float | None:
        """Monotonic time a delayed run becomes ready, if later than `now_mono` (runs that are
        ready already wait for a worker, whose freeing wakes the loop anyway)."""
        delayed = self._delayed
        if not delayed:
            return None
        due = delayed[0][0]
        return due if due > now_mono else now_mono

    def backing_off(self, now_mono: float) -> tuple[int, JobRuntime | None, float]:
        """How many jobs back off at `now_mono`, the one back first and its seconds left."""
        for job in self.backoffs.pop_due(now_mono):
            job.backing_off_until = None  # over: nothing to show any more
        head = self.backoffs.peek_key()
        if head is None:
            return 0, None, 0.0
        until = self.backoffs.get(head)
        assert until is not None  # peek_key returned a live key
        return len(self.backoffs), head, until - now_mono

    def drop_waiting(self) -> None:
        """A drain: nothing waiting starts any more."""
        self._delayed.clear()
        self._ready.clear()
        self._held_runs.clear()
