"""`systemctl stop` drains: loop replicas return, the in-flight run finishes, a job's grandchild
is killed with its worker's process group, every run ends with an outcome, the unit's cgroup
is empty, Result=success, under KillMode=control-group (shipped) and KillMode=mixed; and a drain
longer than TimeoutStopSec= completes thanks to EXTEND_TIMEOUT_USEC."""

from __future__ import annotations

import time

import e2e_support as e2e
import pytest
from sandbox import Sandbox

DRAIN_BUDGET = 4.0
PIDS_DIR = "/run/pk-e2e-pids"  # the tests' own directory, outside the unit's namespaces


@pytest.mark.parametrize("kill_mode", ["control-group", "mixed"])
def test_stop_drains_and_leaves_nothing_behind(systemd_sandbox: Sandbox, kill_mode: str):
    sb = systemd_sandbox
    name = f"stop-{kill_mode}"
    pids_dir = e2e.shared_dir(sb, f"{PIDS_DIR}/{name}")
    unit = e2e.install_instance(
        sb,
        name,
        e2e.config(
            f"""
            consumer:
              target: e2e_jobs:loop
              loop: {{replicas: 2}}
            report:
              target: e2e_jobs:with_grandchild
              at: startup
              kwargs: {{seconds: 1.5, pid_dir: {pids_dir}}}
            """,
            workers=4,
            drain=f"{DRAIN_BUDGET:g}s",
        ),
        f"KillMode={kill_mode}\nReadWritePaths={PIDS_DIR}\n",
    )
    e2e.keep_loaded(sb, unit)
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        cgroup = sb.show(unit, "ControlGroup")["ControlGroup"]

        def grandchild() -> list[int] | None:
            out = sb.run("sh", "-c", f"cat {pids_dir}/*.pids 2>/dev/null", check=False).stdout
            return [int(p) for p in out.split()] or None

        worker, child = sb.wait_for(grandchild, 10, "the run with a grandchild to start")
        e2e.wait_journal(sb, "run started", "-u", unit, "JOB=consumer")
        everything = sb.cgroup_procs(cgroup)
        assert child in everything and worker in everything

        clock, stop_at = e2e.Stopwatch(), time.time()
        sb.systemctl("stop", unit)
        took = clock.elapsed()

        props = sb.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        assert took < DRAIN_BUDGET + 1.0
        assert sb.cgroup_procs(cgroup) == []
        assert [p for p in everything if sb.alive(p)] == []
        runs = e2e.state_runs(sb, f"/var/lib/poolkeeper/{name}/poolkeeper.db")
        outcomes = sorted((r["job"], r["outcome"]) for r in runs)
        assert outcomes == [
            ("consumer", "succeeded"), ("consumer", "succeeded"), ("report", "succeeded")
        ], runs  # fmt: skip
        # The run with the grandchild was in flight at the stop and finished its work.
        report = next(r for r in runs if r["job"] == "report")
        assert report["started"] < stop_at < report["ended"]
        e2e.wait_journal(sb, "drain finished", "-u", unit)


def test_drain_longer_than_timeout_stop_sec_completes(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    flags = e2e.shared_dir(sb, f"{PIDS_DIR}/long-drain")
    unit = e2e.install_instance(
        sb,
        "long-drain",
        e2e.config(
            f"""
            long:
              target: e2e_jobs:busy
              at: startup
              kwargs: {{seconds: 4, flag_dir: {flags}}}
            """,
            drain="20s",
        ),
        f"TimeoutStopSec=2s\nReadWritePaths={PIDS_DIR}\n",
    )
    e2e.keep_loaded(sb, unit)
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        sb.wait_for(
            lambda: sb.run("test", "-e", f"{flags}/long.started", check=False).returncode == 0,
            10, "the long run to start",
        )  # fmt: skip
        clock = e2e.Stopwatch()
        sb.systemctl("stop", unit)
        took = clock.elapsed()
        props = sb.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        assert 2.5 < took < 6.0  # past TimeoutStopSec=2s, done when the run was
        runs = e2e.state_runs(sb, "/var/lib/poolkeeper/long-drain/poolkeeper.db")
        assert [(r["job"], r["outcome"]) for r in runs] == [("long", "succeeded")]
