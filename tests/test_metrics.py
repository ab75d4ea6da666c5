"""Metrics (issue 12, docs/monitoring.md) with real daemons: what `poolkeeper metrics` and the
textfile say as runs happen, checked by Prometheus's own `promtool`; the `metrics:` section's
errors; a reload that changes it; a listener or textfile that cannot be had at start.

The real Prometheus server scraping a daemon is in test_metrics_prometheus.py.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import stat
import time

import pytest
from metrics_support import daemon_metrics, free_port, poolkeeper, promtool, samples, value
from test_import_rules import MODULES

from poolkeeper import __version__

SPEC = """
pool: {{workers: 2, start_method: fork, max_runs_per_worker: 3}}
metrics: {{{metrics}}}
jobs:
  x: {{target: daemon_jobs:ok, every: 100ms}}
  y: {{target: daemon_jobs:fail, every: 150ms}}
  hung: {{target: daemon_jobs:hold, args: [30], every: 1s, timeout: 200ms}}
  crash: {{target: jobs_for_tests:die_exit3, every: 1s}}
"""


def test_metrics_count_runs_outcomes_and_replacements_and_promtool_accepts_them(
    daemon_factory,
):
    started = time.time()
    d = daemon_factory(SPEC.format(metrics=""))
    d.wait_log("ready")

    def enough():
        text = daemon_metrics(d.config)
        ok = value(text, "poolkeeper_runs_total", job="x", outcome="succeeded")
        bad = value(text, "poolkeeper_runs_total", job="y", outcome="failed")
        timeout = value(text, "poolkeeper_worker_replacements_total", cause="timeout")
        recycled = value(text, "poolkeeper_worker_replacements_total", cause="max_runs")
        died = value(text, "poolkeeper_worker_replacements_total", cause="died")
        return text if ok and ok >= 3 and bad and timeout and recycled and died else None

    text = d.wait_for(enough, what="runs ok and failed; workers replaced for each cause")
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Every outcome of a job that has run starts at 0 (increase() sees the first failure).
    assert value(text, "poolkeeper_runs_total", job="x", outcome="failed") == 0
    assert value(text, "poolkeeper_run_duration_seconds_count", job="x") >= 3
    assert value(text, "poolkeeper_run_lateness_seconds_count") >= 3
    last_ok = value(text, "poolkeeper_job_last_success_timestamp_seconds", job="x")
    last_bad = value(text, "poolkeeper_job_last_failure_timestamp_seconds", job="y")
    assert started < last_ok < time.time() and started < last_bad < time.time()
    assert value(text, "poolkeeper_job_last_success_timestamp_seconds", job="y") is None
    assert value(text, "poolkeeper_jobs") == 4
    assert value(text, "poolkeeper_runs_total", job="crash", outcome="lost") >= 1
    busy = value(text, "poolkeeper_workers", state="busy")
    idle = value(text, "poolkeeper_workers", state="idle")
    assert busy + idle == 2
    assert value(text, "poolkeeper_build_info", version=__version__, python=_python()) == 1
    assert value(text, "poolkeeper_process_resident_memory_bytes") > 0
    assert value(text, "poolkeeper_drains_total") == 0
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    # The gauges hold the end times of runs, as the state DB has them.
    runs = d.runs()
    assert last_ok in {r["ended"] for r in runs if r["job"] == "x" and r["outcome"] == "succeeded"}
    assert last_bad in {r["ended"] for r in runs if r["job"] == "y" and r["outcome"] == "failed"}


def _python() -> str:
    import sys

    return sys.version.split()[0]


def test_metrics_off_by_default_never_import_prometheus_client(daemon_factory):
    """No `metrics:` section: `poolkeeper metrics` says how to turn them on (exit 69), and
    no process of the daemon imports prometheus_client (~70 ms, a thread, nobody asked)."""
    d = daemon_factory(
        """
        pool: {workers: 1, start_method: forkserver}
        jobs:
          x: {target: daemon_jobs:ok, every: 100ms}
        """,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    d.wait_log("run succeeded")
    done = poolkeeper("metrics", "-c", str(d.config))
    assert done.returncode == 69
    assert "metrics are off: this daemon's spec has no `metrics:` section" in done.stderr
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    imported = {
        line.rpartition("|")[2].strip()
        for line in d.log().splitlines()
        if line.startswith("import time:")
    }
    assert "poolkeeper.daemon.mainloop" in imported  # the probe sees the daemon's imports
    assert not {name for name in imported if name.startswith("prometheus_client")}


PROMETHEUS_MODULES = {"poolkeeper.service.metrics", "poolkeeper.service.metrics_runs"}


def test_only_the_metrics_modules_import_prometheus_client_and_only_on_demand():
    """Statically: prometheus_client appears in the two metrics modules alone, and nothing
    else imports them at module level (metrics_hooks.start_metrics does, when they are on)."""
    importers, top_level = set(), set()
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(t.split(".")[0] == "prometheus_client" for t in targets):
                importers.add(name)
            if PROMETHEUS_MODULES & set(targets) and node in tree.body:
                top_level.add(name)
    assert importers == PROMETHEUS_MODULES
    assert top_level <= PROMETHEUS_MODULES


def test_the_textfile_is_replaced_atomically_and_never_seen_half_written(
    daemon_factory, tmp_path
):
    """A reader that reads and parses the file as fast as it can while the daemon rewrites it
    every 10 ms always gets a whole file: rename(2), never a write into the file it reads."""
    collector = tmp_path / "textfile_collector"
    collector.mkdir()
    prom = collector / "poolkeeper.prom"
    d = daemon_factory(
        SPEC.format(metrics=f"textfile: {prom}, textfile_every: 10ms").replace(
            ", max_runs_per_worker: 3", ""
        )
    )
    d.wait_for(prom.exists, what="the textfile")
    versions: set[str] = set()
    reads = 0
    while len(versions) < 30:
        text = prom.read_text()
        reads += 1
        families = samples(text)  # raises on a partial file
        # The last family written: a file cut short anywhere would lack it.
        assert ("poolkeeper_start_time_seconds", frozenset()) in families, text[-300:]
        assert text.endswith("\n")
        versions.add(text)
        assert reads < 100_000, "the file is not being rewritten"
        assert d.proc.poll() is None, d.log()
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644  # node_exporter runs as another user
    checked = promtool("check", "metrics", stdin=prom.read_text())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    # Written a last time after the drain, which it counts; no temporary file is left.
    assert value(prom.read_text(), "poolkeeper_drains_total") == 1
    assert os.listdir(collector) == ["poolkeeper.prom"]


def test_a_listener_that_cannot_bind_fails_the_start_in_one_line(daemon_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory(SPEC.format(metrics=f'listen: "127.0.0.1:{port}"'))
        assert d.wait_exit() == 69
    line = f"metrics.listen 127.0.0.1:{port}: cannot listen: Address already in use"
    assert line in d.log()
    assert "Traceback" not in d.log()


def test_a_textfile_directory_that_cannot_be_written_fails_the_start(daemon_factory, tmp_path):
    missing = tmp_path / "no-such-dir" / "poolkeeper.prom"
    d = daemon_factory(SPEC.format(metrics=f"textfile: {missing}"))
    assert d.wait_exit() == 69
    assert f"metrics.textfile {missing}: cannot write: No such file or directory" in d.log()
    assert "Traceback" not in d.log()


def test_the_listener_answers_on_ipv6_loopback(daemon_factory):
    import urllib.request

    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6: the [::1] listener cannot be tested")
    port = free_port("::1")
    d = daemon_factory(SPEC.format(metrics=f'listen: "[::1]:{port}"'))
    d.wait_log("ready")
    with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert value(text, "poolkeeper_jobs") == 4
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_the_gauges_show_a_full_pool_and_the_runs_waiting_for_it(daemon_factory):
    d = daemon_factory(
        """
        pool: {workers: 1, start_method: fork}
        shutdown: {drain_timeout: 1s}
        metrics: {}
        jobs:
          long: {target: daemon_jobs:hold, args: [60], at: startup}
          tick: {target: daemon_jobs:ok, every: 100ms}
        """
    )
    d.wait_log("long[")  # its run started: the one worker is taken

    def full():
        text = daemon_metrics(d.config)
        return text if (value(text, "poolkeeper_runs_queued") or 0) >= 1 else None

    text = d.wait_for(full, what="a run of tick waiting")
    assert value(text, "poolkeeper_workers", state="busy") == 1
    assert value(text, "poolkeeper_workers", state="idle") == 0
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


@pytest.mark.parametrize(
    "metrics, error",
    [
        ('listen: "::1:9108"', "metrics.listen: '::1:9108': the address must be an IPv4"),
        ('listen: "127.0.0.1:0"', "is not 'address:port' with a port from 1 to 65535"),
        ('listen: "127.0.0.1"', "is not 'address:port' with a port from 1 to 65535"),
        ('listen: "example.com:80"', "the address must be an IPv4 address"),
        ("listen: 9108", "metrics.listen: expected an address like '127.0.0.1:9108'"),
        ("textfile: out/poolkeeper.prom", "is not an absolute path ending in .prom"),
        ("textfile: /var/lib/x/poolkeeper.txt", "is not an absolute path ending in .prom"),
        ("textfile: /x.prom, textfile_every: 0s", "metrics.textfile_every: must be positive"),
        ("port: 9108", "unknown key 'port'"),
    ],
)
def test_a_bad_metrics_section_is_one_line_with_its_place_and_exit_78(tmp_path, metrics, error):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nmetrics: {{{metrics}}}\njobs: {{}}\n")
    done = poolkeeper("check", str(spec))
    assert done.returncode == 78
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{spec}:2:"), done.stderr
    assert error in lines[0]


def test_a_reload_that_changes_metrics_is_refused_and_counted(daemon_factory):
    d = daemon_factory(SPEC.format(metrics=""))
    d.wait_log("ready")
    port = free_port()
    d.rewrite(SPEC.format(metrics=f'listen: "127.0.0.1:{port}"'))
    done = poolkeeper("reload", "--wait", "-c", str(d.config))
    assert done.returncode == 78
    assert "metrics: changed: a running daemon keeps its metrics listener" in done.stderr
    d.rewrite(SPEC.format(metrics="") + "  z: {target: daemon_jobs:ok, every: 1h}\n")
    assert poolkeeper("reload", "--wait", "-c", str(d.config)).returncode == 0
    text = daemon_metrics(d.config)
    assert value(text, "poolkeeper_reloads_total", result="rejected") == 1
    assert value(text, "poolkeeper_reloads_total", result="applied") == 1
    assert value(text, "poolkeeper_jobs") == 5
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_last_success_survives_a_restart(daemon_factory, tmp_path):
    """The gauge an alert's clock reads ("not succeeded in 26 hours") comes back from the
    state DB when the daemon starts again, before the job runs again."""
    spec = "metrics: {}\njobs:\n  nightly: {target: daemon_jobs:ok, at: startup}\n"
    first = daemon_factory(spec)
    first.wait_log("run succeeded")
    ended = daemon_metrics(first.config)
    when = value(ended, "poolkeeper_job_last_success_timestamp_seconds", job="nightly")
    assert when is not None
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    second = daemon_factory(
        "metrics: {}\njobs:\n  nightly: {target: daemon_jobs:ok, cron: \"0 3 1 1 *\"}\n"
    )
    second.wait_log("ready")
    text = daemon_metrics(second.config)
    assert value(text, "poolkeeper_job_last_success_timestamp_seconds", job="nightly") == when
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0
