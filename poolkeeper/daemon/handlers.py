"""Requests over the control socket (poolkeeper.service.control), answered by the daemon's main loop:
`reload` (poolkeeper.daemon.reload), `status`, and the commands for one job by hand: `pause`, `resume`,
`run-now` (docs/lifecycle.md, "By hand").

A mixin of `Daemon`: these read and change the daemon's jobs, and they run inside its loop, so
they never race with it. Every reply says `ok` and a `message` for the user; one that says no
also gives the sysexits code `poolkeeper` exits with (`control.refused`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from poolkeeper import exitcodes
from poolkeeper.config.settings import Job
from poolkeeper.daemon.jobs import JobRuntime
from poolkeeper.daemon.status import count
from poolkeeper.report import schedule_text
from poolkeeper.service.control import refused, shown


class ByHand:
    def _serve_control(self) -> None:
        if self.control is not None:
            self.control.serve(self._on_request, time.monotonic())

    def _on_request(self, request: dict[str, str]) -> dict:
        """A control socket request, its shape checked (control.parse_request: `command`, and
        `job` if any, are strings of bounded length). A reply says `ok`, a `message` for the
        user and, when not ok, the `exit` code `poolkeeper` exits with (sysexits)."""
        command = request["command"]
        if command == "reload":
            return self._reload("reload request")
        if command == "status":
            return self._live_status()
        by_hand = {"pause": self._pause, "resume": self._resume, "run-now": self._run_now}
        if command not in by_hand:
            known = ", ".join(["reload", "status", *by_hand])
            return refused(f"unknown command {shown(command)} (known: {known})", exitcodes.USAGE)
        if self.phase != "running":
            return refused(f"the daemon is {self.phase}: not now", exitcodes.UNAVAILABLE)
        name = request.get("job")
        if name is None:
            return refused(f"{command}: which job? (the request has no 'job')", exitcodes.USAGE)
        job = self.jobs.get(name)
        if job is None:
            if name in self.held:
                why = f"job '{name}' is being restarted by a reload; try again when it runs"
                return refused(why, exitcodes.TEMPFAIL)
            return refused(
                f"no job named {shown(name)} (jobs: {_some(self.jobs)})", exitcodes.USAGE
            )
        return by_hand[command](job)

    def _live_status(self) -> dict:
        """`poolkeeper status` from the running daemon: its jobs as it runs them."""
        now = time.monotonic()
        jobs = {
            name: _view(job.spec, None if job.paused else job.next_fire, _doing(job, now))
            for name, job in self.jobs.items()
        }
        for name, spec in self.held.items():
            jobs[name] = _view(spec, None, "restarting (reload)")
        return {"ok": True, "message": self.status_text(now), "jobs": jobs}

    def _pause(self, job: JobRuntime) -> dict:
        if job.paused:
            return {"ok": True, "message": f"{job.name}: already paused"}
        loops = job.pause()
        self._stop_in_flight(job, loops, time.monotonic())
        self.log.info("%s: paused by hand (%d loop replicas stopping)", job.name, len(loops))
        stopping = f"; {count(len(loops), 'loop replica')} stopping" if loops else ""
        return {"ok": True, "message": f"{job.name}: paused, no new runs{stopping}"}

    def _resume(self, job: JobRuntime) -> dict:
        if not job.paused:
            return {"ok": True, "message": f"{job.name}: not paused"}
        stopping = {run_id for run_id in job.running if run_id in self.retiring}
        job.resume(time.time(), time.monotonic(), stopping)
        self.log.info("%s: resumed by hand", job.name)
        return {"ok": True, "message": f"{job.name}: resumed"}

    def _run_now(self, job: JobRuntime) -> dict:
        why_not = job.run_now(time.time(), time.monotonic())
        if why_not is not None:
            return refused(why_not, exitcodes.TEMPFAIL)
        self.log.info("%s: a run requested by hand", job.name)
        return {"ok": True, "message": f"{job.name}: a run is starting"}


def _some(names: Iterable[str], at_most: int = 20) -> str:
    """`a, b, c` or `a, b, ... (+2,480 more)`: a message stays one readable line."""
    listed = list(names)
    more = f", ... (+{len(listed) - at_most:,} more)" if len(listed) > at_most else ""
    return (", ".join(listed[:at_most]) or "none") + more


def _view(spec: Job, next_fire: float | None, doing: str) -> dict:
    """One job as `poolkeeper status` shows it."""
    return {"kind": spec.kind, "schedule": schedule_text(spec), "next": next_fire, "now": doing}


def _doing(job: JobRuntime, now: float) -> str:
    """What a job is doing now, for `poolkeeper status`: `2 running, backing off 8s`."""
    parts = ["paused"] if job.paused else []
    if job.running:
        parts.append(f"{len(job.running)} running")
    left = job.backing_off(now)
    if left is not None:
        parts.append(f"backing off {left:.0f}s")
    return ", ".join(parts) or "idle"
