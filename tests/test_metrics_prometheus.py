"""A real Prometheus server (Debian's `prometheus`) scraping a running daemon's listener every
second on loopback: what it stores is what an alert or a dashboard reads. Asked through its
HTTP query API. Also: the example alert rules (docs/prometheus-alerts.yml) pass `promtool
check rules`, load into that server and evaluate on real data, and the nightly rule fires
when it should (`promtool test rules`); every query of docs/grafana-dashboard.json is valid
and answers with data.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from metrics_support import daemon_metrics, free_port, promtool, samples

REPO = Path(__file__).parent.parent
RULES = REPO / "docs" / "prometheus-alerts.yml"
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"

SPEC = """
pool: {{workers: 2, start_method: fork}}
metrics: {{listen: "127.0.0.1:{port}"}}
jobs:
  x: {{target: daemon_jobs:ok, every: 200ms}}
  y: {{target: daemon_jobs:fail, every: 300ms}}
"""


class Prometheus:
    """`prometheus` on a free loopback port, its data in `tmp`, scraping `target` every 1s
    with the example rules loaded; stopped (SIGTERM, then waited for) by close()."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES}]\n"
            "scrape_configs:\n"
            "  - job_name: poolkeeper\n"
            "    honor_labels: true  # the metrics' `job` is the poolkeeper job's name\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_for(self._ready, "Prometheus ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            answer = json.load(reply)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, predicate, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            assert self.proc.poll() is None, f"prometheus exited: {self._log_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self._log_text()}"
            time.sleep(0.2)
        return value

    def _log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus{len(started)}", target)
        started.append(server)
        return server

    for directory in range(3):
        (tmp_path / f"prometheus{directory}").mkdir()
    yield start
    for server in started:
        server.close()


def _scalar(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sees_runs_counted_and_the_last_success_move(daemon_factory, prometheus):
    port = free_port()
    d = daemon_factory(SPEC.format(port=port))
    d.wait_log("ready")
    prom = prometheus(f"127.0.0.1:{port}")

    ok = 'increase(poolkeeper_runs_total{job="x",outcome="succeeded"}[1m])'
    prom.wait_for(lambda: (_scalar(prom.query(ok)) or 0) > 0, f"{ok} > 0")
    bad = 'increase(poolkeeper_runs_total{job="y",outcome="failed"}[1m])'
    assert _scalar(prom.query(bad)) > 0
    assert _scalar(prom.query('increase(poolkeeper_runs_total{job="x",outcome="failed"}[1m])')) == 0

    # The gauge moves as runs happen: a later scrape holds a later success.
    gauge = 'poolkeeper_job_last_success_timestamp_seconds{job="x"}'
    first = prom.wait_for(lambda: _scalar(prom.query(gauge)), gauge)
    later = prom.wait_for(
        lambda: (v := _scalar(prom.query(gauge))) is not None and v > first and v,
        f"{gauge} past {first}",
    )
    assert first < later <= time.time()
    # The job that only fails has a last failure and no last success.
    assert _scalar(prom.query('poolkeeper_job_last_failure_timestamp_seconds{job="y"}')) > 0
    assert prom.query('poolkeeper_job_last_success_timestamp_seconds{job="y"}') == []

    # The example rules load and evaluate on this data: every one healthy, and the one for
    # a failing job is pending (its `for:` not over yet) for y, and for y alone.
    groups = prom.wait_for(
        lambda: [
            g
            for g in prom.api("rules")["groups"]
            if all(r.get("lastEvaluation", "").startswith("20") for r in g["rules"])
        ],
        "the rules evaluated once",
    )
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules

    def failing_jobs():
        alerts = prom.api("alerts")["alerts"]
        return {a["labels"]["job"] for a in alerts if a["labels"]["alertname"] == "PoolkeeperJobFailing"}

    assert prom.wait_for(failing_jobs, "PoolkeeperJobFailing pending") == {"y"}
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_every_dashboard_query_is_valid_and_answers_with_real_metrics(daemon_factory, prometheus):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    port = free_port()
    d = daemon_factory(SPEC.format(port=port))
    d.wait_log("ready")
    # Every metric name a query uses is one the daemon exposes (a renamed metric would
    # leave a panel empty without an error anywhere).
    exposed = {name for name, _ in samples(daemon_metrics(d.config))}
    used = {name for e in exprs for name in re.findall(r"\bpoolkeeper_\w+", e)}
    assert used and used <= exposed, used - exposed
    prom = prometheus(f"127.0.0.1:{port}")
    variables = {"$__rate_interval": "1m", "$instance": ".*", "$job": ".*"}

    def concrete(expr: str) -> str:
        for name, value in variables.items():
            expr = expr.replace(name, value)
        return expr

    for expr in exprs:
        query = concrete(expr)
        prom.wait_for(lambda q=query: prom.query(q), f"data for {expr}")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_the_example_rules_pass_promtool_and_the_nightly_rule_fires_after_26_hours(tmp_path):
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    annotations = {
        "summary": "poolkeeper job nightly has not succeeded in 26 hours",
        "description": "{description}",
    }
    alert = {"exp_labels": {"severity": "page", "job": "nightly", "instance": "h:9108"}}
    never = {"exp_labels": {"severity": "page", "job": "nightly"}}
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {  # one success at time 0, reported ever since: fires past 26 hours (+10m)
                "interval": "1h",
                "input_series": [
                    {
                        "series": 'poolkeeper_job_last_success_timestamp_seconds{job="nightly",instance="h:9108"}',
                        "values": "0x30",
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": "25h", "alertname": "PoolkeeperNightlyNotSucceeded", "exp_alerts": []},
                    {
                        "eval_time": "27h",
                        "alertname": "PoolkeeperNightlyNotSucceeded",
                        "exp_alerts": [
                            {**alert, "exp_annotations": {**annotations, "description": "Last success 1d 3h 0m 0s ago; see `poolkeeper history nightly`."}}
                        ],
                    },
                ],
            },
            {  # a success every day: never fires
                "interval": "1h",
                "input_series": [
                    {
                        "series": 'poolkeeper_job_last_success_timestamp_seconds{job="nightly",instance="h:9108"}',
                        "values": "0x23 86400x23 172800x10",
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": f"{h}h", "alertname": "PoolkeeperNightlyNotSucceeded", "exp_alerts": []}
                    for h in (20, 27, 50, 57)
                ],
            },
            {  # the daemon restarted, its gauge gone for good: max_over_time remembers, then
                # absent_over_time takes over
                "interval": "1h",
                "input_series": [
                    {
                        "series": 'poolkeeper_job_last_success_timestamp_seconds{job="nightly",instance="h:9108"}',
                        "values": "0x2",
                    },
                    {"series": 'poolkeeper_jobs{instance="h:9108"}', "values": "1x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20h", "alertname": "PoolkeeperNightlyNotSucceeded", "exp_alerts": []},
                    {
                        "eval_time": "30h",
                        "alertname": "PoolkeeperNightlyNotSucceeded",
                        "exp_alerts": [
                            {**never, "exp_annotations": {**annotations, "description": "No success seen in 26 hours; see `poolkeeper history nightly`."}}
                        ],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "nightly_test.yml"
    test_file.write_text(json.dumps(tests))  # JSON is YAML
    tested = promtool("test", "rules", str(test_file))
    assert tested.returncode == 0, tested.stdout + tested.stderr
