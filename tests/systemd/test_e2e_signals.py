"""`systemctl kill -s SIG` reaches every process of the unit (docs/lifecycle.md, "Signals"):
SIGUSR1 writes a state dump to the journal, SIGUSR2 and SIGALRM are logged and ignored,
SIGHUP reloads; no process of the unit dies of them, the unit stays active, and the stop
afterwards records every run `succeeded` (none `lost`)."""

from __future__ import annotations

import e2e_support as e2e
from sandbox import Sandbox


def test_systemctl_kill_reaches_every_process_and_none_dies(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    name = "signals"
    unit = e2e.install_instance(
        sb,
        name,
        e2e.config(
            """
            consumer:
              target: e2e_jobs:loop
              loop: {replicas: 1}
            tick:
              target: e2e_jobs:hold
              every: 200ms
              kwargs: {seconds: 0.3}
            """,
            workers=3,
        ),
    )
    e2e.keep_loaded(sb, unit)
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        e2e.wait_journal(sb, "run succeeded", "-u", unit, "JOB=tick")
        everything = sb.cgroup_procs(unit)
        assert len(everything) >= 6, everything  # main, forkserver, tracker, 3 workers
        for sig, says in (
            ("SIGUSR1", "SIGUSR1: state dump"),
            ("SIGUSR2", "SIGUSR2 received: ignored"),
            ("SIGALRM", "SIGALRM received: ignored"),
            ("SIGHUP", "reload applied"),
        ):
            sb.systemctl("kill", "-s", sig, unit)
            e2e.wait_journal(sb, says, "-u", unit)
        [dump] = e2e.wait_journal(sb, "SIGUSR1: state dump", "-u", unit)
        assert "job consumer (loop): 1 running" in e2e._message(dump), dump
        ended = len(e2e.wait_journal(sb, "run succeeded", "-u", unit, "JOB=tick"))
        sb.wait_for(
            lambda: len(e2e.wait_journal(sb, "run succeeded", "-u", unit, "JOB=tick")) > ended,
            10,
            "runs after the signals",
        )
        assert [p for p in everything if not sb.alive(p)] == []
        assert sb.show(unit, "ActiveState")["ActiveState"] == "active"

        sb.systemctl("stop", unit)
        props = sb.show(unit, "Result", "ExecMainStatus")
        assert props == {"Result": "success", "ExecMainStatus": "0"}
        runs = e2e.state_runs(sb, f"/var/lib/poolkeeper/{name}/poolkeeper.db")
        assert runs and {r["outcome"] for r in runs} == {"succeeded"}, runs
