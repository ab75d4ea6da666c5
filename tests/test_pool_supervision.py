"""Supervision: lost workers, timeouts, heartbeats, recycling, init failures, orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from jobs_for_tests import TESTS_DIR, pid_alive, wait_gone
from procs import START_METHODS

from poolkeeper.pool.supervisor import RunEnded, RunStarted, Task, WorkerEvent


def T(run_id: str, func: str, *args, **kw) -> Task:
    return Task(run_id=run_id, job="j", target=f"jobs_for_tests:{func}", args=args, **kw)


@pytest.mark.parametrize(
    "func, exit_code, sig",
    [("die_sigkill", None, signal.SIGKILL), ("die_exit3", 3, None),
     ("die_abort", None, signal.SIGABRT), ("die_segfault", None, signal.SIGSEGV)],
)  # fmt: skip
def test_a_worker_dying_mid_run_is_lost_and_replaced(make_pool, func, exit_code, sig):
    d = make_pool("fork")
    d.wait_ready()
    ended = d.run([T("die", func)], resubmit=False)
    ev = ended["die"]
    assert (ev.outcome, ev.exit_code, ev.signal) == ("lost", exit_code, sig)
    assert ev.error.startswith("worker died: ")
    d.wait_ready(2)
    assert d.run([T("after", "add", 1, 1)])["after"].outcome == "succeeded"
    assert any(e.kind == "replaced" for e in d.events if isinstance(e, WorkerEvent))


@pytest.mark.parametrize("method", START_METHODS)
def test_killing_busy_idle_and_every_worker_never_hangs(make_pool, method, tmp_path):
    d = make_pool(method)
    pids = d.wait_ready()
    d.pool.submit(T("busy", "sleep", 30))
    d.until(lambda e: isinstance(e, RunStarted))
    busy = d.pool._workers[0].pid if d.pool._workers[0].queue else d.pool._workers[1].pid
    os.kill(busy, signal.SIGKILL)
    ev = d.until(lambda e: isinstance(e, RunEnded))[-1]
    assert (ev.outcome, ev.signal, ev.worker_pid) == ("lost", signal.SIGKILL, busy)
    idle = next(p for p in pids if p != busy)
    os.kill(idle, signal.SIGKILL)  # an idle worker: cpython#96062 wedges multiprocessing.Pool
    d.until(lambda e: isinstance(e, WorkerEvent) and e.kind == "exited" and e.pid == idle)
    now = d.wait_ready(2)
    for pid in now:  # and every worker at once
        os.kill(pid, signal.SIGKILL)
    limit = time.monotonic() + 10
    while not set(now) <= {
        e.pid for e in d.events if isinstance(e, WorkerEvent) and e.kind == "exited"
    }:
        assert time.monotonic() < limit
        d.turn()
    ended = d.run([T(f"r{i}", "add", i, 1) for i in range(6)])
    assert all(e.outcome == "succeeded" for e in ended.values())
    assert not set(d.wait_ready(2)) & set(pids + now)


@pytest.mark.parametrize("method", START_METHODS)
def test_timeout_kills_the_worker_group_and_its_grandchildren(make_pool, method, tmp_path):
    d = make_pool(method, workers=1)
    marker = str(tmp_path / "pids")
    ended = d.run([T("hang", "grandchild_then_block", marker, timeout=1.0)], resubmit=False)
    ev = ended["hang"]
    assert (ev.outcome, ev.signal, ev.error) == ("timeout", signal.SIGKILL, "timed out after 1s")
    worker, grandchild = map(int, open(marker).read().split())
    assert wait_gone([worker, grandchild], 2.0) == []
    d.wait_ready(1)
    assert d.run([T("after", "noop")])["after"].outcome == "succeeded"


def test_heartbeat_timeout_dumps_the_stack_then_kills():
    """A loop that stops heartbeating: SIGUSR1 (faulthandler writes its stack to stderr),
    then SIGKILL, outcome 'timeout'. Runs in a driver process to capture its stderr."""
    spec = {
        "method": "fork", "workers": 1, "pythonpath": [TESTS_DIR], "exit_when_done": True,
        "tasks": [{"run_id": "loop", "job": "hb", "target": "jobs_for_tests:loop_with_heartbeat",
                   "kwargs": {"hang_after": 0.3}, "heartbeat_timeout": 0.8, "loop": True}],
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", f"import jobs_for_tests as j; j.drive({json.dumps(json.dumps(spec))})"],
        cwd=TESTS_DIR, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    ended = [e for e in events if e.get("type") == "RunEnded"]
    assert ended and ended[0]["outcome"] == "timeout", (events, proc.stderr)
    assert ended[0]["error"] == "no heartbeat for 0.8s"
    assert "stuck_here" in proc.stderr and "loop_with_heartbeat" in proc.stderr, proc.stderr


def test_heartbeats_keep_a_loop_alive(make_pool):
    d = make_pool("fork", workers=1)
    d.pool.submit(T("loop", "loop_with_heartbeat", heartbeat_timeout=0.5, loop=True))
    limit = time.monotonic() + 1.5
    while time.monotonic() < limit:
        assert not [e for e in d.turn(0.1) if isinstance(e, RunEnded)]
    d.pool.drain()
    ev = d.until(lambda e: isinstance(e, RunEnded))[-1]
    assert ev.outcome == "succeeded"


def test_recycling_after_max_runs(make_pool):
    d = make_pool("fork", workers=1, max_runs_per_worker=3)
    ended = d.run([T(f"r{i}", "my_pid") for i in range(7)])
    pids = [int(ended[f"r{i}"].result_repr) for i in range(7)]
    assert len(set(pids[:3])) == 1 and len(set(pids[3:6])) == 1 and pids[0] != pids[3] != pids[6]
    recycled = [e for e in d.events if isinstance(e, WorkerEvent) and e.kind == "recycled"]
    assert len(recycled) == 2 and recycled[0].detail == "3 runs"


def test_recycling_on_memory(make_pool):
    # A forked worker starts with this process's resident pages (shared, but counted in its
    # RSS): the limit sits 100 MiB above them, wherever the suite has brought them, and the
    # big run goes 200 MiB past that.
    resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    limit = resident + 100 * 1024 * 1024
    d = make_pool("fork", workers=1, max_memory_per_worker=limit)
    ended = d.run([T("small", "my_pid"), T("big", "allocate_mib", 200), T("next", "my_pid")])
    assert ended["small"].result_repr != ended["next"].result_repr
    recycled = [e for e in d.events if isinstance(e, WorkerEvent) and e.kind == "recycled"]
    assert len(recycled) == 1 and recycled[0].detail.startswith("RSS ")


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_failing_preload_backs_off_and_is_reported(make_pool, method):
    d = make_pool(method, workers=2, preload=["no_such_module_for_preload"])
    limit = time.monotonic() + 2.0
    while time.monotonic() < limit:
        d.turn(0.1)
    failures = [e for e in d.events if isinstance(e, WorkerEvent) and e.kind == "init_failed"]
    # 2 at start, then one probe after 0.25, 0.5, 1 s...: never a respawn loop.
    assert 2 <= len(failures) <= 5, failures
    assert "ModuleNotFoundError" in failures[0].detail
    ok, why = d.pool.healthy()
    assert not ok and "fail to start" in why and "no_such_module_for_preload" in why
    assert d.pool.size() <= 1 and d.pool.free_slots() <= 2


@pytest.mark.parametrize("method", START_METHODS)
def test_an_unrelated_thread_exiting_does_not_kill_workers(make_pool, method):
    """PR_SET_PDEATHSIG fires when the parent *thread* exits: start the pool from a thread
    that then ends, and the workers must live on."""
    holder = {}

    def starter():
        holder["d"] = make_pool(method)

    t = threading.Thread(target=starter)
    t.start()
    t.join()
    d = holder["d"]
    pids = d.wait_ready()
    time.sleep(0.2)
    assert all(pid_alive(p) for p in pids)
    assert d.run([T("a", "noop"), T("b", "noop")])["a"].outcome == "succeeded"
    assert sorted(d.ready_pids()) == sorted(pids)


def test_kill_runs_ends_every_run_killed(make_pool):
    d = make_pool("fork")
    d.wait_ready()
    for i in range(4):  # 2 running, 2 queued behind them
        d.pool.submit(T(f"s{i}", "sleep", 30))
    d.until(lambda e: isinstance(e, RunStarted))
    ended = d.pool.kill_runs()
    assert sorted(e.task.run_id for e in ended) == ["s0", "s1", "s2", "s3"]
    assert {e.outcome for e in ended} == {"killed"}
    assert sum(e.started_at is None for e in ended) == 2  # the queued ones never started
    assert d.pool.in_flight() == []
    d.wait_ready(2)
    assert not [e for e in d.events if isinstance(e, RunEnded)]  # not repeated by poll()


@pytest.mark.parametrize("method", START_METHODS)
def test_no_orphans_when_the_main_process_is_sigkilled(method, tmp_path):
    marker = str(tmp_path / "pids")
    spec = {
        "method": method, "workers": 2, "pythonpath": [TESTS_DIR],
        "tasks": [{"run_id": "busy", "job": "j", "target": "jobs_for_tests:grandchild_then_block",
                   "args": [marker]}],
    }  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-c", f"import jobs_for_tests as j; j.drive({json.dumps(json.dumps(spec))})"],
        cwd=TESTS_DIR, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    pids = None
    for line in driver.stdout:
        msg = json.loads(line)
        if "pids" in msg:
            pids = msg["pids"]
            break
    assert pids is not None
    limit = time.monotonic() + 10
    while not os.path.exists(marker) and time.monotonic() < limit:
        time.sleep(0.01)
    worker, grandchild = map(int, open(marker).read().split())
    everyone = [*pids["workers"], grandchild, pids["forkserver"], pids["resource_tracker"]]
    assert worker in pids["workers"] and all(pid_alive(p) for p in everyone if p)
    if method != "fork":
        assert pids["forkserver" if method == "forkserver" else "resource_tracker"]
    driver.kill()
    driver.wait()
    driver.stdout.close()
    assert wait_gone(everyone, 2.0) == []
