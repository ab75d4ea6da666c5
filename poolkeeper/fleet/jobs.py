"""A fleet job on one host (`scope: fleet`): its schedule creates fires in the database, not
runs; its runs come from the fires this host claims, and a loop's replicas from the slots it
is granted. Everything else (the queue, retries, loop restarts and backoff, pause) is the
JobRuntime of a job on one host.

    schedule due -> fires_due() -> NewFire (member: INSERT, unique key)     [every host]
    member claims -> claimed(Claim) -> PendingRun(claim=...) -> a run       [one host]
    the run ends  -> a retry keeps the claim; the last attempt ends the fire (fence checked)
    member grants -> granted(Slot) -> the replica runs, restarts keep the slot
    the replica's run ends with no restart queued (revoked, paused, lost) -> the slot is released
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from poolkeeper.config.settings import Job
from poolkeeper.daemon.jobs import JobRuntime, PendingRun, _backoff
from poolkeeper.fleet.db import Claim, Ended, NewFire, Slot
from poolkeeper.fleet.keys import GridIntervalTrigger, fire_key, manual_key
from poolkeeper.outcomes import Outcome
from poolkeeper.pool.supervisor import RunEnded, Task
from poolkeeper.scheduling.backoff import FailureTracker, RetryDecider
from poolkeeper.scheduling.triggers import IntervalTrigger, JobSchedule, make_trigger

if TYPE_CHECKING:
    from poolkeeper.fleet.member import FleetMember

Hold = Claim | Slot  # what a fleet run holds: a claimed fire, or a loop replica's slot


class FleetJobRuntime(JobRuntime):
    __slots__ = ("member", "held", "slots", "revoked", "_carry")

    def __init__(self, spec: Job, rng: random.Random, member: FleetMember) -> None:
        super().__init__(spec, rng)
        self.member = member
        self.held: dict[str, Hold] = {}  # run id -> what its run holds
        self.slots: dict[int, Slot] = {}  # replica -> the slot this host holds for it
        self.revoked: set[int] = set()  # replicas to give back once their run has ended
        self._carry: Hold | None = None  # what a run queued by ended() inherits

    # -- scheduling: fires go to the fleet ----------------------------------------------

    def start(self, now_wall: float, now_mono: float, last_fire: float | None) -> None:
        spec = self.spec
        if spec.loop is not None:  # replicas wait for their slots (granted)
            for replica in range(spec.loop.replicas):
                self.replica_failures[replica] = FailureTracker(_backoff(spec.backoff), self.rng)
            return
        self.retry = RetryDecider(spec.retry.attempts, _backoff(spec.retry), self.rng)
        trigger = make_trigger(spec)
        if isinstance(trigger, IntervalTrigger):  # every host on the same grid
            trigger = GridIntervalTrigger(trigger.every, trigger.jitter)
        if trigger is not None:
            self.schedule = JobSchedule(trigger, now=now_wall, last_fire=last_fire, rng=self.rng)

    def fire_due(self, now_wall: float, now_mono: float) -> list[float]:
        """The due fires become the fleet's (fires_due), not runs here."""
        fired: list[float] = []
        if self.schedule is None:
            return fired
        fires: list[NewFire] = []
        trigger = self.schedule.trigger
        while (fire := self.schedule.pop_due(now_wall)) is not None:
            fired.append(fire.nominal)
            if not self.paused:
                key = fire_key(trigger, fire.nominal)
                fires.append(NewFire(self.name, key, fire.nominal, fire.due))
        if fires:
            self.member.fires_due(fires)
        return fired

    def claimed(self, claim: Claim, now_mono: float) -> None:
        """This host won `claim`: its run waits for a worker."""
        if self.paused:  # paused here before the fleet heard: not run
            self._end_unstarted(claim, "paused")
            return
        self.member.waiting.add(claim.fire_id)
        self._queue(PendingRun(self.name, claim.attempt, claim.scheduled, now_mono, None, claim))

    def granted(self, slot: Slot, now_wall: float, now_mono: float) -> None:
        """This host holds `slot`: its replica runs here."""
        if self.paused or slot.replica not in self.replica_failures:
            self.member.release(slot)
            return
        self.slots[slot.replica] = slot
        self.revoked.discard(slot.replica)
        self.replica_failures[slot.replica].reset()
        self._queue(PendingRun(self.name, 1, now_wall, now_mono, slot.replica, slot))

    def revoke(self, slot: Slot) -> list[Task]:
        """Give `slot` back: returns its run to stop (the slot is released when it ends), or
        releases it now if it has none."""
        if self.slots.get(slot.replica) != slot:
            self.member.release(slot)
            return []
        self.revoked.add(slot.replica)
        waiting = [run for run in self.pending if run.replica == slot.replica]
        for run in waiting:
            self.pending.remove(run)
        running = [t for run_id, t in self.running.items() if self.held.get(run_id) == slot]
        if not running:
            self._release(slot.replica)
        return running

    def lose(self, replicas: bool, fires: bool) -> list[Task]:
        """The lease is lost, or its deadline passed: drop the waiting runs of what this host
        can no longer hold, and return the runs in flight to kill (`replicas`: loop replicas,
        `fires`: runs of claimed fires, that another host may run again)."""
        kill: list[Task] = []
        for run in [r for r in self.pending if r.claim is not None]:
            # Nothing starts past the deadline: a claimed fire not started yet is ended as
            # killed (written, fence-checked, when the database answers again).
            if isinstance(run.claim, Claim):
                self.pending.remove(run)
                self._end_unstarted(run.claim, "not started: this host's fleet lease ran out")
            elif replicas and isinstance(run.claim, Slot):
                self.pending.remove(run)
                self._release(run.claim.replica)
        for run_id, task in self.running.items():
            hold = self.held.get(run_id)
            if (replicas and isinstance(hold, Slot)) or (fires and isinstance(hold, Claim)):
                if isinstance(hold, Slot):
                    self.revoked.add(hold.replica)
                kill.append(task)
        return kill

    def pause(self) -> list[Task]:
        for run in self.pending:
            if isinstance(run.claim, Claim):
                self._end_unstarted(run.claim, "paused")
        for replica in [r.replica for r in self.pending if isinstance(r.claim, Slot)]:
            if replica is not None:
                self._release(replica)
        return super().pause()

    def resume(self, now_wall: float, now_mono: float, stopping: set[str]) -> None:
        """Fires count again; a loop's replicas come back as the fleet grants their slots."""
        if self.paused and self.agenda is not None:
            self.agenda.pause_changed(self, False)
        self.paused = False

    # -- runs: the hold goes with the run ---------------------------------------------------

    def _queue(self, run: PendingRun, *, first: bool = False) -> None:
        if run.claim is None and self._carry is not None:
            run = run._replace(claim=self._carry)
        super()._queue(run, first=first)

    def make_task(self, run: PendingRun) -> Task:
        task = super().make_task(run)
        hold = run.claim
        if isinstance(hold, Slot):
            return task._replace(replica=hold.replica, fence=hold.epoch)
        if isinstance(hold, Claim):
            return task._replace(fence=hold.fence)
        return task

    def dispatched(self, run: PendingRun, task: Task) -> None:
        super().dispatched(run, task)
        if isinstance(run.claim, (Claim, Slot)):
            self.held[task.run_id] = run.claim
            if isinstance(run.claim, Claim):
                self.member.waiting.discard(run.claim.fire_id)

    def handed_back(self, task: Task, now_mono: float) -> None:
        self._carry = self.held.pop(task.run_id, None)
        try:
            super().handed_back(task, now_mono)
        finally:
            self._carry = None

    def drop_pending(self) -> int:
        """What waits here will not start: claimed fires go back to the fleet (another host
        runs them), slots are released."""
        for run in self.pending:
            if isinstance(run.claim, Claim) and run.claim.fire_id in self.member.waiting:
                self.member.waiting.discard(run.claim.fire_id)
                self.member.give_back(run.claim)
            elif isinstance(run.claim, Claim):  # a retry: the fire ends with this attempt
                self._end_unstarted(run.claim, "not retried")
            elif isinstance(run.claim, Slot) and run.replica is not None:
                self._release(run.replica)
        return super().drop_pending()

    def dropped(self, task: Task) -> None:
        """Never started (a drain): a claimed fire goes back to the fleet for another host."""
        hold = self.held.pop(task.run_id, None)
        super().dropped(task)
        if isinstance(hold, Claim):
            self.member.give_back(hold)
        elif isinstance(hold, Slot):
            self._release(hold.replica)

    def ended(self, ev: RunEnded, now_wall: float, now_mono: float, draining: bool) -> str:
        hold = self.held.pop(ev.task.run_id, None)
        if isinstance(hold, Slot) and hold.replica in self.revoked:
            draining = True  # given back: not restarted here
        self._carry = hold
        try:
            follow_up = super().ended(ev, now_wall, now_mono, draining)
        finally:
            self._carry = None
        if hold is not None and not any(run.claim == hold for run in self.pending):
            if isinstance(hold, Claim):  # no retry queued: the fire's outcome is final
                self.member.fire_ended(Ended(hold.fire_id, hold.fence, ev.outcome, ev.error))
            else:
                self._release(hold.replica)
        return follow_up

    def _end_unstarted(self, claim: Claim, why: str) -> None:
        """A claimed fire whose run will not start here: its outcome is `killed`, with why
        (written, fence-checked, when the database answers)."""
        self.member.waiting.discard(claim.fire_id)
        self.member.fire_ended(Ended(claim.fire_id, claim.fence, Outcome.KILLED, why))

    def _release(self, replica: int) -> None:
        slot = self.slots.pop(replica, None)
        self.revoked.discard(replica)
        if slot is not None:
            self.member.release(slot)

    def run_now(self, now_wall: float, now_mono: float) -> str | None:
        if self.is_loop:
            return super().run_now(now_wall, now_mono)
        self.member.run_now(self.name, manual_key(), now_wall)
        return None
