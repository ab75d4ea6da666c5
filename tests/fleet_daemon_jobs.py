"""Jobs for tests/test_fleet_daemon.py: each run says where it ran, as a line in a file of
$OUT (the host's own directory), so a test reads what each host ran."""

from __future__ import annotations

import os
from pathlib import Path


def note(ctx, out: str) -> None:
    with open(Path(out) / "runs", "a") as f:
        f.write(f"{ctx.job} {ctx.scheduled_at:.3f} {ctx.fence} {os.environ.get('POOLKEEPER_FENCE')}\n")


def hold(ctx, out: str) -> None:
    """A loop replica: says it holds its slot, until told to stop."""
    path = Path(out) / f"replica-{ctx.replica}-{ctx.fence}"
    path.write_text(f"running {os.getpid()}\n")
    ctx.stopping.wait()
    path.write_text("ended\n")
