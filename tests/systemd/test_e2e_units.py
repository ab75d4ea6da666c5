"""The shipped units: one source of truth, clean under `systemd-analyze verify`, hardened as
`systemd-analyze security` scores them, and `poolkeeper unit` prints them for this install."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import e2e_support as e2e
import pytest
from sandbox import Sandbox

from poolkeeper.service import unit as units

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "systemd"
NETWORK_MAX, OFFLINE_MAX = 1.5, 0.5


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
    finally:
        _remove_shipped(sb)


def _remove_shipped(sb: Sandbox) -> None:
    sb.run("rm", "-rf", "/etc/systemd/system/pk-offline.service",
           "/etc/systemd/system/pk-offline.service.d", units.SHIPPED_EXECUTABLE)  # fmt: skip
    sb.systemctl("daemon-reload")
