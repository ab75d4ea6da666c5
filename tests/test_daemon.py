"""`poolkeeper run` as a user runs it: a real daemon process, real workers, real SQLite."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import procs
import pytest
from daemon_harness import DaemonProcess
from procs import START_METHODS


@pytest.mark.parametrize("start_method", START_METHODS)
def test_sigterm_drains_loops_and_in_flight_runs(daemon_factory, start_method):
    d = daemon_factory(f"""
        pool: {{workers: 4, start_method: {start_method}}}
        shutdown: {{drain_timeout: 20s}}
        jobs:
          consumer:
            target: daemon_jobs:loop_units
            loop: {{replicas: 2}}
            kwargs: {{out_dir: $OUT}}
          report:
            target: daemon_jobs:slow
            every: 100ms
            kwargs: {{seconds: 1.5, out_dir: $OUT}}
        """)
    d.wait_log("ready")
    d.wait_for(lambda: d.units() >= 4 and list(d.out.glob("slow-*.started")), what="work")
    sigterm_at = d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    runs = d.runs()
    assert runs, d.log()
    # Every run has an outcome; none is left 'running'; none started after SIGTERM.
    assert {r["outcome"] for r in runs} == {"succeeded"}, runs
    assert all(r["started"] <= sigterm_at for r in runs), runs
    loops = [r for r in runs if r["job"] == "consumer"]
    assert len(loops) == 2
    # Both replicas saw the stop event and returned on their own.
    assert len(list(d.out.glob("*.returned"))) == 2
    assert [r for r in runs if r["job"] == "report"]
    assert "drain finished" in d.log()


def test_runs_past_the_drain_budget_are_killed_with_their_grandchildren(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        shutdown: {drain_timeout: 1s}
        jobs:
          stubborn:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
        """)
    pids_file = d.out / "stubborn.pids"
    d.wait_for(pids_file.exists, what="stubborn job to start")
    worker, grandchild = (int(p) for p in pids_file.read_text().split())
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    [run] = d.runs()
    assert (run["outcome"], run["error"]) == (
        "killed",
        "killed at the drain deadline (drain_timeout 1s)",
    )
    assert "killed: 1" in d.log()
    for pid in (worker, grandchild):
        assert not _alive(pid), f"{pid} survived the drain"


def test_second_signal_is_a_fast_stop(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        shutdown: {drain_timeout: 60s}
        jobs:
          stubborn:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
        """)
    d.wait_for((d.out / "stubborn.pids").exists, what="stubborn job to start")
    d.signal(signal.SIGTERM)
    d.wait_log("draining 1 run in flight")
    d.signal(signal.SIGINT)
    assert d.wait_exit(timeout=15) == 0
    assert [(r["outcome"], r["error"]) for r in d.runs()] == [
        ("killed", "killed by a fast stop (SIGINT during the drain)")
    ]
    assert "fast stop" in d.log()


def test_ctrl_c_to_the_process_group_drains(daemon_factory):
    """A terminal's Ctrl-C reaches every process of the group: workers must ignore it."""
    d = daemon_factory("""
        pool: {workers: 2, start_method: forkserver}
        jobs:
          consumer:
            target: daemon_jobs:loop_units
            loop: {replicas: 1}
            kwargs: {out_dir: $OUT}
        """)
    d.wait_for(lambda: d.units() >= 2, what="loop units")
    os.killpg(d.pid, signal.SIGINT)
    assert d.wait_exit() == 0
    [run] = d.runs()
    assert run["outcome"] == "succeeded"
    assert len(list(d.out.glob("*.returned"))) == 1


def test_failed_runs_are_retried_with_backoff_and_logged_with_traceback(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        jobs:
          flaky:
            target: daemon_jobs:fail
            at: startup
            retry: {attempts: 2, initial: 100ms, jitter: none}
        """)
    d.wait_for(lambda: d.log().count("run failed") >= 2, what="two failed attempts")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    runs = d.runs()
    assert [(r["attempt"], r["outcome"]) for r in runs] == [(1, "failed"), (2, "failed")]
    assert runs[0]["error"] == "RuntimeError: boom"
    log = d.log()
    assert "Traceback" in log and 'raise RuntimeError("boom")' in log
    assert "flaky[" in log  # job records carry the job's name
    assert "about to fail" in log


def test_config_error_exits_78_with_file_line_col(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\njobs:\n  x:\n    target: os:getcwd\n    every: soon\n")
    proc = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "run", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert f"{bad}:5:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", ["validated", "cached"])
def test_sigkill_of_the_daemon_leaves_no_process(daemon_factory, config):
    """The forkserver is forked early in both start paths (configcache, mphelpers): it, its
    workers and their children must all go with a SIGKILLed daemon."""
    spec = """
        pool: {workers: 3, start_method: forkserver}
        jobs:
          stubborn:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
          consumer:
            target: daemon_jobs:loop_units
            loop: {replicas: 1}
            kwargs: {out_dir: $OUT}
        """
    if config == "cached":
        first = daemon_factory(spec)
        # Wait for the stubborn run to begin: a stop before it would leave no pids file to remove.
        first.wait_for((first.out / "stubborn.pids").exists, what="stubborn job to start")
        assert first.fast_stop(signal.SIGINT, signal.SIGINT) == 0  # the stubborn run is killed
        (first.out / "stubborn.pids").unlink()
    d = daemon_factory(spec)
    d.wait_for((d.out / "stubborn.pids").exists, what="stubborn job to start")
    assert ("not validated again" in d.log()) == (config == "cached")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert procs.leftovers(grace=2.0) == {}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_loop_whose_module_fails_to_import_restarts_with_growing_backoff(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        jobs:
          broken:
            target: daemon_jobs_import_breaks:loop
            loop: {replicas: 1}
            env: {BREAK_IMPORT: "1"}
            restart: always
            backoff: {initial: 100ms, factor: 2, max: 400ms, jitter: none}
        """)
    d.wait_for(lambda: d.log().count("restart in") >= 5, what="five restarts")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    delays = re.findall(r"restart in ([0-9.]+)s", d.log())[:5]
    assert delays == ["0.1", "0.2", "0.4", "0.4", "0.4"]  # doubling, capped: never a busy loop
    assert "cannot import" in d.log() and "broken on purpose" in d.log()
    assert {r["outcome"] for r in d.runs()} == {"failed"}


def test_a_failing_before_ready_job_aborts_the_start_with_exit_69(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        jobs:
          warm:
            target: daemon_jobs:fail
            at: startup
            before_ready: true
          other:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
        """)
    assert d.wait_exit() == 69
    log = d.log()
    assert "before_ready job 'warm' did not succeed (failed: RuntimeError: boom)" in log
    assert "INFO    ready" not in log  # never reported ready
    assert not (d.out / "stubborn.pids").exists()  # nothing else started before READY
    assert 'Traceback (most recent call last):\n  File "' in log  # the job's, logged once
    assert log.count("Traceback") == 1


def test_history_older_than_keep_is_pruned_at_start(daemon_factory, tmp_path):
    from poolkeeper.state.identity import store_at

    store = store_at(tmp_path / "state.db")
    now = time.time()
    for run_id, ended in (("old", now - 3 * 86400), ("recent", now - 3600)):
        store.run_ended(
            run_id=run_id,
            job="tick",
            attempt=1,
            scheduled_at=ended - 1,
            started_at=ended - 1,
            ended_at=ended,
            outcome="succeeded",
            exit_code=None,
            signal=None,
            worker_pid=1,
            error=None,
        )
    store.close()
    d = daemon_factory(
        """
        pool: {workers: 2, start_method: fork}
        jobs:
          tick:
            target: daemon_jobs:ok
            every: 1h
        """,
        keep="1d",
    )
    d.wait_log("pruned 1 run older")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert "old" not in {r["run_id"] for r in d.runs()}
    assert "recent" in {r["run_id"] for r in d.runs()}


def test_a_second_daemon_on_the_same_state_db_exits_75(daemon_factory, tmp_path):
    spec = """
        pool: {workers: 2, start_method: fork}
        jobs:
          tick:
            target: daemon_jobs:ok
            every: 1h
        """
    first = daemon_factory(spec)
    first.wait_log("INFO    ready")
    # Twice: the second time its config is cached, and its pool starts before the state lock
    # is taken (cli._run_cached); the workers it started must go with it.
    for cached in (False, True):
        second = DaemonProcess(tmp_path / "second", spec.replace("1h", "2h"), db=first.db)
        try:
            assert second.wait_exit() == 75
            assert "another poolkeeper holds the state database" in second.log()
            assert ("not validated again" in second.log()) == cached
        finally:
            second.close()
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0


def test_a_run_in_flight_when_the_daemon_was_killed_is_recorded_lost(daemon_factory):
    spec = """
        pool: {workers: 2, start_method: fork}
        jobs:
          stubborn:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
        """
    d = daemon_factory(spec)
    d.wait_for((d.out / "stubborn.pids").exists, what="stubborn job to start")
    d.wait_for(lambda: d.runs(), what="the run's start in the state DB")  # flushed <= 0.5 s
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert [r["outcome"] for r in d.runs()] == ["running"]
    (d.out / "stubborn.pids").unlink()
    again = daemon_factory(spec)
    again.wait_log("1 run of a previous daemon had no outcome: recorded as lost")
    again.wait_for((d.out / "stubborn.pids").exists, what="the new run to start")
    # The new stubborn run is killed.
    assert again.fast_stop(signal.SIGINT, signal.SIGINT, draining="draining 1 run in flight") == 0
    outcomes = [(r["outcome"], r["error"]) for r in again.runs()]
    assert outcomes[0] == ("lost", "daemon exited while the run was in flight")
    assert outcomes[1][0] == "killed"
