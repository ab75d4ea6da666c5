"""The main loop's fleet duties, in its own thread, each turn (poolkeeper.daemon.mainloop):
apply what the fleet thread sent (claims, slots, pauses, a lost lease), and keep the safety
rule: past the member's `deadline` this host holds nothing in the fleet, so

- the runs of fleet loop replicas are killed (unless the job says `on_db_loss: keep`), and
  so are the runs of claimed fires whose job says `on_lost: retry` (another host may run that
  fire again: two at once would break "at most one run of a fire at a time");
- a lost lease (LeaseLost) stops all of them, `keep` or not: another host may hold them now.

`FleetSide(daemon)` holds a reference to the `Daemon`, like its control handlers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from poolkeeper import exitcodes
from poolkeeper.config.settings import Config, Job
from poolkeeper.fleet import db
from poolkeeper.fleet.jobs import FleetJobRuntime
from poolkeeper.fleet.member import (
    Claimed,
    FleetMember,
    Granted,
    LeaseLost,
    Paused,
    Refused,
    Revoke,
    Superseded,
)
from poolkeeper.outcomes import Outcome
from poolkeeper.pool.supervisor import RunEnded, Task
from poolkeeper.state.rows import end_row, start_row

if TYPE_CHECKING:
    from poolkeeper.daemon.mainloop import Daemon


def spec_hash(config: Config) -> str:
    """What hosts compare to find they run different specs: the jobs as validated."""
    jobs = config.to_json().get("jobs", {})
    text = json.dumps(jobs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def host_name(config: Config) -> str:
    fleet = config.fleet
    return (fleet.host_id if fleet is not None and fleet.host_id else socket.gethostname())


class FleetSide:
    def __init__(self, daemon: Daemon, log: logging.Logger) -> None:
        fleet = daemon.config.fleet
        assert fleet is not None  # made only in fleet mode
        self.daemon = daemon
        self.log = log
        self.member = FleetMember(
            fleet.database,
            host_id=host_name(daemon.config),
            lease=fleet.lease,
            spec_hash=spec_hash(daemon.config),
            capacity=daemon.config.pool.workers,
            log=log,
        )
        self.member.keep = daemon.config.state.keep
        self.jobs_changed = True
        self._expired = False  # past the deadline, and what it stops was stopped

    # -- the loop's calls ---------------------------------------------------------------

    def runtime(self, spec: Job, daemon: Daemon) -> FleetJobRuntime:
        self.jobs_changed = True
        return FleetJobRuntime(spec, daemon.rng, self.member)

    def start(self) -> None:
        self.member.start(self._job_infos())
        self.jobs_changed = False

    def close(self) -> None:
        self.member.stop()

    def next_deadline(self) -> float | None:
        """When the loop must look again even if nothing happens: the member's deadline, while
        this host holds something it would have to stop then."""
        if self._expired:
            return None
        return self.member.deadline or None

    def turn(self, ready: set[int]) -> None:
        d = self.daemon
        if self.jobs_changed:
            self.jobs_changed = False
            self.member.set_jobs(self._job_infos())
        if self.member.fileno() in ready:
            now_wall, now_mono = time.time(), time.monotonic()
            for event in self.member.take_events():
                self._apply(event, now_wall, now_mono)
        now = time.monotonic()
        if now >= self.member.deadline:
            if not self._expired:
                self._expired = True
                self._stop_held(lease_lost=False)
        else:
            self._expired = False
        pool = d.live_pool
        free = pool.free_slots() if d.phase == "running" else 0
        self.member.set_load(d.config.pool.workers, pool.busy_count(), free)

    def run_started(self, task: Task, started_at: float, worker_pid: int) -> None:
        row = start_row(
            task.run_id, task.job, task.attempt, task.scheduled_at, started_at, worker_pid
        )
        self.member.row(db.WRITE_START, row)

    def run_ended(self, ev: RunEnded) -> None:
        task = ev.task
        row = end_row(
            task.run_id,
            task.job,
            task.attempt,
            task.scheduled_at,
            ev.started_at,
            ev.ended_at,
            ev.outcome,
            ev.exit_code,
            ev.signal,
            ev.worker_pid,
            ev.error,
        )
        self.member.row(db.WRITE_END, row)

    def pause(self, job: str, paused: bool) -> None:
        self.member.pause(job, paused)

    def status(self) -> dict[str, Any]:
        m = self.member
        return {
            "host_id": m.host_id,
            "incarnation": m.incarnation,
            "lease": m.lease,
            "holding": m.deadline > time.monotonic(),
            "hosts": [h._asdict() for h in m.hosts],
        }

    # -- events -----------------------------------------------------------------------------

    def _fleet_jobs(self) -> list[FleetJobRuntime]:
        return [job for job in self.daemon.jobs.values() if isinstance(job, FleetJobRuntime)]

    def _job_infos(self) -> list[db.JobInfo]:
        infos = []
        for job in self._fleet_jobs():
            spec = job.spec
            replicas = spec.loop.replicas if spec.loop is not None else 0
            on_lost = spec.on_lost
            infos.append(db.JobInfo(spec.name, spec.overlap, on_lost, replicas))
        return infos

    def _apply(self, event: object, now_wall: float, now_mono: float) -> None:
        d = self.daemon
        if isinstance(event, Claimed):
            for claim in event.claims:
                job = d.jobs.get(claim.job)
                if isinstance(job, FleetJobRuntime) and d.phase == "running":
                    job.claimed(claim, now_mono)
                else:  # gone by a reload, or draining: another host may run it
                    self.member.give_back(claim)
        elif isinstance(event, Granted):
            for slot in event.slots:
                job = d.jobs.get(slot.job)
                if isinstance(job, FleetJobRuntime) and d.phase == "running":
                    job.granted(slot, now_wall, now_mono)
                else:
                    self.member.release(slot)
        elif isinstance(event, Revoke):
            job = d.jobs.get(event.slot.job)
            if isinstance(job, FleetJobRuntime):
                tasks = job.revoke(event.slot)
                if tasks:
                    self.log.info(
                        "fleet: giving slot %s#%d back (this host holds more than its share)",
                        event.slot.job,
                        event.slot.replica,
                    )
                    d.stop_runs(job, tasks, now_mono)
            else:
                self.member.release(event.slot)
        elif isinstance(event, Paused):
            self._paused(event.job, event.paused, now_wall, now_mono)
        elif isinstance(event, LeaseLost):
            self._stop_held(lease_lost=True)
        elif isinstance(event, Refused):
            self.log.error("fleet: %s", event.why)
            d.stop_for(f"fleet: {event.why}", exitcodes.CONFIG)
        elif isinstance(event, Superseded):
            for end in event.ends:
                self.log.warning(
                    "fleet: fire %d ended here (%s) after its claim was taken back: the fleet "
                    "recorded it as the reaper did",
                    end.fire_id,
                    end.outcome,
                )

    def _paused(self, name: str, paused: bool, now_wall: float, now_mono: float) -> None:
        d = self.daemon
        job = d.jobs.get(name)
        if not isinstance(job, FleetJobRuntime) or job.paused == paused:
            return
        if paused:
            loops = job.pause()
            d.stop_runs(job, loops, now_mono)
            self.log.info("%s: paused across the fleet", name)
        else:
            job.resume(now_wall, now_mono, set())
            self.log.info("%s: resumed across the fleet", name)

    def _stop_held(self, *, lease_lost: bool) -> None:
        """Past the deadline or with the lease lost: kill what this host may no longer hold."""
        d = self.daemon
        kill: list[Task] = []
        for job in self._fleet_jobs():
            spec = job.spec
            keep = spec.on_db_loss == "keep" and not lease_lost
            retry = spec.on_lost == "retry"
            kill += job.lose(replicas=not keep, fires=retry)
        why = "its lease was lost" if lease_lost else "its lease could not be renewed in time"
        if kill:
            self.log.error(
                "fleet: killing %d fleet runs: %s (another host may take their work)",
                len(kill),
                why,
            )
            reason = f"killed: this host's fleet lease {'was lost' if lease_lost else 'expired'}"
            d.handle_events(d.live_pool.kill_runs(Outcome.KILLED, kill, reason=reason))
