"""Every kind of schedule, run by the real daemon; outcomes read from its SQLite history.

Assertions are about what was recorded (which runs, when they were scheduled, whether two
runs of a job overlapped), never about how long something took."""

from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest
from daemon_harness import DaemonProcess

from poolkeeper.state.identity import store_at


def _down_since(tmp_path, job: str, seconds: float) -> None:
    """The state of a daemon that last fired `job` `seconds` ago and then stopped."""
    store = store_at(tmp_path / "state.db")
    store.set_last_fire(job, time.time() - seconds)
    store.close()


def _stop(d: DaemonProcess) -> list[dict]:
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    return d.runs()


def test_cron_job_catches_up_once_after_downtime_in_its_time_zone(daemon_factory, tmp_path):
    # The daemon was down for the last three fires of an every-minute cron job.
    _down_since(tmp_path, "minutely", 200)
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        jobs:
          minutely:
            target: daemon_jobs:ok
            cron: "* * * * *"
            timezone: Asia/Kolkata
            catchup: once
        """)
    d.wait_log("run succeeded")
    [run] = _stop(d)
    # One run for everything missed, scheduled at the latest missed minute (Kolkata is
    # UTC+5:30, so minutes there are minutes here too).
    scheduled = datetime.fromtimestamp(run["scheduled"])
    assert scheduled.second == 0 and scheduled.microsecond == 0
    assert time.time() - 60 <= run["scheduled"] <= time.time()
    assert run["outcome"] == "succeeded"


def test_cron_job_without_catchup_does_not_run_for_missed_fires(daemon_factory, tmp_path):
    _down_since(tmp_path, "minutely", 200)
    started = time.time()
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        jobs:
          minutely:
            target: daemon_jobs:ok
            cron: "* * * * *"
          beacon:
            target: daemon_jobs:ok
            at: startup
        """)
    d.wait_log("run succeeded")  # the beacon: the daemon is up and dispatching
    runs = _stop(d)
    assert [r["job"] for r in runs].count("beacon") == 1
    # Only fires after the start count (one may come if the test crosses a minute).
    assert all(r["scheduled"] >= started for r in runs if r["job"] == "minutely"), runs


def test_at_an_iso_datetime_fires_once_at_that_time(daemon_factory):
    when = datetime.fromtimestamp(int(time.time()) + 2).isoformat()
    d = daemon_factory(f"""
        pool: {{workers: 2, start_method: fork}}
        jobs:
          once:
            target: daemon_jobs:ok
            at: "{when}"
        """)
    d.wait_log("run succeeded")
    [run] = _stop(d)
    assert run["scheduled"] == datetime.fromisoformat(when).timestamp()
    assert run["started"] >= run["scheduled"]


@pytest.mark.parametrize(
    ("overlap", "max_concurrent", "expect_overlap"),
    [("skip", 1, False), ("queue", 1, False), ("allow", 2, True)],
)
def test_overlap_policy(daemon_factory, overlap, max_concurrent, expect_overlap):
    limit = f"max_concurrent: {max_concurrent}" if overlap == "allow" else ""
    d = daemon_factory(f"""
        pool: {{workers: 3, start_method: fork}}
        jobs:
          slow:
            target: daemon_jobs:hold
            every: 100ms
            kwargs: {{seconds: 0.4}}
            overlap: {overlap}
            {limit}
        """)
    d.wait_for(lambda: d.log().count("run succeeded") >= 4, what="four runs")
    runs = [r for r in _stop(d) if r["outcome"] == "succeeded"]
    runs.sort(key=lambda r: r["started"])
    overlapping = [
        (a["run_id"], b["run_id"])
        for a, b in zip(runs, runs[1:], strict=False)
        if b["started"] < a["ended"]
    ]
    most_at_once = max(
        sum(1 for r in runs if r["started"] <= t < r["ended"]) for t in (r["started"] for r in runs)
    )
    assert bool(overlapping) == expect_overlap, runs
    assert most_at_once <= max_concurrent
    if overlap == "queue":
        # A fire that came while a run was going waited for it: runs follow each other
        # back to back instead of being dropped until the next fire.
        gaps = [b["started"] - a["ended"] for a, b in zip(runs, runs[1:], strict=False)]
        assert min(gaps) < 0.1
