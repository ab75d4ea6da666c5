"""The sandbox itself: a real systemd 252 that the end-to-end tests can trust."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from sandbox import HostGuard, Sandbox

PYTHON = sys.executable  # the project's virtualenv, at the same path inside

NOTIFY_PROBE = """\
import os, time
from poolkeeper.service.notify import Notifier

notifier = Notifier()
# What the daemon does before it starts workers: the notifier must keep working.
for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
    os.environ.pop(name, None)
print("backend=" + notifier.backend, flush=True)
notifier.status("café ✓")
notifier.ready()
time.sleep(120)
"""


def test_boots_to_running_or_degraded(systemd_sandbox: Sandbox):
    state = systemd_sandbox.systemctl("is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert systemd_sandbox.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    # Its own cgroup namespace: PID 1 sees itself in /init.scope of its own tree.
    # (v1 hierarchies of a hybrid host are listed too: look at the unified line.)
    lines = systemd_sandbox.run("cat", "/proc/1/cgroup").stdout.splitlines()
    assert "0::/init.scope" in lines
    assert systemd_sandbox.show("systemd-journald.service", "ActiveState") == {
        "ActiveState": "active"
    }


def test_notify_status_utf8_end_to_end(systemd_sandbox: Sandbox):
    systemd_sandbox.write_file("/srv/poolkeeper-tests/notify_probe.py", NOTIFY_PROBE)
    systemd_sandbox.run(
        "systemd-run", "--quiet", "--unit=probe", "-p", "Type=notify", "-p", "NotifyAccess=main",
        "-p", "Environment=PYTHONUNBUFFERED=1", "-p", "TimeoutStartSec=20",
        PYTHON, "/srv/poolkeeper-tests/notify_probe.py",
    )  # fmt: skip
    try:
        props = systemd_sandbox.show("probe.service", "ActiveState", "SubState", "StatusText")
        assert props == {"ActiveState": "active", "SubState": "running", "StatusText": "café ✓"}
        lines = systemd_sandbox.wait_for(
            lambda: [e["MESSAGE"] for e in systemd_sandbox.journal("-u", "probe.service")
                     if e.get("MESSAGE", "").startswith("backend=")],
            5, "the probe's backend line in the journal",
        )  # fmt: skip
        assert lines == ["backend=systemd"]
    finally:
        systemd_sandbox.systemctl("stop", "probe.service", check=False)


def test_journal_custom_field(systemd_sandbox: Sandbox):
    code = "from systemd import journal; journal.send(MESSAGE='hello from the probe', JOB='x')"
    systemd_sandbox.run(
        "systemd-run", "--quiet", "--wait", "--unit=journal-probe", PYTHON, "-c", code
    )
    entries = systemd_sandbox.wait_for(
        lambda: systemd_sandbox.journal("JOB=x"), 5, "an entry with JOB=x"
    )
    assert [(e["MESSAGE"], e["_SYSTEMD_UNIT"]) for e in entries] == [
        ("hello from the probe", "journal-probe.service")
    ]


def test_install_unit_and_write_file(systemd_sandbox: Sandbox):
    systemd_sandbox.write_file("/srv/poolkeeper-tests/greeting", "hello from a file\n")
    systemd_sandbox.install_unit(
        "greeter.service",
        "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=/bin/cat /srv/poolkeeper-tests/greeting\n",
    )
    systemd_sandbox.systemctl("start", "greeter.service")
    assert systemd_sandbox.show("greeter.service", "ActiveState", "Result") == {
        "ActiveState": "active",
        "Result": "success",
    }
    messages = systemd_sandbox.wait_for(
        lambda: [e["MESSAGE"] for e in systemd_sandbox.journal("-u", "greeter.service")
                 if e.get("MESSAGE") == "hello from a file"],
        5, "the unit's output in the journal",
    )  # fmt: skip
    assert messages == ["hello from a file"]
    systemd_sandbox.systemctl("stop", "greeter.service")


# main exits on SIGTERM, its worker ignores it: mixed SIGKILLs the worker as soon as main is gone.
WORKER_IGNORES = "(trap '' TERM; exec sleep 300) & wait"
# main ignores SIGTERM too: SIGKILL for everything at TimeoutStopSec.
MAIN_IGNORES = "trap '' TERM; sleep 300 & wait"


@pytest.mark.parametrize(
    "script, result, max_seconds",
    [(WORKER_IGNORES, "success", 3.0), (MAIN_IGNORES, "timeout", 4.0)],
    ids=["worker-ignores-sigterm", "main-ignores-sigterm"],
)
def test_stop_under_killmode_mixed_empties_the_cgroup(
    systemd_sandbox: Sandbox, script: str, result: str, max_seconds: float
):
    unit = f"mixed-{result}.service"
    systemd_sandbox.run(
        "systemd-run", "--quiet", f"--unit={unit}", "-p", "KillMode=mixed",
        "-p", "TimeoutStopSec=1", "sh", "-c", script,
    )  # fmt: skip
    cgroup = systemd_sandbox.show(unit, "ControlGroup")["ControlGroup"]

    def main_and_worker() -> list[int] | None:
        found = systemd_sandbox.cgroup_procs(cgroup)
        return found if len(found) >= 2 else None

    pids = systemd_sandbox.wait_for(main_and_worker, 5, f"main and worker in {cgroup}")

    started = time.monotonic()
    systemd_sandbox.systemctl("stop", unit)
    elapsed = time.monotonic() - started

    assert systemd_sandbox.cgroup_procs(cgroup) == []
    assert [p for p in pids if systemd_sandbox.alive(p)] == []
    assert elapsed < max_seconds
    props = systemd_sandbox.show(unit, "ActiveState", "Result")
    assert props["Result"] == result
    systemd_sandbox.systemctl("reset-failed", unit, check=False)


def test_the_host_is_not_touched(systemd_sandbox: Sandbox, host_guard: HostGuard):
    sb = systemd_sandbox
    etc, run, tmp = (host_guard.markers[d] for d in ("/etc", "/run", "/tmp"))
    # /etc is the host's, seen through the overlay; /run and /tmp are the sandbox's own tmpfs.
    assert sb.run("cat", str(etc)).stdout == host_guard.token
    assert sb.run("test", "-e", str(run), check=False).returncode == 1
    assert sb.run("test", "-e", str(tmp), check=False).returncode == 1
    # Whatever the sandbox writes stays in it.
    sb.run("sh", "-c", f"echo sandbox > {etc}; rm -f /etc/hostname; echo x > /etc/sandbox-only")
    for marker in (run, tmp):
        sb.write_file(str(marker), "sandbox")
    assert host_guard.changes() == []
    # (After poweroff the host_guard fixture checks again.)


def test_the_hosts_poolkeeper_files_do_not_show_through(
    systemd_sandbox: Sandbox, host_leftovers: list[Path]
):
    """A host where poolkeeper was installed before: its state, cache and configs stay out
    of the sandbox (a host's poolkeeper.db used to show through the overlay)."""
    assert host_leftovers, "no marker placed on the host"
    for marker in host_leftovers:
        assert marker.is_file()  # on the host, from before the boot
        assert systemd_sandbox.run("test", "-e", str(marker), check=False).returncode == 1
