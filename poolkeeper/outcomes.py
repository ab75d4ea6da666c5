"""How a run ended, and what each way of ending means: one table for the whole package.

An `Outcome` is a `StrEnum`: each member *is* the string stored in the state DB, shown by
`poolkeeper history` and counted in STATUS=, so records written before this table existed read
the same. What the daemon does with an outcome is in `_TABLE` below, one row per outcome (the
shape of CPython's concurrent.futures states table), so adding or changing one is one line:

- level: the level of the `run <outcome>` log record (its journal PRIORITY);
- failure: whether it counts as a failure (`restart: on-failure`, a loop's backoff);
- retried: whether `retry:` tries the run again;
- message_id: the journal MESSAGE_ID of the `run <outcome>` record (docs/journal.md).

May import: the standard library only (pool/, daemon/, state/, service/ and report.py use it).
"""

from __future__ import annotations

import enum
import logging
from typing import NamedTuple


class Outcome(enum.StrEnum):
    """How a run ended. A run in flight has none yet (see RUNNING)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # raised, or its worker could not start it
    TIMEOUT = "timeout"  # `timeout:` or `heartbeat_timeout:` ran out: killed
    LOST = "lost"  # its worker died under it, or a previous daemon died while it ran
    KILLED = "killed"  # the daemon stopped it: drain budget spent, fast stop, pause, reload

    @property
    def level(self) -> int:
        return _TABLE[self].level

    @property
    def failure(self) -> bool:
        return _TABLE[self].failure

    @property
    def retried(self) -> bool:
        return _TABLE[self].retried

    @property
    def message_id(self) -> str:
        return _TABLE[self].message_id


class _Row(NamedTuple):
    level: int
    failure: bool
    retried: bool
    message_id: str


# 'killed' is neither a failure nor retried on purpose: only the daemon itself stops a run
# that way, and retrying it would start work during shutdown. The MESSAGE_IDs are stable
# across releases: never change one.
_TABLE: dict[Outcome, _Row] = {
    #                  level            failure retried MESSAGE_ID
    Outcome.SUCCEEDED: _Row(logging.INFO, False, False, "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a02"),
    Outcome.FAILED: _Row(logging.ERROR, True, True, "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a03"),
    Outcome.TIMEOUT: _Row(logging.ERROR, True, True, "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a04"),
    Outcome.LOST: _Row(logging.ERROR, True, True, "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a05"),
    Outcome.KILLED: _Row(logging.WARNING, False, False, "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a06"),
}

# What the state DB stores in a run's outcome column while the run is in flight (and
# `history` shows): not an Outcome, a run has none until it ends.
RUNNING = "running"
