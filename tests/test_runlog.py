"""The run-logging policy (poolkeeper.daemon.runlog, docs/journal.md "How many lines a run
gets"): which runs get a journal line, and that what gets none is counted, per job, in a
summary line. The clock is injected: a minute at 1,000 runs/s takes no time."""

from __future__ import annotations

import itertools
import logging
import re
import signal
from collections import Counter
from collections.abc import Iterator

import pytest

from poolkeeper.config.loader import ConfigError, load_config
from poolkeeper.daemon.runlog import FAILURE_LINES, RUN_LINES, SUMMARY_LINES, RunLog, TokenBucket
from poolkeeper.outcomes import Outcome
from poolkeeper.service.logs import MESSAGE_IDS

# journald's default budget per unit and priority (before scaling with free space).
JOURNALD_BURST, JOURNALD_INTERVAL = 10_000, 30.0


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def summaries(self) -> list[logging.LogRecord]:
        return [
            r
            for r in self.records
            if getattr(r, "MESSAGE_ID", "") == MESSAGE_IDS["runs_summarised"]
        ]


@pytest.fixture
def records() -> Iterator[Records]:
    log = logging.getLogger("poolkeeper.test_runlog")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = Records()
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)


def runlog() -> RunLog:
    return RunLog(logging.getLogger("poolkeeper.test_runlog"))


class Spec:
    """What RunLog reads of a job's settings (settings.Job has the same attribute)."""

    def __init__(self, log_runs: str) -> None:
        self.log_runs = log_runs


ALL, SUMMARY, FAILURES = Spec("all"), Spec("summary"), Spec("failures")


RUN_IDS = itertools.count()


def one_run(rl: RunLog, job: str, spec, outcome: Outcome, now: float, logged: list[str]) -> None:
    """A run's start and end through the policy, as the daemon makes them: `logged` gets the
    lines that would be written."""
    run_id = f"{next(RUN_IDS):016x}"
    if rl.started(job, run_id, spec, now):
        logged.append(f"{job} started")
    if rl.ended(job, run_id, spec, outcome, now, error=f"{job} error"):
        logged.append(f"{job} {outcome}")
    rl.report(now)


def counted(records: Records, job: str, what: str) -> int:
    """The runs of `job` that its summary lines say `what` (e.g. 'succeeded', 'failed')."""
    total = 0
    for r in records.summaries():
        if getattr(r, "JOB", None) != job:
            continue
        msg = r.getMessage()
        if what == "succeeded":
            found = re.match(r"([\d,]+) runs succeeded", msg)
        else:
            found = re.search(rf"\b{what} ([\d,]+)", msg)
        total += int(found.group(1).replace(",", "")) if found else 0
    return total


def test_a_minute_at_a_thousand_runs_a_second_stays_well_under_journalds_budget(records):
    """20 jobs, 1,000 runs/s, one failure a second: every failure gets its line, the run lines
    stay far below journald's 10,000 per 30 s, and every success is either logged or counted
    in its job's summary."""
    rl = runlog()
    logged: list[str] = []
    times: list[tuple[float, int]] = []  # (when, level) of every line written
    runs: Counter[str] = Counter()
    for ms in range(60_000):
        now = ms / 1000
        before_lines, before_records = len(logged), len(records.records)
        if ms % 1000 == 500:
            one_run(rl, "boom", ALL, Outcome.FAILED, now, logged)
        else:
            job = f"noop{ms % 20:02d}"
            one_run(rl, job, ALL, Outcome.SUCCEEDED, now, logged)
            runs[job] += 1
        lines = len(logged) - before_lines + len(records.records) - before_records
        times += [(now, logging.INFO)] * lines
    rl.report(60.0, final=True)

    assert logged.count("boom failed") == 60
    # Per 30 s window: at most the burst, the refill and the summaries.
    run_rate, run_burst = RUN_LINES
    for start in range(0, 31):
        in_window = sum(1 for t, _ in times if start <= t < start + JOURNALD_INTERVAL)
        assert in_window <= run_burst + run_rate * JOURNALD_INTERVAL + 3 * 2 * (SUMMARY_LINES + 1)
        assert in_window < JOURNALD_BURST / 2
    for i in range(20):
        job = f"noop{i:02d}"
        ok_lines = logged.count(f"{job} succeeded")
        assert ok_lines + counted(records, job, "succeeded") == runs[job]
        assert logged.count(f"{job} started") == ok_lines  # never half a run
    summary = next(r for r in records.summaries() if r.JOB.startswith("noop"))
    assert summary.levelno == logging.INFO
    assert re.fullmatch(
        r"[\d,]+ runs succeeded in the last 10s without lines of their own: per-run lines are "
        r"capped at 100/s for the unit \(50 runs/s\) and resume below that",
        summary.getMessage(),
    ), summary.getMessage()


def test_successes_get_their_lines_again_once_the_rate_falls(records):
    rl = runlog()
    logged: list[str] = []
    now = 0.0
    for _ in range(5000):  # a burst: 2 lines per run, the budget runs out after 500 runs
        one_run(rl, "job", ALL, Outcome.SUCCEEDED, now, logged)
    assert len(logged) == RUN_LINES[1]
    logged.clear()
    for _ in range(100):  # then 10 runs/s for 10 s: 20 lines/s, under the refill
        now += 0.1
        one_run(rl, "job", ALL, Outcome.SUCCEEDED, now, logged)
    assert logged[-20:] == ["job started", "job succeeded"] * 10


def test_a_failure_storm_is_capped_and_summarised_with_the_last_error(records):
    rl = runlog()
    logged: list[str] = []
    rate, burst = FAILURE_LINES
    for i in range(10_000):  # 10,000 failures in 1 s
        now = i / 10_000
        outcome = Outcome.TIMEOUT if i % 100 == 0 else Outcome.FAILED
        one_run(rl, "storm", FAILURES, outcome, now, logged)
    rl.report(1.0, final=True)
    failed_lines = len(logged)
    assert burst <= failed_lines <= burst + rate * 1.0 + 1
    (summary,) = [r for r in records.summaries() if r.levelno == logging.ERROR]
    msg = summary.getMessage()
    assert summary.JOB == "storm"
    assert counted(records, "storm", "failed") + counted(records, "storm", "timeout") == (
        10_000 - failed_lines
    )
    assert "did not succeed in the last 1s without lines of their own (failed " in msg
    assert ", timeout " in msg
    assert "the last error: storm error" in msg and "`poolkeeper history` lists them" in msg


def test_killed_runs_alone_are_summarised_as_a_warning(records):
    rl = RunLog(logging.getLogger("poolkeeper.test_runlog"), failure_lines=(1.0, 1))
    assert rl.ended("j", "r1", ALL, Outcome.KILLED, 0.0)
    assert not rl.ended("j", "r2", ALL, Outcome.KILLED, 0.0)
    rl.report(0.0, final=True)
    (summary,) = records.summaries()
    assert summary.levelno == logging.WARNING
    assert summary.getMessage() == (
        "1 run did not succeed in the last 0s without a line of its own (killed 1): over the "
        "unit's 1 lines/s for runs that did not succeed; `poolkeeper history` lists them"
    )


def test_successes_cannot_crowd_out_failures(records):
    """The failure lines have a budget of their own: a flood of successes leaves it whole."""
    rl = runlog()
    logged: list[str] = []
    for i in range(100_000):
        one_run(rl, "flood", ALL, Outcome.SUCCEEDED, i / 100_000, logged)
    for outcome in (Outcome.FAILED, Outcome.TIMEOUT, Outcome.LOST, Outcome.KILLED):
        assert rl.ended("other", f"other-{outcome}", ALL, outcome, 1.0, "why")


def test_log_runs_summary_counts_and_failures_drops_the_successes(records):
    rl = runlog()
    logged: list[str] = []
    for i in range(30):
        now = i * 0.5
        one_run(rl, "counted", SUMMARY, Outcome.SUCCEEDED, now, logged)
        one_run(rl, "quiet", FAILURES, Outcome.SUCCEEDED, now, logged)
    one_run(rl, "counted", SUMMARY, Outcome.FAILED, 15.0, logged)
    one_run(rl, "quiet", FAILURES, Outcome.LOST, 15.0, logged)
    # Only the failures have lines; they are not counted again.
    assert logged == ["counted failed", "quiet lost"]
    rl.report(15.0, final=True)
    messages = {(r.JOB, r.getMessage()) for r in records.summaries()}
    # The first summary came at 10 s (the runs at 0, 0.5, ... 10), the final one at 15 s.
    assert messages == {
        ("counted", "21 runs succeeded in the last 10s (log_runs: summary)"),
        ("counted", "9 runs succeeded in the last 5s (log_runs: summary)"),
    }


def test_summaries_come_every_ten_seconds_and_only_with_something_to_say(records):
    rl = runlog()
    rl.report(0.0)
    assert not rl.started("a", "r1", SUMMARY, 0.0)
    rl.ended("a", "r1", SUMMARY, Outcome.SUCCEEDED, 1.0)
    rl.report(10.9)
    assert records.summaries() == []
    rl.report(11.0)
    assert len(records.summaries()) == 1
    rl.report(30.0)
    rl.report(60.0, final=True)  # nothing counted since: nothing to say
    assert len(records.summaries()) == 1


def test_the_summary_of_many_jobs_is_bounded_failures_first(records):
    rl = RunLog(logging.getLogger("poolkeeper.test_runlog"), run_lines=(1.0, 0), summary_lines=10)
    for i in range(500):
        rl.ended(f"job{i:03d}", f"r{i}", SUMMARY, Outcome.SUCCEEDED, 1.0)
    rl.failure_lines.tokens = 0
    rl.ended("job499", "r500", SUMMARY, Outcome.FAILED, 1.0, "bad")
    rl.report(2.0, final=True)
    lines = records.summaries()
    assert len(lines) == 11
    assert lines[0].JOB == "job499" and lines[0].levelno == logging.ERROR
    rest = lines[-1]
    assert not hasattr(rest, "JOB")
    assert rest.getMessage() == (
        "491 more jobs: 491 runs succeeded in the last 1s (summed up: `poolkeeper history` "
        "lists them)"
    )


def test_a_removed_job_gets_the_default():
    rl = runlog()
    assert rl.started("gone", "r1", None, 0.0)
    assert rl.ended("gone", "r1", None, Outcome.SUCCEEDED, 0.0)


def test_the_bucket_refills_at_its_rate_and_not_when_the_clock_goes_back():
    bucket = TokenBucket(8.0, 2)  # times in binary fractions: exact sums
    assert bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)
    assert not bucket.take(100.0625)  # half a token
    assert bucket.take(100.125)
    assert not bucket.take(50.0)  # back in time: no refill
    assert bucket.take(100.25)
    assert not bucket.take(100.25)
    assert bucket.take(1000.0) and bucket.take(1000.0) and not bucket.take(1000.0)  # capped
    assert not bucket.take(1000.125, 2.0) and bucket.take(1000.25, 2.0)  # a run's two lines


# -- the setting ----------------------------------------------------------------------------


def _load(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text("version: 1\n" + text)
    return load_config(path, import_targets=False)


def test_log_runs_defaults_to_all_and_defaults_can_set_it(tmp_path):
    config = _load(
        tmp_path,
        "defaults: {log_runs: summary}\njobs:\n"
        "  a: {target: 'os:getcwd', every: 1s}\n"
        "  b: {target: 'os:getcwd', every: 1s, log_runs: failures}\n"
        "  c: {target: 'os:getcwd', loop: {}, log_runs: all}\n",
    )
    assert {n: j.log_runs for n, j in config.jobs.items()} == {
        "a": "summary",
        "b": "failures",
        "c": "all",
    }
    plain = _load(tmp_path, "jobs:\n  a: {target: 'os:getcwd', every: 1s}\n")
    assert plain.jobs["a"].log_runs == "all"


def test_a_wrong_log_runs_names_the_spot_and_the_choices(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(
            tmp_path, "jobs:\n  a:\n    target: 'os:getcwd'\n    every: 1s\n    log_runs: sumary\n"
        )
    message = str(caught.value)
    assert message == (
        f"{tmp_path / 'spec.yaml'}:6:15: log_runs: 'sumary' is not one of: all, summary, "
        "failures (did you mean 'summary'?)"
    )


# -- the daemon -----------------------------------------------------------------------------


def test_the_daemon_logs_per_the_setting_and_counts_the_rest_at_stop(daemon_factory):
    """A real daemon: `log_runs: failures` leaves no line for a success, `summary` counts them
    in a line at stop, and every failure has its line in every mode."""
    d = daemon_factory("""
        pool: {workers: 2, start_method: fork}
        jobs:
          quiet: {target: 'daemon_jobs:ok', every: 20ms, log_runs: failures}
          counted: {target: 'daemon_jobs:ok', every: 20ms, log_runs: summary}
          loud: {target: 'daemon_jobs:fail', every: 100ms, log_runs: failures}
        """)
    d.wait_for(lambda: d.log().count("run failed") >= 3, what="three failed runs")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    log = d.log()
    runs = d.runs()
    succeeded = {job: sum(1 for r in runs if r["job"] == job) for job in ("quiet", "counted")}
    assert succeeded["quiet"] > 0 and succeeded["counted"] > 0
    assert "quiet[" not in log and "counted[" not in log  # no per-run line
    summarised = re.findall(r"counted ([\d,]+) runs? succeeded in the last \d+s", log)
    assert sum(int(n.replace(",", "")) for n in summarised) == succeeded["counted"]
    failed = [r for r in runs if r["job"] == "loud"]
    assert log.count("run failed") == len(failed)
    for run in failed:
        assert f"loud[{run['run_id'][:8]}] run failed in " in log
