"""The one-line summary sent as STATUS= and shown by `poolkeeper status`."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """`1 job`, `2 jobs`, `1,204 runs`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def first_of(problems: list[str]) -> str:
    """`the first problem (+2 more)`: a list of problems as one line of STATUS=."""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def status_line(daemon, now: float) -> str:
    """e.g. `6 jobs, 4/4 workers busy, 1 backing off (rollup, 8s); 1,204 runs ok, 3 failed`."""
    pool = daemon.pool
    outcomes = daemon.outcomes
    ok = outcomes.get("succeeded", 0)
    bad = sum(v for k, v in outcomes.items() if k != "succeeded")
    tail = f"{ok:,} runs ok, {bad:,} failed"
    if daemon.phase == "draining":
        left = len(pool.in_flight())
        budget = max(0.0, (daemon.drain_deadline or now) - now)
        return f"draining: {left} runs in flight, {budget:.0f}s left; {tail}"
    if daemon.phase == "starting":
        waiting = ", ".join(job.name for job in daemon.before_ready_waiting())
        return f"starting: waiting for {waiting}" if waiting else "starting"
    jobs = len(daemon.jobs) + len(daemon.held)
    head = f"{count(jobs, 'job')}, {pool.busy_count()}/{pool.size()} workers busy"
    if daemon.next_pool is not None:
        head += f", replacing the pool ({count(len(daemon.retiring), 'stopped run')} finishing)"
    elif daemon.retiring:
        head += f", {count(len(daemon.retiring), 'stopped run')} finishing"
    backing = [
        (job.name, left)
        for job in daemon.jobs.values()
        if (left := job.backing_off(now)) is not None
    ]
    if backing:
        name, left = min(backing, key=lambda item: item[1])
        more = f" +{len(backing) - 1}" if len(backing) > 1 else ""
        head += f", {len(backing)} backing off ({name}, {left:.0f}s{more})"
    paused = sum(1 for job in daemon.jobs.values() if job.paused)
    if paused:
        head += f", {paused} paused"
    if daemon.reload_rejected:
        tail += f"; reload rejected: {daemon.reload_rejected}"
    return f"{head}; {tail}"
