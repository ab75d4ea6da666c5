"""Fire keys (poolkeeper.fleet.keys): two hosts that compute the same scheduled time give the
same key, whatever their start time; different scheduled times give different keys."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.fleet.keys import GridIntervalTrigger, fire_key, manual_key
from poolkeeper.scheduling.triggers import CronTrigger, JobSchedule

PARIS = ZoneInfo("Europe/Paris")


def _keys(trigger, start: float, until: float) -> list[str]:
    """The keys one host's schedule of `trigger` creates from `start` to `until`."""
    sched = JobSchedule(trigger, now=start)
    keys, now = [], start
    while now < until:
        now += 0.05
        while (fire := sched.pop_due(now)) is not None:
            keys.append(fire_key(trigger, fire.nominal))
    return keys


@given(
    every=st.sampled_from([0.2, 1.0, 7.0, 60.0]),
    starts=st.lists(st.floats(0, 30), min_size=2, max_size=3),
)
@settings(max_examples=40, deadline=None)
def test_hosts_started_at_different_times_fire_the_same_interval_keys(every, starts):
    trigger = GridIntervalTrigger(every)
    t0 = 1_800_000_000.0
    end = t0 + 30 + 5 * every
    runs = [_keys(trigger, t0 + s, end) for s in starts]
    late = max(starts)
    # What every host fires after the last one started is the same, key for key.
    common = [set(k for k in keys if int(k.split(":")[1]) * every >= t0 + late) for keys in runs]
    assert all(c == common[0] for c in common) and common[0]
    # One key per grid point: no host creates two keys for one scheduled time.
    assert all(len(keys) == len(set(keys)) for keys in runs)


def test_a_fixed_hour_cron_in_the_repeated_hour_has_one_key():
    # 2026-10-25 02:30 happens twice in Paris (clocks go back at 03:00 CEST).
    first = datetime(2026, 10, 25, 2, 30, tzinfo=PARIS).timestamp()
    second = datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=PARIS).timestamp()
    assert second - first == 3600
    nightly = CronTrigger("30 2 * * *", "Europe/Paris")
    assert fire_key(nightly, first) == fire_key(nightly, second)
    assert fire_key(nightly, first) == "cron:2026-10-25T02:30:00@Europe/Paris"


def test_a_wildcard_hour_cron_keeps_both_occurrences_of_the_repeated_hour():
    first = datetime(2026, 10, 25, 2, 15, tzinfo=PARIS).timestamp()
    second = datetime(2026, 10, 25, 2, 15, fold=1, tzinfo=PARIS).timestamp()
    quarterly = CronTrigger("*/15 * * * *", "Europe/Paris")
    assert fire_key(quarterly, first) != fire_key(quarterly, second)


def test_run_now_keys_are_never_the_same():
    assert len({manual_key() for _ in range(1000)}) == 1000
