"""The template: `poolkeeper@demo` runs /etc/poolkeeper/demo.yaml with its own state and
runtime directories, beside the plain `poolkeeper.service`, and neither disturbs the other."""

from __future__ import annotations

import e2e_support as e2e
from sandbox import Sandbox

from poolkeeper.service import unit as units

PLAIN = "poolkeeper.service"


def _dirs(sb: Sandbox, unit: str) -> dict[str, str]:
    env = sb.run("cat", f"/proc/{sb.show(unit, 'MainPID')['MainPID']}/environ").stdout
    pairs = dict(item.split("=", 1) for item in env.split("\0") if "=" in item)
    return {k: pairs[k] for k in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")}


def test_template_instance_runs_its_own_config_beside_the_plain_unit(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    demo = e2e.install_instance(
        sb, "demo", e2e.config("demo_job:\n  target: e2e_jobs:quick\n  every: 200ms\n")
    )
    sb.write_file("/etc/poolkeeper/poolkeeper.yaml",
                  e2e.config("main_job:\n  target: e2e_jobs:quick\n  every: 200ms\n"))  # fmt: skip
    sb.write_file(f"/etc/systemd/system/{PLAIN}", units.render(units.PLAIN, e2e.COMMAND))
    sb.write_file(f"/etc/systemd/system/{PLAIN}.d/e2e.conf",
                  "[Service]\n" + e2e.environment_dropin())  # fmt: skip
    sb.systemctl("daemon-reload")
    try:
        sb.systemctl("start", PLAIN, demo)
        assert _dirs(sb, PLAIN) == {
            "STATE_DIRECTORY": "/var/lib/poolkeeper",
            "RUNTIME_DIRECTORY": "/run/poolkeeper/poolkeeper",
        }
        assert _dirs(sb, demo) == {
            "STATE_DIRECTORY": "/var/lib/poolkeeper/demo",
            "RUNTIME_DIRECTORY": "/run/poolkeeper/demo",
        }
        e2e.wait_journal(sb, "quick run", "-u", demo, "JOB=demo_job")
        e2e.wait_journal(sb, "quick run", "-u", PLAIN, "JOB=main_job")
        assert sb.journal("-u", demo, "JOB=main_job") == []
        assert sb.show(demo, "StatusText")["StatusText"].startswith("1 job, ")

        # Stopping the plain unit removes its runtime directory, not the instance's.
        sb.systemctl("stop", PLAIN)
        assert sb.run("test", "-d", "/run/poolkeeper/demo", check=False).returncode == 0
        assert sb.show(demo, "ActiveState")["ActiveState"] == "active"
        sb.systemctl("stop", demo)
        runs = {
            db: {r["job"] for r in e2e.state_runs(sb, db)}
            for db in ("/var/lib/poolkeeper/poolkeeper.db",
                       "/var/lib/poolkeeper/demo/poolkeeper.db")
        }  # fmt: skip
        assert runs == {
            "/var/lib/poolkeeper/poolkeeper.db": {"main_job"},
            "/var/lib/poolkeeper/demo/poolkeeper.db": {"demo_job"},
        }
    finally:
        e2e.cleanup(sb, PLAIN, demo)
        sb.run("rm", "-rf", f"/etc/systemd/system/{PLAIN}", f"/etc/systemd/system/{PLAIN}.d")
        sb.systemctl("daemon-reload")
