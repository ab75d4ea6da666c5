"""The main loop's per-job decisions (overlap, retry, loop restart) on a controlled clock:
no processes, no sleeps; the same Job objects the daemon gets from the spec."""

from __future__ import annotations

import random
import textwrap

import pytest

from poolkeeper.config.loader import load_config
from poolkeeper.daemon.jobs import JobRuntime
from poolkeeper.pool.supervisor import RunEnded


def job(tmp_path, body: str) -> JobRuntime:
    spec = tmp_path / "jobs.yaml"
    spec.write_text("version: 1\njobs:\n  j:\n" + textwrap.indent(textwrap.dedent(body), "    "))
    runtime = JobRuntime(load_config(spec, import_targets=False).jobs["j"], random.Random(1))
    runtime.start(now_wall=1000.0, now_mono=0.0, last_fire=None)
    return runtime


def dispatch_all(rt: JobRuntime, now_mono: float) -> list:
    tasks = []
    for run in rt.ready(now_mono):
        task = rt.make_task(run)
        rt.dispatched(run, task)
        tasks.append(task)
    return tasks


def end(rt: JobRuntime, task, outcome: str, *, at: float, lived: float = 1.0) -> str:
    ev = RunEnded(task, outcome, 1000.0 + at - lived, 1000.0 + at, 1, None, None, None, None)
    return rt.ended(ev, now_wall=1000.0 + at, now_mono=at, draining=False)


@pytest.mark.parametrize(
    ("overlap", "extra", "admitted"),
    [("skip", "", 0), ("queue", "", 1), ("allow", "max_concurrent: 3", 2)],
)
def test_fires_while_a_run_is_going(tmp_path, overlap, extra, admitted):
    rt = job(tmp_path, f"target: m:f\nevery: 10s\noverlap: {overlap}\n{extra}\n")
    rt.fire_due(now_wall=1000.0, now_mono=0.0)
    [first] = dispatch_all(rt, 0.0)
    # Three more fires while the first run goes on (it lasts 35 s).
    for step in (10.0, 20.0, 30.0):
        rt.fire_due(now_wall=1000.0 + step, now_mono=step)
    waiting_or_running = len(rt.pending) + len(rt.running) - 1
    assert waiting_or_running == admitted
    if overlap == "queue":
        assert dispatch_all(rt, 30.0) == []  # a queued fire waits for the running one
        end(rt, first, "succeeded", at=35.0)
        assert len(dispatch_all(rt, 35.0)) == 1


def test_failed_runs_retry_with_growing_delays_then_give_up(tmp_path):
    rt = job(
        tmp_path,
        "target: m:f\nat: startup\nretry: {attempts: 3, initial: 10s, factor: 2, jitter: none}\n",
    )
    rt.fire_due(now_wall=1000.0, now_mono=0.0)
    [t1] = dispatch_all(rt, 0.0)
    assert end(rt, t1, "failed", at=1.0) == "retry 2/3 in 10.0s"
    assert dispatch_all(rt, 10.9) == []  # not before its time
    [t2] = dispatch_all(rt, 11.0)
    assert (t2.attempt, t2.scheduled_at) == (2, t1.scheduled_at)
    assert rt.backing_off(5.0) == pytest.approx(6.0)
    assert end(rt, t2, "timeout", at=12.0) == "retry 3/3 in 20.0s"
    [t3] = dispatch_all(rt, 32.0)
    assert end(rt, t3, "lost", at=33.0) == "gave up after 3 attempts"
    assert not rt.pending


def test_killed_runs_are_never_retried(tmp_path):
    rt = job(tmp_path, "target: m:f\nat: startup\nretry: {attempts: 5}\n")
    rt.fire_due(now_wall=1000.0, now_mono=0.0)
    [t1] = dispatch_all(rt, 0.0)
    end(rt, t1, "killed", at=1.0)
    assert not rt.pending and not rt.running


def test_a_loop_that_keeps_crashing_backs_off_and_one_that_ran_well_restarts_at_once(tmp_path):
    rt = job(
        tmp_path,
        "target: m:f\nloop: {replicas: 1}\nrestart: always\n"
        "backoff: {initial: 1s, factor: 2, max: 4s, jitter: none}\n",
    )
    delays = []
    now = 0.0
    for _ in range(4):
        [task] = dispatch_all(rt, now)
        now += 0.5
        delays.append(end(rt, task, "failed", at=now, lived=0.5))
        now = rt.pending[0].due
    assert delays == ["restart in 1.0s", "restart in 2.0s", "restart in 4.0s", "restart in 4.0s"]
    [task] = dispatch_all(rt, now)
    assert end(rt, task, "succeeded", at=now + 3600, lived=3600) == "restarted"


def test_restart_never_and_on_failure(tmp_path):
    rt = job(tmp_path, "target: m:f\nloop: {replicas: 2}\nrestart: on-failure\n")
    a, b = dispatch_all(rt, 0.0)
    assert end(rt, a, "succeeded", at=100.0, lived=100.0) == "not restarted (restart: on-failure)"
    assert end(rt, b, "failed", at=100.0, lived=100.0).startswith("restart")
