"""What the main loop holds of the metrics, whether they are on or off (issue 12).

The daemon calls one hook per event (a run ended, a worker replaced, a drain, a reload) and
one at report time. With no `metrics:` section they go to `NoMetrics`, whose hooks
do nothing, and prometheus_client is never imported (~70 ms of start-up, a thread and a port
that nobody asked for). With one, `start_metrics` imports poolkeeper.service.metrics, whose
`Metrics` implements the same hooks.

May import: the standard library and the shared tables; the metrics module only inside
start_metrics.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from poolkeeper.exitcodes import UNAVAILABLE

if TYPE_CHECKING:
    from poolkeeper.config.settings import Config
    from poolkeeper.daemon.mainloop import Daemon
    from poolkeeper.pool.protocol import RunEnded, WorkerEvent
    from poolkeeper.state.store import StateStore


class MetricsFailed(Exception):
    """The listener cannot be bound or the textfile cannot be written, at start."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class MetricsHooks(Protocol):
    def run_ended(self, ev: RunEnded) -> None: ...

    def worker_event(self, ev: WorkerEvent) -> None: ...

    def drain_started(self) -> None: ...

    def reloaded(self, applied: bool) -> None: ...

    def report(self, daemon: Daemon, now: float) -> None: ...

    def reply(self, daemon: Daemon) -> dict[str, Any]: ...

    def fds(self) -> list[int]: ...

    def close(self) -> None: ...


class NoMetrics:
    """Metrics off: every hook is a no-op (a method call per event, nothing more)."""

    def run_ended(self, ev: RunEnded) -> None:
        pass

    def worker_event(self, ev: WorkerEvent) -> None:
        pass

    def drain_started(self) -> None:
        pass

    def reloaded(self, applied: bool) -> None:
        pass

    def report(self, daemon: Daemon, now: float) -> None:
        pass

    def reply(self, daemon: Daemon) -> dict[str, Any]:
        """The `metrics` verb of the control socket: refused, saying how to turn them on."""
        return {
            "ok": False,
            "message": "metrics are off: this daemon's spec has no `metrics:` section "
            "(docs/monitoring.md)",
            "exit": UNAVAILABLE,
        }

    def fds(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


def start_metrics(config: Config, store: StateStore, log: logging.Logger) -> MetricsHooks:
    """The daemon's metrics: NoMetrics, or the real ones with their listener bound and their
    textfile written once. Raises MetricsFailed when either cannot be (the caller fails the start:
    metrics asked for and silently missing would only be noticed when an alert should have
    fired)."""
    if config.metrics is None:
        return NoMetrics()
    from poolkeeper.service.metrics import Metrics
    from poolkeeper.service.metrics_textfile import Unavailable

    try:
        return Metrics(config, store, log)
    except Unavailable as exc:
        raise MetricsFailed(str(exc), exc.errno) from None


def reload_refusal(old: Config, new: Config) -> str | None:
    """Why a reload cannot apply `new`: a changed `metrics:` section is applied by a restart.
    The listener's port, the textfile writer and every counter belong to the running daemon,
    and a reload that half-applied them (a port that cannot be bound after the jobs changed)
    could not be refused any more."""
    if old.metrics == new.metrics:
        return None
    return (
        "metrics: changed: a running daemon keeps its metrics listener and textfile; "
        "restart it to apply this (systemctl restart), or put the section back as it was"
    )
