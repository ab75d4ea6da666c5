"""What `make run` shows, read as a user reads it: each run's `run started` line comes before
the first line the job prints, the drain's line before what the runs say as they stop, and
the drain lines are good English for one run."""

from __future__ import annotations

import math
import re
import signal


def test_run_started_comes_before_the_jobs_first_line(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: forkserver}
        jobs:
          chatty:
            target: daemon_jobs:say_hello
            every: 50ms
        """)
    d.wait_for(lambda: d.log().count("hello from run ") >= 40, timeout=60, what="40 runs")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    lines = d.log().splitlines()
    started = {}
    for i, line in enumerate(lines):
        found = re.search(r" chatty\[(\w{8})\] run started ", line)
        if found:
            started[found[1]] = i
    said = [(i, line.split()[-1]) for i, line in enumerate(lines) if "hello from run " in line]
    assert len(said) >= 40
    late = [lines[i] for i, run in said if started.get(run, math.inf) > i]
    assert late == [], "a job's line came before its 'run started' line"


def test_the_drain_lines_count_in_good_english(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        shutdown: {drain_timeout: 30s}
        jobs:
          consumer:
            target: daemon_jobs:loop_says_bye
            loop: {replicas: 1}
        """)
    d.wait_log("the loop runs")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    log = d.log()
    draining = (
        "SIGTERM: draining 1 run in flight (1 loop replica) within 30s; "
        "0 waiting runs will not start"
    )
    assert draining in log
    # The daemon says it drains before the runs react to it.
    assert log.index(draining) < log.index("the loop saw the drain")
    assert re.search(
        r"drain finished in [\d.]+s: 1 run in flight; drained: 1 succeeded; killed: 0", log
    )


def test_the_drain_line_comes_before_what_the_runs_say_as_they_stop(daemon_factory):
    """Six loop replicas, each woken by the drain: none may speak before the daemon says it
    drains (it used to set ctx.stopping first, then write its line)."""
    d = daemon_factory("""
        pool: {workers: 7, start_method: fork}
        jobs:
          consumer:
            target: daemon_jobs:loop_says_bye
            loop: {replicas: 6}
        """)
    d.wait_for(lambda: d.log().count("the loop runs") == 6, what="6 loop replicas")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    log = d.log()
    assert log.count("the loop saw the drain") == 6
    draining = "SIGTERM: draining 6 runs in flight (6 loop replicas) within 30s"
    assert log.index(draining) < log.index("the loop saw the drain")
