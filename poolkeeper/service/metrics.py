"""The daemon's Prometheus metrics (issue 12; names and meaning in docs/monitoring.md).

Built with prometheus_client, in a registry of our own (not the library's global one: no
platform collector, and nothing a job's module registers shows up as ours). The process
collector is kept, under our prefix: the daemon's memory, CPU and descriptors are read from
/proc only when someone scrapes, and a bare `process_*` would collide with node_exporter's own
in its textfile collector.

The main loop updates the figures (one hook per event, poolkeeper.service.metrics_hooks: the
runs' in plain objects, poolkeeper.service.metrics_runs; the pool's gauges at most every
GAUGES_EVERY) and never serves anyone: the HTTP listener is prometheus_client's WSGI server in
a daemon thread, and the textfile is written by a thread of its own
(poolkeeper.service.metrics_textfile), so a slow scraper or a slow disk never holds a turn.
Both threads only read.

Imported only when a spec has a `metrics:` section, and by nothing the `run` start imports
otherwise (tests/test_import_rules.py).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    generate_latest,
)

from poolkeeper import __version__
from poolkeeper.outcomes import Outcome
from poolkeeper.service.metrics_runs import RunFigures
from poolkeeper.service.metrics_textfile import TextfileWriter, Unavailable

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from poolkeeper.config.settings import Config
    from poolkeeper.daemon.mainloop import Daemon
    from poolkeeper.pool.protocol import RunEnded, WorkerEvent
    from poolkeeper.state.store import StateStore

# A counter's `_created` series doubles every counter and histogram child (one per job and
# outcome); nothing we document uses it. A process-wide switch: ours is the only registry.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "poolkeeper"
GAUGES_EVERY = 1.0  # seconds: the pool's gauges are refreshed this often (a scrape: >= 1s)
# A worker's replacement, by cause: its run timed out / died under it / was killed (drain,
# reload, pause), or it was recycled (memory, max runs, its run was stopped by hand).
_KILLED_BY = {
    Outcome.TIMEOUT: str(Outcome.TIMEOUT),
    Outcome.LOST: "died",
    Outcome.KILLED: str(Outcome.KILLED),
}
_RECYCLED = ("memory", "max_runs", "run_stopped")
_DEAD_KEPT = 1024  # pids whose run said why they died, waiting for their "replaced" event


class Metrics:
    """The metric objects, the listener and the textfile writer of one daemon."""

    def __init__(self, config: Config, store: StateStore, log: logging.Logger) -> None:
        settings = config.metrics
        assert settings is not None  # metrics_hooks.start_metrics decides
        self.log = log
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace=PREFIX, registry=registry)
        self.runs = RunFigures(PREFIX)
        registry.register(self.runs)
        self.queued = Gauge(
            f"{PREFIX}_runs_queued", "Runs due or delayed (retry, jitter), not started yet.",
            registry=registry,
        )  # fmt: skip
        self.workers = Gauge(
            f"{PREFIX}_workers", "Pool workers by state: busy (running a job) or idle.",
            ["state"], registry=registry,
        )  # fmt: skip
        self.jobs = Gauge(f"{PREFIX}_jobs", "Jobs of the running config.", registry=registry)
        self.replacements = Counter(
            f"{PREFIX}_worker_replacements", "Workers replaced, by cause.", ["cause"],
            registry=registry,
        )  # fmt: skip
        self.drains = Counter(
            f"{PREFIX}_drains", "Drains begun (SIGTERM, SIGINT).", registry=registry
        )
        self.reloads = Counter(
            f"{PREFIX}_reloads", "Reloads, by result: applied or rejected.", ["result"],
            registry=registry,
        )  # fmt: skip
        Info(f"{PREFIX}_build", "The daemon's version.", registry=registry).info(
            {"version": __version__, "python": sys.version.split()[0]}
        )
        Gauge(
            f"{PREFIX}_start_time_seconds", "When the daemon started (Unix time).",
            registry=registry,
        ).set(time.time())  # fmt: skip
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        for cause in (*_KILLED_BY.values(), *_RECYCLED):
            self.replacements.labels(cause)
        self._dead: dict[int, str] = {}  # worker pid -> cause, from the run that ended on it
        self._next_gauges = 0.0
        self._seed(store)
        self._server: WSGIServer | None = None
        self._writer: TextfileWriter | None = None
        if settings.listen is not None:
            self._server = self._listen(settings.listen)
        if settings.textfile is not None:
            every = settings.textfile_every
            self._writer = TextfileWriter(self.text, settings.textfile, every, log)

    def _seed(self, store: StateStore) -> None:
        """The last success and failure the state DB knows of, so that a restart does not
        reset an alert's clock ("has not succeeded in 26 hours"): only each job's last
        finished run is kept there, so one of the two gauges waits for the next run."""
        for job, record in store.last_outcomes().items():
            if record.ended is None:
                continue
            try:
                outcome = Outcome(record.outcome)
            except ValueError:  # 'running': not finished
                continue
            if outcome is Outcome.SUCCEEDED:
                self.runs.job(job).last_success = record.ended
            elif outcome.failure:
                self.runs.job(job).last_failure = record.ended

    def _listen(self, listen: str) -> WSGIServer:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        try:
            server, _thread = prometheus_client.start_http_server(
                int(port), addr=host, registry=self.registry
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise Unavailable(f"metrics.listen {listen}: cannot listen: {why}", exc.errno) from None
        self.log.info("metrics: serving http://%s/metrics", listen)
        return server

    # -- hooks (poolkeeper.service.metrics_hooks.MetricsHooks) -----------------------------

    def run_ended(self, ev: RunEnded) -> None:
        self.runs.ended(ev)
        if ev.outcome is not Outcome.SUCCEEDED and ev.worker_pid is not None:
            cause = _KILLED_BY.get(ev.outcome)
            if cause is not None:
                if len(self._dead) >= _DEAD_KEPT:  # workers never replaced (a drain)
                    self._dead.clear()
                self._dead[ev.worker_pid] = cause

    def worker_event(self, ev: WorkerEvent) -> None:
        if ev.kind == "replaced":
            cause = self._dead.pop(ev.pid, "died")
        elif ev.kind == "recycled":  # poolkeeper.pool.supervisor's reasons for _retire
            if ev.detail.startswith("RSS"):
                cause = "memory"
            elif ev.detail.endswith(" runs"):
                cause = "max_runs"
            else:
                cause = "run_stopped"
        else:
            return
        self.replacements.labels(cause).inc()

    def drain_started(self) -> None:
        self.drains.inc()

    def reloaded(self, applied: bool) -> None:
        self.reloads.labels("applied" if applied else "rejected").inc()

    def report(self, daemon: Daemon, now: float) -> None:
        """At the end of a turn: the pool's gauges, at most every GAUGES_EVERY."""
        if now >= self._next_gauges:
            self._next_gauges = now + GAUGES_EVERY
            self._set_gauges(daemon)

    def _set_gauges(self, daemon: Daemon) -> None:
        # Runs waiting: a sum over the jobs (no counter is kept of them), once a second.
        self.queued.set(sum(len(job.pending) for job in daemon.jobs.values()))
        pool = daemon.pool
        if pool is not None:
            busy = pool.busy_count()
            self.workers.labels("busy").set(busy)
            self.workers.labels("idle").set(max(0, pool.size() - busy))
        self.jobs.set(len(daemon.jobs) + len(daemon.reloader.held))

    def reply(self, daemon: Daemon) -> dict[str, Any]:
        """The `metrics` verb of the control socket: the text format, gauges as of now."""
        self._set_gauges(daemon)
        return {"ok": True, "message": self.text().rstrip("\n")}

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def fds(self) -> list[int]:
        """The listening socket: a worker started by fork must not hold our port."""
        return [self._server.fileno()] if self._server is not None else []

    def close(self) -> None:
        """Stop the listener; write the textfile a last time (the drain's runs counted)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
