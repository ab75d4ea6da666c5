"""Job functions for the daemon's integration tests (imported by workers via pythonpath)."""

from __future__ import annotations

import logging
import os
import subprocess
import time


def loop_units(ctx, out_dir):
    """A well-behaved loop: one unit of work per turn, returns when the drain starts."""
    units = 0
    while not ctx.stopping.is_set():
        units += 1
        with open(os.path.join(out_dir, f"{ctx.run_id}.units"), "a") as f:
            f.write(f"{time.time()}\n")
        ctx.heartbeat()
        ctx.stopping.wait(0.05)
    with open(os.path.join(out_dir, f"{ctx.run_id}.returned"), "w") as f:
        f.write(str(units))
    return units


def slow(ctx, seconds, out_dir):
    """An in-flight run that ignores the stop event but ends within the drain budget."""
    with open(os.path.join(out_dir, f"slow-{ctx.run_id}.started"), "w") as f:
        f.write(str(time.time()))
    time.sleep(seconds)
    return "slept"


def stubborn(ctx, out_dir):
    """Ignores the stop event for ever, with a grandchild: must be killed at the deadline."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(os.path.join(out_dir, "stubborn.pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    while True:
        time.sleep(1)


def fail(ctx):
    logging.getLogger("daemon_jobs").info("about to fail")
    raise RuntimeError("boom")


def ok():
    return 42


def hold(seconds):
    """A run of a known length, to see how runs of one job overlap (or don't)."""
    time.sleep(seconds)
