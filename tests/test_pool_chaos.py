"""Many repetitions under fork: repeated SIGKILLs, and a chaos run of 10,000 tiny runs."""

from __future__ import annotations

import os
import random
import signal
import time

from jobs_for_tests import TESTS_DIR, Driver

from poolkeeper.pool.supervisor import NotStarted, RunEnded, RunStarted, Task, WorkerPool


def test_sigkill_a_busy_worker_100_times_in_a_row():
    pool = WorkerPool(workers=2, start_method="fork", pythonpath=[TESTS_DIR])
    pool.start()
    d = Driver(pool)
    try:
        d.wait_ready()
        for i in range(100):
            task = Task(run_id=f"k{i}", job="j", target="jobs_for_tests:sleep", args=(30,))
            pool.submit(task)
            started = d.until(lambda e: isinstance(e, RunStarted))[-1]
            os.kill(started.worker_pid, signal.SIGKILL)
            ev = d.until(lambda e: isinstance(e, RunEnded))[-1]
            assert (ev.task.run_id, ev.outcome, ev.signal) == (f"k{i}", "lost", signal.SIGKILL)
            d.wait_ready(2)
        ended = d.run([Task(run_id="last", job="j", target="jobs_for_tests:add", args=(1, 2))])
        assert ended["last"].result_repr == "3"
        assert pool.healthy() == (True, "ok")
    finally:
        pool.close(timeout=2)


def test_chaos_every_run_ends_exactly_once_and_no_fd_leaks():
    rng = random.Random(1234)
    fds_before = len(os.listdir("/proc/self/fd"))
    pool = WorkerPool(workers=2, start_method="fork", pythonpath=[TESTS_DIR])
    pool.start()
    d = Driver(pool)
    total = 10_000
    outcomes: dict[str, int] = {}  # submission id -> terminal events seen
    pending = [Task(run_id=f"c{i}", job="j", target="jobs_for_tests:noop") for i in range(total)]
    resubmitted = kills = 0
    counts: dict[str, int] = {}
    limit = time.monotonic() + 60
    try:
        done = 0
        while done < total:
            assert time.monotonic() < limit, f"chaos stalled at {done}/{total}"
            while pending and pool.free_slots():
                task = pending.pop()
                outcomes[task.run_id] = 0
                pool.submit(task)
            if rng.random() < 0.01:
                victims = [w.pid for w in pool._workers if w.state == "ready"]
                if victims:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    kills += 1
            for ev in d.turn(0.5):
                if isinstance(ev, RunEnded):
                    outcomes[ev.task.run_id] += 1
                    assert outcomes[ev.task.run_id] == 1, f"two outcomes for {ev.task.run_id}"
                    counts[ev.outcome] = counts.get(ev.outcome, 0) + 1
                    done += 1
                elif isinstance(ev, NotStarted):
                    outcomes[ev.task.run_id] += 1
                    assert outcomes[ev.task.run_id] == 1
                    del outcomes[ev.task.run_id]  # resubmitted: a fresh submission
                    pending.append(ev.task)
                    resubmitted += 1
        d.events.clear()
    finally:
        pool.close(timeout=2)
    assert all(n == 1 for n in outcomes.values()) and len(outcomes) == total
    assert set(counts) <= {"succeeded", "lost"} and counts.get("lost", 0) <= kills
    assert kills > 20, kills
    assert len(os.listdir("/proc/self/fd")) == fds_before
