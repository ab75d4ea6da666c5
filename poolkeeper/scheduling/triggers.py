"""When each job fires: interval, cron and one-shot triggers, and the per-job schedule.

All times are wall-clock epoch seconds (`time.time()`): cron is defined on the wall clock, and
the fire times persisted in the state DB must survive a restart. The daemon's loop waits on the
monotonic clock: every job's next fire (`JobSchedule.next.due`) is a deadline in one timer
heap (daemon/agenda.py); at every turn it reads `time.time()` and pops the due fires of the
jobs at the head only (`JobSchedule.pop_due`). It turns at least once a second
(daemon.mainloop.MAX_WAIT), so a wall-clock step (NTP, suspend/resume) is noticed within a
second: a step forward makes fires due; a step back is told to every schedule
(`JobSchedule.stepped_back`). See docs/state.md, "Scheduling".

A trigger's `next_fire(after)` is the *nominal* time (no jitter): it is what `scheduled_at`
records, what `poolkeeper next` prints and what the state stores as the last fire. Jitter is
added on top by `JobSchedule`, per fire, so it never accumulates as drift.
"""

from __future__ import annotations

import functools
import math
import os
import random
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, NamedTuple, Protocol

# How far the wall clock may step backwards before a schedule stops trusting what it already
# fired. Smaller steps (an NTP correction, the DST-like jumps cron folk know) never re-fire a
# slot; a larger one (a clock that was set a year ahead and got fixed) rebases the schedule on
# the new time, or a cron job would stay silent until the clock caught up again.
BACKWARD_TOLERANCE = 3 * 3600.0

# Cron is evaluated on local wall time; an instant's wall time and its UTC offset never differ
# by more than this between neighbouring transitions, which bounds the candidate search.
_OFFSET_MARGIN = timedelta(hours=3)

CATCHUP_MODES = ("none", "once")


class Trigger(Protocol):
    @property
    def jitter(self) -> float:  # read-only: IntervalTrigger's is a NamedTuple field
        ...

    def next_fire(self, after: float) -> float | None:
        """The first nominal fire time strictly after `after`, or None if it never fires again."""
        ...

    def first_fire(self, now: float, last_fire: float | None) -> float | None:
        """The nominal time of the first fire of a daemon started at `now`, given the last fire
        the state DB remembers. May be <= now: fire at once (a missed fire being caught up)."""
        ...

    def following(self, nominal: float, now: float) -> float | None:
        """The nominal fire after the one at `nominal`, which was due and popped at `now`."""
        ...


# --- time zones -------------------------------------------------------------------------


def local_zone() -> tzinfo:
    """The system's local zone as a real IANA zone (with its DST rules), not a fixed offset.

    `$TZ` first (as libc does), then /etc/localtime; UTC when neither names a zone.
    """
    # zoneinfo here, not at the top: only cron jobs and `at:` times need a zone, and a daemon
    # without them should not import it (and sysconfig) on its way to READY=1.
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    localtime = "/etc/localtime"
    try:
        target = os.path.realpath(localtime, strict=True)
        if "zoneinfo/" in target:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
        with open(localtime, "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ZoneInfoNotFoundError, ValueError):
        return UTC


def zone(name: str | None) -> tzinfo:
    """A zone by IANA name (ValueError if unknown); None = the system's local zone."""
    if name is None:
        return local_zone()
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def _wall(ts: float, tz: tzinfo) -> datetime:
    """The naive local wall time of an instant."""
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None)


# --- triggers ---------------------------------------------------------------------------


class _IntervalFields(NamedTuple):
    every: float
    jitter: float = 0.0


class IntervalTrigger(_IntervalFields):
    """`every: 5m`, `jitter: 10s`. Elapsed-time semantics: the wall clock's date is irrelevant.
    An immutable record (see backoff.BackoffDelays) that checks its fields when made."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> IntervalTrigger:
        self = super().__new__(cls, *args, **kwargs)
        if not self.every > 0:
            raise ValueError(f"every must be positive, got {self.every}")
        if self.jitter < 0:
            raise ValueError(f"jitter must not be negative, got {self.jitter}")
        return self

    def next_fire(self, after: float) -> float | None:
        return after + self.every

    def first_fire(self, now: float, last_fire: float | None) -> float | None:
        # Fire at start, unless the previous daemon fired less than `every` ago: then keep its
        # rhythm, so restarting the daemon never runs an interval job more often than `every`.
        if last_fire is None or last_fire > now + BACKWARD_TOLERANCE:
            return now
        return max(now, min(last_fire, now) + self.every)

    def following(self, nominal: float, now: float) -> float:
        """The fire after `nominal`, on the same grid, skipping grid points already past."""
        nxt = nominal + self.every
        if nxt <= now:  # we fell behind by more than a period: don't fire a burst
            nxt += math.ceil((now - nxt) / self.every + 1e-9) * self.every
            if nxt <= now:
                nxt += self.every
        return nxt


class CronTrigger:
    """`cron: "30 2 * * MON-FRI"`, evaluated on the wall clock of `tz` (None = system zone).

    DST, following Vixie cron / cronie:
    - a *fixed-hour* entry (the hour field does not start with `*`, e.g. `30 2 * * *`) whose
      time falls into a spring-forward gap fires once at the end of the gap (03:00 in
      Europe/Berlin): a nightly job runs late rather than not at all; in a fall-back overlap it
      fires only at the first of the two occurrences: never twice.
    - a *wildcard-hour* entry (`*/15 * * * *`, `0 * * * *`) follows elapsed time: times inside
      a gap don't exist and are skipped, times inside an overlap occur twice and fire twice.
    """

    jitter = 0.0

    def __init__(self, expr: str, tz: str | None = None, catchup: str = "none"):
        # Imported here: croniter (and dateutil) cost ~30 ms of start-up, only cron jobs need it.
        from croniter import croniter

        if catchup not in CATCHUP_MODES:
            raise ValueError(f"catchup must be one of {', '.join(CATCHUP_MODES)}")
        if not croniter.is_valid(expr):
            raise ValueError(f"invalid cron expression {expr!r}")
        self.expr = expr
        self.tz_name = tz
        self.tz = zone(tz)
        self.catchup = catchup
        fields = croniter(expr, datetime(2000, 1, 1)).expressions  # aliases like @daily expanded
        self.wildcard_hour = str(fields[1]).startswith("*")

    def __repr__(self) -> str:
        return f"CronTrigger({self.expr!r}, tz={self.tz_name!r}, catchup={self.catchup!r})"

    def next_fire(self, after: float) -> float | None:
        return self._search(after, forward=True)

    def prev_fire(self, at_or_before: float) -> float | None:
        """The latest nominal fire time <= `at_or_before`."""
        return self._search(at_or_before, forward=False)

    def first_fire(self, now: float, last_fire: float | None) -> float | None:
        if last_fire is not None and last_fire > now + BACKWARD_TOLERANCE:
            last_fire = None  # the clock was far ahead when that was stored: don't trust it
        if last_fire is not None:
            missed = self.next_fire(last_fire)
            if missed is not None and missed <= now:
                if self.catchup == "once":
                    # One run for everything missed, recorded as the latest missed slot.
                    return self.prev_fire(now)
            # Never re-fire a slot already fired (a restart within the same minute).
            now = max(now, last_fire)
        return self.next_fire(now)

    def following(self, nominal: float, now: float) -> float | None:
        # Slots missed while the daemon was running but late (a stalled loop, a clock step
        # forward) are coalesced into the fire that just happened.
        return self.next_fire(max(nominal, now))

    # The search runs croniter on naive local wall time (where cron is defined), then maps
    # each wall-time candidate to zero, one or two instants by the DST rules above. Mapped
    # instants never decrease from one candidate to the next (the lowest of a candidate's
    # instants forward, the highest backward), so the first candidate entirely past `ts` ends
    # the search. It starts at the lowest wall time any instant after `ts` can have: before
    # wall(ts) when a fall-back lies ahead.
    def _search(self, ts: float, *, forward: bool) -> float | None:
        margin = _OFFSET_MARGIN.total_seconds()
        if forward:
            start = min(_wall(ts, self.tz), _wall(ts + margin, self.tz) - _OFFSET_MARGIN)
            start -= timedelta(seconds=1)
        else:
            start = max(_wall(ts, self.tz), _wall(ts - margin, self.tz) + _OFFSET_MARGIN)
            start += timedelta(seconds=1)
        from croniter import CroniterBadDateError, croniter

        it = croniter(self.expr, start)
        best: float | None = None
        try:
            while True:
                cand = it.get_next(datetime) if forward else it.get_prev(datetime)
                instants = self._instants(cand)
                if forward:
                    best = min(
                        [t for t in instants if t > ts] + ([best] if best is not None else []),
                        default=None,
                    )
                    if instants and min(instants) > ts:
                        return best
                else:
                    best = max(
                        [t for t in instants if t <= ts] + ([best] if best is not None else []),
                        default=None,
                    )
                    if instants and max(instants) <= ts:
                        return best
        except CroniterBadDateError:  # no match within croniter's horizon (e.g. Feb 30)
            return best

    def _instants(self, wall: datetime) -> list[float]:
        early = wall.replace(tzinfo=self.tz, fold=0)
        late = wall.replace(tzinfo=self.tz, fold=1)
        t_early, t_late = early.timestamp(), late.timestamp()
        if _wall(t_early, self.tz) != wall:  # in a spring-forward gap: this wall time is skipped
            return [] if self.wildcard_hour else [self._gap_end(wall, t_early, t_late)]
        if t_early != t_late:  # in a fall-back overlap: this wall time happens twice
            return [t_early, t_late] if self.wildcard_hour else [t_early]
        return [t_early]

    def _gap_end(self, wall: datetime, a: float, b: float) -> float:
        """The transition instant of the gap containing `wall`: the first instant whose wall
        time is past it. Transitions are on whole seconds, so bisect over integers."""
        lo, hi = math.floor(min(a, b)), math.ceil(max(a, b))
        while lo < hi:
            mid = (lo + hi) // 2
            if _wall(mid, self.tz) > wall:
                hi = mid
            else:
                lo = mid + 1
        return float(lo)


class AtTrigger:
    """`at: startup` (once per daemon start) or `at: <datetime>` (once, ever).

    A naive datetime is read in `tz` (None = system zone). A datetime already past when the
    daemon starts fires at once if the state DB has no fire of it, else never: the stored last
    fire is the nominal time, so "fired" means last_fire >= when, and editing `at:` to a new,
    later datetime arms the job again.
    """

    jitter = 0.0

    def __init__(self, when: str | datetime, tz: str | None = None):
        if isinstance(when, str):
            if when != "startup":
                raise ValueError(f"at must be 'startup' or a datetime, got {when!r}")
            self.when: float | None = None
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=zone(tz))
            self.when = when.timestamp()

    @property
    def startup(self) -> bool:
        return self.when is None

    def __repr__(self) -> str:
        return "AtTrigger('startup')" if self.startup else f"AtTrigger({self.when})"

    def next_fire(self, after: float) -> float | None:
        if self.when is None or self.when <= after:
            return None
        return self.when

    def first_fire(self, now: float, last_fire: float | None) -> float | None:
        if self.when is None:
            return now
        if last_fire is not None and last_fire >= self.when:
            return None
        return self.when

    def following(self, nominal: float, now: float) -> float | None:
        return None


def make_trigger(spec: object, rng: random.Random | None = None) -> Trigger | None:
    """The trigger of a job spec: reads the YAML keys `every`/`jitter` (seconds), `cron`/
    `timezone`/`catchup` and `at` as attributes (duck-typed). None for a loop job.

    `rng` is accepted for call-site convenience but unused: triggers are deterministic; the
    jitter is drawn by `JobSchedule` (see make_schedule).
    """
    tz = getattr(spec, "timezone", None)
    every = getattr(spec, "every", None)
    if every is not None:
        return _interval(float(every), float(getattr(spec, "jitter", None) or 0.0))
    cron = getattr(spec, "cron", None)
    if cron is not None:
        return CronTrigger(cron, tz, getattr(spec, "catchup", None) or "none")
    at = getattr(spec, "at", None)
    if at is not None:
        if isinstance(at, str) and at != "startup":
            at = datetime.fromisoformat(at)
        return AtTrigger(at, tz)
    return None


@functools.lru_cache(maxsize=1024)
def _interval(every: float, jitter: float) -> IntervalTrigger:
    """Immutable, so jobs with the same `every` and `jitter` share one (10,000 jobs written
    `every: 1h` would otherwise hold 10,000 of them)."""
    return IntervalTrigger(every, jitter)


def make_schedule(
    spec: object, *, now: float, last_fire: float | None, rng: random.Random | None = None
) -> JobSchedule | None:
    """A job's JobSchedule from its spec (None for a loop job)."""
    trigger = make_trigger(spec)
    return None if trigger is None else JobSchedule(trigger, now=now, last_fire=last_fire, rng=rng)


def upcoming(trigger: Trigger, n: int, after: float) -> list[float]:
    """The next `n` nominal fire times after `after` (`poolkeeper next JOB -n N`).

    Jitter is not included (it is drawn per fire). `at: startup` has none: it fires only when
    the daemon starts.
    """
    out: list[float] = []
    t: float = after
    while len(out) < n:
        nxt = trigger.next_fire(t)
        if nxt is None:
            break
        t = nxt
        out.append(t)
    return out


# --- one job's schedule -----------------------------------------------------------------


class Fire(NamedTuple):
    nominal: float  # scheduled_at, and what to store with StateStore.set_last_fire
    due: float  # nominal + this fire's jitter: when to dispatch


class JobSchedule:
    """The next fire of one job, advanced by the daemon's loop. Wall-clock epoch seconds.

    The daemon's use (daemon/jobs.py, daemon/agenda.py), when `sched.next.due` (the key of
    this job in the loop's timer heap) has come (`now = time.time()`):

        while fire := sched.pop_due(now):
            dispatch(job, scheduled_at=fire.nominal); state.set_last_fire(job, fire.nominal)
        timers.set(job, sched.next.due)  # its next wake-up
    """

    __slots__ = ("trigger", "rng", "_last_seen", "next")  # one per job: 10,000 of them

    def __init__(
        self,
        trigger: Trigger,
        *,
        now: float,
        last_fire: float | None = None,
        rng: random.Random | None = None,
    ):
        self.trigger = trigger
        self.rng = rng if rng is not None else random.Random()
        self._last_seen = now
        first = self._fire(trigger.first_fire(now, last_fire))
        if first is not None and first.due < now:  # a catch-up: due now, not in the past
            first = Fire(first.nominal, now)
        self.next: Fire | None = first

    def _fire(self, nominal: float | None) -> Fire | None:
        if nominal is None:
            return None
        jitter = self.trigger.jitter
        return Fire(nominal, nominal + (self.rng.uniform(0, jitter) if jitter > 0 else 0.0))

    def _observe(self, now: float) -> None:
        """Notice a wall clock stepped backwards since the last call."""
        self.stepped_back(now, self._last_seen - now)

    def stepped_back(self, now: float, step: float) -> None:
        """The wall clock is at `now` after going back `step` seconds (<= 0: it did not):
        rebase when the step is large (or the trigger is an interval, which follows elapsed
        time: it must not wait out the step). The daemon's loop, which only looks at the
        schedules that are due, tells every schedule when it sees a step."""
        self._last_seen = now
        if step <= 0 or self.next is None:
            return
        if isinstance(self.trigger, IntervalTrigger):
            if self.next.nominal > now + self.trigger.every:
                # following(), not now + every: a fleet's interval stays on its grid
                self.next = self._fire(self.trigger.following(now, now))
        elif step > BACKWARD_TOLERANCE and isinstance(self.trigger, CronTrigger):
            self.next = self._fire(self.trigger.next_fire(now))

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next fire is due (0 if due), None if it never fires again."""
        self._observe(now)
        if self.next is None:
            return None
        return max(0.0, self.next.due - now)

    def pop_due(self, now: float) -> Fire | None:
        """The fire due at `now`, if any; the schedule moves on to the following one.

        Call it also when the fire is skipped (overlap: skip, paused job): the slot is gone.
        """
        self._observe(now)
        fire = self.next
        if fire is None or fire.due > now:
            return None
        self.next = self._fire(self.trigger.following(fire.nominal, now))
        return fire
