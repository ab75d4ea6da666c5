"""Logging for the daemon and its workers: the journal under systemd, one human line otherwise.

Job records carry the journal fields JOB, RUN_ID, ATTEMPT and WORKER_PID (python-systemd's
JournalHandler sends every UPPERCASE record attribute as a field), so
`journalctl -u poolkeeper JOB=rollup` shows one job's lines, tracebacks included. Event records
(run started, run failed, drain finished, ...) also carry a fixed MESSAGE_ID, listed in
docs/journal.md, so `journalctl MESSAGE_ID=...` finds every event of one kind.

Workers log on their own (to the journal socket or the inherited stderr): a record never has
to cross the worker's pipe, and a job that floods its log cannot slow the main loop down. The
worker's log record factory (poolkeeper.pool.worker) stamps the run's fields on every record, so
plain `logging` in a job carries them too, not only `ctx.log`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from poolkeeper.outcomes import Outcome
from poolkeeper.printable import printable

LOGGER_NAME = "poolkeeper"
JOB_FIELDS = ("JOB", "RUN_ID", "ATTEMPT", "WORKER_PID")

# One fixed 128-bit id per event kind (like systemd's catalog ids): stable across releases.
# A run's end has the id of its outcome (poolkeeper.outcomes): `run_failed`, `run_lost`, ...
MESSAGE_IDS: dict[str, str] = {
    "run_started": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a01",
    **{f"run_{outcome}": outcome.message_id for outcome in Outcome},
    "worker_replaced": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a07",
    "reload_applied": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a08",
    "reload_rejected": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a09",
    "drain_started": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a0a",
    "drain_finished": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a0b",
    "daemon_ready": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a0c",
    # Runs counted rather than logged one by one (poolkeeper.daemon.runlog).
    "runs_summarised": "5b0a3e0c7f4e4d0c9f7a0e1d2c3b4a0d",
}


def job_prefix(record: logging.LogRecord) -> str:
    """`rollup[3f2a9c01] ` for a job's record (its name and run id lead the line), else ''."""
    job = getattr(record, "JOB", None)
    if job is None:
        return ""
    run_id = getattr(record, "RUN_ID", None)
    return f"{job}[{str(run_id)[:8]}] " if run_id else f"{job} "


class HumanFormatter(logging.Formatter):
    """`12:00:01.234 INFO    rollup[3f2a9c01] message`, for a terminal. Messages carry job
    text (errors, a job's own log lines): control characters are shown escaped, so a job
    cannot clear the reader's screen; newlines stay (tracebacks)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        head = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} "
        return head + printable(job_prefix(record) + super().format(record), newlines=True)


class JournalFormatter(logging.Formatter):
    """MESSAGE of a journal entry: `rollup[3f2a9c01] message`. The fields JOB, RUN_ID, ... are
    there too, but `journalctl -u poolkeeper` and `systemctl status` show MESSAGE alone, and a
    line must say which job it is about. journald stamps time and priority itself."""

    def format(self, record: logging.LogRecord) -> str:
        return job_prefix(record) + super().format(record)


class PriorityPrefixFormatter(JournalFormatter):
    """For journald's stdout/stderr stream without python-systemd: `<N>` on every line sets
    PRIORITY, so a traceback is filed at its record's priority."""

    _PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self._PRIORITIES.get(record.levelname, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """systemd sets $JOURNAL_STREAM to 'DEV:INODE' of the stream it connected stderr to."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="poolkeeper")  # untyped module
    return handler


def resolve_target(target: str) -> str:
    """'auto' becomes 'journal' when stderr is connected to journald, else 'stderr'."""
    if target == "auto":
        return "journal" if stderr_is_journal() else "stderr"
    return target


def make_handler(target: str) -> logging.Handler:
    """A handler for a resolved target: 'journal' or 'stderr'."""
    if target == "journal":
        handler = _journal_handler()
        if handler is not None:
            handler.setFormatter(JournalFormatter("%(message)s"))
            return handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PriorityPrefixFormatter())
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(HumanFormatter())
    return handler


def setup(target: str = "auto", level: int | str = logging.INFO) -> str:
    """Configure the root logger of this process; returns the resolved target."""
    resolved = resolve_target(target)
    handler = make_handler(resolved)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return resolved


class WorkerLogSetup:
    """Picklable worker initialiser: the same log target as the main process."""

    def __init__(self, target: str, level: int | str = logging.INFO) -> None:
        self.target = target
        self.level = level

    def __call__(self) -> None:
        setup(self.target, self.level)


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """`extra=` for an event record: its MESSAGE_ID plus the given journal fields."""
    extra = {key: value for key, value in fields.items() if value is not None}
    extra["MESSAGE_ID"] = MESSAGE_IDS[kind]
    return extra


def ended_event(outcome: Outcome, **fields: Any) -> dict[str, Any]:
    """`extra=` for the record of a run that ended with `outcome`: its outcome's MESSAGE_ID
    plus the given journal fields. Every Outcome has one, so this cannot fail."""
    extra = {key: value for key, value in fields.items() if value is not None}
    extra["MESSAGE_ID"] = outcome.message_id
    return extra


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
