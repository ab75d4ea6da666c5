"""The daemon's Prometheus metrics (issue 12; names and meaning in docs/monitoring.md).

Built with prometheus_client, in a registry of our own (not the library's global one: no
platform collector, and nothing a job's module registers shows up as ours). The process
collector is kept, under our prefix: the daemon's memory, CPU and descriptors are read from
/proc only when someone scrapes, and a bare `process_*` would collide with node_exporter's own
in its textfile collector.

The main loop updates the metric objects (one hook per event, poolkeeper.service.metrics_hooks;
the gauges of the pool at most every GAUGES_EVERY) and never serves anyone: the HTTP listener
is prometheus_client's WSGI server in a daemon thread, and the textfile is written by a thread
of its own, so a slow scraper or a slow disk never holds a turn. Both threads only read
(prometheus_client's metric objects take their own locks).

Imported only when a spec has a `metrics:` section, and by nothing the `run` start imports
otherwise (tests/test_import_rules.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

from poolkeeper import __version__
from poolkeeper.outcomes import Outcome

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from poolkeeper.config.settings import Config
    from poolkeeper.daemon.mainloop import Daemon
    from poolkeeper.pool.protocol import RunEnded, RunStarted, WorkerEvent
    from poolkeeper.state.store import StateStore

# A counter's `_created` series doubles every counter and histogram child (one per job and
# outcome); nothing we document uses it. A process-wide switch: ours is the only registry.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "poolkeeper"
GAUGES_EVERY = 1.0  # seconds: the pool's gauges are refreshed this often (a scrape: >= 1s)
# Jobs run from milliseconds to hours: buckets from 10 ms to 2 h, a few per decade.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200)
# How late a fire starts, from 1 ms (a busy loop) to 5 min (a pool full for minutes).
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300)
# A worker's replacement, by cause: its run timed out / died under it / was killed (drain,
# reload, pause), or it was recycled (memory, max runs, its run was stopped by hand).
_KILLED_BY = {
    Outcome.TIMEOUT: str(Outcome.TIMEOUT),
    Outcome.LOST: "died",
    Outcome.KILLED: str(Outcome.KILLED),
}
_RECYCLED = ("memory", "max_runs", "run_stopped")
_DEAD_KEPT = 1024  # pids whose run said why they died, waiting for their "replaced" event


class Unavailable(Exception):
    """The listener cannot be bound or the textfile cannot be written."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class Metrics:
    """The metric objects, the listener and the textfile writer of one daemon."""

    def __init__(self, config: Config, store: StateStore, log: logging.Logger) -> None:
        settings = config.metrics
        assert settings is not None  # metrics_hooks.start_metrics decides
        self.log = log
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace=PREFIX, registry=registry)
        self.runs = Counter(
            f"{PREFIX}_runs", "Runs ended, by job and outcome.", ["job", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            f"{PREFIX}_run_duration_seconds", "How long runs took, by job.", ["job"],
            buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.lateness = Histogram(
            f"{PREFIX}_run_lateness_seconds",
            "How late scheduled runs started: started minus scheduled (jitter included; "
            "first attempts of every/cron/at jobs).",
            buckets=LATENESS_BUCKETS, registry=registry,
        )  # fmt: skip
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
        self.last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "When the job's last successful run ended (Unix time).", ["job"], registry=registry,
        )  # fmt: skip
        self.last_failure = Gauge(
            f"{PREFIX}_job_last_failure_timestamp_seconds",
            "When the job's last failed run (failed, timeout, lost) ended (Unix time).",
            ["job"], registry=registry,
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
        # Children by label, cached: labels() takes a lock and builds a key on every call,
        # this is one dict lookup on the path of every run.
        self._runs: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._dead: dict[int, str] = {}  # worker pid -> cause, from the run that ended on it
        self._next_gauges = 0.0
        self._seed(store)
        self._server: WSGIServer | None = None
        self._writer: _TextfileWriter | None = None
        if settings.listen is not None:
            self._server = self._listen(settings.listen)
        if settings.textfile is not None:
            self._writer = _TextfileWriter(self, settings.textfile, settings.textfile_every)

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
                self.last_success.labels(job).set(record.ended)
            elif outcome.failure:
                self.last_failure.labels(job).set(record.ended)

    def _listen(self, listen: str) -> WSGIServer:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        try:
            server, _thread = prometheus_client.start_http_server(
                int(port), addr=host, registry=self.registry
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise Unavailable(
                f"metrics.listen {listen}: cannot listen: {why}", exc.errno
            ) from None
        self.log.info("metrics: serving http://%s/metrics", listen)
        return server

    # -- hooks (poolkeeper.service.metrics_hooks.MetricsHooks) -----------------------------

    def run_started(self, ev: RunStarted) -> None:
        task = ev.task
        if task.attempt == 1 and not task.loop and task.scheduled_at > 0:
            self.lateness.observe(max(0.0, ev.started_at - task.scheduled_at))

    def run_ended(self, ev: RunEnded) -> None:
        job, outcome = ev.task.job, ev.outcome
        child = self._runs.get((job, outcome))
        if child is None:
            child = self._first_end(job, outcome)
        child.inc()
        if ev.started_at is not None:
            hist = self._durations.get(job)
            if hist is None:
                hist = self._durations[job] = self.duration.labels(job)
            hist.observe(max(0.0, ev.ended_at - ev.started_at))
        if outcome is Outcome.SUCCEEDED:
            self.last_success.labels(job).set(ev.ended_at)
            return
        if outcome.failure:
            self.last_failure.labels(job).set(ev.ended_at)
        cause = _KILLED_BY.get(outcome)
        if cause is not None and ev.worker_pid is not None:
            if len(self._dead) >= _DEAD_KEPT:  # workers that were never replaced (a drain)
                self._dead.clear()
            self._dead[ev.worker_pid] = cause

    def _first_end(self, job: str, outcome: str) -> Any:
        """A job's first run to end: every outcome's counter starts at 0, so that
        `increase()` sees the first failure too (a series born at 1 has no increase)."""
        for each in Outcome:
            self._runs[(job, each)] = self.runs.labels(job, each)
        return self._runs[(job, outcome)]

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


class _TextfileWriter:
    """Writes the metrics to `path` every `every` seconds, from a thread of its own, for
    node_exporter's textfile collector. Atomically: a temporary file in the same directory
    (named so that the collector, which reads *.prom, never reads it), then rename(2); a
    reader sees the old file or the new one, never part of one."""

    def __init__(self, metrics: Metrics, path: str, every: float) -> None:
        self.metrics = metrics
        self.path = path
        self.every = every
        self._stop = threading.Event()
        self._problem: str | None = None
        self.write()  # at start, in the caller: a directory we cannot write fails the start
        self._thread = threading.Thread(target=self._run, name="metrics-textfile", daemon=True)
        self._thread.start()
        metrics.log.info("metrics: writing %s every %gs", path, every)

    def write(self) -> None:
        """One atomic write; raises Unavailable."""
        directory, name = os.path.split(self.path)
        data = self.metrics.text().encode()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600: the collector reads it
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            why = exc.strerror or str(exc)
            raise Unavailable(
                f"metrics.textfile {self.path}: cannot write: {why}", exc.errno
            ) from None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._write_logged()

    def _write_logged(self) -> None:
        """A write whose failure is a warning, said once until it changes or recovers:
        the metrics go on being served, and the file's age tells the rest."""
        try:
            self.write()
        except Unavailable as exc:
            problem = str(exc)
            if problem != self._problem:
                self.metrics.log.warning("metrics: textfile not written: %s", problem)
            self._problem = problem
            return
        if self._problem is not None:
            self.metrics.log.info("metrics: textfile %s written again", self.path)
            self._problem = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._write_logged()
