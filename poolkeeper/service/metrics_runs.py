"""The figures of runs (poolkeeper.service.metrics): counted by the main loop in plain Python
objects, turned into prometheus_client metric families only when someone reads them.

Why not prometheus_client's Counter and Histogram objects: each update takes a lock, and a
histogram's observe() walks its buckets in Python; at thousands of runs a second that was a
tenth of the main loop's time per run (bench/bench_metrics.py). Here a run costs a dict lookup,
two increments and a bisect. The library still renders every family (no hand-written
exposition): this is its documented custom-collector interface.

The scrape and textfile threads read while the loop writes. What they copy is copied whole
(a list slice, a dict's items, under the GIL), and a histogram's count is the sum of its
copied buckets, so what they render is always consistent; at worst a run behind.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from poolkeeper.outcomes import Outcome

if TYPE_CHECKING:
    from poolkeeper.pool.protocol import RunEnded

# Jobs run from milliseconds to hours: buckets from 10 ms to 2 h, a few per decade.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200)
# How late a fire starts, from 1 ms (a busy loop) to 5 min (a pool full for minutes).
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300)
_OUTCOMES = list(Outcome)
_INDEX = {outcome: i for i, outcome in enumerate(_OUTCOMES)}


class JobFigures:
    """One job's: runs by outcome (in _OUTCOMES order), durations by bucket (the last one
    +Inf, not cumulative), their sum, and when its last success and failure ended."""

    __slots__ = ("outcomes", "buckets", "total", "last_success", "last_failure")

    def __init__(self) -> None:
        self.outcomes = [0] * len(_OUTCOMES)
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0
        self.last_success: float | None = None
        self.last_failure: float | None = None


class RunFigures(Collector):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs: dict[str, JobFigures] = {}
        self.late_buckets = [0] * (len(LATENESS_BUCKETS) + 1)
        self.late_total = 0.0

    def job(self, name: str) -> JobFigures:
        """A job's figures, every outcome at 0 from its first mention (a series born at 1
        shows no increase(): the first failure would go unseen)."""
        figures = self.jobs.get(name)
        if figures is None:
            figures = self.jobs[name] = JobFigures()
        return figures

    def ended(self, ev: RunEnded) -> None:
        """A run ended: its outcome, duration and, for the first attempt of a scheduled
        run, its lateness (counted here rather than at its start: one call per run on the
        main loop's path, and the run's record is complete). Written for speed: locals,
        one dict lookup, bisect in C."""
        task, outcome, started = ev.task, ev.outcome, ev.started_at
        figures = self.jobs.get(task.job)
        if figures is None:
            figures = self.job(task.job)
        figures.outcomes[_INDEX[outcome]] += 1
        if started is not None:
            took = max(0.0, ev.ended_at - started)
            figures.buckets[bisect_left(DURATION_BUCKETS, took)] += 1
            figures.total += took
            if task.attempt == 1 and not task.loop and task.scheduled_at > 0:
                late = max(0.0, started - task.scheduled_at)
                self.late_buckets[bisect_left(LATENESS_BUCKETS, late)] += 1
                self.late_total += late
        if outcome is Outcome.SUCCEEDED:
            figures.last_success = ev.ended_at
        elif outcome.failure:
            figures.last_failure = ev.ended_at

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        runs = CounterMetricFamily(
            f"{p}_runs", "Runs ended, by job and outcome.", labels=["job", "outcome"]
        )
        durations = HistogramMetricFamily(
            f"{p}_run_duration_seconds", "How long runs took, by job.", labels=["job"]
        )
        success = GaugeMetricFamily(
            f"{p}_job_last_success_timestamp_seconds",
            "When the job's last successful run ended (Unix time).",
            labels=["job"],
        )
        failure = GaugeMetricFamily(
            f"{p}_job_last_failure_timestamp_seconds",
            "When the job's last failed run (failed, timeout, lost) ended (Unix time).",
            labels=["job"],
        )
        for name, figures in list(self.jobs.items()):
            outcomes, buckets, total = figures.outcomes[:], figures.buckets[:], figures.total
            for outcome, n in zip(_OUTCOMES, outcomes, strict=True):
                runs.add_metric([name, outcome], n)
            if any(buckets):
                durations.add_metric([name], _cumulative(buckets, DURATION_BUCKETS), total)
            if figures.last_success is not None:
                success.add_metric([name], figures.last_success)
            if figures.last_failure is not None:
                failure.add_metric([name], figures.last_failure)
        lateness = HistogramMetricFamily(
            f"{p}_run_lateness_seconds",
            "How late scheduled runs started: started minus scheduled (jitter included; "
            "first attempts of every/cron/at jobs; counted when the run ends).",
        )
        late, late_total = self.late_buckets[:], self.late_total
        lateness.add_metric([], _cumulative(late, LATENESS_BUCKETS), late_total)
        yield from (runs, durations, lateness, success, failure)


def _cumulative(counts: list[int], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one +Inf) as the text format's cumulative `le` buckets."""
    out, running = [], 0
    for bound, n in zip([*bounds, float("inf")], counts, strict=True):
        running += n
        out.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
    return out
