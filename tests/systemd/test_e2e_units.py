"""The shipped units: one source of truth, clean under `systemd-analyze verify`, hardened as
`systemd-analyze security` scores them, and `poolkeeper unit` prints them for this install."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import e2e_support as e2e
import pytest
from sandbox import Sandbox

from poolkeeper.config.model import FleetModel
from poolkeeper.fleet.member import HEARTBEAT_PARTS
from poolkeeper.service import unit as units

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
NETWORK_MAX, OFFLINE_MAX = 1.5, 0.5
# fleet.conf's Wants=/After= for a local PostgreSQL, as a host that runs one uncomments them.
DEFAULT_LEASE = FleetModel.model_fields["lease"].default  # fleet.lease's, in seconds
LOCAL_DB_LINES = ("#Wants=postgresql.service\n", "#After=postgresql.service\n")


def test_packaging_files_are_generated_from_unit_py():
    """packaging/systemd/ is `python -m poolkeeper.service.unit packaging/systemd`: no drift."""
    shipped = {
        str(p.relative_to(PACKAGING)): p.read_text(encoding="utf-8")
        for p in PACKAGING.rglob("*")
        if p.is_file()
    }
    assert shipped == units.shipped_files()


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], units.render(units.PLAIN, e2e.COMMAND)),
        (["--instance", "demo"], units.render(units.TEMPLATE, e2e.COMMAND)),
        (["--offline"], units.OFFLINE),
    ],
    ids=["plain", "template", "offline"],
)
def test_poolkeeper_unit_prints_the_unit_of_this_installation(argv, expected):
    out = subprocess.run(
        [*e2e.COMMAND, "unit", *argv], capture_output=True, text=True, check=True
    ).stdout
    assert out == expected
    if "--offline" not in argv:
        assert f"ExecStart={e2e.COMMAND[0]} run %E/poolkeeper/" in out


def _install_shipped(sb: Sandbox) -> None:
    """The packaging files as a distribution installs them, /usr/local/bin/poolkeeper being
    this checkout's (in the sandbox's overlay only)."""
    e2e.prepare(sb)
    sb.run("ln", "-sf", e2e.COMMAND[0], units.SHIPPED_EXECUTABLE)
    files = units.shipped_files()
    sb.write_file("/etc/systemd/system/poolkeeper.service", files["poolkeeper.service"])
    sb.write_file("/etc/systemd/system/poolkeeper@.service", files["poolkeeper@.service"])
    sb.write_file("/etc/systemd/system/pk-offline.service", files["poolkeeper.service"])
    sb.write_file("/etc/systemd/system/pk-offline.service.d/offline.conf", files["offline.conf"])
    # Fleet members: the template with fleet.conf as shipped, and with its lines for a local
    # database uncommented (Debian's postgresql.service, installed with the server).
    local_db = files["fleet.conf"]
    for line in LOCAL_DB_LINES:
        assert line in local_db
        local_db = local_db.replace(line, line[1:])
    for name, dropin in (("pk-fleet", files["fleet.conf"]), ("pk-fleetdb", local_db)):
        sb.write_file(f"/etc/systemd/system/{name}@.service", files["poolkeeper@.service"])
        sb.write_file(f"/etc/systemd/system/{name}@.service.d/fleet.conf", dropin)
    sb.systemctl("daemon-reload")


def test_sysusers_and_tmpfiles_entries_apply(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    e2e.prepare(sb)  # runs systemd-sysusers and systemd-tmpfiles on the shipped entries
    assert sb.run("getent", "passwd", "poolkeeper").stdout.split(":")[0] == "poolkeeper"
    owner = sb.run("stat", "-c", "%U %a", "/var/lib/poolkeeper").stdout.split()
    assert owner == ["poolkeeper", "755"]


def test_systemd_analyze_verify_prints_nothing(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    _install_shipped(sb)
    try:
        for path in (
            "/etc/systemd/system/poolkeeper.service",
            "/etc/systemd/system/poolkeeper@demo.service",  # an instance of the template
            "/etc/systemd/system/pk-offline.service",  # with the offline drop-in
            "/etc/systemd/system/pk-fleet@demo.service",  # with the fleet drop-in
            "/etc/systemd/system/pk-fleetdb@demo.service",  # ... and a local database
        ):
            result = sb.run("systemd-analyze", "verify", path, check=False)
            assert (result.returncode, result.stdout + result.stderr) == (0, ""), path
    finally:
        _remove_shipped(sb)


def _exposure(sb: Sandbox, unit: str) -> float:
    out = sb.run("systemd-analyze", "security", "--no-pager", unit).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out
    return float(found.group(1))


def test_systemd_analyze_security_scores(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    _install_shipped(sb)
    try:
        assert _exposure(sb, "poolkeeper.service") <= NETWORK_MAX
        assert _exposure(sb, "poolkeeper@demo.service") <= NETWORK_MAX
        assert _exposure(sb, "pk-offline.service") <= OFFLINE_MAX
        assert _exposure(sb, "pk-fleet@demo.service") <= NETWORK_MAX
    finally:
        _remove_shipped(sb)


def _remove_shipped(sb: Sandbox) -> None:
    sb.run("rm", "-rf", "/etc/systemd/system/pk-offline.service",
           "/etc/systemd/system/pk-offline.service.d", units.SHIPPED_EXECUTABLE,
           *(f"/etc/systemd/system/{n}@.service{d}" for n in ("pk-fleet", "pk-fleetdb")
             for d in ("", ".d")))  # fmt: skip
    sb.systemctl("daemon-reload")


def test_fleet_dropin_kills_a_frozen_daemon_before_its_lease_can_be_taken_over(
    systemd_sandbox: Sandbox,
):
    """systemd's own reading of fleet.conf on a running daemon: its watchdog and abort
    timeouts together stay under the default lease minus its margin (docs/fleet.md, "The
    watchdog"). WatchdogUSec= reads "infinity" until the unit has started."""
    sb = systemd_sandbox
    unit = e2e.install_instance(
        sb, "fleetwd", e2e.config("tick:\n  target: e2e_jobs:quick\n  every: 1s\n")
    )
    sb.write_file(f"/etc/systemd/system/{unit}.d/fleet.conf", units.FLEET)
    sb.systemctl("daemon-reload")
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        shown = sb.show(unit, "WatchdogUSec", "TimeoutAbortUSec", "ActiveState")
        assert shown["ActiveState"] == "active"
        watchdog = _seconds(shown["WatchdogUSec"])
        abort = _seconds(shown["TimeoutAbortUSec"])
        # The frozen daemon's last renewal was at most a heartbeat before the freeze.
        assert watchdog + abort < DEFAULT_LEASE - DEFAULT_LEASE / HEARTBEAT_PARTS
    sb.run("rm", "-rf", f"/etc/systemd/system/{unit}.d")
    sb.systemctl("daemon-reload")


def test_fleet_dropin_orders_the_daemon_after_a_local_database(systemd_sandbox: Sandbox):
    """Uncommented, fleet.conf's lines start the daemon after Debian's postgresql.service (so
    it also stops, and drains, before the database); as shipped they do not."""
    sb = systemd_sandbox
    _install_shipped(sb)
    try:
        assert "postgresql.service" not in sb.show("pk-fleet@demo.service", "After")["After"]
        local_db = sb.show("pk-fleetdb@demo.service", "After", "Wants")
        assert "postgresql.service" in local_db["After"].split()
        assert "postgresql.service" in local_db["Wants"].split()
    finally:
        _remove_shipped(sb)


def _seconds(timespan: str) -> float:
    """A systemctl show timespan ("15s", "1min 30s", "500ms") in seconds."""
    factors = {"min": 60.0, "ms": 0.001, "us": 1e-6, "s": 1.0, "h": 3600.0}
    found = re.findall(r"(\d+(?:\.\d+)?)(min|ms|us|s|h)", timespan)
    assert found, timespan
    return sum(float(value) * factors[unit] for value, unit in found)
