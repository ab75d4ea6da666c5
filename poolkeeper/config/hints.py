"""What the forkserver needs of the spec file, read before its validation (pool_hints).

A start that validates the config pays for importing the spec model (pydantic: ~200 ms); the
forkserver only needs `pool.start_method`, `pool.preload` and `pythonpath`, so cli.py reads
those first, with the same bounded reader and YAML loader as the validation, and starts the
forkserver (poolkeeper.pool.prestart) while the full validation runs. Best effort: on any doubt
about the file there are no hints, the pool starts the forkserver as usual, and the validation
reports whatever is wrong. Imports no pydantic: only yamlload.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from poolkeeper.config.yamlload import load_top, read_config


class PoolHints(NamedTuple):
    start_method: str
    preload: list[str]
    pythonpath: list[str]  # absolute


def pool_hints(path: str) -> PoolHints | None:
    """start_method, preload and the absolute pythonpath as the file writes them, or None."""
    try:
        # The same bounded reader and loader as the validation: a FIFO or a device named as
        # the config must not block or exhaust the start before the validation says what it is.
        # Converts only these sections, and keeps the parse for the validation that follows.
        data = load_top(read_config(path), path, ("pool", "pythonpath"))
    except Exception:  # noqa: BLE001 - anything odd: leave it to the validation
        return None
    if data is None:
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
    return PoolHints(method, preload, [os.path.realpath(os.path.join(base, p)) for p in paths])
