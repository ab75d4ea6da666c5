"""Backoff, retry and restart decisions, on a number-as-clock and seeded RNGs: no sleeping."""

from __future__ import annotations

import random

import pytest

from poolkeeper.scheduling.backoff import (
    MIN_DELAY,
    BackoffDelays,
    FailureTracker,
    RetryDecider,
    should_restart,
)


def test_base_grows_geometrically_and_caps_at_max():
    b = BackoffDelays(initial=1, factor=2, max=10, jitter="none")
    assert [b.base(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_base_survives_a_job_failing_for_days():
    b = BackoffDelays(initial=1, factor=2, max=300)
    assert b.base(100_000) == 300  # 2**99999 overflows a float


def test_no_jitter_is_the_base():
    b = BackoffDelays(initial=1.5, factor=3, max=100, jitter="none")
    assert b.delay(3, random.Random(0)) == 13.5


def test_full_jitter_draws_from_zero_to_base_reproducibly():
    b = BackoffDelays(initial=4, factor=2, max=300, jitter="full")
    draws = [b.delay(3, random.Random(seed)) for seed in range(200)]
    assert all(MIN_DELAY <= d <= 16 for d in draws)
    assert min(draws) < 2 and max(draws) > 14  # really spread over the range
    assert b.delay(3, random.Random(7)) == b.delay(3, random.Random(7))
    assert b.delay(3, random.Random(7)) == random.Random(7).uniform(0, 16)


def test_equal_jitter_stays_in_upper_half():
    b = BackoffDelays(initial=4, factor=2, max=300, jitter="equal")
    draws = [b.delay(3, random.Random(seed)) for seed in range(200)]
    assert all(8 <= d <= 16 for d in draws)


def test_delay_never_below_floor_even_with_zero_initial():
    b = BackoffDelays(initial=0, jitter="none")
    assert b.delay(1, random.Random(0)) == MIN_DELAY
    full = BackoffDelays(initial=0.05, jitter="full")
    assert all(full.delay(1, random.Random(s)) >= MIN_DELAY for s in range(100))


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": -1}, {"initial": 1, "factor": 0.5}, {"initial": 1, "jitter": "bogus"}],
)
def test_invalid_backoff_rejected(kwargs):
    with pytest.raises(ValueError):
        BackoffDelays(**kwargs)


def test_base_rejects_zero_failures():
    with pytest.raises(ValueError):
        BackoffDelays(initial=1).base(0)


# --- retry of scheduled runs ---------------------------------------------------------------


def _retry(attempts: int) -> RetryDecider:
    delays = BackoffDelays(initial=10, factor=2, max=600, jitter="none")
    return RetryDecider(attempts, delays, random.Random(1))


@pytest.mark.parametrize("outcome", ["failed", "timeout", "lost"])
def test_failures_retry_with_growing_delay_until_attempts_used(outcome):
    r = _retry(3)
    assert r.should_retry(outcome, 1) == 10
    assert r.should_retry(outcome, 2) == 20
    assert r.should_retry(outcome, 3) is None  # the third attempt was the last


@pytest.mark.parametrize("outcome", ["succeeded", "killed", "running", "nonsense"])
def test_success_and_killed_never_retry(outcome):
    assert _retry(5).should_retry(outcome, 1) is None


def test_one_attempt_means_no_retry():
    assert _retry(1).should_retry("failed", 1) is None


def test_retry_rejects_zero_attempts():
    with pytest.raises(ValueError):
        _retry(0)


def test_retry_delay_is_jittered_by_its_rng():
    b = BackoffDelays(initial=10, jitter="full")
    assert RetryDecider(3, b, random.Random(5)).should_retry("failed", 2) == max(
        MIN_DELAY, random.Random(5).uniform(0, 20)
    )


# --- restart policy of loops ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "outcome", "restart"),
    [
        ("always", "succeeded", True),
        ("always", "failed", True),
        ("always", "killed", False),
        ("on-failure", "succeeded", False),
        ("on-failure", "failed", True),
        ("on-failure", "timeout", True),
        ("on-failure", "lost", True),
        ("on-failure", "killed", False),
        ("never", "failed", False),
        ("never", "succeeded", False),
    ],
)
def test_should_restart(policy, outcome, restart):
    assert should_restart(policy, outcome) is restart


def test_should_restart_rejects_unknown_policy():
    with pytest.raises(ValueError):
        should_restart("sometimes", "failed")


# --- failure tracker (loop replicas) -------------------------------------------------------


def _tracker(**kw) -> FailureTracker:
    return FailureTracker(
        BackoffDelays(initial=1, factor=2, max=8, jitter="none"), random.Random(0), **kw
    )


def test_crash_loop_backs_off_exponentially_on_a_fake_clock():
    t = _tracker()
    now = 1000.0
    waits = []
    for _ in range(6):
        assert t.ready(now)
        t.started(now)
        now += 0.01  # crashes at once
        next_start = t.ended("failed", now)
        waits.append(next_start - now)
        assert t.backing_off(now) and not t.ready(now)
        assert t.remaining(now) == pytest.approx(next_start - now)
        now = next_start
    assert waits == [1, 2, 4, 8, 8, 8]
    assert t.failures == 6


def test_stable_run_resets_the_count():
    t = _tracker()
    now = 0.0
    for _ in range(4):  # build up a long delay
        t.started(now)
        now = t.ended("failed", now + 0.5)
    assert t.failures == 4
    t.started(now)
    now += 3600  # then an hour of good work, and a crash
    assert t.ended("failed", now) == now + 1  # back to `initial`
    assert t.failures == 1


def test_default_stable_period_is_ten_seconds_or_initial():
    assert _tracker().stable_after == 10
    slow = FailureTracker(BackoffDelays(initial=30), random.Random(0))
    assert slow.stable_after == 30


def test_clean_exit_after_a_long_run_restarts_at_once():
    t = _tracker()
    t.started(0)
    assert t.ended("succeeded", 60) == 60
    assert t.failures == 0 and t.ready(60) and not t.backing_off(60)


def test_clean_but_instant_exit_still_backs_off():
    # A loop that returns at once (forgot its `while`) under restart: always is a busy loop.
    t = _tracker()
    t.started(0)
    assert t.ended("succeeded", 0.001) == pytest.approx(1.001)
    t.started(1.001)
    assert t.ended("succeeded", 1.002) == pytest.approx(3.002)


def test_end_without_start_counts_as_long_lived():
    t = _tracker()
    assert t.ended("failed", 5) == 6
    assert t.failures == 1


def test_reset_forgets_failures():
    t = _tracker()
    t.started(0)
    t.ended("failed", 0.1)
    t.reset()
    assert t.failures == 0 and t.ready(0.1) and t.remaining(0.1) == 0


def test_primitives_for_callers_with_their_own_timing():
    t = _tracker()
    assert t.delay() == 1  # no failure yet: the first step (never 0)
    assert t.failed() == 1 and t.delay() == 1
    assert t.failed() == 2 and t.delay(random.Random(0)) == 2
    t.succeeded()
    assert t.failures == 0
