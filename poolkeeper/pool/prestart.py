"""Start the forkserver early: before the config's validation, or first thing from the cache.

A start that validates the config pays for importing the spec model (pydantic: ~200 ms);
the forkserver only needs `pool.start_method`, `pool.preload` and `pythonpath`, so those are
read first with the bounded YAML loader and the forkserver imports the workers' modules while
the full validation runs. Best effort: on any doubt about the file nothing is started here,
the pool starts the forkserver as usual, and validation reports whatever is wrong. A start
from the cache (cli._run_cached) has the validated values and calls start_forkserver() itself.
The forkserver is a fork of this process (mphelpers.prestart_forkserver).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def pool_hints(path: str) -> tuple[str, list[str], list[str]] | None:
    """(start_method, preload, absolute pythonpath) as the file writes them, or None."""
    from poolkeeper.config.yamlload import load_yaml, read_config

    try:
        # The same bounded reader and loader as the validation: a FIFO or a device named as
        # the config must not block or exhaust the start before the validation says what it is.
        doc, _ = load_yaml(read_config(path), path)
    except Exception:  # noqa: BLE001 - anything odd: leave it to the validation
        return None
    data = doc.data
    if not isinstance(data, dict):
        return None
    pool = data.get("pool") or {}
    paths = data.get("pythonpath") or []
    if not isinstance(pool, dict) or not isinstance(paths, list):
        return None
    method = pool.get("start_method", "forkserver")
    preload = pool.get("preload") or []
    if not isinstance(method, str) or not isinstance(preload, list):
        return None
    if not all(isinstance(p, str) for p in [*preload, *paths]):
        return None
    base = os.path.dirname(os.path.realpath(path))
    return method, preload, [os.path.realpath(os.path.join(base, p)) for p in paths]


def prestart(path: str) -> bool:
    """Start the forkserver for the config at `path` if it asks for one; True if started."""
    hints = pool_hints(path)
    return hints is not None and start_forkserver(*hints)


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
