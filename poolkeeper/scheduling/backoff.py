"""Retry and restart delays.

Everything here is pure bookkeeping: no sleeping, no reading of clocks. Callers pass `now` (the
daemon uses `time.monotonic()`, tests a plain number) and a `random.Random` (seeded in tests),
so every decision is reproducible. See docs/state.md for the policy in prose.
"""

from __future__ import annotations

import math
import random
from typing import Any, NamedTuple

from poolkeeper.outcomes import Outcome

# The shortest delay ever returned. Full jitter can draw ~0 and `initial` may be configured as
# 0; without a floor a crash-looping job would restart as fast as the pool can spawn it.
MIN_DELAY = 0.1

JITTER_MODES = ("full", "equal", "none")

# From the outcome table (poolkeeper.outcomes). As sets, so that any other string (a run still
# 'running', say) is simply neither retried nor a failure.
RETRYABLE_OUTCOMES = frozenset(outcome for outcome in Outcome if outcome.retried)
FAILURE_OUTCOMES = frozenset(outcome for outcome in Outcome if outcome.failure)

RESTART_POLICIES = ("always", "on-failure", "never")

# A loop replica that stayed up this long (or `backoff.initial`, if larger) is considered
# healthy: its consecutive-failure count resets when it exits.
DEFAULT_STABLE_AFTER = 10.0


class _BackoffFields(NamedTuple):
    initial: float
    factor: float = 2.0
    max: float = 300.0
    jitter: str = "full"  # full | equal | none
    floor: float = MIN_DELAY


class BackoffDelays(_BackoffFields):
    """Exponential backoff: the n-th consecutive failure waits about initial * factor**(n-1).

    An immutable record (a NamedTuple: ~0.2 ms to build at import, a dataclass ~1 ms) that
    checks its fields when made."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> BackoffDelays:
        self = super().__new__(cls, *args, **kwargs)
        if self.initial < 0 or self.max < 0 or self.floor < 0:
            raise ValueError("backoff durations must not be negative")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")
        if self.jitter not in JITTER_MODES:
            raise ValueError(f"backoff jitter must be one of {', '.join(JITTER_MODES)}")
        return self

    def base(self, failures: int) -> float:
        """The un-jittered delay after `failures` consecutive failures (>= 1)."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        try:
            grown = float(self.initial) * float(self.factor) ** (failures - 1)
        except OverflowError:  # a job failing for days: factor**n exceeds a float
            return self.max
        return self.max if math.isinf(grown) else min(self.max, grown)

    def delay(self, failures: int, rng: random.Random) -> float:
        """The delay to wait after `failures` consecutive failures, jittered, never below floor."""
        base = self.base(failures)
        if self.jitter == "full":
            drawn = rng.uniform(0, base)
        elif self.jitter == "equal":
            drawn = base / 2 + rng.uniform(0, base / 2)
        else:
            drawn = base
        return max(self.floor, drawn)


class RetryDecider:
    """The retry decision for interval, cron and one-shot runs (`retry: {attempts: N, ...}`):
    the policy's attempts and delays, with the RNG their jitter draws from.

    `attempts` counts every try, the first included: 1 means no retry.
    """

    __slots__ = ("attempts", "backoff", "rng")  # one per scheduled job: 10,000 of them

    def __init__(self, attempts: int, backoff: BackoffDelays, rng: random.Random | None = None):
        if attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {attempts}")
        self.attempts = attempts
        self.backoff = backoff
        self.rng = rng if rng is not None else random.Random()

    def should_retry(self, outcome: str, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when the run must not be retried.

        `attempt` is the 1-based number of the attempt that just ended with `outcome`; the
        delay after attempt n is the backoff for n consecutive failures.
        """
        if outcome not in RETRYABLE_OUTCOMES or attempt >= self.attempts:
            return None
        return self.backoff.delay(attempt, self.rng)


def should_restart(policy: str, outcome: str) -> bool:
    """Whether a loop replica that ended with `outcome` is started again (`restart:`).

    Never after 'killed' (the daemon stopped it: drain or fast stop), whatever the policy.
    """
    if policy not in RESTART_POLICIES:
        raise ValueError(f"restart policy must be one of {', '.join(RESTART_POLICIES)}")
    if outcome == Outcome.KILLED or policy == "never":
        return False
    if policy == "always":
        return True
    return outcome in FAILURE_OUTCOMES


class FailureTracker:
    """Consecutive-failure counting for one loop replica (or one job), on a caller's clock.

    Life cycle: `started(now)` when the replica starts, `ended(outcome, now)` when it exits
    (returns the earliest time it may start again), `ready(now)` / `remaining(now)` to ask.

    A run counts as a failure when its outcome is a failure *or* it lived shorter than
    `stable_after`: a loop that returns at once with success would otherwise be restarted in
    a tight loop. A run that lived at least `stable_after` resets the count first, so a
    replica that crashes after an hour of good work restarts after `initial`, not after the
    delay earned by crashes from days ago.
    """

    def __init__(
        self,
        backoff: BackoffDelays,
        rng: random.Random | None = None,
        *,
        stable_after: float | None = None,
    ):
        self.backoff = backoff
        self.rng = rng if rng is not None else random.Random()
        self.stable_after = (
            max(DEFAULT_STABLE_AFTER, backoff.initial) if stable_after is None else stable_after
        )
        self.failures = 0
        self.not_before = -math.inf
        self._started_at: float | None = None

    def started(self, now: float) -> None:
        self._started_at = now

    def ended(self, outcome: str, now: float) -> float:
        """Record the end of the current run; return the earliest time of the next start."""
        lived = math.inf if self._started_at is None else now - self._started_at
        self._started_at = None
        if lived >= self.stable_after:
            self.failures = 0
        if outcome in FAILURE_OUTCOMES or lived < self.stable_after:
            self.failures += 1
            self.not_before = now + self.backoff.delay(self.failures, self.rng)
        else:
            self.not_before = now  # a healthy run that ended cleanly: no reason to wait
        return self.not_before

    # Primitives for callers that do their own timing (e.g. a scheduled job's retry counter):
    # `failed()` then `delay()`, and `succeeded()` when a run went well.

    def failed(self) -> int:
        self.failures += 1
        return self.failures

    def succeeded(self) -> None:
        self.failures = 0

    def delay(self, rng: random.Random | None = None) -> float:
        """The backoff delay for the current failure count (MIN_DELAY floor when it is 0)."""
        return self.backoff.delay(max(1, self.failures), rng if rng is not None else self.rng)

    def reset(self) -> None:
        """Forget past failures (e.g. the job was changed by a reload or resumed by hand)."""
        self.failures = 0
        self.not_before = -math.inf

    def ready(self, now: float) -> bool:
        return now >= self.not_before

    def remaining(self, now: float) -> float:
        """Seconds until a start is allowed (0 when allowed now): for STATUS= and `status`."""
        return max(0.0, self.not_before - now)

    def backing_off(self, now: float) -> bool:
        return self.failures > 0 and not self.ready(now)
