"""The key of a fire: the same scheduled time gives the same key on every host, whatever its
clock or when it started, so `UNIQUE (job, fire_key)` makes each scheduled time one row.

- interval: the index of the nominal time on the grid `k * every` (epoch-anchored, so every
  host's schedule of the job is the same grid: GridIntervalTrigger);
- cron: the local wall time in the job's zone (a fixed-hour entry in the hour repeated when
  daylight saving time ends has one key: it runs once); a wildcard-hour entry follows elapsed
  time (it fires in both occurrences on one host), so its key carries the UTC offset too;
- at a datetime: the instant; run-now: a fresh id (never the same twice).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime

from poolkeeper.scheduling.triggers import CronTrigger, IntervalTrigger, Trigger

# A nominal time this close to a grid point is that grid point (float noise of k * every).
_GRID_EPSILON = 1e-6


class GridIntervalTrigger(IntervalTrigger):
    """`every:` on the grid `k * every` of the epoch: two hosts that start at different times
    still fire at the same nominal times, which is what makes their fires one row."""

    __slots__ = ()

    def grid_index(self, nominal: float) -> int:
        return round(nominal / self.every)

    def _at_or_after(self, when: float) -> float:
        k = math.ceil(when / self.every - _GRID_EPSILON)
        return k * self.every

    def first_fire(self, now: float, last_fire: float | None) -> float | None:
        # As IntervalTrigger: fire at start (the next grid point), unless the fleet's last fire
        # was less than `every` ago; the cursor in the database drops a fire already created.
        start = self._at_or_after(now)
        if last_fire is not None and last_fire <= now:
            start = max(start, self._at_or_after(last_fire + self.every))
        return start

    def following(self, nominal: float, now: float) -> float:
        nxt = (self.grid_index(nominal) + 1) * self.every
        if nxt <= now:  # behind by more than a period: the next grid point ahead, no burst
            nxt = self._at_or_after(now + _GRID_EPSILON)
        return nxt


def fire_key(trigger: Trigger, nominal: float) -> str:
    """The key of the fire of `trigger` at `nominal` (epoch seconds)."""
    if isinstance(trigger, GridIntervalTrigger):
        return f"every:{trigger.grid_index(nominal)}"
    if isinstance(trigger, CronTrigger):
        wall = datetime.fromtimestamp(nominal, trigger.tz)
        key = f"cron:{wall.replace(tzinfo=None).isoformat(timespec='seconds')}"
        if trigger.wildcard_hour:
            offset = wall.utcoffset()
            key += f"{offset.total_seconds() / 60:+.0f}m" if offset is not None else ""
        return f"{key}@{trigger.tz_name or 'local'}"
    return f"at:{nominal:.6f}"


def manual_key() -> str:
    """A run-now's key: a fresh id, so each request is a fire of its own."""
    return f"manual:{uuid.uuid4()}"
