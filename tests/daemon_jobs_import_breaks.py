"""Imports fine where `poolkeeper check` imports it, fails in a worker whose job sets
BREAK_IMPORT: a job module that breaks after the daemon validated it."""

import os

if os.environ.get("BREAK_IMPORT"):
    raise ImportError("broken on purpose")


def loop(ctx):
    ctx.stopping.wait()
