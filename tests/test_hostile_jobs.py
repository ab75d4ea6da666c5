"""Job code that is hard on the worker it runs in (issue 8): threads left running, processes
started without closing descriptors, helpers forked without exec, a killed forkserver, huge
results. Whatever a job does, stop, reload and recycling end, and nothing of poolkeeper's
plumbing reaches a process the job starts."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import time

import pytest
from jobs_for_tests import pid_alive, wait_gone
from procs import START_METHODS

from poolkeeper.pool.supervisor import RunStarted, Task, WorkerEvent


def T(run_id: str, func: str, *args, **kw) -> Task:
    return Task(run_id=run_id, job="j", target=f"jobs_for_tests:{func}", args=args, **kw)


def _kill(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert wait_gone(pids, 5.0) == []


# -- a thread the job leaves behind (finding 4) -------------------------------------------------


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_thread_left_by_a_job_does_not_hold_the_stop(daemon_factory, start_method):
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {start_method}}}
        jobs:
          threads:
            target: daemon_jobs:leave_a_thread
            at: startup
        """)
    d.wait_log("run succeeded")
    [run] = d.wait_for(d.runs, what="the run in the state DB")  # flushed <= 0.5 s
    worker = run["worker_pid"]
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=20) == 0
    assert wait_gone([worker], 5.0) == []
    assert "did not exit within" not in d.log()  # it left at once, not at the deadline


def test_a_thread_left_by_a_job_does_not_hold_a_reload_that_replaces_the_pool(daemon_factory):
    spec = """
        pool: {{workers: {n}, start_method: forkserver}}
        jobs:
          threads:
            target: daemon_jobs:leave_a_thread
            at: startup
        """
    d = daemon_factory(spec.format(n=2))
    d.wait_log("run succeeded")
    d.rewrite(spec.format(n=3))
    d.signal(signal.SIGHUP)
    d.wait_log("reload: pool replaced")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=20) == 0


def test_recycled_workers_exit_despite_a_thread_left_by_their_job(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork, max_runs_per_worker: 1}
        jobs:
          threads:
            target: daemon_jobs:leave_a_thread
            every: 100ms
        """)

    def recycled() -> list[int]:
        return [int(pid) for pid in re.findall(r"worker (\d+) recycled", d.log())]

    d.wait_for(lambda: len(recycled()) >= 5, what="five recycled workers")
    assert wait_gone(recycled()[:5], 10.0) == []
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=20) == 0


def test_a_worker_that_cannot_exit_is_killed_after_a_grace_and_the_stop_ends(daemon_factory):
    """Flushing stdout on the way out blocks for ever (a pipe nobody reads): the worker's
    exit has a deadline, after which its group is killed and the fact logged."""
    d = daemon_factory("""
        pool: {workers: 1, start_method: fork}
        jobs:
          wedge:
            target: daemon_jobs:wedge_stdout
            at: startup
            kwargs: {out_dir: $OUT}
        """)
    d.wait_log("run succeeded")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=30) == 0
    assert re.search(r"worker \d+ did not exit within 5s of being told to", d.log()), d.log()


# -- descriptors (findings 5 and 8) ---------------------------------------------------------------


@pytest.mark.parametrize("start_method", START_METHODS)
def test_processes_a_job_starts_inherit_no_descriptor_of_poolkeeper(daemon_factory, start_method):
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {start_method}}}
        jobs:
          lister:
            target: daemon_jobs:list_inherited_fds
            at: startup
            kwargs: {{out_dir: $OUT}}
        """)
    d.wait_log("run succeeded")
    for how in ("system", "popen"):
        fds = {int(fd) for fd in (d.out / f"fds.{how}").read_text().split()}
        assert fds <= {0, 1, 2}, (how, fds)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_detached_grandchild_does_not_hold_the_stop(daemon_factory, start_method):
    """`setsid sleep 301 &` kept the resource tracker's pipe: the stop waited for it."""
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {start_method}}}
        jobs:
          detach:
            target: daemon_jobs:detach_sleeper
            at: startup
            kwargs: {{out_dir: $OUT}}
        """)
    pid_file = d.out / "sleeper.pid"
    d.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the sleeper")
    sleeper = int(pid_file.read_text())
    try:
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=20) == 0
        assert "did not exit within" not in d.log()  # nothing had to be killed
    finally:
        _kill([sleeper])


def _helpers(d) -> list[int]:
    path = d.out / "helper.pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _open_files(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def test_a_forked_helper_of_a_job_holds_nothing_of_the_daemon(daemon_factory):
    """Under fork, a job's helper that forks without exec and outlives a SIGKILLed daemon
    held its state lock: the restart exited 75."""
    spec = """
        pool: {workers: 2, start_method: fork}
        jobs:
          helper:
            target: daemon_jobs:fork_a_helper
            at: startup
            kwargs: {out_dir: $OUT}
        """
    d = daemon_factory(spec)
    try:
        d.wait_for(lambda: _helpers(d), what="the helper")
        [helper] = _helpers(d)
        state = os.path.realpath(d.db)
        assert not [f for f in _open_files(helper) if f.startswith(state)]
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        again = daemon_factory(spec)
        again.wait_log("INFO    ready")  # not exit 75: the lock is free
        again.signal(signal.SIGTERM)
        assert again.wait_exit() == 0
    finally:
        _kill(_helpers(d))


def test_a_forked_helper_holding_the_resource_tracker_does_not_hold_the_stop(daemon_factory):
    """Under forkserver, a helper forked without exec keeps the resource tracker's pipe,
    which no close-on-exec can take from it: the tracker is killed after a grace."""
    d = daemon_factory("""
        pool: {workers: 2, start_method: forkserver}
        jobs:
          helper:
            target: daemon_jobs:fork_a_helper
            at: startup
            kwargs: {out_dir: $OUT}
        """)
    try:
        d.wait_for(lambda: _helpers(d), what="the helper")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=30) == 0
        if pid_alive(_helpers(d)[0]):  # (unless something killed it at the drain)
            assert "the resource tracker" in d.log() and "did not exit within 5s" in d.log()
    finally:
        _kill(_helpers(d))


# -- smaller things (finding 13) -------------------------------------------------------------------


def test_a_big_result_is_cut_before_its_repr_is_built(make_pool):
    """A plain repr() of a big result is built in full, then cut: some 7 MB here, gigabytes
    for a big enough result. The last element's repr() raises if it is ever reached."""
    d = make_pool("fork", workers=1)
    ev = d.run([T("big", "big_result")])["big"]
    assert ev.outcome == "succeeded"
    assert ev.result_repr.startswith("[0, 1, 2, 3, ") and len(ev.result_repr) <= 200


def test_a_huge_exception_message_keeps_the_frames_of_the_traceback(make_pool):
    """The traceback used to be formatted in full and its end kept: a megabyte of message and
    not one frame."""
    d = make_pool("fork", workers=1)
    ev = d.run([T("big", "raise_a_huge_message")])["big"]
    assert ev.outcome == "failed" and len(ev.error) <= 500
    assert "Traceback (most recent call last)" in ev.traceback
    assert "in raise_a_huge_message" in ev.traceback and len(ev.traceback) <= 40_000


def test_a_job_that_kills_the_forkserver(make_pool, caplog):
    d = make_pool("forkserver", workers=1)
    forkserver = int(d.run([T("kill", "kill_the_parent")])["kill"].result_repr)
    _turn_until(d, lambda: f"the forkserver (pid {forkserver}) died (SIGTERM)" in caplog.text)
    # The worker it started runs on; its death cannot be told apart from "exit code 255".
    ev = d.run([T("orphan", "die_exit3")], resubmit=False)["orphan"]
    assert (ev.outcome, ev.exit_code, ev.signal) == ("lost", None, None)
    assert ev.error == f"worker died: exit status unknown: its forkserver ({forkserver}) died"
    # Its replacement comes from a new forkserver, which reports exit statuses again.
    ev = d.run([T("next", "die_exit3")], resubmit=False)["next"]
    assert (ev.outcome, ev.exit_code, ev.error) == ("lost", 3, "worker died: exit code 3")
    assert d.run([T("after", "add", 1, 1)])["after"].result_repr == "2"


def test_no_worker_is_replaced_once_the_pool_drains(make_pool):
    """A fast stop kills every run during the drain: no replacement may start."""
    d = make_pool("fork", workers=2)
    pids = d.wait_ready()
    for i in range(2):
        d.pool.submit(T(f"s{i}", "sleep", 30))
    _turn_until(d, lambda: len(_kinds(d, RunStarted)) == 2)
    d.pool.drain()
    assert len(d.pool.kill_runs()) == 2
    _turn_until(
        d, lambda: {e.pid for e in _kinds(d, WorkerEvent) if e.kind == "exited"} >= set(pids)
    )
    assert d.pool.size() == 0 and d.pool._workers == []
    assert not [e for e in _kinds(d, WorkerEvent) if e.kind == "replaced"]


def _kinds(d, kind) -> list:
    return [e for e in d.events if isinstance(e, kind)]


def _turn_until(d, condition, timeout: float = 10.0) -> None:
    limit = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < limit, d.events[-10:]
        d.turn()


def _read_syscall() -> str:
    numbers = {"x86_64": "0", "aarch64": "63"}
    if platform.machine() not in numbers:
        pytest.skip(f"read(2)'s number on {platform.machine()} is not known here")
    return numbers[platform.machine()]


def _blocked_in_read(pid: int, read_nr: str) -> bool:
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] == read_nr


def test_idle_workers_leave_quietly_when_the_daemon_is_sigkilled(daemon_factory):
    """The daemon dies with results unread: the workers' next read fails with ECONNRESET,
    which used to end in a traceback on the journal (unless the worker's watcher thread
    killed it first: four workers, so that the race is lost at least once)."""
    read_nr = _read_syscall()
    jobs = "".join(
        f"""
          short{i}:
            target: daemon_jobs:end_on_go
            at: startup
            kwargs: {{out_dir: $OUT}}"""
        for i in range(4)
    )
    d = daemon_factory("pool: {workers: 4, start_method: fork}\njobs:" + jobs)
    d.wait_for(lambda: d.log().count("run started") == 4, what="four runs")
    d.proc.send_signal(signal.SIGSTOP)  # from now on nothing the workers send is read
    (d.out / "go").touch()
    d.wait_for(lambda: len(list(d.out.glob("ended-*"))) == 4, what="the runs to end")
    workers = [int(path.name.split("-")[1]) for path in d.out.glob("ended-*")]
    # Their results sent, the workers wait for their next task.
    d.wait_for(lambda: all(_blocked_in_read(w, read_nr) for w in workers), what="the workers")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert wait_gone(workers, 5.0) == []
    log = d.log()
    assert "Process poolkeeper-worker" not in log and "Traceback" not in log, log
