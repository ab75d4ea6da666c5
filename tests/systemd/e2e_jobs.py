"""Job functions for the end-to-end tests: copied into the sandbox (/srv/pk-e2e) and run by a
real poolkeeper under a real systemd, as the unit's user. Only the standard library."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("e2e_jobs")


def sleep_for(seconds: float) -> str:
    """A before_ready job: READY=1 must wait for it."""
    time.sleep(seconds)
    return f"slept {seconds}"


def quick(ctx) -> None:
    ctx.log.info("quick run %s", ctx.run_id)


def half_line(ctx, flag_dir: str) -> None:
    """Writes a line in two pieces, and another job writes a whole line in between."""
    sys.stdout.write("first half of a line, ")
    sys.stdout.flush()
    open(os.path.join(flag_dir, "half-written"), "w").close()
    _wait_for_file(os.path.join(flag_dir, "whole-written"))
    sys.stdout.write("second half\n")
    sys.stdout.flush()


def whole_line(ctx, flag_dir: str) -> None:
    _wait_for_file(os.path.join(flag_dir, "half-written"))
    print("a whole line from another job", flush=True)
    open(os.path.join(flag_dir, "whole-written"), "w").close()


def _wait_for_file(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def hold(ctx, seconds: float) -> None:
    """A run that stays in flight for a while (so STATUS shows a busy worker)."""
    ctx.log.info("holding for %ss", seconds)
    time.sleep(seconds)


def fail(ctx, message: str) -> None:
    """Logs through plain `logging` and through ctx.log, then fails with a traceback."""
    log.warning("plain logging from the job before it fails")
    ctx.log.info("ctx.log from the job before it fails")
    _deep_failure(message)


def _deep_failure(message: str) -> None:
    raise ValueError(message)


def loop(ctx) -> None:
    """A loop replica: works in small units and returns once the drain starts."""
    while not ctx.stopping.wait(0.1):
        ctx.heartbeat()
    ctx.log.info("loop replica saw the stop event")


def with_grandchild(ctx, seconds: float, pid_dir: str) -> None:
    """An in-flight run when the stop comes: it starts a grandchild that ignores SIGTERM (so
    neither systemd's SIGTERM nor the job cleans it up), records both pids, finishes its work
    without looking at ctx.stopping, and leaves the grandchild behind: poolkeeper must kill
    it with the worker's process group."""
    child = subprocess.Popen(
        ["sleep", "300"], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
    )
    path = os.path.join(pid_dir, f"{ctx.run_id}.pids")
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}\n")
    os.rename(path + ".tmp", path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    ctx.log.info("in-flight run done, grandchild %d left behind", child.pid)


def busy(ctx, seconds: float, flag_dir: str) -> None:
    """A run that ignores the drain for `seconds` (a long drain), flagging that it started."""
    open(os.path.join(flag_dir, f"{ctx.job}.started"), "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
