"""How many journal lines a run gets: the run-logging policy (docs/journal.md, "How many lines a
run gets").

journald rate-limits each unit, per priority (by default 10,000 messages per 30 s, scaled up
with free space) and, once over, drops the unit's lines blindly: at a few thousand runs/s the
daemon's own reload, drain and worker lines went with the flood. So the daemon holds its run
lines well under that budget itself, and says what it left out:

- a run's start and end lines, per the job's `log_runs:` setting:
  `all` (the default): both lines, for as many runs as the unit's run-line budget allows
  (RUN_LINES: a burst of 1,000 lines, then 100 lines/s, i.e. 50 runs/s); a run whose start got
  its line gets its end line too, so the journal never shows half a run; the successes of the
  other runs are counted per job;
  `summary`: no per-run lines for successes, counted per job; `failures`: none, not counted;
- every run that did not succeed (failed, timeout, lost, killed) and got no start line gets its
  end line, with the error and traceback, from a budget of its own (FAILURE_LINES: a burst of
  1,000, then 100 lines/s for the whole unit), in every mode; only a storm beyond that is
  counted instead, per job, with the last error;
- every SUMMARY_EVERY seconds, one line per job with anything counted, carrying the job's JOB=
  field (so `journalctl JOB=x` shows it) and MESSAGE_ID `runs_summarised`; at most
  SUMMARY_LINES of them per summary, failures first and then the busiest, and one line for the
  rest;
- the daemon's own events (ready, reload, drain, worker replaced, ...) are not runs: they are
  logged where they happen, always, and the budgets above leave them journald's room.

Worst case per 30 s and priority: at INFO 1,000 + 30 x 100 run lines and 3 x (SUMMARY_LINES + 1)
summaries, about 4,300 of journald's 10,000; at ERROR (the ends of lined runs that failed, the
failure budget, summaries) about 2,000 + 4,000 + 300 = 6,300. The daemon's events and the jobs'
own lines keep the rest. Every run is in the state DB (`poolkeeper history`) whatever the journal got.

Decisions take the clock (`now`, monotonic seconds) as an argument: tested without sleeping. The
cost per run is O(1); `report()` is called every turn and returns at once between summaries.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from poolkeeper.outcomes import Outcome
from poolkeeper.service.logs import event

if TYPE_CHECKING:
    from poolkeeper.config.settings import Job

LOG_RUNS = ("all", "summary", "failures")  # the values of `log_runs:`, the default first
DEFAULT_LOG_RUNS = "all"
RUN_LINES = (100.0, 1000)  # (lines/s, burst): starts and successes of `log_runs: all` jobs
FAILURE_LINES = (100.0, 1000)  # (lines/s, burst): runs that did not succeed, every job
SUMMARY_EVERY = 10.0
SUMMARY_LINES = 100  # per-job summary lines per summary; the rest share one line


class TokenBucket:
    """`rate` tokens a second up to `burst`; take() spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now  # None: the first take() starts the clock, full

    def take(self, now: float, tokens: float = 1.0) -> bool:
        if self.last is None:
            self.last = now
        elif now > self.last:  # a clock that went back refills nothing
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens >= tokens:
            self.tokens -= tokens
            return True
        return False


class _Held:
    """What one job's lines did not say since the last summary."""

    __slots__ = ("over_budget", "by_setting", "failures", "failure_count", "last_error")

    def __init__(self) -> None:
        self.over_budget = 0  # successes of runs started over the run-line budget
        self.by_setting = 0  # successes of `log_runs: summary`
        self.failures: Counter[Outcome] = Counter()  # over the failure-line budget
        self.failure_count = 0  # sum(failures.values()), kept: the summary orders jobs by it
        self.last_error: str | None = None

    @property
    def runs(self) -> int:
        return self.over_budget + self.by_setting + self.failure_count

    def rank(self) -> tuple[int, int]:
        """Failures first, then the busiest jobs (the smallest rank is summarised first)."""
        return (-self.failure_count, -self.runs)


def mode_of(spec: Job | None) -> str:
    """A job's `log_runs:`; a run whose job is gone (removed by a reload) gets the default."""
    return spec.log_runs if spec is not None else DEFAULT_LOG_RUNS


class RunLog:
    """Decides, run by run, whether a start or end gets its line (`started`, `ended`), counts
    what does not, and logs the per-job summaries (`report`)."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        run_lines: tuple[float, int] = RUN_LINES,
        failure_lines: tuple[float, int] = FAILURE_LINES,
        summary_every: float = SUMMARY_EVERY,
        summary_lines: int = SUMMARY_LINES,
    ) -> None:
        self.log = log
        self.run_lines = TokenBucket(*run_lines)
        self.failure_lines = TokenBucket(*failure_lines)
        self.summary_every = summary_every
        self.summary_lines = summary_lines
        self.held: dict[str, _Held] = {}
        # Runs in flight whose start got its line: their end gets one too (its token was
        # taken with the start's), so the journal never shows half a run.
        self.lined: set[str] = set()
        self.since: float | None = None  # start of the summary's window: the last summary
        self.next_summary: float | None = None

    def _held(self, job: str, now: float) -> _Held:
        if self.next_summary is None:
            self.next_summary = now + self.summary_every
            # The window goes on from the last summary, unless that was long ago.
            if self.since is None or now - self.since > self.summary_every:
                self.since = now
        held = self.held.get(job)
        if held is None:
            held = self.held[job] = _Held()
        return held

    def started(self, job: str, run_id: str, spec: Job | None, now: float) -> bool:
        """Whether this run's start gets its line (and so its end, whatever the outcome)."""
        if mode_of(spec) == "all" and self.run_lines.take(now, 2.0):  # the end's line too
            self.lined.add(run_id)
            return True
        return False

    def ended(
        self,
        job: str,
        run_id: str,
        spec: Job | None,
        outcome: Outcome,
        now: float,
        error: str | None = None,
    ) -> bool:
        """Whether this run's end gets its line."""
        if run_id in self.lined:
            self.lined.discard(run_id)
            return True
        if outcome != Outcome.SUCCEEDED:
            if self.failure_lines.take(now):
                return True
            held = self._held(job, now)
            held.failures[outcome] += 1
            held.failure_count += 1
            held.last_error = error or held.last_error
            return False
        mode = mode_of(spec)
        if mode == "all":
            self._held(job, now).over_budget += 1
        elif mode == "summary":
            self._held(job, now).by_setting += 1
        return False

    def report(self, now: float, final: bool = False) -> None:
        """Log the summaries when they are due (every `summary_every`), or now if `final`."""
        if self.next_summary is None or (now < self.next_summary and not final):
            return
        for level, message, extra in self.summaries(now):
            # No args: the journal handler would copy them into CODE_ARGS.
            self.log.log(level, message, extra=extra)

    def summaries(self, now: float) -> list[tuple[int, str, dict[str, Any]]]:
        """(level, message, extra) of each summary line, and a fresh window."""
        window = now - (self.since if self.since is not None else now)
        held, self.held = self.held, {}
        self.since, self.next_summary = now, None
        last = f"in the last {window:.0f}s"
        # Failures first, then the busiest jobs: the first `summary_lines` by a partial sort
        # (heapq.nsmallest), not all of them (20 ms of the loop for 10,000 jobs every 10 s).
        top = heapq.nsmallest(
            self.summary_lines, held.items(), key=lambda kv: (kv[1].rank(), kv[0])
        )
        shown = {job for job, _ in top}
        rest = [h for job, h in held.items() if job not in shown]
        lines: list[tuple[int, str, dict[str, Any]]] = []
        for i, (job, h) in enumerate(top):
            if len(lines) >= self.summary_lines:  # a job may take two lines
                rest += [h for _, h in top[i:]]
                break
            extra = event("runs_summarised", JOB=job)
            if h.failures:
                text = f"{_failures(h.failures, last)}: over the unit's "
                text += f"{self.failure_lines.rate:g} lines/s for runs that did not succeed"
                if h.last_error:
                    text += f"; the last error: {h.last_error}"
                text += "; `poolkeeper history` lists them"
                lines.append((_level(h.failures), text, extra))
            succeeded = h.over_budget + h.by_setting
            if h.over_budget:
                text = f"{_runs(succeeded)} succeeded {last} {_unlined(succeeded)}: "
                text += f"per-run lines are capped at {self.run_lines.rate:g}/s for the unit "
                text += f"({self.run_lines.rate / 2:g} runs/s) and resume below that"
                lines.append((logging.INFO, text, extra))
            elif h.by_setting:
                text = f"{_runs(succeeded)} succeeded {last} (log_runs: summary)"
                lines.append((logging.INFO, text, extra))
        if rest:
            failures: Counter[Outcome] = Counter()
            for h in rest:
                if h.failure_count:
                    failures.update(h.failures)
            succeeded = sum(h.over_budget + h.by_setting for h in rest)
            parts = [f"{_runs(succeeded)} succeeded {last}"] if succeeded else []
            if failures:
                parts.append(_failures(failures, last))
            text = f"{len(rest):,} more jobs: {'; '.join(parts)}"
            text += " (summed up: `poolkeeper history` lists them)"
            level = _level(failures) if failures else logging.INFO
            lines.append((level, text, event("runs_summarised")))
        return lines


def _runs(n: int) -> str:
    return f"{n:,} run" if n == 1 else f"{n:,} runs"


def _unlined(n: int) -> str:
    return "without a line of its own" if n == 1 else "without lines of their own"


def _failures(failures: Counter[Outcome], last: str) -> str:
    """`3,212 runs did not succeed in the last 10s without lines of their own (failed 3,210,
    timeout 2)`, the outcomes in the outcome table's order."""
    total = sum(failures.values())
    parts = ", ".join(
        f"{outcome} {failures[outcome]:,}" for outcome in Outcome if failures[outcome]
    )
    return f"{_runs(total)} did not succeed {last} {_unlined(total)} ({parts})"


def _level(failures: Counter[Outcome]) -> int:
    return max(outcome.level for outcome in failures)
