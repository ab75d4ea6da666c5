"""systemd units for poolkeeper: the one source of `packaging/systemd/*` and `poolkeeper unit`.

The texts below are templates with one placeholder, ``@POOLKEEPER@``: the command that starts
poolkeeper. The shipped files in `packaging/systemd/` are these templates rendered for
`/usr/local/bin/poolkeeper` (where `pip install` puts the console script on Debian);
tests/systemd/test_e2e_units.py checks they are identical. `poolkeeper unit` renders them for
the running installation instead, so the unit always names an executable that exists.

Why each setting is there is said next to it; docs/systemd.md has the longer story.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

PLACEHOLDER = "@POOLKEEPER@"
SHIPPED_EXECUTABLE = "/usr/local/bin/poolkeeper"

# Values a user tunes most; keep docs/systemd.md in step.
DRAIN_BUDGET_DEFAULT = "30s"  # shutdown.drain_timeout's default (poolkeeper/config/model.py)

_HEAD = """\
# {name}: {what}
# Generated from poolkeeper/service/unit.py: print one for your installation with `poolkeeper unit{flag}`.
# Tune it with a drop-in (`systemctl edit {edit}`), not by editing this file.
# Documented in poolkeeper's docs/systemd.md, docs/health.md and docs/journal.md.
[Unit]
Description={description}
# Jobs may talk to the network from their first run.
Wants=network-online.target
After=network-online.target
"""

# Everything below [Service] that plain and template units share; {config}, {state} and
# {runtime} differ.
_SERVICE = """\

[Service]
Type=notify
# Only the main process speaks sd_notify; workers' messages would be dropped anyway.
NotifyAccess=main
# `run` validates the config exactly like `poolkeeper check`: on an error it logs every one as
# FILE:LINE:COL, sets STATUS= and exits 78, and RestartPreventExitStatus= stops there. No
# ExecStartPre=check: on 252 its failure is retried by Restart=on-failure (see docs/systemd.md).
ExecStart=@POOLKEEPER@ run {config}
# The daemon validates the file in full, then applies it by job name or, if it is invalid,
# logs every error and keeps the running config (docs/lifecycle.md, "Reload"). `reload --wait`
# asks over the control socket in RuntimeDirectory= and waits for that verdict, so
# `systemctl reload` fails on a rejected file (a SIGHUP would return before the verdict).
ExecReload=@POOLKEEPER@ reload --wait
Environment=PYTHONUNBUFFERED=1
# READY=1 comes after the pool is up and every before_ready job succeeded; a long one sends
# EXTEND_TIMEOUT_USEC, so this only bounds a start that makes no progress.
TimeoutStartSec=90s
# Workers survive SIGTERM: the main process drains (shutdown.drain_timeout, 30s by default),
# joins every worker, then exits. Stay above the drain budget; a longer drain is not cut
# short either (EXTEND_TIMEOUT_USEC). KillMode=mixed works too: see docs/systemd.md.
KillMode=control-group
TimeoutStopSec=45s
# WATCHDOG=1 every 15s while the main loop turns and the pool is healthy (docs/health.md).
WatchdogSec=30s
Restart=on-failure
RestartSec=2s
# 78 = EX_CONFIG: a restart cannot fix the config.
RestartPreventExitStatus=78

User=poolkeeper
Group=poolkeeper
StateDirectory={state}
RuntimeDirectory={runtime}
ConfigurationDirectory=poolkeeper
# The last successful validation of each config, by path (docs/config.md): a start whose
# inputs are unchanged skips validating again. Safe to delete at any time.
CacheDirectory=poolkeeper
UMask=0027

# Hardening (systemd-analyze security: 1.1 OK). Jobs may use the network; for jobs that do
# not, add the offline drop-in (packaging/systemd/offline.conf: 0.2 SAFE).
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateUsers=yes
PrivateIPC=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
# AF_UNIX: sd_notify, the journal, multiprocessing's forkserver and pipes.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
# Not MemoryDenyWriteExecute=yes: it breaks cffi callbacks and JITs that jobs commonly use.

[Install]
WantedBy=multi-user.target
"""

PLAIN = _HEAD.format(
    name="poolkeeper.service",
    what="the poolkeeper job daemon for /etc/poolkeeper/poolkeeper.yaml",
    flag="",
    edit="poolkeeper",
    description="poolkeeper job daemon",
) + _SERVICE.format(
    config="%E/poolkeeper/poolkeeper.yaml",
    state="poolkeeper",
    # A directory of its own below /run/poolkeeper: stopping this unit removes it, and must
    # not remove the runtime directories of running poolkeeper@ instances.
    runtime="poolkeeper/poolkeeper",
)

TEMPLATE = _HEAD.format(
    name="poolkeeper@.service",
    what="one poolkeeper daemon per config, poolkeeper@NAME runs /etc/poolkeeper/NAME.yaml",
    flag=" --instance NAME",
    edit="poolkeeper@NAME",
    description="poolkeeper job daemon (%i)",
) + _SERVICE.format(
    config="%E/poolkeeper/%i.yaml",
    state="poolkeeper/%i",
    runtime="poolkeeper/%i",
)

OFFLINE = """\
# offline.conf: the drop-in for jobs that need no network (systemd-analyze security: 0.2 SAFE).
# Install: mkdir -p /etc/systemd/system/poolkeeper.service.d
#          cp offline.conf /etc/systemd/system/poolkeeper.service.d/
#          systemctl daemon-reload && systemctl restart poolkeeper
# (or poolkeeper@NAME.service.d/ for one instance). Generated from poolkeeper/service/unit.py.
[Unit]
# No network needed: do not wait for it.
Wants=
After=

[Service]
PrivateNetwork=yes
IPAddressDeny=any
# The empty line resets the unit's list (lists of this setting are merged otherwise).
# AF_UNIX stays: sd_notify, the journal and the forkserver need it.
RestrictAddressFamilies=
RestrictAddressFamilies=AF_UNIX
# JITs and cffi callbacks need writable+executable memory: drop this line if a job uses them
# (it costs 0.1 in the score).
MemoryDenyWriteExecute=yes
"""

# Keep docs/fleet.md ("The watchdog") in step with the numbers below.
FLEET = """\
# fleet.conf: the drop-in for a fleet member (a spec with `fleet:`, docs/fleet.md).
# Install: mkdir -p /etc/systemd/system/poolkeeper@.service.d
#          cp fleet.conf /etc/systemd/system/poolkeeper@.service.d/
#          systemctl daemon-reload && systemctl restart poolkeeper@NAME
# (or poolkeeper.service.d/, or poolkeeper@NAME.service.d/ for one instance). With offline.conf
# too, the [Unit] lines below must sort after it (it empties Wants= and After=): name this file
# zz-fleet.conf. Generated from poolkeeper/service/unit.py.
[Unit]
# The unit already waits for network-online.target: that is what a database on another host
# needs. On a host that runs the fleet's database itself (Debian's postgresql package), also
# uncomment these two lines: the daemon then starts after the local clusters
# (postgresql@VERSION-NAME.service is ordered before postgresql.service) and, at shutdown,
# drains before the database stops, so its last runs are written. Wants=, not Requires=: a
# database that stops is an outage the daemon rides out (scope: host jobs go on), not a reason
# to stop the daemon.
#Wants=postgresql.service
#After=postgresql.service

[Service]
# A frozen daemon (SIGSTOP, a paused VM) stops renewing its lease, but its workers run on.
# Other hosts may take its work over lease - margin after the freeze: its last renewal came
# at most one heartbeat (lease/6) before it, and margin = lease/6. systemd sends SIGABRT to
# every process of the unit at most WatchdogSec after the freeze, and SIGKILL to what is left
# TimeoutAbortSec later. Hence the rule:
#     WatchdogSec + TimeoutAbortSec < lease - lease/6
# These values are for the default lease, 30s: 15s + 5s = 20s < 25s. For another fleet.lease
# scale both: lease 10s -> 5s + 2s (< 8.3s); lease 5s -> 2s + 1s (< 4.2s). A WatchdogSec under
# 2s is not tested: keep fleet.lease at 5s or more. The unit alone breaks the rule (30s, and
# TimeoutAbortSec= is TimeoutStopSec=, 45s, when unset).
WatchdogSec=15s
TimeoutAbortSec=5s
"""

SYSUSERS = """\
# sysusers.d(5): the system user the poolkeeper units run as (install as
# /usr/lib/sysusers.d/poolkeeper.conf, then `systemd-sysusers`).
u poolkeeper - "poolkeeper job daemon" /var/lib/poolkeeper
"""

TMPFILES = """\
# tmpfiles.d(5): what must exist before the first start (install as
# /usr/lib/tmpfiles.d/poolkeeper.conf, then `systemd-tmpfiles --create poolkeeper.conf`).
# The units create these themselves (ConfigurationDirectory=, StateDirectory=); creating them
# at install time lets an admin put the config in place and run `poolkeeper status` or
# `poolkeeper history` (which read the state DB) before the first start.
d /etc/poolkeeper 0755 root root -
d /var/lib/poolkeeper 0755 poolkeeper poolkeeper -
"""

# File name in packaging/systemd/ -> its text, rendered for SHIPPED_EXECUTABLE where it names one.
SHIPPED_NAMES = (
    "poolkeeper.service",
    "poolkeeper@.service",
    "offline.conf",
    "fleet.conf",
    "sysusers.d/poolkeeper.conf",
    "tmpfiles.d/poolkeeper.conf",
)


def exec_quote(argv: list[str]) -> str:
    """A command line for ExecStart= (systemd.service(5) "Command lines"): `%` and `$` would
    be expanded and `\\` and spaces split; quote what needs it."""
    words = []
    for arg in argv:
        text = arg.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$")
        if not text or any(c in text for c in " \t\"'"):
            text = '"' + text.replace('"', '\\"') + '"'
        words.append(text)
    return " ".join(words)


def installed_command() -> list[str]:
    """How this installation starts poolkeeper: the console script next to the interpreter
    (a virtualenv's bin/, or /usr/local/bin), else `python -m poolkeeper`."""
    script = Path(sys.executable).parent / "poolkeeper"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "poolkeeper"]


def render(template: str, command: list[str] | None = None) -> str:
    """`template` with the poolkeeper command filled in (the installed one by default)."""
    return template.replace(PLACEHOLDER, exec_quote(command or installed_command()))


def unit_text(instance: str | None = None, command: list[str] | None = None) -> str:
    """The plain unit, or the template (instance is "" or "%i") / an instance's text: an
    instance's unit is the template itself, systemd fills %i in."""
    return render(PLAIN if instance is None else TEMPLATE, command)


def shipped_files() -> dict[str, str]:
    """What packaging/systemd/ must contain, name -> text."""
    shipped = [SHIPPED_EXECUTABLE]
    return {
        "poolkeeper.service": render(PLAIN, shipped),
        "poolkeeper@.service": render(TEMPLATE, shipped),
        "offline.conf": OFFLINE,
        "fleet.conf": FLEET,
        "sysusers.d/poolkeeper.conf": SYSUSERS,
        "tmpfiles.d/poolkeeper.conf": TMPFILES,
    }


class UnitPaths(NamedTuple):
    """Where a running unit keeps what poolkeeper's commands read (see `locate`)."""

    argv: list[str]  # its ExecStart=, specifiers expanded
    state_directory: str | None
    runtime_directory: str | None


def locate(unit: str) -> UnitPaths:
    """A system unit's ExecStart and its state and runtime directories, from systemd's own
    view of it (`systemctl show`): what `poolkeeper status --unit NAME` and the other
    commands use from a shell, where systemd sets none of $STATE_DIRECTORY and
    $RUNTIME_DIRECTORY. Raises LookupError with the reason."""
    if "." not in unit:
        unit += ".service"
    try:
        shown = subprocess.run(
            ["systemctl", "show", "--property=LoadState,StateDirectory,RuntimeDirectory,ExecStart",
             "--", unit],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LookupError(f"cannot ask systemd about {unit}: {exc}") from None
    props = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    if shown.returncode != 0 or props.get("LoadState") != "loaded":
        why = " ".join(shown.stderr.split()) or f"LoadState={props.get('LoadState', 'unknown')}"
        raise LookupError(f"no unit {unit} ({why})")
    state = props.get("StateDirectory", "").split()
    runtime = props.get("RuntimeDirectory", "").split()
    return UnitPaths(
        argv=_argv_of(props.get("ExecStart", "")),
        state_directory=f"/var/lib/{state[0]}" if state else None,
        runtime_directory=f"/run/{runtime[0]}" if runtime else None,
    )


def _argv_of(exec_start: str) -> list[str]:
    """`{ path=... ; argv[]=/usr/local/bin/poolkeeper run /etc/x.yaml ; ... }` -> the argv."""
    for part in exec_start.split(" ; "):
        if "argv[]=" in part:
            return part.split("argv[]=", 1)[1].split()
    return []


def write_shipped(directory: Path) -> None:
    """Regenerate packaging/systemd/ (python -m poolkeeper.service.unit DIR)."""
    for name, text in shipped_files().items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_shipped(Path(sys.argv[1] if len(sys.argv) > 1 else "packaging/systemd"))
