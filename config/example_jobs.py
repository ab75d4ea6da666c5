"""Job code for example.yaml: small, real functions to watch in a terminal (`make run`).

poolkeeper calls each target as fn(*args, **kwargs), adding `ctx` (a poolkeeper.RunContext)
as a keyword when the function has a `ctx` parameter.
"""

from __future__ import annotations

import os
import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poolkeeper import RunContext

# Filled by warm_cache() at startup. Each worker is its own process, so other jobs only see
# this through what warm_cache leaves on disk; here it just shows a before_ready job's work.
_CACHE: dict[str, int] = {}


def warm_cache(size: int, *, ctx: RunContext, region: str = "eu") -> None:
    """One-shot at startup; READY=1 waits for it (before_ready)."""
    ctx.log.info("warming %d cache entries for region %s (CACHE_URL=%s)", size, region, os.environ.get("CACHE_URL"))
    for i in range(size):
        _CACHE[f"{region}:{i}"] = i * i
        if i % 25 == 0 and ctx.stopping.wait(0.05):  # a slow backend; give up on a drain
            ctx.log.info("stopping before the cache was warm")
            return
    ctx.log.info("cache warm: %d entries", len(_CACHE))


def consume(ctx: RunContext, queue: str = "events", batch: int = 5) -> None:
    """A loop job: handles a batch about once a second until the daemon drains."""
    handled = 0
    ctx.log.info("consuming %s in batches of %d", queue, batch)
    while not ctx.stopping.is_set():
        handled += batch
        ctx.heartbeat()  # proves liveness; heartbeat_timeout catches a hung loop
        if handled % (batch * 10) == 0:
            ctx.log.info("%s: %d events handled", queue, handled)
        ctx.stopping.wait(1.0)  # sleeps, but wakes at once when a drain starts
    ctx.log.info("%s: drained after %d events", queue, handled)


def rollup(ctx: RunContext, window: str = "15s") -> int:
    """An interval job that sometimes fails, to show retries."""
    ctx.log.info("rolling up the last %s (attempt %d)", window, ctx.attempt)
    time.sleep(random.uniform(0.2, 1.5))
    if random.random() < 0.2:
        raise RuntimeError("upstream timed out (a simulated, retried failure)")
    rows = random.randint(100, 1000)
    ctx.log.info("rolled up %d rows", rows)
    return rows


def report(ctx: RunContext) -> None:
    """A cron job: every minute, in the configured time zone."""
    ctx.log.info("minute report for %s", time.strftime("%H:%M"))
