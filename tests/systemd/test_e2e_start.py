"""Start-up as systemd sees it: `systemctl start` returns after READY=1 (which waits for the
workers and the before_ready jobs, stretching TimeoutStartSec= with EXTEND_TIMEOUT_USEC), a bad
config fails the unit with the reason in its status, and STATUS= follows the jobs."""

from __future__ import annotations

import threading
import time

import e2e_support as e2e
from sandbox import Sandbox


def test_start_waits_for_a_before_ready_job_longer_than_the_start_timeout(
    systemd_sandbox: Sandbox,
):
    sb = systemd_sandbox
    unit = e2e.install_instance(
        sb,
        "warmup",
        e2e.config(
            """
            wärme-café:
              target: e2e_jobs:sleep_for
              at: startup
              before_ready: true
              args: [3]
            """
        ),
        "TimeoutStartSec=2s\n",
    )
    with e2e.running(sb, unit):
        result: dict[str, object] = {}

        def start() -> None:
            began = time.monotonic()
            result["proc"] = sb.systemctl("start", unit, check=False)
            result["took"] = time.monotonic() - began

        starter = threading.Thread(target=start)
        starter.start()
        try:
            # While `systemctl start` blocks, the unit says what it waits for.
            status = sb.wait_for(
                lambda: sb.show(unit, "StatusText")["StatusText"].startswith("starting"),
                10, "a 'starting' status",
            )  # fmt: skip
            assert status
            assert sb.show(unit, "ActiveState")["ActiveState"] == "activating"
            # A non-ASCII job name arrives intact (UTF-8 all the way to systemd).
            assert sb.show(unit, "StatusText")["StatusText"] == "starting: waiting for wärme-café"
        finally:
            starter.join(30)
        proc = result["proc"]
        assert proc.returncode == 0, proc.stderr
        assert result["took"] >= 3.0
        props = sb.show(unit, "ActiveState", "SubState", "Result", "NRestarts")
        assert props == {
            "ActiveState": "active", "SubState": "running", "Result": "success", "NRestarts": "0"
        }  # fmt: skip
        # READY=1 came after the job succeeded (one process logs both, in this order).
        e2e.wait_journal(sb, "ready", "-u", unit)
        lines = e2e.journal_messages(sb, "-u", unit, "SYSLOG_IDENTIFIER=poolkeeper")
        succeeded = next(i for i, m in enumerate(lines) if "] run succeeded" in m)
        assert lines.index("ready") > succeeded, lines


BAD_CONFIG = """\
version: 1
pythonpath: [/srv/pk-e2e]
jobs:
  tick:
    target: e2e_jobs:quick
    every: 1s
    tímeout: 5s
"""


def test_config_error_fails_the_unit_with_the_reason_in_its_status(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    unit = e2e.install_instance(sb, "broken", BAD_CONFIG)
    with e2e.running(sb, unit):
        proc = sb.systemctl("start", unit, check=False)
        assert proc.returncode != 0
        props = sb.show(
            unit, "ActiveState", "Result", "ExecMainStatus", "StatusText", "StatusErrno",
            "NRestarts",
        )  # fmt: skip
        reason = "/etc/poolkeeper/broken.yaml:7:5: unknown key 'tímeout' (did you mean 'timeout'?)"
        assert props == {
            "ActiveState": "failed",
            "Result": "exit-code",
            "ExecMainStatus": "78",
            # UTF-8 from the user's file arrives intact in STATUS=.
            "StatusText": f"config error: {reason}",
            "StatusErrno": "22",
            "NRestarts": "0",  # RestartPreventExitStatus=78: no restart loop on a bad config
        }
        status = sb.systemctl("status", unit, check=False).stdout
        assert f'Status: "config error: {reason}"' in status
        assert "Error: 22 (Invalid argument)" in status
        e2e.wait_journal(sb, reason, "-u", unit)


def test_status_text_follows_the_runs(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    unit = e2e.install_instance(
        sb,
        "status",
        e2e.config(
            """
            slow:
              target: e2e_jobs:hold
              every: 100ms
              kwargs: {seconds: 0.5}
            """
        ),
    )
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        seen: list[str] = []

        def observe(predicate) -> str | None:
            text = sb.show(unit, "StatusText")["StatusText"]
            if not seen or seen[-1] != text:
                seen.append(text)
            return text if predicate(text) else None

        sb.wait_for(lambda: observe(lambda t: "1/2 workers busy" in t), 10, "a busy worker")
        sb.wait_for(lambda: observe(lambda t: "2 runs ok" in t), 10, "two runs counted")
        sb.wait_for(lambda: observe(lambda t: "3 runs ok" in t), 10, "three runs counted")
        assert all(t.startswith("1 job, ") for t in seen), seen
        assert len(seen) >= 3, seen


# Imports fine in the main process (where the config is validated), fails in every worker.
WORKER_ONLY_FAILURE = """\
import multiprocessing
if multiprocessing.parent_process() is not None:
    raise RuntimeError("cannot open the jobs' database from a worker")
"""


def test_a_pool_that_cannot_start_fails_the_start_instead_of_hanging(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    sb.write_file("/srv/pk-workerfail/workerfail_dep.py", WORKER_ONLY_FAILURE)
    spec = e2e.config("tick:\n  target: e2e_jobs:quick\n  every: 1s\n")
    spec = spec.replace(
        "start_method: forkserver", "start_method: spawn, preload: [workerfail_dep]"
    )
    spec = spec.replace(f"[{e2e.JOBS_DIR}]", f"[{e2e.JOBS_DIR}, /srv/pk-workerfail]")
    unit = e2e.install_instance(sb, "workerfail", spec, "Restart=no\n")
    with e2e.running(sb, unit):
        clock = e2e.Stopwatch()
        proc = sb.systemctl("start", unit, check=False)
        assert proc.returncode != 0
        assert clock.elapsed() < 10  # not TimeoutStartSec=90s, nor for ever (EXTEND_TIMEOUT)
        props = sb.show(unit, "ActiveState", "Result", "ExecMainStatus", "StatusText")
        assert props["ActiveState"] == "failed"
        assert props["Result"] == "exit-code"
        assert props["ExecMainStatus"] == "69"
        assert props["StatusText"].startswith("the pool cannot start: workers fail to start")
        assert "cannot open the jobs' database from a worker" in props["StatusText"]
