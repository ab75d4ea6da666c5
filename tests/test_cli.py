"""The command line as a user types it: real processes, real SQLite."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from poolkeeper import __version__
from poolkeeper.state.identity import store_at


def pk(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "poolkeeper", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_version_and_help():
    assert pk("--version").stdout.strip() == f"poolkeeper {__version__}"
    helped = pk("--help")
    assert helped.returncode == 0
    for command in ("run", "check", "status", "history", "next", "schema"):
        assert command in helped.stdout
    assert pk("check", "--help").returncode == 0


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["check"], ["history", "-n", "many"]])
def test_usage_errors_exit_64_without_traceback(argv):
    proc = pk(*argv)
    assert proc.returncode == 64
    assert "Traceback" not in proc.stderr


@pytest.fixture
def spec_with_history(tmp_path):
    spec = tmp_path / "jobs.yaml"
    spec.write_text(
        textwrap.dedent(f"""\
        version: 1
        state: {{path: {tmp_path / "state.db"}}}
        jobs:
          nightly:
            target: os:getcwd
            cron: "30 2 * * MON-FRI"
            timezone: Europe/Berlin
          rollup:
            target: os:getcwd
            every: 5m
        """)
    )
    store = store_at(tmp_path / "state.db")
    store.run_ended(
        run_id="r1",
        job="rollup",
        attempt=1,
        scheduled_at=1000.0,
        started_at=1000.0,
        ended_at=1000.25,
        outcome="succeeded",
        exit_code=None,
        signal=None,
        worker_pid=10,
        error=None,
    )
    store.run_ended(
        run_id="r2",
        job="rollup",
        attempt=2,
        scheduled_at=2000.0,
        started_at=2000.0,
        ended_at=2003.0,
        outcome="lost",
        exit_code=None,
        signal=9,
        worker_pid=11,
        error="worker died: SIGKILL",
    )
    store.close()
    return spec


def test_history_lists_runs_newest_first(spec_with_history):
    proc = pk("history", "rollup", "-c", str(spec_with_history))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["STARTED", "JOB"]
    assert "lost" in lines[1] and "worker died: SIGKILL" in lines[1] and "3.00s" in lines[1]
    assert "succeeded" in lines[2] and "250ms" in lines[2]


def test_status_shows_every_job_and_its_last_outcome(spec_with_history):
    proc = pk("status", "-c", str(spec_with_history))
    assert proc.returncode == 0, proc.stderr
    nightly = next(line for line in proc.stdout.splitlines() if line.startswith("nightly"))
    rollup = next(line for line in proc.stdout.splitlines() if line.startswith("rollup"))
    assert "never" in nightly and "Europe/Berlin" in nightly
    assert "lost (worker died: SIGKILL)" in rollup


def test_next_prints_fire_times_in_the_jobs_zone(spec_with_history):
    proc = pk("next", "nightly", "-n", "3", "-c", str(spec_with_history))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert all(" 02:30:00 " in line and line.endswith(("CET", "CEST")) for line in lines)


def test_unknown_job_and_bad_config_are_one_line_errors(spec_with_history, tmp_path):
    proc = pk("history", "nope", "-c", str(spec_with_history))
    assert proc.returncode == 64 and "no job named 'nope'" in proc.stderr
    missing = pk("status", "-c", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 66
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, command, has_log_level",
    [(["run", "spec.yaml"], "_cmd_run", True), (["schema"], "_cmd_schema", False)],
)
def test_an_internal_error_hints_only_at_options_the_command_has(
    monkeypatch, capsys, argv, command, has_log_level
):
    """Issue 9: 'rerun with --log-level debug' was printed by commands without that option."""
    from poolkeeper import cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, command, broken)
    assert cli.main(argv) == 70
    err = capsys.readouterr().err
    assert err.startswith("poolkeeper: internal error: ZeroDivisionError: a bug (please report it")
    assert ("--log-level debug" in err) == has_log_level


def test_the_no_daemon_hint_names_the_unit_the_socket_belongs_to():
    from poolkeeper.service.control import running_hint

    assert running_hint("/run/poolkeeper/poolkeeper/control.sock") == (
        "systemctl status poolkeeper"
    )
    assert running_hint("/run/poolkeeper/nightly/control.sock") == (
        "systemctl status poolkeeper@nightly"
    )
    assert "poolkeeper run CONFIG" in running_hint("/srv/app/.poolkeeper/state.db.sock")
