"""`poolkeeper pause / resume / run-now JOB`: one job, in the running daemon, over its control
socket. Another job's runs serve as the clock: "while it ran five more times" is an event, not
a sleep."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

SPEC = """
    pool: {workers: 3, start_method: fork}
    jobs:
      tick:
        target: daemon_jobs:ok
        every: 100ms
      clock:
        target: daemon_jobs:ok
        every: 100ms
      consume:
        target: daemon_jobs:loop_units
        loop: {replicas: 1}
        kwargs: {out_dir: $OUT}
      yearly:
        target: daemon_jobs:ok
        cron: "0 0 1 1 *"
      slow:
        target: daemon_jobs:hold
        cron: "0 0 1 1 *"
        args: [30]
    """


def ask(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "poolkeeper", *args, "--socket", f"{d.db}.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def runs_of(d, job: str) -> list[dict]:
    return [r for r in d.runs() if r["job"] == job]


def five_more_clock_runs(d) -> None:
    seen = len(runs_of(d, "clock"))
    d.wait_for(lambda: len(runs_of(d, "clock")) >= seen + 5, what="five more runs of clock")


def start(daemon_factory):
    d = daemon_factory(SPEC)
    d.wait_log("ready")
    d.wait_for(lambda: runs_of(d, "consume") and runs_of(d, "tick"), what="the jobs running")
    return d


def test_a_paused_job_starts_no_run_until_resumed(daemon_factory):
    d = start(daemon_factory)
    paused = ask(d, "pause", "tick")
    assert (paused.returncode, paused.stdout) == (0, "tick: paused, no new runs\n")
    paused_at = time.time()
    five_more_clock_runs(d)
    # Counted by start time, not by rows: runs are written in batches, so rows of runs that
    # ended before the pause may still arrive after it.
    after_pause = [r for r in runs_of(d, "tick") if (r["started"] or 0) > paused_at]
    assert len(after_pause) <= 1  # at most one already handed to a worker
    assert ask(d, "pause", "tick").stdout == "tick: already paused\n"

    resumed = ask(d, "resume", "tick")
    assert (resumed.returncode, resumed.stdout) == (0, "tick: resumed\n")
    settled = len(runs_of(d, "tick"))
    d.wait_for(lambda: len(runs_of(d, "tick")) > settled, what="tick to run again")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_pausing_a_loop_stops_its_replicas_and_resume_starts_them_again(daemon_factory):
    d = start(daemon_factory)
    (first,) = [r["run_id"] for r in runs_of(d, "consume")]
    paused = ask(d, "pause", "consume")
    assert paused.stdout == "consume: paused, no new runs; 1 loop replica stopping\n"
    d.wait_for(lambda: (d.out / f"{first}.returned").exists(), what="the replica to return")
    d.wait_for(
        lambda: [r["outcome"] for r in runs_of(d, "consume")] == ["succeeded"],
        what="its run recorded",
    )
    five_more_clock_runs(d)
    assert len(runs_of(d, "consume")) == 1  # not restarted while paused
    assert ask(d, "resume", "consume").returncode == 0
    d.wait_for(lambda: len(runs_of(d, "consume")) == 2, what="a new replica")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_run_now_runs_a_job_outside_its_schedule_once(daemon_factory):
    d = start(daemon_factory)
    assert runs_of(d, "yearly") == []
    asked = ask(d, "run-now", "yearly")
    assert (asked.returncode, asked.stdout) == (0, "yearly: a run is starting\n")
    d.wait_for(
        lambda: [r["outcome"] for r in runs_of(d, "yearly")] == ["succeeded"], what="the run"
    )
    assert ask(d, "run-now", "slow").returncode == 0
    d.wait_for(lambda: runs_of(d, "slow"), what="the slow run to start")
    busy = ask(d, "run-now", "slow")  # overlap: skip, and one is in flight
    assert busy.returncode == 75
    assert "'slow' already has a run in flight or waiting (overlap: skip)" in busy.stderr
    assert d.fast_stop(signal.SIGTERM, signal.SIGTERM) == 0  # the 30 s run is killed


def test_what_cannot_be_done_by_hand_says_why(daemon_factory):
    d = start(daemon_factory)
    loop = ask(d, "run-now", "consume")
    assert loop.returncode == 75
    assert "'consume' is a loop job: its replicas run all the time" in loop.stderr
    unknown = ask(d, "pause", "nope")
    assert unknown.returncode == 64
    assert "no job named 'nope' (jobs: tick, clock, consume, yearly, slow)" in unknown.stderr
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_status_asks_the_running_daemon_what_each_job_is_doing(daemon_factory):
    d = start(daemon_factory)
    assert ask(d, "pause", "tick").returncode == 0
    status = ask(d, "status", "-c", str(d.config))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("daemon: 5 jobs, ") and "1 paused" in lines[0]
    assert lines[1].split() == ["JOB", "KIND", "SCHEDULE", "NEXT", "NOW", "LAST", "RUN", "OUTCOME"]
    row = {line.split()[0]: line for line in lines[2:]}
    assert "paused" in row["tick"]
    assert "1 running" in row["consume"] and "1 replica(s)" in row["consume"]
    assert " idle " in row["yearly"] and "never" in row["yearly"]
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    # No daemon: the file's jobs and the state DB's outcomes.
    offline = ask(d, "status", "-c", str(d.config))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.startswith("daemon: not reachable; the jobs of the file")
    assert "succeeded" in next(
        line for line in offline.stdout.splitlines() if line.startswith("tick")
    )
