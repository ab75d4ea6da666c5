"""Processes a job detaches (setsid, start_new_session, a double fork) leave the worker's
process group; outside systemd no cgroup holds them. Each test here runs outside systemd: the
daemon's timeout, drain and death, and a worker's own death, must still take them along
(poolkeeper/pool/reaper.py). Every hostile job writes the pids of its three detached `sleep`s
(301, 302, 303) to $OUT/<tag>.pids."""

from __future__ import annotations

import ast
import os
import re
import signal
import time

import procs
import pytest
from jobs_for_tests import pid_alive, wait_gone
from procs import START_METHODS

from poolkeeper.pool.supervisor import RunEnded, Task, WorkerEvent


def _detached(d, tag: str, check: bool = True) -> list[int]:
    path = d.out / f"{tag}.pids"
    d.wait_for(path.exists, what=f"the job to write {path.name}")
    pids = [int(p) for p in path.read_text().split()]
    if check:  # they are ours (and detached, each in a session of its own)
        assert [_cmdline(p) for p in pids] == ["sleep 301", "sleep 302", "sleep 303"]
        assert len({os.getsid(p) for p in pids} | {os.getsid(d.pid)}) == 4
    return pids


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def _assert_gone(pids: list[int], log: str, timeout: float = 5.0) -> None:
    left = wait_gone(pids, timeout)
    if left:
        procs.kill_all(left)
    assert left == [], f"detached processes survived: {left}\n{log}"


@pytest.mark.parametrize("method", START_METHODS)
def test_a_timeout_kills_what_the_run_detached(daemon_factory, method):
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {method}}}
        jobs:
          hostile:
            target: daemon_jobs:detach_then_hang
            at: startup
            timeout: 1s
            kwargs: {{out_dir: $OUT}}
        """)
    pids = _detached(d, "hang")
    d.wait_log("run timeout")
    _assert_gone(pids, d.log())
    assert re.search(r"killed 3 processes below worker \d+ \(running hostile\): pid ", d.log())
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


@pytest.mark.parametrize("method", START_METHODS)
def test_the_drain_kills_what_a_loop_detached(daemon_factory, method):
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {method}}}
        jobs:
          detacher:
            target: daemon_jobs:detach_then_loop
            loop: {{replicas: 1}}
            kwargs: {{out_dir: $OUT}}
        """)
    pids = _detached(d, "loop")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    _assert_gone(pids, d.log(), timeout=2.0)
    [run] = d.runs()
    assert run["outcome"] == "succeeded"
    assert "killed 3 processes left by job detacher: pid " in d.log()


@pytest.mark.parametrize("method", START_METHODS)
def test_a_sigkilled_daemon_takes_detached_processes_along(daemon_factory, method):
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {method}}}
        jobs:
          detacher:
            target: daemon_jobs:detach_then_loop
            loop: {{replicas: 1}}
            kwargs: {{out_dir: $OUT}}
        """)
    pids = _detached(d, "loop")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    _assert_gone(pids, d.log())
    assert procs.leftovers(grace=5.0) == {}


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_what_a_dead_worker_detached_is_killed_by_the_daemon(daemon_factory, method):
    """The worker dies before it can kill anything: its detached processes are re-parented to
    the main process (a subreaper), which kills them when it sees the worker go."""
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: {method}}}
        jobs:
          suicidal:
            target: daemon_jobs:detach_then_die
            at: startup
            kwargs: {{out_dir: $OUT}}
        """)
    pids = _detached(d, "die", check=False)  # they may be gone already
    d.wait_log("run lost")
    _assert_gone(pids, d.log())
    d.wait_log("killed 3 processes left by a job whose worker died first")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_recycled_worker_takes_what_its_runs_detached(make_pool, method, tmp_path):
    d = make_pool(method, workers=1, max_runs_per_worker=1)
    task = Task(run_id="r", job="detacher", target="daemon_jobs:detach_children",
                args=(str(tmp_path), "recycled"))  # fmt: skip
    assert d.run([task])["r"].outcome == "succeeded"
    pids = [int(p) for p in (tmp_path / "recycled.pids").read_text().split()]
    d.until(lambda e: isinstance(e, WorkerEvent) and e.kind == "exited")
    _assert_gone(pids, "the worker retired after its one run")


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_timeout_freezes_a_forking_tree_before_killing_it(make_pool, method, tmp_path):
    d = make_pool(method, workers=1)
    marker = tmp_path / "sid"
    task = Task(run_id="t", job="spawner", target="jobs_for_tests:detached_spawner_then_hang",
                args=(str(marker),), timeout=1.0)  # fmt: skip
    assert d.run([task])["t"].outcome == "timeout"
    sid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while left := _in_session(sid):
        if time.monotonic() > deadline:
            procs.kill_all(left)
            raise AssertionError(f"{len(left)} processes of session {sid} survived the timeout")
        time.sleep(0.01)


def _in_session(sid: int) -> list[int]:
    """Live processes of session `sid` (a zombie has left it for good)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _state(int(name)) not in (None, "Z"):
            try:
                if os.getsid(int(name)) == sid:
                    found.append(int(name))
            except ProcessLookupError:
                pass
    return found


# -- a worker is a subreaper: it reaps orphans, never a job's own child -------------------------


def T(run_id: str, func: str, *args) -> Task:
    return Task(run_id=run_id, job="j", target=f"jobs_for_tests:{func}", args=args)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


def _wait_state(pid: int, states: set, timeout: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout
    while (state := _state(pid)) not in states:
        assert time.monotonic() < deadline, f"pid {pid} is still {state!r}"
        time.sleep(0.01)
    return state


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_jobs_own_waits_still_see_exit_codes(make_pool, method):
    d = make_pool(method, workers=1)
    ran = d.run([T("rc", "exit_code_of_a_subprocess", 3)])
    assert ran["rc"].result_repr == "3"
    kept, orphan = ast.literal_eval(
        d.run([T("keep", "keep_a_child_and_orphan_another", 5)])["keep"].result_repr
    )
    worker = d.ready_pids()[0]
    assert _wait_state(kept, {"Z"}) == "Z"  # dead, and only its Popen may collect it
    _wait_state(orphan, {"Z", None})
    d.run([T("between", "noop")])  # a run's end reaps the orphan (after sending the result)
    _wait_state(orphan, {None})  # reaped: gone from /proc
    assert _state(kept) == "Z" and _ppid(kept) == worker  # not the kept child
    ended = d.run([T("wait", "wait_for_the_kept_child")])["wait"]
    assert isinstance(ended, RunEnded) and ended.result_repr == "5"
    assert d.run([T("rc2", "exit_code_of_a_subprocess", 7)])["rc2"].result_repr == "7"
    assert pid_alive(worker)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return int(raw[raw.rindex(b")") + 2 :].split()[1])


def test_kill_tree_kills_the_root_and_names_what_was_below_it():
    import subprocess

    from poolkeeper.pool import reaper

    child = subprocess.Popen(["sh", "-c", "setsid sleep 304 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while not (below := _sleeps_below(child.pid, reaper)):  # once setsid has exec'd sleep
            assert time.monotonic() < deadline
            time.sleep(0.01)
        killed = reaper.kill_tree(child.pid)
        assert child.wait(5) == -signal.SIGKILL
        assert [text for _, text in killed] == below
        assert wait_gone([p.pid for p, _ in killed], 2.0) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _sleeps_below(pid: int, reaper) -> list[str]:
    texts = [reaper.describe(p.pid) for p in reaper.descendants(pid, reaper.scan())]
    return [t for t in texts if t.endswith(" 'sleep 304'")]
