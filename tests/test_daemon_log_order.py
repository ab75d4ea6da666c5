"""What `make run` shows, read as a user reads it: each run's `run started` line comes before
the first line the job prints, and the drain lines are good English for one run."""

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
            target: daemon_jobs:loop_units
            loop: {replicas: 1}
            kwargs: {out_dir: $OUT}
        """)
    d.wait_for(lambda: d.units() >= 1, what="a loop unit")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    log = d.log()
    assert (
        "SIGTERM: draining 1 run in flight (1 loop replica) within 30s; "
        "0 waiting runs will not start" in log
    )
    assert re.search(
        r"drain finished in [\d.]+s: 1 run in flight; drained: 1 succeeded; killed: 0", log
    )
