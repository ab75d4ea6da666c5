"""The job call and the worker's set-up, under every start method (real processes, no mocks)."""

from __future__ import annotations

import functools
import os
import signal

import pytest
from jobs_for_tests import TESTS_DIR, Driver
from procs import START_METHODS

from poolkeeper.pool.supervisor import (
    NotStarted,
    PoolFull,
    RunEnded,
    RunStarted,
    Task,
    WorkerEvent,
    WorkerPool,
)


def T(run_id: str, func: str, *args, **kw) -> Task:
    return Task(
        run_id=run_id, job=kw.pop("job", "j"), target=f"jobs_for_tests:{func}", args=args, **kw
    )


@pytest.mark.parametrize("method", START_METHODS)
def test_outcomes_of_the_job_call(make_pool, method):
    d = make_pool(method)
    tasks = [
        T("add", "add", 2, 3),
        T("div", "divide", 1, 0),
        Task(
            run_id="ctx",
            job="myjob",
            target="jobs_for_tests:echo_ctx",
            attempt=3,
            scheduled_at=12.5,
        ),
        T("exit", "raise_system_exit"),
        T("kbd", "raise_keyboard_interrupt"),
        T("lambda", "return_unpicklable"),
        T("unpicklable-exc", "raise_unpicklable"),
        Task(run_id="noimport", job="j", target="no_such_pkg.mod:f"),
        Task(run_id="noattr", job="j", target="jobs_for_tests:no_such_function"),
        Task(run_id="nested", job="j", target="jobs_for_tests:Namespace.Inner.method", args=(21,)),
        Task(run_id="badtarget", job="j", target="jobs_for_tests"),
        Task(
            run_id="env",
            job="j",
            target="jobs_for_tests:env_value",
            args=("PK_TEST_VAR",),
            env={"PK_TEST_VAR": "set-for-run"},
        ),  # fmt: skip
        T("env-after", "env_value", "PK_TEST_VAR"),
    ]
    ended = d.run(tasks)
    assert ended["add"].outcome == "succeeded" and ended["add"].result_repr == "5"
    div = ended["div"]
    assert div.outcome == "failed" and div.error == "ZeroDivisionError: division by zero"
    assert "return a / b" in div.traceback and div.started_at <= div.ended_at
    assert eval(ended["ctx"].result_repr) == {
        "job": "myjob", "run_id": "ctx", "attempt": 3, "scheduled_at": 12.5, "stopping": False,
    }  # fmt: skip
    assert (ended["exit"].outcome, ended["exit"].error) == ("failed", "SystemExit: 3")
    assert (ended["kbd"].outcome, ended["kbd"].error) == ("failed", "KeyboardInterrupt")
    # Results travel as repr strings: an unpicklable result is no problem (decision: succeeded).
    assert ended["lambda"].outcome == "succeeded" and "lambda" in ended["lambda"].result_repr
    assert ended["unpicklable-exc"].outcome == "failed"
    assert ended["unpicklable-exc"].error == "Unpicklable: cannot be pickled"
    noimport = ended["noimport"]
    assert noimport.outcome == "failed"
    assert noimport.error.startswith("cannot import 'no_such_pkg.mod': ModuleNotFoundError: ")
    assert ended["noattr"].error.startswith("cannot resolve 'jobs_for_tests:no_such_function'")
    assert ended["nested"].result_repr == "42"
    assert ended["badtarget"].outcome == "failed" and "invalid target" in ended["badtarget"].error
    assert ended["env"].result_repr == "'set-for-run'"
    assert ended["env-after"].result_repr == "None"
    # None of that hurt the pool: same workers, nothing lost, still working.
    assert not [e for e in d.events if isinstance(e, WorkerEvent) and e.kind == "exited"]
    assert d.pool.healthy() == (True, "ok")
    assert d.run([T("again", "add", 1, 1)])["again"].result_repr == "2"


def test_fleet_runs_see_their_replica_and_fence_in_ctx_and_environment(make_pool, monkeypatch):
    """ctx.replica / ctx.fence (FLEET.md): a fleet run has them in ctx and, for the programs
    it starts, in its environment (POOLKEEPER_REPLICA only for a replica), restored after the
    run like Task.env; a run outside the fleet has None and the environment it inherited."""
    monkeypatch.setenv("POOLKEEPER_REPLICA", "inherited")
    monkeypatch.delenv("POOLKEEPER_FENCE", raising=False)
    d = make_pool("fork", workers=1)  # one worker: each run sees what the previous one left
    task = functools.partial(Task, job="eat", target="jobs_for_tests:fleet_ctx")
    ended = d.run([
        task(run_id="replica", replica=2, fence=41, loop=True),
        task(run_id="fire", fence=7, env={"POOLKEEPER_FENCE": "from-spec", "OTHER": "x"}),
        task(run_id="local"),
        Task(run_id="no-ctx", job="j", target="jobs_for_tests:env_value",
             args=("POOLKEEPER_FENCE",), fence=9),
        task(run_id="after", replica=1),
    ])  # fmt: skip
    replica, fence, env, text = eval(ended["replica"].result_repr)
    assert (replica, fence, env) == (2, 41, ("2", "41"))
    assert "replica=2, fence=41" in text
    assert eval(ended["fire"].result_repr)[:3] == (None, 7, ("inherited", "7"))
    assert eval(ended["local"].result_repr)[:3] == (None, None, ("inherited", None))
    assert ended["no-ctx"].result_repr == "'9'"  # a job without ctx still passes it on
    assert eval(ended["after"].result_repr)[:3] == (1, None, ("inherited", None))


@pytest.mark.parametrize("method", START_METHODS)
def test_worker_setup(make_pool, method, monkeypatch):
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.setenv(key, "from-systemd")
    from jobs_for_tests import worker_setup_marker

    d = make_pool(method, worker_setup=worker_setup_marker, preload=["json", "jobs_for_tests"])
    ended = d.run([
        T("env", "notify_env"), T("sig", "signal_dispositions"), T("pg", "pid_and_pgid"),
        T("setup", "env_value", "POOLKEEPER_TEST_SETUP"),
    ])  # fmt: skip
    assert ended["env"].result_repr == "[None, None, None]"
    assert ended["sig"].result_repr == "(True, True)"
    pid, pgid = eval(ended["pg"].result_repr)
    assert pid == pgid == ended["pg"].worker_pid  # its own process group leader
    assert ended["setup"].result_repr == "'done'"


@pytest.mark.parametrize("method", START_METHODS)
def test_job_logging_carries_journal_fields(make_pool, method, tmp_path):
    from jobs_for_tests import setup_log_file

    path = tmp_path / "log.txt"
    d = make_pool(method, workers=1, worker_setup=functools.partial(setup_log_file, str(path)))
    ended = d.run(
        [Task(run_id="r-1", job="logger", target="jobs_for_tests:log_something", attempt=2)]
    )
    assert ended["r-1"].outcome == "succeeded"
    lines = path.read_text().splitlines()
    pid = ended["r-1"].worker_pid
    assert f"logger|r-1|2|{pid}|poolkeeper.job.logger|hello from the job" in lines
    assert f"logger|r-1|2|{pid}|some.library|hello from a library" in lines


def test_unpicklable_args_fail_at_once_and_touch_no_worker(make_pool):
    d = make_pool("fork")
    pids = d.wait_ready()
    import threading

    d.pool.submit(
        Task(run_id="bad", job="j", target="jobs_for_tests:add", args=(threading.Lock(), 1))
    )
    assert d.pool.in_flight() == [] and d.pool.busy_count() == 0
    ended = d.run([T("good", "add", 1, 2)])
    bad = next(e for e in d.events if isinstance(e, RunEnded) and e.task.run_id == "bad")
    assert bad.outcome == "failed" and bad.error.startswith("cannot send arguments: TypeError")
    assert bad.started_at is None and bad.worker_pid is None
    assert ended["good"].outcome == "succeeded"
    assert sorted(d.ready_pids()) == sorted(pids)


@pytest.mark.parametrize("method", START_METHODS)
def test_drain_sets_ctx_stopping(make_pool, method):
    d = make_pool(method, workers=1)
    d.pool.submit(T("w", "wait_until_stopping", kwargs={"limit": 20.0}))
    d.until(lambda e: isinstance(e, RunStarted))
    d.pool.drain()
    ended = d.run([], timeout=10)
    ev = d.until(lambda e: isinstance(e, RunEnded))[-1]
    assert ended == {} and ev.outcome == "succeeded" and ev.result_repr == "True"


def test_loop_tasks_need_an_idle_worker_and_nothing_queues_behind_them(make_pool):
    d = make_pool("fork", workers=1)
    d.wait_ready()
    d.pool.submit(
        Task(run_id="loop", job="l", target="jobs_for_tests:loop_with_heartbeat", loop=True)
    )
    assert d.pool.free_slots() == 0 and d.pool.idle_slots() == 0
    with pytest.raises(PoolFull):
        d.pool.submit(T("x", "noop"))
    d.pool.drain()
    ev = d.until(lambda e: isinstance(e, RunEnded))[-1]
    assert ev.outcome == "succeeded" and ev.result_repr == "'stopped'"


def test_prefetch_and_drain_hand_back_queued_tasks(make_pool):
    d = make_pool("fork", workers=2)
    d.wait_ready()
    for i in range(4):  # two run, two are queued behind them (prefetch 1)
        d.pool.submit(T(f"s{i}", "sleep", 0.4))
    assert d.pool.free_slots() == 0 and len(d.pool.in_flight()) == 4
    d.until(lambda e: isinstance(e, RunStarted))
    d.pool.drain()  # the daemon's drain: nothing queued may start now
    ended, handed_back = {}, []
    while len(ended) + len(handed_back) < 4:
        for e in d.turn():
            if isinstance(e, RunEnded):
                ended[e.task.run_id] = e
            elif isinstance(e, NotStarted):
                handed_back.append(e.task.run_id)
    assert sorted(ended) == ["s0", "s1"] and sorted(handed_back) == ["s2", "s3"]
    assert all(e.outcome == "succeeded" for e in ended.values())
    assert d.pool.in_flight() == []


def test_close_joins_everything_and_kills_busy_workers_at_the_timeout(tmp_path):
    pool = WorkerPool(workers=2, start_method="fork", pythonpath=[TESTS_DIR])
    pool.start()
    d = Driver(pool)
    d.wait_ready()
    marker = str(tmp_path / "pids")
    pool.submit(T("hang", "grandchild_then_block", marker))
    d.until(lambda e: isinstance(e, RunStarted))
    while not os.path.exists(marker):
        d.turn(0.01)
    worker, grandchild = map(int, open(marker).read().split())
    ended = pool.close(timeout=0.5)
    assert [(e.task.run_id, e.outcome, e.signal) for e in ended] == [
        ("hang", "killed", signal.SIGKILL)
    ]
    from jobs_for_tests import wait_gone

    assert wait_gone([worker, grandchild], 2.0) == []
    assert pool.size() == 0 and pool.close() == []  # idempotent
    kinds = [e.kind for e in pool.poll() if isinstance(e, WorkerEvent)]
    assert kinds.count("exited") == 2


@pytest.mark.parametrize("method", START_METHODS)
def test_stop_runs_stops_only_those_runs_and_replaces_their_worker(make_pool, method):
    """A reload stops the runs of a changed job: their ctx.stopping is set, the other runs
    carry on, and the stopped run's worker (whose stop cannot be taken back) is replaced."""
    d = make_pool(method, workers=2)
    d.wait_ready()
    loops = [
        Task(run_id=r, job=r, target="jobs_for_tests:loop_with_heartbeat", loop=True)
        for r in ("a", "b")
    ]
    for task in loops:
        d.pool.submit(task)
    d.until(lambda e: isinstance(e, RunStarted) and e.task.run_id == "b")
    pid_of = {e.task.run_id: e.worker_pid for e in d.events if isinstance(e, RunStarted)}
    assert sorted(pid_of) == ["a", "b"] and pid_of["a"] != pid_of["b"]
    d.pool.stop_runs([loops[0]])
    ended = d.until(lambda e: isinstance(e, RunEnded))[-1]
    assert (ended.task.run_id, ended.outcome, ended.result_repr) == ("a", "succeeded", "'stopped'")
    recycled = [e for e in d.events if isinstance(e, WorkerEvent) and e.kind == "recycled"]
    assert [e.pid for e in recycled] == [pid_of["a"]]
    d.wait_ready(2)
    assert pid_of["a"] not in d.ready_pids() and pid_of["b"] in d.ready_pids()
    assert [t.run_id for t in d.pool.in_flight()] == ["b"]  # b never saw a stop
    assert d.run([T("after", "my_pid")])["after"].outcome == "succeeded"  # a fresh worker
    d.pool.drain()
    assert d.until(lambda e: isinstance(e, RunEnded))[-1].task.run_id == "b"


def test_stop_runs_cancels_a_run_that_has_not_started(make_pool):
    d = make_pool("fork", workers=1)
    d.wait_ready()
    d.pool.submit(T("first", "sleep", 0.5))
    d.pool.submit(T("queued", "noop"))  # prefetched behind it
    d.until(lambda e: isinstance(e, RunStarted))
    d.pool.stop_runs([T("queued", "noop")])
    d.until(lambda e: isinstance(e, NotStarted))
    ended = [e for e in d.events if isinstance(e, RunEnded)]
    assert [e.task.run_id for e in d.events if isinstance(e, NotStarted)] == ["queued"]
    assert [(e.task.run_id, e.outcome) for e in ended] == [("first", "succeeded")]
    assert not [e for e in d.events if isinstance(e, WorkerEvent) and e.kind == "recycled"]
