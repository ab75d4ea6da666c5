"""The SQLite store's writer thread (flush(wait=False)) on real files: what a crash leaves,
write errors, close. The promises themselves are in test_state_contract.py."""

from __future__ import annotations

import logging
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

from poolkeeper.state.sqlite import SqliteStore
from poolkeeper.state.store import ABANDONED_ERROR

T0 = 1_700_000_000.0

_CRASH = textwrap.dedent(
    """
    import os, sys
    from poolkeeper.state.sqlite import SqliteStore
    path, n = sys.argv[1], int(sys.argv[2])
    s = SqliteStore(path)
    s.open()
    def run(i, ended):
        s.run_started(run_id=i, job="j", attempt=1, scheduled_at=1.0, started_at=1.0,
                      worker_pid=7)
        if ended:
            s.run_ended(run_id=i, job="j", attempt=1, scheduled_at=1.0, started_at=1.0,
                        ended_at=2.0, outcome="succeeded")
    run("flushed-done", True)
    run("flushed-running", False)
    s.flush()  # written
    for i in range(n):  # handed to the writer thread...
        run(f"handed-{i}", True)
    s.flush(wait=False)
    run("buffered", True)  # ...and this only buffered when the daemon dies
    os._exit(9)
    """
)


def test_a_crash_loses_only_what_was_not_written_and_each_batch_whole(tmp_path):
    path = tmp_path / "state.db"
    n = 10_000  # below the store's batch: no forced flush in between
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(path), str(n)], timeout=60)
    assert proc.returncode == 9
    s = SqliteStore(path)
    s.open()
    try:
        assert s.mark_abandoned(T0) == 1
        recs = {r.run_id: r for r in s.history(limit=None)}
        assert recs.pop("flushed-done").outcome == "succeeded"
        lost = recs.pop("flushed-running")
        assert (lost.outcome, lost.error) == ("lost", ABANDONED_ERROR)
        # the handed-over batch is one transaction: all of it or none of it
        assert set(recs) in (set(), {f"handed-{i}" for i in range(n)})
        assert all(r.outcome == "succeeded" for r in recs.values())
    finally:
        s.close()


def test_a_write_error_behind_the_loops_back_is_logged_once_and_never_raises(tmp_path, caplog):
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    s.open()
    with sqlite3.connect(path) as other:
        other.execute("DROP TABLE runs")
    with caplog.at_level(logging.ERROR, logger="poolkeeper.state.sqlite"):
        for i in range(3):
            s.run_started(run_id=i, job="j", attempt=1, scheduled_at=1.0, started_at=1.0,
                          worker_pid=7)  # fmt: skip
            s.flush(wait=False)
        s.flush()
    failures = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].threadName == "poolkeeper-state-writer"
    s.close()


def test_the_writer_thread_gives_the_switch_interval_back(tmp_path):
    # It shortens the GIL's switch interval while it writes (the loop's thread must not wait
    # 5 ms for the GIL after each system call); the process's setting is back afterwards.
    before = sys.getswitchinterval()
    s = SqliteStore(tmp_path / "state.db")
    s.open()
    try:
        for i in range(3000):
            s.run_started(run_id=i, job="j", attempt=1, scheduled_at=1.0, started_at=1.0,
                          worker_pid=7)  # fmt: skip
        s.flush(wait=False)
        s.flush()  # waits for the writer thread's batch
        assert sys.getswitchinterval() == before
        assert len(s.history(limit=None)) == 3000
    finally:
        s.close()


def test_close_stops_the_writer_thread(tmp_path):
    s = SqliteStore(tmp_path / "state.db")
    s.open()
    s.run_started(run_id=1, job="j", attempt=1, scheduled_at=1.0, started_at=1.0, worker_pid=7)
    s.flush(wait=False)
    s.close()
    assert not [t for t in threading.enumerate() if t.name == "poolkeeper-state-writer"]
    s.close()  # idempotent
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT run_id, outcome FROM runs").fetchall() == [("1", "running")]


def test_a_fork_waits_for_the_transaction_in_progress(tmp_path):
    # A worker started by fork while the writer thread is inside SQLite would inherit
    # SQLite's locked mutexes: a job there using sqlite3 would hang. The fork happens
    # between two transactions instead, and sqlite3 works in the child.
    import os

    s = SqliteStore(tmp_path / "state.db")
    s.open()
    try:
        for round_ in range(20):
            for i in range(2000):
                s.run_started(run_id=f"{round_}-{i}", job="j", attempt=1, scheduled_at=1.0,
                              started_at=1.0, worker_pid=7)  # fmt: skip
            s.flush(wait=False)
            pid = os.fork()
            if pid == 0:  # the child: sqlite3 must work, and at once
                code = 1
                try:
                    with sqlite3.connect(":memory:") as conn:
                        conn.execute("CREATE TABLE t (x)")
                        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
                        code = 0
                finally:
                    os._exit(code)
            pidfd = os.pidfd_open(pid)
            try:
                exited = select.select([pidfd], [], [], 30)[0]
            finally:
                os.close(pidfd)
            if not exited:  # hung in SQLite: fail, and reap it
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            assert exited and os.waitstatus_to_exitcode(status) == 0
        s.flush()
        assert len(s.history(limit=None)) == 40_000
    finally:
        s.close()
