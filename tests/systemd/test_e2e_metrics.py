"""Metrics under the shipped unit (issue 12, docs/monitoring.md): its hardening
(RestrictAddressFamilies=, ProtectSystem=strict, PrivateUsers=, ...) leaves the HTTP listener
working, `poolkeeper metrics -u UNIT` reaches the daemon, and the textfile is written into
node_exporter's directory with the one drop-in line docs/monitoring.md gives."""

from __future__ import annotations

import socket

import e2e_support as e2e
from sandbox import Sandbox

TEXTFILE_DIR = "/var/lib/node_exporter/textfile_collector"

FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
    sys.stdout.write(reply.read().decode())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _succeeded(text: str, job: str) -> float:
    prefix = f'poolkeeper_runs_total{{job="{job}",outcome="succeeded"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_the_shipped_unit_serves_metrics_on_its_port_and_writes_the_textfile(
    systemd_sandbox: Sandbox,
):
    sb = systemd_sandbox
    port = _free_port()
    e2e.prepare(sb)
    sb.run("mkdir", "-p", TEXTFILE_DIR)  # as node_exporter's package makes it: root's, 0755
    # docs/monitoring.md: the directory must be writable by the unit's user, and listed.
    sb.run("chgrp", "poolkeeper", TEXTFILE_DIR)
    sb.run("chmod", "0775", TEXTFILE_DIR)
    prom = f"{TEXTFILE_DIR}/poolkeeper.prom"
    unit = e2e.install_instance(
        sb,
        "metrics",
        e2e.config(
            "tick: {target: e2e_jobs:quick, every: 100ms}",
            extra=f'metrics: {{listen: "127.0.0.1:{port}", textfile: {prom}, '
            "textfile_every: 200ms}\n",
        ),
        f"ReadWritePaths={TEXTFILE_DIR}\n",
    )
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)

        def scraped() -> str | None:
            got = sb.run(e2e.PYTHON, "-c", FETCH, f"http://127.0.0.1:{port}/metrics", check=False)
            return got.stdout if got.returncode == 0 and _succeeded(got.stdout, "tick") else None

        text = sb.wait_for(scraped, 20, "runs of tick counted on the listener")
        assert "poolkeeper_build_info{" in text
        # The control socket route, as an operator types it.
        told = sb.run(*e2e.COMMAND, "metrics", "-u", unit).stdout
        assert _succeeded(told, "tick") >= _succeeded(text, "tick")
        # The textfile, written by the unit's user, readable by node_exporter's.
        written = sb.wait_for(
            lambda: _succeeded(sb.run("cat", prom, check=False).stdout, "tick"),
            20,
            "the textfile",
        )
        assert written > 0
        owner_mode = sb.run("stat", "-c", "%U %a", prom).stdout.split()
        assert owner_mode == ["poolkeeper", "644"]
        sb.systemctl("stop", unit)
        assert "poolkeeper_drains_total 1.0" in sb.run("cat", prom).stdout
