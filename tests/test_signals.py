"""Every catchable signal, sent once to a daemon with runs in flight (issue 8, finding 2), and
the signal state of what a job starts (finding 6). The expected behaviour is written out here,
not taken from poolkeeper.signals: docs/lifecycle.md, "Signals", is the contract."""

from __future__ import annotations

import os
import signal
import time

import procs
import pytest
from daemon_harness import DaemonProcess
from procs import START_METHODS

from poolkeeper.pool.supervisor import Task
from poolkeeper.service import control

DRAIN = {signal.SIGTERM, signal.SIGINT}
FAST_STOP = {signal.SIGQUIT}
CRASH = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
CATCHABLE = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
SURVIVED = [s for s in CATCHABLE if s not in DRAIN | FAST_STOP | CRASH]
# Survived without a word: the default action does nothing, or Python ignores them.
SILENT = {
    signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGPIPE,
    signal.SIGXFSZ,
}  # fmt: skip
# Sent to every process of the daemon's tree, as `systemctl kill -s SIG` does.
TREE_WIDE = [
    signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGTSTP,
    signal.SIGPWR, signal.SIGRTMIN,
]  # fmt: skip

SPEC = """
    pool: {{workers: 3, start_method: {method}}}
    shutdown: {{drain_timeout: 20s}}
    jobs:
      consumer:
        target: daemon_jobs:loop_units
        loop: {{replicas: 1}}
        kwargs: {{out_dir: $OUT}}
      report:
        target: daemon_jobs:slow
        every: 100ms
        kwargs: {{seconds: 0.3, out_dir: $OUT}}
    """


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def _ids(sigs) -> list[str]:
    return [_name(s) for s in sigs]


def _tree(root: int) -> set[int]:
    """`root` and every live descendant: the processes systemd's cgroup would hold."""
    found, todo = {root}, [root]
    while todo:
        found_now = set(procs.children(todo.pop()))
        todo += found_now - found
        found |= found_now
    return found


def _alive(pid: int) -> bool:
    st = procs._stat(pid)
    return st is not None and st[2] != "Z"


def _live_status(d: DaemonProcess) -> dict:
    reply = control.request(f"{d.db}.sock", {"command": "status"}, timeout=5.0)
    assert reply is not None and reply.get("ok") is True, reply
    return reply


def _finished(d: DaemonProcess) -> int:
    return sum(1 for r in d.runs() if r["outcome"] != "running")


def _busy(d: DaemonProcess) -> None:
    """Ready, with the loop replica and an interval run in flight."""
    d.wait_log("ready")
    d.wait_for(
        lambda: d.units() >= 2 and list(d.out.glob("slow-*.started")), what="runs in flight"
    )


def _assert_every_run_has_an_outcome(d: DaemonProcess, allowed: set[str]) -> list[dict]:
    runs = d.runs()
    assert runs, d.log()
    outcomes = {r["outcome"] for r in runs}
    assert "running" not in outcomes, runs
    assert outcomes <= allowed, (outcomes, d.log())
    return runs


@pytest.fixture(scope="module")
def survivor(tmp_path_factory):
    """One daemon (forkserver: the forkserver and the resource tracker are in its tree) that
    every survived signal is sent to, in turn."""
    d = DaemonProcess(tmp_path_factory.mktemp("survivor"), SPEC.format(method="forkserver"))
    procs.ALLOWED.add(d.pid)  # it outlives each test; the last test drains it
    try:
        _busy(d)
        yield d
    finally:
        d.close()
        procs.ALLOWED.discard(d.pid)


@pytest.mark.parametrize("sig", SURVIVED, ids=_ids(SURVIVED))
def test_daemon_survives_the_signal_and_answers(survivor, sig):
    d = survivor
    if d.proc.poll() is not None:
        pytest.fail(f"the daemon died earlier ({d.proc.returncode}):\n{d.log()}")
    d.signal(sig)
    name = _name(sig)
    if sig == signal.SIGHUP:
        d.wait_for(lambda: d.log().count("reload applied: nothing changed") >= 1, what="reload")
    elif sig == signal.SIGUSR1:
        d.wait_log("SIGUSR1: state dump")
    elif sig not in SILENT:
        d.wait_log(f"{name} received: ignored")
    assert d.proc.poll() is None, d.log()
    assert _live_status(d)["message"].startswith("2 jobs"), d.log()


def test_sigusr1_dumps_jobs_workers_and_runs_in_flight(survivor):
    d = survivor
    d.signal(signal.SIGUSR1)
    d.wait_for(lambda: d.log().count("SIGUSR1: state dump") >= 2, what="a second dump")
    dump = d.log().split("SIGUSR1: state dump")[-1]
    assert "job consumer (loop): 1 running" in dump, dump
    assert "job report (every):" in dump, dump
    assert "consumer[" in dump and "running" in dump and "worker " in dump, dump


@pytest.mark.parametrize("sig", TREE_WIDE, ids=_ids(TREE_WIDE))
def test_every_process_of_the_tree_survives_the_signal(survivor, sig):
    """`systemctl kill -s SIG` reaches the main process, the forkserver, the resource tracker
    and every worker: none may die of a signal the daemon survives, or a run is lost."""
    d = survivor
    before = _tree(d.pid)
    assert len(before) >= 6, before  # main, forkserver, resource tracker, 3 workers
    done = _finished(d)
    for pid in before:
        os.kill(pid, sig)
    # Runs go on: two more end after the signal (the interval job's take ~0.3 s each).
    d.wait_for(lambda: _finished(d) >= done + 2, what="further runs")
    dead = {pid: procs._cmdline(pid) for pid in before if not _alive(pid)}
    assert not dead, f"died of {_name(sig)}: {dead}\n{d.log()}"
    assert _live_status(d)["ok"]
    assert not [r for r in d.runs() if r["outcome"] in ("lost", "killed")], d.log()


def test_after_every_signal_a_drain_records_every_run(survivor):
    d = survivor
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0, d.log()
    _assert_every_run_has_an_outcome(d, {"succeeded"})
    assert "drain finished" in d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.mark.parametrize("tree_wide", [False, True], ids=["main", "tree"])
@pytest.mark.parametrize("sig", sorted(DRAIN), ids=_ids(sorted(DRAIN)))
def test_drain_signal_drains_with_every_run_recorded(daemon_factory, sig, tree_wide):
    d = daemon_factory(SPEC.format(method="forkserver"))
    _busy(d)
    for pid in _tree(d.pid) if tree_wide else [d.pid]:
        os.kill(pid, sig)
    assert d.wait_exit() == 0, d.log()
    _assert_every_run_has_an_outcome(d, {"succeeded"})
    assert f"{_name(sig)}: draining" in d.log()


@pytest.mark.parametrize("tree_wide", [False, True], ids=["main", "tree"])
def test_sigquit_is_a_fast_stop(daemon_factory, tree_wide):
    """Like gunicorn (and a terminal's Ctrl-\\): stop now. Runs in flight are killed and
    recorded `killed`; the exit is still 0, as after a second SIGTERM."""
    d = daemon_factory(SPEC.format(method="forkserver"))
    _busy(d)
    for pid in _tree(d.pid) if tree_wide else [d.pid]:
        os.kill(pid, signal.SIGQUIT)
    assert d.wait_exit() == 0, d.log()
    runs = _assert_every_run_has_an_outcome(d, {"succeeded", "killed"})
    assert [r for r in runs if r["job"] == "consumer" and r["outcome"] == "killed"], runs
    assert "SIGQUIT: fast stop" in d.log()


@pytest.mark.parametrize("sig", sorted(CRASH), ids=_ids(sorted(CRASH)))
def test_crash_signal_dumps_and_dies_and_the_next_start_records_lost(
    daemon_factory, tmp_path, sig
):
    """SIGABRT (systemd's watchdog) and the fault signals, whoever sends them: faulthandler
    writes every stack, the daemon dies of the signal, its workers die with it, and the next
    start records the runs it had in flight `lost`."""
    d = daemon_factory(SPEC.format(method="fork"))
    _busy(d)
    # Writes reach the DB every 0.5 s (docs/state.md): a run in flight, as a crash finds it.
    d.wait_for(lambda: [r for r in d.runs() if r["outcome"] == "running"], what="a flush")
    tree = _tree(d.pid)
    d.signal(sig)
    assert d.wait_exit() == -sig, d.log()
    assert "Fatal Python error" in d.log()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        procs.reap_zombies()
        time.sleep(0.02)
    assert not [pid for pid in tree if _alive(pid)], "workers outlived the crashed daemon"
    in_flight = {r["run_id"] for r in d.runs() if r["outcome"] == "running"}
    assert in_flight, d.runs()  # what the crash left: fixed by the next start
    again = DaemonProcess(tmp_path / "again", SPEC.format(method="fork"), db=d.db)
    try:
        again.wait_log("recorded as lost")
        again.wait_log("ready")
        again.signal(signal.SIGTERM)
        assert again.wait_exit() == 0, again.log()
    finally:
        again.close()
    runs = _assert_every_run_has_an_outcome(again, {"succeeded", "lost"})
    assert {r["run_id"] for r in runs if r["outcome"] == "lost"} == in_flight


def test_signals_during_the_start_are_handled_once_the_loop_runs(daemon_factory):
    """While the config is validated (here: a job module that takes 1 s to import), SIGHUP
    and SIGUSR1 wait for the main loop instead of killing the daemon."""
    d = daemon_factory("""
        pool: {workers: 1, start_method: forkserver}
        jobs:
          tick:
            target: slow_import_jobs:ok
            every: 100ms
        """)
    d.wait_log("validating")
    for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2):
        d.signal(sig)
    d.wait_log("ready")
    d.wait_for(lambda: _finished(d) >= 1, what="a run")
    log = d.log()
    assert "SIGUSR1: state dump" in log and "SIGUSR2 received: ignored" in log, log
    assert "SIGHUP while starting: not reloading" in log, log
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0, d.log()
    _assert_every_run_has_an_outcome(d, {"succeeded"})


# -- finding 6: what a job starts gets default dispositions and an empty mask -----------------


WATCHED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM, signal.SIGTSTP,
)  # fmt: skip


def _job(run_id: str, func: str) -> Task:
    return Task(run_id=run_id, job="j", target=f"signal_jobs:{func}")


@pytest.mark.parametrize("method", START_METHODS)
def test_processes_a_job_starts_get_default_signals_and_an_empty_mask(make_pool, method):
    d = make_pool(method, workers=1)
    ended = d.run([_job("exec", "exec_child"), _job("fork", "fork_child")])
    for run_id in ("exec", "fork"):
        ev = ended[run_id]
        assert ev.outcome == "succeeded", (ev.error, ev.traceback)
        child = eval(ev.result_repr)
        assert child["SigBlk"] == [], (run_id, child)
        assert not set(child["SigIgn"]) & set(WATCHED), (run_id, child)
        # A fork without exec keeps Python's own SIGINT handler (KeyboardInterrupt), as a
        # fresh interpreter has it; nothing else of the worker's.
        caught = set(child["SigCgt"]) - ({signal.SIGINT} if run_id == "fork" else set())
        assert not caught & set(WATCHED), (run_id, child)
        assert child["terminate"] == -signal.SIGTERM, (run_id, child)


@pytest.mark.parametrize("method", START_METHODS)
def test_the_worker_itself_catches_what_it_must_survive(make_pool, method):
    """Caught by a handler that does nothing, not ignored: SIG_IGN would be inherited."""
    d = make_pool(method, workers=1)
    ev = d.run([_job("self", "worker_survives")])["self"]
    masks = eval(ev.result_repr)
    assert masks["SigBlk"] == [], masks
    assert not set(masks["SigIgn"]) & set(WATCHED), masks
    assert set(WATCHED) <= set(masks["SigCgt"]), masks


def test_a_survived_signal_does_not_interrupt_a_jobs_system_call(make_pool):
    """SA_RESTART: a job's C library blocked in read() does not see EINTR."""
    d = make_pool("forkserver", workers=1)
    ev = d.run([_job("read", "c_read_through_a_signal")])["read"]
    assert ev.outcome == "succeeded", (ev.error, ev.traceback)
    assert ev.result_repr == "(1, 0)"
