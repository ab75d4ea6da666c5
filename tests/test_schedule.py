"""Triggers and per-job schedules, on explicit epoch times and seeded RNGs: no sleeping."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.scheduling.triggers import (
    BACKWARD_TOLERANCE,
    AtTrigger,
    CronTrigger,
    IntervalTrigger,
    JobSchedule,
    local_zone,
    make_schedule,
    make_trigger,
    upcoming,
    zone,
)

BERLIN = ZoneInfo("Europe/Berlin")


def ts(*args: int, tz=BERLIN, fold: int = 0) -> float:
    return datetime(*args, tzinfo=tz, fold=fold).timestamp()


def local(t: float) -> str:
    """An instant as Berlin wall time with offset, for readable assertions."""
    return datetime.fromtimestamp(t, BERLIN).isoformat(timespec="minutes")


# --- interval ------------------------------------------------------------------------------


def test_interval_fires_at_start_without_history():
    s = JobSchedule(IntervalTrigger(300), now=1000.0)
    assert s.next.nominal == 1000.0 and s.pop_due(1000.0).nominal == 1000.0
    assert s.next.nominal == 1300.0


def test_interval_resumes_from_a_recent_stored_fire():
    # Fired 100 s before the restart: the next run is 200 s after the restart, not now.
    s = JobSchedule(IntervalTrigger(300), now=1000.0, last_fire=900.0)
    assert s.next.nominal == 1200.0
    assert s.pop_due(1100.0) is None
    assert s.wait_time(1100.0) == 100.0


def test_interval_fires_at_start_when_the_stored_fire_is_older_than_every():
    s = JobSchedule(IntervalTrigger(300), now=1000.0, last_fire=10.0)
    assert s.next.nominal == 1000.0  # once, not one per missed period


def test_interval_keeps_its_grid_and_skips_missed_periods_without_a_burst():
    s = JobSchedule(IntervalTrigger(60), now=0.0)
    assert s.pop_due(0.0).nominal == 0.0
    assert s.pop_due(60.5).nominal == 60.0  # a little late: the grid stays
    assert s.next.nominal == 120.0
    assert s.pop_due(400.0).nominal == 120.0  # very late (stalled loop): one fire...
    assert s.next.nominal == 420.0  # ...and the next grid point after now
    assert s.pop_due(400.0) is None


def test_interval_jitter_bounds_and_reproducibility():
    trig = IntervalTrigger(every=60, jitter=10)
    offsets = []
    for seed in range(100):
        s = JobSchedule(trig, now=0.0, rng=random.Random(seed))
        fires = [s.next]
        for _ in range(5):
            fires.append(s.pop_due(fires[-1].due) and s.next)
        for f in fires:
            assert 0 <= f.due - f.nominal <= 10
            offsets.append(f.due - f.nominal)
        # Jitter never drifts the grid: nominals stay on multiples of `every`.
        assert [f.nominal for f in fires] == [0, 60, 120, 180, 240, 300]
    assert min(offsets) < 1 and max(offsets) > 9
    a = JobSchedule(trig, now=0.0, rng=random.Random(42)).next
    assert a == JobSchedule(trig, now=0.0, rng=random.Random(42)).next


def test_interval_wall_clock_step_back_does_not_stall_it():
    s = JobSchedule(IntervalTrigger(60), now=10_000.0)
    s.pop_due(10_000.0)
    assert s.wait_time(10_030.0) == 30.0
    # The clock steps back an hour: an elapsed-time job must not wait an hour longer.
    assert s.wait_time(6_430.0) == 60.0


def test_interval_rejects_nonpositive_every():
    with pytest.raises(ValueError):
        IntervalTrigger(0)
    with pytest.raises(ValueError):
        IntervalTrigger(10, jitter=-1)


def test_upcoming_interval():
    assert upcoming(IntervalTrigger(5), 3, 100.0) == [105.0, 110.0, 115.0]


# --- cron ----------------------------------------------------------------------------------


def test_cron_mon_fri_skips_the_weekend():
    trig = CronTrigger("30 2 * * MON-FRI", "Europe/Berlin")
    fires = upcoming(trig, 6, ts(2024, 6, 6, 12, 0))  # a Thursday
    assert [local(f) for f in fires] == [
        "2024-06-07T02:30+02:00",  # Fri
        "2024-06-10T02:30+02:00",  # Mon
        "2024-06-11T02:30+02:00",
        "2024-06-12T02:30+02:00",
        "2024-06-13T02:30+02:00",
        "2024-06-14T02:30+02:00",
    ]


def test_cron_is_evaluated_in_its_zone():
    fire = CronTrigger("0 9 * * *", "America/New_York").next_fire(ts(2024, 1, 15, 0, 0, tz=UTC))
    assert fire == ts(2024, 1, 15, 14, 0, tz=UTC)


def test_cron_spring_forward_fixed_time_runs_once_at_the_end_of_the_gap():
    # 2024-03-31 in Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    trig = CronTrigger("30 2 * * *", "Europe/Berlin")
    fires = upcoming(trig, 3, ts(2024, 3, 30, 12, 0))
    assert [local(f) for f in fires] == [
        "2024-03-31T03:00+02:00",  # late by the gap, but not lost
        "2024-04-01T02:30+02:00",
        "2024-04-02T02:30+02:00",
    ]


def test_cron_fall_back_fixed_time_runs_once():
    # 2024-10-27 in Berlin: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    trig = CronTrigger("30 2 * * *", "Europe/Berlin")
    fires = upcoming(trig, 3, ts(2024, 10, 26, 12, 0))
    assert [local(f) for f in fires] == [
        "2024-10-27T02:30+02:00",  # the first 02:30 only
        "2024-10-28T02:30+01:00",
        "2024-10-29T02:30+01:00",
    ]
    # Asked from inside the repeated hour (after the first 02:30), nothing fires that night.
    inside = ts(2024, 10, 27, 2, 10, fold=1)
    assert local(trig.next_fire(inside)) == "2024-10-28T02:30+01:00"


def test_cron_wildcard_hour_follows_elapsed_time_across_dst():
    trig = CronTrigger("*/30 * * * *", "Europe/Berlin")
    spring = upcoming(trig, 4, ts(2024, 3, 31, 1, 0))
    assert [local(f) for f in spring] == [
        "2024-03-31T01:30+01:00",
        "2024-03-31T03:00+02:00",  # 02:00 and 02:30 never existed
        "2024-03-31T03:30+02:00",
        "2024-03-31T04:00+02:00",
    ]
    autumn = upcoming(trig, 6, ts(2024, 10, 27, 1, 30))
    assert [local(f) for f in autumn] == [
        "2024-10-27T02:00+02:00",
        "2024-10-27T02:30+02:00",
        "2024-10-27T02:00+01:00",  # the repeated hour is real time: it fires again
        "2024-10-27T02:30+01:00",
        "2024-10-27T03:00+01:00",
        "2024-10-27T03:30+01:00",
    ]
    assert all(b - a == 1800 for a, b in zip(autumn, autumn[1:], strict=False))


def test_cron_prev_fire_mirrors_next_fire_across_dst():
    for expr in ("30 2 * * *", "*/20 * * * *"):
        trig = CronTrigger(expr, "Europe/Berlin")
        for start in (ts(2024, 3, 30, 20, 0), ts(2024, 10, 26, 20, 0)):
            fires = upcoming(trig, 30, start)
            assert fires == sorted(set(fires))  # strictly increasing: no double fire
            for a, b in zip(fires, fires[1:], strict=False):
                assert trig.prev_fire(b - 1) == a
                assert trig.prev_fire(b) == b


def test_cron_impossible_date_never_fires():
    assert CronTrigger("0 0 30 2 *", "UTC").next_fire(0.0) is None


def test_cron_rejects_bad_expression_zone_and_catchup():
    with pytest.raises(ValueError):
        CronTrigger("61 * * * *", "UTC")
    with pytest.raises(ValueError):
        CronTrigger("* * * * *", "Mars/Olympus")
    with pytest.raises(ValueError):
        CronTrigger("* * * * *", "UTC", catchup="all")


def test_cron_aliases_are_classified():
    assert CronTrigger("@hourly", "UTC").wildcard_hour
    assert not CronTrigger("@daily", "UTC").wildcard_hour


def _nightly(catchup: str) -> CronTrigger:
    return CronTrigger("30 2 * * *", "Europe/Berlin", catchup=catchup)


def test_catchup_once_fires_once_at_start_after_downtime():
    last = ts(2024, 6, 1, 2, 30)
    now = ts(2024, 6, 4, 12, 0)  # down for three nights
    s = JobSchedule(_nightly("once"), now=now, last_fire=last)
    fire = s.pop_due(now)
    assert fire.due == now
    assert local(fire.nominal) == "2024-06-04T02:30+02:00"  # recorded as the latest missed slot
    assert local(s.next.nominal) == "2024-06-05T02:30+02:00"
    assert s.pop_due(now) is None


def test_catchup_none_skips_missed_fires():
    now = ts(2024, 6, 4, 12, 0)
    s = JobSchedule(_nightly("none"), now=now, last_fire=ts(2024, 6, 1, 2, 30))
    assert s.pop_due(now) is None
    assert local(s.next.nominal) == "2024-06-05T02:30+02:00"


def test_catchup_once_nothing_missed_no_extra_fire():
    # Restarted a few seconds after tonight's run: it must not run again.
    last = ts(2024, 6, 4, 2, 30)
    s = JobSchedule(_nightly("once"), now=last + 5, last_fire=last)
    assert s.pop_due(last + 5) is None
    assert local(s.next.nominal) == "2024-06-05T02:30+02:00"


def test_catchup_once_without_history_has_nothing_to_catch_up():
    now = ts(2024, 6, 4, 12, 0)
    s = JobSchedule(_nightly("once"), now=now, last_fire=None)
    assert s.pop_due(now) is None


def test_cron_never_refires_a_stored_slot_after_a_small_clock_step_back():
    last = ts(2024, 6, 4, 2, 30)
    s = JobSchedule(_nightly("none"), now=last - 60, last_fire=last)
    assert local(s.next.nominal) == "2024-06-05T02:30+02:00"


def test_cron_far_future_stored_fire_is_not_trusted():
    now = ts(2024, 6, 4, 12, 0)
    bogus = now + 365 * 86400  # stored while the clock was a year ahead
    s = JobSchedule(_nightly("none"), now=now, last_fire=bogus)
    assert local(s.next.nominal) == "2024-06-05T02:30+02:00"


def test_cron_schedule_rebases_after_a_large_clock_step_back():
    now = ts(2024, 6, 4, 12, 0)
    s = JobSchedule(_nightly("none"), now=now)
    assert s.wait_time(now) == ts(2024, 6, 5, 2, 30) - now
    back = now - 2 * 86400
    assert s.wait_time(back) == ts(2024, 6, 3, 2, 30) - back
    # A small step back keeps the already computed fire (no slot fires twice).
    s2 = JobSchedule(_nightly("none"), now=now)
    assert s2.wait_time(now - BACKWARD_TOLERANCE / 2) == ts(2024, 6, 5, 2, 30) - (
        now - BACKWARD_TOLERANCE / 2
    )


def test_cron_late_fires_coalesce_while_running():
    trig = CronTrigger("*/5 * * * *", "UTC")
    now = ts(2024, 6, 4, 12, 0, tz=UTC)
    s = JobSchedule(trig, now=now)
    late = now + 3600 + 7  # a clock jump forward / a stalled loop
    assert s.pop_due(late).nominal == ts(2024, 6, 4, 12, 5, tz=UTC)
    assert s.next.nominal == ts(2024, 6, 4, 13, 5, tz=UTC)


def test_cron_none_zone_is_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert local_zone() == ZoneInfo("Asia/Tokyo")
    assert zone(None) == ZoneInfo("Asia/Tokyo")
    trig = CronTrigger("0 9 * * *")
    assert trig.next_fire(ts(2023, 12, 31, 23, 0, tz=UTC)) == ts(2024, 1, 1, 0, 0, tz=UTC)


# --- at ------------------------------------------------------------------------------------


def test_at_startup_fires_once_per_daemon_start():
    trig = AtTrigger("startup")
    for last in (None, 50.0):  # state is irrelevant: every start fires it
        s = JobSchedule(trig, now=100.0, last_fire=last)
        assert s.pop_due(100.0).nominal == 100.0
        assert s.next is None and s.wait_time(200.0) is None
    assert upcoming(trig, 3, 0.0) == []


def test_at_datetime_in_the_future_fires_then():
    when = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
    s = JobSchedule(AtTrigger(when), now=when.timestamp() - 10)
    assert s.pop_due(when.timestamp() - 1) is None
    assert s.pop_due(when.timestamp()).nominal == when.timestamp()
    assert s.next is None


def test_at_datetime_in_the_past_fires_once_if_never_fired():
    when = datetime(2024, 1, 1, 8, 0, tzinfo=UTC).timestamp()
    s = JobSchedule(AtTrigger(datetime.fromtimestamp(when, UTC)), now=when + 86400)
    assert s.pop_due(when + 86400).nominal == when
    assert s.next is None


def test_at_datetime_already_fired_never_fires_again():
    when = datetime(2024, 1, 1, 8, 0, tzinfo=UTC)
    s = JobSchedule(AtTrigger(when), now=when.timestamp() + 86400, last_fire=when.timestamp())
    assert s.next is None


def test_at_datetime_moved_later_fires_again():
    old = datetime(2024, 1, 1, 8, 0, tzinfo=UTC).timestamp()
    new = datetime(2024, 2, 1, 8, 0, tzinfo=UTC)
    s = JobSchedule(AtTrigger(new), now=new.timestamp() + 60, last_fire=old)
    assert s.pop_due(new.timestamp() + 60).nominal == new.timestamp()


def test_at_naive_datetime_is_read_in_the_zone():
    trig = AtTrigger(datetime(2024, 7, 1, 12, 0), tz="Europe/Berlin")
    assert trig.when == ts(2024, 7, 1, 10, 0, tz=UTC)
    assert upcoming(trig, 3, 0.0) == [trig.when]


def test_at_rejects_other_strings():
    with pytest.raises(ValueError):
        AtTrigger("tomorrow")


# --- from a job spec -------------------------------------------------------------------------


def test_make_trigger_from_spec_attributes():
    spec = SimpleNamespace
    every = make_trigger(spec(every=300.0, jitter=10.0, cron=None, at=None))
    assert every == IntervalTrigger(300.0, 10.0)
    cron = make_trigger(spec(cron="30 2 * * MON-FRI", timezone="Europe/Berlin", catchup="once"))
    assert (cron.expr, cron.tz, cron.catchup) == ("30 2 * * MON-FRI", BERLIN, "once")
    at = make_trigger(spec(at="2024-07-01T12:00:00+00:00", timezone=None))
    assert at.when == ts(2024, 7, 1, 12, 0, tz=UTC)
    assert make_trigger(spec(at="startup")).startup
    assert make_trigger(spec(loop={"replicas": 2})) is None


def test_make_schedule_applies_jitter_and_state():
    spec = SimpleNamespace(every=60.0, jitter=5.0)
    s = make_schedule(spec, now=1000.0, last_fire=970.0, rng=random.Random(3))
    assert s.next.nominal == 1030.0 and 1030.0 <= s.next.due <= 1035.0
    assert make_schedule(SimpleNamespace(loop={}), now=0.0, last_fire=None) is None


@settings(max_examples=150, deadline=None)
@given(
    t=st.floats(min_value=ts(2024, 1, 1, 0, 0), max_value=ts(2025, 12, 31, 0, 0)),
    expr=st.sampled_from(["30 2 * * *", "*/7 * * * *", "0 * * * MON-FRI", "15 1,2,3 * * *"]),
    tz=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]),
)
def test_cron_next_and_prev_are_consistent_everywhere(t, expr, tz):
    trig = CronTrigger(expr, tz)
    nxt, prev = trig.next_fire(t), trig.prev_fire(t)
    assert prev <= t < nxt
    assert trig.next_fire(prev) == nxt  # nothing fires between two neighbours
    assert trig.prev_fire(nxt - 0.001) == prev
