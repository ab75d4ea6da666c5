"""Requests over the control socket (poolkeeper.service.control), answered by the daemon's main
loop: `reload` (poolkeeper.daemon.reload), `status`, and the commands for one job by hand:
`pause`, `resume`, `run-now` (docs/lifecycle.md, "By hand").

`ControlHandlers(daemon)` holds a reference to the `Daemon`: its handlers read and change the
daemon's jobs, and they run inside its loop, so they never race with it. Every reply says `ok`
and a `message` for the user; one that says no also gives the sysexits code `poolkeeper` exits
with (`control.refused`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from poolkeeper import exitcodes
from poolkeeper.config.settings import Job
from poolkeeper.daemon.jobs import JobRuntime
from poolkeeper.daemon.status import count
from poolkeeper.report import schedule_text
from poolkeeper.service.control import refused, shown

if TYPE_CHECKING:
    from poolkeeper.daemon.mainloop import Daemon


class ControlHandlers:
    """The control socket's verbs, for the daemon they hold."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def serve(self, ready: set[int]) -> None:
        """Answer the control socket's clients (never blocks), when one of its descriptors is
        in `ready` or one of its deadlines has come."""
        control = self.daemon.control
        if control is None:
            return
        now = time.monotonic()
        deadline = control.next_deadline()
        if ready.isdisjoint(control.fds()) and (deadline is None or now < deadline):
            return
        control.serve(self.on_request, now)

    def on_request(self, request: dict[str, str]) -> dict[str, Any]:
        """A control socket request, its shape checked (control.parse_request: `command`, and
        `job` if any, are strings of bounded length). A reply says `ok`, a `message` for the
        user and, when not ok, the `exit` code `poolkeeper` exits with (sysexits)."""
        d = self.daemon
        command = request["command"]
        if command == "reload":
            return d.reloader.reload("reload request")
        if command == "status":
            return self.live_status()
        if command == "metrics":  # poolkeeper.service.metrics: the text format, or why not
            return d.metrics.reply(d)
        by_hand = {"pause": self.pause, "resume": self.resume, "run-now": self.run_now}
        if command not in by_hand:
            known = ", ".join(["reload", "status", "metrics", *by_hand])
            return refused(f"unknown command {shown(command)} (known: {known})", exitcodes.USAGE)
        if d.phase != "running":
            return refused(f"the daemon is {d.phase}: not now", exitcodes.UNAVAILABLE)
        name = request.get("job")
        if name is None:
            return refused(f"{command}: which job? (the request has no 'job')", exitcodes.USAGE)
        job = d.jobs.get(name)
        if job is None:
            if name in d.reloader.held:
                why = f"job '{name}' is being restarted by a reload; try again when it runs"
                return refused(why, exitcodes.TEMPFAIL)
            return refused(f"no job named {shown(name)} (jobs: {_some(d.jobs)})", exitcodes.USAGE)
        return by_hand[command](job)

    def live_status(self) -> dict[str, Any]:
        """`poolkeeper status` (and `top`) from the running daemon: its jobs as it runs them,
        its workers and what waits for one (docs/json.md)."""
        d, now = self.daemon, time.monotonic()
        jobs = {name: _view(job, now) for name, job in d.jobs.items()}
        for name, spec in d.reloader.held.items():
            jobs[name] = _spec_view(spec, None, "restarting (reload)", "restarting", 0)
        # Waiting for a worker: runs due in the jobs' queues, and runs a worker holds unstarted.
        due = sum(1 for job in d.jobs.values() for run in job.pending if run.due <= now)
        pool = d.pool
        views = pool.worker_views() if pool is not None else []
        prefetched = sum(1 for _, _, runs in views for _, started in runs if started is None)
        reply: dict[str, Any] = {
            "ok": True,
            "message": d.status_text(now),
            "phase": d.phase,
            "pid": os.getpid(),
            "workers": {
                "busy": pool.busy_count() if pool is not None else 0,
                "total": pool.size() if pool is not None else 0,
            },
            "queued": due + prefetched,
            "finished": sum(d.outcomes.values()),
            "jobs": jobs,
        }
        if d.fleet is not None:
            reply["fleet"] = d.fleet.status()
        return reply

    def pause(self, job: JobRuntime) -> dict[str, Any]:
        if job.paused:
            return {"ok": True, "message": f"{job.name}: already paused"}
        loops = job.pause()
        self.daemon.stop_runs(job, loops, time.monotonic())
        self._tell_fleet(job, paused=True)
        self.daemon.log.info("%s: paused by hand (%d loop replicas stopping)", job.name, len(loops))
        stopping = f"; {count(len(loops), 'loop replica')} stopping" if loops else ""
        return {"ok": True, "message": f"{job.name}: paused, no new runs{stopping}"}

    def resume(self, job: JobRuntime) -> dict[str, Any]:
        if not job.paused:
            return {"ok": True, "message": f"{job.name}: not paused"}
        stopping = {run_id for run_id in job.running if run_id in self.daemon.retiring}
        job.resume(time.time(), time.monotonic(), stopping)
        self._tell_fleet(job, paused=False)
        self.daemon.log.info("%s: resumed by hand", job.name)
        return {"ok": True, "message": f"{job.name}: resumed"}

    def _tell_fleet(self, job: JobRuntime, *, paused: bool) -> None:
        """A fleet job is paused or resumed on every host (each hears it from the database)."""
        fleet = self.daemon.fleet
        if fleet is not None and job.spec.scope == "fleet":
            fleet.pause(job.name, paused)

    def run_now(self, job: JobRuntime) -> dict[str, Any]:
        why_not = job.run_now(time.time(), time.monotonic())
        if why_not is not None:
            return refused(why_not, exitcodes.TEMPFAIL)
        self.daemon.log.info("%s: a run requested by hand", job.name)
        return {"ok": True, "message": f"{job.name}: a run is starting"}


def _some(names: Iterable[str], at_most: int = 20) -> str:
    """`a, b, c` or `a, b, ... (+2,480 more)`: a message stays one readable line."""
    listed = list(names)
    more = f", ... (+{len(listed) - at_most:,} more)" if len(listed) > at_most else ""
    return (", ".join(listed[:at_most]) or "none") + more


def _view(job: JobRuntime, now: float) -> dict[str, Any]:
    """One running job as `poolkeeper status` shows it."""
    if job.paused:
        state = "paused"
    elif job.backing_off(now) is not None:
        state = "backing_off"
    else:
        state = "running" if job.running else "idle"
    next_fire = None if job.paused else job.next_fire
    return _spec_view(job.spec, next_fire, _doing(job, now), state, len(job.running))


def _spec_view(
    spec: Job, next_fire: float | None, doing: str, state: str, running: int
) -> dict[str, Any]:
    return {
        "kind": spec.kind,
        "scope": spec.scope,
        "schedule": schedule_text(spec),
        "next": next_fire,
        "now": doing,
        "state": state,
        "running": running,
    }


def _doing(job: JobRuntime, now: float) -> str:
    """What a job is doing now, for `poolkeeper status`: `2 running, backing off 8s`."""
    parts = ["paused"] if job.paused else []
    if job.running:
        parts.append(f"{len(job.running)} running")
    left = job.backing_off(now)
    if left is not None:
        parts.append(f"backing off {left:.0f}s")
    return ", ".join(parts) or "idle"
