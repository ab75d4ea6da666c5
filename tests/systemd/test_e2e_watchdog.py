"""The watchdog (docs/health.md): pings stop when the main loop stops turning or the pool is
unhealthy, and systemd restarts the unit (Result=watchdog, NRestarts grows)."""

from __future__ import annotations

import e2e_support as e2e
from sandbox import Sandbox

WATCHDOG = "WatchdogSec=2s\nRestartSec=100ms\n"


def _wait_restarted(sb: Sandbox, unit: str, old_pid: str, timeout: float = 20) -> dict:
    def restarted() -> dict | None:
        props = sb.show(unit, "ActiveState", "MainPID", "NRestarts")
        done = props["ActiveState"] == "active" and props["MainPID"] not in ("0", old_pid)
        return props if done and int(props["NRestarts"]) >= 1 else None

    return sb.wait_for(restarted, timeout, f"{unit} restarted by the watchdog")


def test_frozen_main_process_is_restarted(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    unit = e2e.install_instance(
        sb,
        "frozen",
        e2e.config(
            """
            tick:
              target: e2e_jobs:quick
              every: 500ms
            """
        ),
        WATCHDOG,
    )
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        old = sb.show(unit, "MainPID")["MainPID"]
        sb.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", unit)
        e2e.wait_journal(sb, "Watchdog timeout (limit 2s)!", "-u", unit)
        e2e.wait_journal(sb, "Failed with result 'watchdog'", "-u", unit)
        _wait_restarted(sb, unit, old)
        # faulthandler turned systemd's SIGABRT into the frozen loop's Python stack.
        # Where the loop was frozen varies (it is usually waiting); its run() frame is always
        # on the stack.
        frame = 'mainloop.py", line'
        dump = e2e.wait_journal(sb, frame, f"_PID={old}")
        assert "Fatal Python error: Aborted" in "".join(
            e2e._message(e) for e in sb.journal(f"_PID={old}")
        )
        sb.wait_for(
            lambda: any(
                frame in e2e._message(e) and e2e._message(e).endswith(" in run")
                for e in sb.journal(f"_PID={old}")
            ),
            10,
            f"the daemon's run() frame in the dump: {dump}",
        )


# The jobs' dependency, preloaded by every worker (spawn: each worker imports it afresh).
GOOD_DEP = "VALUE = 1\n"
BROKEN_DEP = "raise ImportError('this release of wedge_dep is broken')\n"


def test_pool_that_cannot_replace_its_workers_is_restarted(systemd_sandbox: Sandbox):
    """A deployment breaks a module under the running daemon, then a worker dies (OOM, say):
    its replacements cannot start, the pool reports unhealthy, the pings stop. The main loop
    keeps turning all along: only the pool's condition withholds the ping."""
    sb = systemd_sandbox
    sb.write_file("/srv/pk-wedge/wedge_dep.py", GOOD_DEP)
    spec = e2e.config(
        """
        tick:
          target: e2e_jobs:quick
          every: 500ms
        """
    )
    spec = spec.replace("start_method: forkserver", "start_method: spawn, preload: [wedge_dep]")
    spec = spec.replace(f"[{e2e.JOBS_DIR}]", f"[{e2e.JOBS_DIR}, /srv/pk-wedge]")
    unit = e2e.install_instance(sb, "wedged", spec, WATCHDOG)
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        main = sb.show(unit, "MainPID")["MainPID"]
        workers = [
            pid for pid in sb.cgroup_procs(unit)
            if "spawn_main" in sb.run("cat", f"/proc/{pid}/cmdline").stdout
        ]  # fmt: skip
        assert len(workers) == 2
        sb.write_file("/srv/pk-wedge/wedge_dep.py", BROKEN_DEP)
        sb.run("kill", "-KILL", str(workers[0]))

        e2e.wait_journal(sb, "unhealthy, withholding the watchdog ping: workers fail to start",
                         "-u", unit)  # fmt: skip
        e2e.wait_journal(sb, "Failed with result 'watchdog'", "-u", unit)
        # The fix is deployed; the restarted daemon comes up healthy.
        sb.write_file("/srv/pk-wedge/wedge_dep.py", GOOD_DEP)
        _wait_restarted(sb, unit, main)
