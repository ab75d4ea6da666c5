"""The daemon's early forkserver (helper_processes.prestart_forkserver): a fork of the main process
while it is single-threaded, multiprocessing's own spawned forkserver otherwise; workers
started through either run jobs, and nothing outlives the pool."""

from __future__ import annotations

import os
import threading
import time
from multiprocessing import forkserver

import pytest

from poolkeeper.pool import helper_processes
from poolkeeper.pool.supervisor import Task


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


@pytest.fixture
def prestarted():
    assert not helper_processes.forkserver_running()
    yield
    helper_processes.stop_prestarted()


def _runs_a_job(make_pool) -> None:
    d = make_pool("forkserver")
    ended = d.run([Task(run_id="r", job="j", target="jobs_for_tests:add", args=(2, 3))])
    assert (ended["r"].outcome, ended["r"].result_repr) == ("succeeded", "5")


def test_single_threaded_the_forkserver_is_a_fork_of_this_process(prestarted, make_pool):
    assert threading.active_count() == 1
    helper_processes.prestart_forkserver([])
    pid = forkserver._forkserver._forkserver_pid
    assert _cmdline(pid) == _cmdline(os.getpid())  # forked, not exec'd
    _runs_a_job(make_pool)
    assert forkserver._forkserver._forkserver_pid == pid  # the pool used it


def test_with_another_thread_the_forkserver_is_a_new_interpreter(prestarted, make_pool):
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        helper_processes.prestart_forkserver([])
    finally:
        stop.set()
        thread.join()
    pid = forkserver._forkserver._forkserver_pid
    # Its command line is the parent's (or empty) until the exec is done: wait for it.
    deadline = time.monotonic() + 10
    while b"multiprocessing.forkserver" not in _cmdline(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"from multiprocessing.forkserver import main" in _cmdline(pid)
    _runs_a_job(make_pool)
