"""`systemctl reload` (the shipped ExecReload=poolkeeper reload --wait): a bad file makes it
fail with the errors, and leaves the unit active on its old config with the reason in
StatusText and the journal; a good one succeeds once applied, adding and removing jobs by name
while an unchanged loop keeps its run."""

from __future__ import annotations

import e2e_support as e2e
from sandbox import Sandbox

from poolkeeper.service.logs import MESSAGE_IDS

LOOP = "steady:\n  target: e2e_jobs:loop\n  loop: {replicas: 1}\n"
TICK = "tick:\n  target: e2e_jobs:quick\n  every: 200ms\n"
TOCK = "tock:\n  target: e2e_jobs:quick\n  every: 200ms\n"
DB = "/var/lib/poolkeeper/reload/poolkeeper.db"


def _steady_runs(sb: Sandbox) -> list[str]:
    """Ids of the loop's runs that have no outcome yet."""
    runs = e2e.state_runs(sb, DB)
    return [r["run_id"] for r in runs if r["job"] == "steady" and r["outcome"] == "running"]


def _pids_saying(sb: Sandbox, unit: str, text: str, at_least: int) -> set[str] | None:
    """The processes of `unit` that logged `text`, once there are `at_least` of them."""
    pids = {e["_PID"] for e in sb.journal("-u", unit) if text in e2e._message(e)}
    return pids if len(pids) >= at_least else None


def _status_with(sb: Sandbox, unit: str, text: str) -> str | None:
    status = sb.show(unit, "StatusText")["StatusText"]
    return status if text in status else None


def test_systemctl_reload_applies_a_good_file_and_keeps_running_on_a_bad_one(
    systemd_sandbox: Sandbox,
):
    sb = systemd_sandbox
    unit = e2e.install_instance(sb, "reload", e2e.config(LOOP + TICK, workers=3))
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        main = sb.show(unit, "MainPID")["MainPID"]
        e2e.wait_journal(sb, "quick run", "-u", unit, "JOB=tick")
        steady = sb.wait_for(lambda: _steady_runs(sb), 10, "the loop's run in the state DB")

        # A bad file: nothing changes, and systemd shows why.
        bad = e2e.config(LOOP + TICK + "  oops: 1\n", workers=3)
        line = bad.splitlines().index("    oops: 1") + 1
        sb.write_file("/etc/poolkeeper/reload.yaml", bad)
        refused = sb.systemctl("reload", unit, check=False)
        assert refused.returncode != 0, refused
        e2e.wait_journal(
            sb, "reload rejected", "-u", unit, f"MESSAGE_ID={MESSAGE_IDS['reload_rejected']}"
        )
        # The daemon's log, and `reload --wait`'s own stderr (ExecReload=), both say where.
        where = f"/etc/poolkeeper/reload.yaml:{line}:5: unknown key 'oops'"
        pids = sb.wait_for(lambda: _pids_saying(sb, unit, where, 2), 10, "both reports")
        assert main in pids
        status = sb.wait_for(
            lambda: _status_with(sb, unit, "reload rejected"), 10, "the rejection in StatusText"
        )
        assert "unknown key 'oops'" in status
        assert sb.show(unit, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": main}

        # A good file: tick goes, tock comes, steady is not touched.
        sb.write_file("/etc/poolkeeper/reload.yaml", e2e.config(LOOP + TOCK, workers=3))
        sb.systemctl("reload", unit)  # succeeds: the file was applied
        e2e.wait_journal(
            sb,
            "reload applied: 1 job added (tock); 1 job removed (tick); 1 job unchanged",
            "-u",
            unit,
            f"MESSAGE_ID={MESSAGE_IDS['reload_applied']}",
        )
        e2e.wait_journal(sb, "quick run", "-u", unit, "JOB=tock")
        sb.wait_for(
            lambda: "reload rejected" not in sb.show(unit, "StatusText")["StatusText"],
            10,
            "StatusText without the old rejection",
        )
        assert _steady_runs(sb) == steady
        assert sb.show(unit, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": main}

        # From root's shell, as the README says: --unit finds the unit's config, state
        # database and control socket (systemd sets their variables for the unit only).
        pk = e2e.COMMAND
        assert sb.run(*pk, "pause", "tock", "--unit", unit).stdout == "tock: paused, no new runs\n"
        sb.wait_for(lambda: _status_with(sb, unit, "1 paused"), 10, "the paused job in StatusText")
        live = sb.run(*pk, "status", "--unit", unit).stdout.splitlines()
        assert live[0].startswith("daemon: 2 jobs, ") and "1 paused" in live[0], live
        assert any(line.startswith("tock ") and "paused" in line for line in live), live
        history = sb.run(*pk, "history", "tock", "--unit", unit).stdout
        assert "succeeded" in history  # from /var/lib/poolkeeper/reload/poolkeeper.db
        assert sb.run(*pk, "resume", "tock", "-u", unit).stdout == "tock: resumed\n"
        missing = sb.run(*pk, "status", "--unit", "nope", check=False)
        assert missing.returncode == 69 and "no unit nope.service" in missing.stderr
        sb.systemctl("stop", unit)
        assert sb.show(unit, "Result")["Result"] == "success"
