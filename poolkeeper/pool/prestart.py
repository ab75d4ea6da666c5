"""Start the forkserver early: before the config's validation, or first thing from the cache.

A start that validates the config pays for importing the spec model (pydantic: ~200 ms); the
forkserver only needs `pool.start_method`, `pool.preload` and `pythonpath`. cli.py reads those
first (poolkeeper.config.hints: this package reads no config) and passes them here, so the
forkserver imports the workers' modules while the full validation runs; a start from the cache
(cli._run_cached) passes the validated values. The forkserver is a fork of this process
(helper_processes.prestart_forkserver).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def start_forkserver(method: str, preload: list[str], pythonpath: list[str]) -> bool:
    """Start the forkserver now if the pool will use one; True if started."""
    if method != "forkserver":
        return False
    # The forkserver takes the main process's sys.path: preload modules must be findable.
    add_to_sys_path(pythonpath)
    from poolkeeper.pool.helper_processes import prestart_forkserver

    prestart_forkserver(preload)
    return True


def add_to_sys_path(entries: Sequence[str]) -> None:
    """Put `pythonpath` in front of sys.path, in order, as the main process, the forkserver and
    every worker do."""
    for entry in reversed(entries):
        if entry not in sys.path and os.path.isdir(entry):
            sys.path.insert(0, entry)
