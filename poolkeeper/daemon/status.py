"""The one-line summary sent as STATUS= and shown by `poolkeeper status`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from poolkeeper.outcomes import Outcome

if TYPE_CHECKING:
    from poolkeeper.daemon.mainloop import Daemon
    from poolkeeper.pool.supervisor import Task


def count(n: int, noun: str) -> str:
    """`1 job`, `2 jobs`, `1,204 runs`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def first_of(problems: list[str]) -> str:
    """`the first problem (+2 more)`: a list of problems as one line of STATUS=."""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def status_line(daemon: Daemon, now: float) -> str:
    """e.g. `6 jobs, 4/4 workers busy, 1 backing off (rollup, 8s); 1,204 runs ok, 3 failed`."""
    outcomes = daemon.outcomes
    ok = outcomes.get(Outcome.SUCCEEDED, 0)
    bad = sum(v for k, v in outcomes.items() if k != Outcome.SUCCEEDED)
    tail = f"{ok:,} runs ok, {bad:,} failed"
    if daemon.phase == "draining":
        in_flight = len(daemon.live_pool.in_flight())
        budget = max(0.0, (daemon.drain_deadline or now) - now)
        return f"draining: {count(in_flight, 'run')} in flight, {budget:.0f}s left; {tail}"
    if daemon.phase == "starting":
        waiting = ", ".join(job.name for job in daemon.before_ready_waiting())
        return f"starting: waiting for {waiting}" if waiting else "starting"
    pool = daemon.live_pool
    jobs = len(daemon.jobs) + len(daemon.reloader.held)
    head = f"{count(jobs, 'job')}, {pool.busy_count()}/{pool.size()} workers busy"
    if daemon.reloader.next_pool is not None:
        head += f", replacing the pool ({count(len(daemon.retiring), 'stopped run')} finishing)"
    elif daemon.retiring:
        head += f", {count(len(daemon.retiring), 'stopped run')} finishing"
    # Counters kept by the agenda, not a scan: this line costs the same with 10 or 50,000 jobs.
    backing, first, left = daemon.agenda.backing_off(now)
    if first is not None:
        more = f" +{backing - 1}" if backing > 1 else ""
        head += f", {backing} backing off ({first.name}, {left:.0f}s{more})"
    paused = daemon.agenda.paused
    if paused:
        head += f", {paused} paused"
    if daemon.reloader.rejected:
        tail += f"; reload rejected: {daemon.reloader.rejected}"
    return f"{head}; {tail}"


def state_dump(daemon: Daemon, now_wall: float, now_mono: float) -> list[str]:
    """What SIGUSR1 writes to the log: the status line, then every job, worker and run in
    flight, and what waits for a worker."""
    lines = [f"{daemon.phase}: {status_line(daemon, now_mono)}"]
    for job in daemon.jobs.values():
        what = [f"{len(job.running)} running", f"{len(job.pending)} waiting"]
        if job.paused:
            what.append("paused")
        left = job.backing_off(now_mono)
        if left is not None:
            what.append(f"backing off {left:.1f}s")
        if job.next_fire is not None and not job.paused:
            what.append(f"next fire in {max(0.0, job.next_fire - now_wall):.1f}s")
        lines.append(f"job {job.name} ({job.spec.kind}): {', '.join(what)}")
    for name in daemon.reloader.held:
        lines.append(f"job {name}: waiting for its old runs to end (reload)")
    pool = daemon.pool
    if pool is None:
        return lines
    lines.append(f"pool: {pool!r}")
    for pid, state, runs in pool.worker_views():
        doing = ", ".join(_run_text(task, started, now_wall) for task, started in runs)
        lines.append(f"worker {pid} {state}: {doing or 'idle'}")
    return lines


def _run_text(task: Task, started: float | None, now_wall: float) -> str:
    """`rollup[3f2a9c01] attempt 1, running 12.3s` (or `queued`)."""
    head = f"{task.job}[{task.run_id[:8]}] attempt {task.attempt}"
    if started is None:
        return f"{head}, queued"
    return f"{head}, running {max(0.0, now_wall - started):.1f}s"
