"""The spec keys of fleet mode (issue 11): the `fleet:` section, each job's `scope`, `on_lost`
and `on_db_loss`, what `check` says about them, `run --host-id`, the validation cache and the
reload refusal. (What the daemon does with them is tested in tests/test_fleet_*.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poolkeeper import cli
from poolkeeper.config import validation_cache
from poolkeeper.config.loader import load_config
from poolkeeper.config.settings import Config, Fleet, redacted_url
from poolkeeper.daemon import reload

JOBS_PY = """
def tick(ctx):
    pass

def eat(*, ctx):
    pass
"""

# FLEET.md's example, with targets that import.
FLEET_SPEC = """\
version: 1
pythonpath: [.]
pool: {workers: 4, start_method: fork}
fleet:
  database: postgresql:///pk?host=/tmp/pgdir
  host_id: web-1
  lease: 30s
defaults: {scope: fleet, on_lost: record, on_db_loss: stop}
jobs:
  tick:  {target: fjobs:tick, every: 200ms}
  local: {target: fjobs:tick, every: 1m, scope: host}
  eat:   {target: fjobs:eat, loop: {replicas: 3}, on_db_loss: keep}
  once:  {target: fjobs:tick, cron: "0 3 * * *", on_lost: retry}
"""

SECRET = "s3cr3t-pw"


def write(directory: Path, text: str, name: str = "spec.yaml") -> Path:
    (directory / "fjobs.py").write_text(JOBS_PY)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def jobs_of(config: Config) -> dict[str, tuple[str, str, str]]:
    return {name: (job.scope, job.on_lost, job.on_db_loss) for name, job in config.jobs.items()}


# --- valid specs -----------------------------------------------------------------------------


def test_the_fleet_example_gives_its_settings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FLEET_SPEC))
    assert config.fleet == Fleet(
        database="postgresql:///pk?host=/tmp/pgdir", host_id="web-1", lease=30.0
    )
    assert jobs_of(config) == {
        "tick": ("fleet", "record", "stop"),
        "local": ("host", "record", "stop"),
        "eat": ("fleet", "record", "keep"),
        "once": ("fleet", "retry", "stop"),
    }


def test_scope_defaults_to_fleet_with_a_fleet_section_and_to_host_without(tmp_path: Path) -> None:
    body = "jobs:\n  a: {target: fjobs:tick, every: 1m}\n  b: {target: fjobs:eat, loop: {}}\n"
    fleet = load_config(
        write(
            tmp_path, "version: 1\npythonpath: [.]\nfleet: {database: 'postgres://h/pk'}\n" + body
        )
    )
    alone = load_config(write(tmp_path, "version: 1\npythonpath: [.]\n" + body, "alone.yaml"))
    assert fleet.fleet == Fleet(database="postgres://h/pk", host_id=None, lease=30.0)
    assert jobs_of(fleet) == {"a": ("fleet", "record", "stop"), "b": ("fleet", "record", "stop")}
    assert alone.fleet is None
    assert jobs_of(alone) == {"a": ("host", "record", "stop"), "b": ("host", "record", "stop")}


def test_defaults_set_the_fleet_keys_and_a_job_overrides_them(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            version: 1
            pythonpath: [.]
            fleet: {database: 'postgresql://pk@db.example:5432/pk', lease: 2s}
            defaults: {scope: host, on_lost: retry, on_db_loss: keep}
            jobs:
              a: {target: fjobs:tick, every: 1m}
              b: {target: fjobs:tick, every: 1m, scope: fleet, on_lost: record}
              boot: {target: fjobs:tick, at: startup, before_ready: true}
            """,
        )
    )
    assert config.fleet is not None and config.fleet.lease == 2.0
    assert jobs_of(config) == {
        "a": ("host", "retry", "keep"),
        "b": ("fleet", "record", "keep"),
        "boot": ("host", "retry", "keep"),  # a startup job of a fleet spec runs per host
    }


def test_the_settings_survive_json(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FLEET_SPEC))
    assert Config.from_dict(json.loads(json.dumps(config.to_json()))) == config


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://bob:{SECRET}@db:5432/pk", "postgresql://bob:***@db:5432/pk"),
        (f"postgres://bob:{SECRET}@with@at@db/pk", "postgres://bob:***@db/pk"),
        (
            f"postgresql:///pk?host=/run&password={SECRET}&user=u",
            "postgresql:///pk?host=/run&password=***&user=u",
        ),
        ("postgresql://bob@db/pk?sslmode=require", "postgresql://bob@db/pk?sslmode=require"),
        ("postgresql://h1:5432,h2:5433/pk", "postgresql://h1:5432,h2:5433/pk"),
    ],
)
def test_a_printed_config_shows_no_password(tmp_path: Path, url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    config = load_config(
        write(tmp_path, FLEET_SPEC.replace("postgresql:///pk?host=/tmp/pgdir", url))
    )
    assert config.fleet is not None and config.fleet.database == url  # connected to as written
    assert SECRET not in repr(config) and shown in repr(config)


# --- errors: one line each, at the offending spot, exit 78 ------------------------------------

FLEET = "fleet: {database: 'postgresql:///pk'}\n"
HEAD = "version: 1\npythonpath: [.]\n"

ERRORS: list[tuple[str, str, list[str]]] = [
    (
        "scope fleet without fleet:",
        HEAD + "jobs:\n  a: {target: fjobs:tick, every: 1m, scope: fleet}\n",
        [
            "4:45: scope: fleet needs a fleet: section (the database the hosts share); add one or set scope: host"
        ],
    ),
    (
        "default scope fleet without fleet:, said once",
        HEAD
        + "defaults: {scope: fleet}\njobs:\n  a: {target: fjobs:tick, every: 1m}\n"
        + "  b: {target: fjobs:tick, every: 5m}\n",
        [
            "3:19: scope: fleet needs a fleet: section (the database the hosts share); add one or set scope: host"
        ],
    ),
    (
        "default scope fleet without fleet: and no jobs",
        HEAD + "defaults: {scope: fleet}\n",
        [
            "3:19: scope: fleet needs a fleet: section (the database the hosts share); add one or set scope: host"
        ],
    ),
    (
        "before_ready with the fleet scope by default",
        HEAD + FLEET + "jobs:\n  a: {target: fjobs:tick, at: startup, before_ready: true}\n",
        ["5:54: before_ready runs on each host as it starts: set scope: host"],
    ),
    (
        "at: startup with the fleet scope by default",
        HEAD + FLEET + "jobs:\n  a: {target: fjobs:tick, at: startup}\n",
        ["5:31: at: startup runs on each host as it starts: set scope: host"],
    ),
    (
        "at: startup with scope: fleet",
        HEAD + FLEET + "jobs:\n  a:\n    target: fjobs:tick\n    at: startup\n    scope: fleet\n",
        ["7:9: at: startup runs on each host as it starts: set scope: host"],
    ),
    (
        "database of another scheme",
        HEAD + f"fleet: {{database: 'mysql://bob:{SECRET}@db/pk'}}\n",
        [
            "3:19: fleet.database: expected a PostgreSQL URL starting with postgresql:// or postgres:// (e.g. 'postgresql://user@host/dbname')"
        ],
    ),
    (
        "database without a scheme",
        HEAD + f"fleet: {{database: 'host=db password={SECRET} dbname=pk'}}\n",
        [
            "3:19: fleet.database: expected a PostgreSQL URL starting with postgresql:// or postgres:// (e.g. 'postgresql://user@host/dbname')"
        ],
    ),
    (
        "database with a space",
        HEAD + f"fleet: {{database: 'postgresql://bob:{SECRET} @db/pk'}}\n",
        ["3:19: fleet.database: a PostgreSQL URL cannot contain spaces or NUL characters"],
    ),
    (
        "database not a URL",
        HEAD + f"fleet: {{database: 'postgresql://bob:{SECRET}@[::1/pk'}}\n",
        ["3:19: fleet.database: not a valid URL (is a '[' of an IPv6 address left unclosed?)"],
    ),
    (
        "database a list",
        HEAD + "fleet:\n  database: [postgresql:///pk]\n",
        [
            "4:13: fleet.database: expected a PostgreSQL URL like 'postgresql://user@host/dbname', got a list"
        ],
    ),
    (
        "fleet: written as the URL",
        HEAD + f"fleet: postgresql://bob:{SECRET}@db/pk\n",
        ["3:8: fleet: expected a mapping with a database: key, got a string"],
    ),
    (
        "fleet: without a database",
        HEAD + "fleet:\n",
        ["3:1: fleet: missing required key 'database'"],
    ),
    (
        "fleet: with a misspelt key",
        HEAD + "fleet: {database: 'postgresql:///pk', leese: 5s}\n",
        ["3:39: unknown key 'leese' (did you mean 'lease'?)"],
    ),
    (
        "host_id with a space",
        HEAD + "fleet: {database: 'postgresql:///pk', host_id: web 1}\n",
        [
            "3:48: fleet.host_id: 'web 1' is not a host id: use letters, digits and . _ - (1 to 64 characters)"
        ],
    ),
    (
        "host_id empty",
        HEAD + "fleet: {database: 'postgresql:///pk', host_id: ''}\n",
        [
            "3:48: fleet.host_id: '' is not a host id: use letters, digits and . _ - (1 to 64 characters)"
        ],
    ),
    (
        "host_id too long",
        HEAD + f"fleet: {{database: 'postgresql:///pk', host_id: {'h' * 65}}}\n",
        [
            f"3:48: fleet.host_id: '{'h' * 65}' is not a host id: use letters, digits and . _ - (1 to 64 characters)"
        ],
    ),
    (
        "lease under 2s",
        HEAD + "fleet: {database: 'postgresql:///pk', lease: 1999ms}\n",
        ["3:46: fleet.lease: must be at least 2s, got '1999ms'"],
    ),
    (
        "lease without a unit",
        HEAD + "fleet: {database: 'postgresql:///pk', lease: 30}\n",
        ["3:46: fleet.lease: a duration needs a unit, e.g. '30s'"],
    ),
    (
        "bad choices, in defaults",
        HEAD + FLEET + "defaults: {scope: global, on_lost: retyr, on_db_loss: yes}\n"
        "jobs:\n  a: {target: fjobs:tick, every: 1m}\n",
        [
            "4:19: scope: 'global' is not one of: fleet, host",
            "4:36: on_lost: 'retyr' is not one of: record, retry (did you mean 'retry'?)",
            "4:55: on_db_loss: got the boolean true from the unquoted YAML 1.1 word 'yes'; quote it ('yes') if you meant the string",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in ERRORS])
def test_check_reports_each_fleet_error_at_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[str]
) -> None:
    path = write(tmp_path, text)
    assert cli.main(["check", str(path)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"{path}:{line}" for line in expected]
    assert SECRET not in err


def test_the_command_says_it_in_one_line_and_exits_78(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + f"fleet: {{database: 'mysql://bob:{SECRET}@db/pk', lease: 1s}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f"{path}:3:19: fleet.database: expected a PostgreSQL URL starting with postgresql:// or postgres:// (e.g. 'postgresql://user@host/dbname')",
        f"{path}:3:57: fleet.lease: must be at least 2s, got '1s'",
    ]


# --- run --host-id ---------------------------------------------------------------------------

# The daemon's fleet side is not this test's: a Daemon that prints the config it was handed
# (and closes the pool a cached start made for it) shows what `run` passes on.
SHOW_CONFIG = """
import sys
from poolkeeper import cli
from poolkeeper.daemon import mainloop

class ShowConfig:
    def __init__(self, config, *, log_target, notifier, pool=None, host_id=None):
        self.config, self.pool = config, pool

    def run(self):
        if self.pool is not None:
            self.pool.close()
        print("fleet", tuple(self.config.fleet or ()), flush=True)
        return 0

mainloop.Daemon = ShowConfig
sys.exit(cli.main(sys.argv[1:]))
"""


def run_poolkeeper(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "show_config.py"
    if not script.exists():  # its file is an input of the cached validation
        script.write_text(SHOW_CONFIG)
    cache = tmp_path / ".cache"  # not on the import path: "cache" would be a new package there
    return subprocess.run(
        [sys.executable, str(script), "run", *args, "--log-target", "stderr"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CACHE_DIRECTORY": str(cache)},
    )


def test_host_id_overrides_the_spec_validated_or_cached(tmp_path: Path) -> None:
    path = write(tmp_path, FLEET_SPEC)
    expected = "fleet ('postgresql:///pk?host=/tmp/pgdir', 'web-2', 30.0)\n"
    first = run_poolkeeper(tmp_path, str(path), "--host-id", "web-2")
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected
    assert "validating" in first.stderr
    second = run_poolkeeper(tmp_path, str(path), "--host-id", "web-2")
    assert second.returncode == 0, second.stderr
    assert "not validated again" in second.stderr
    assert second.stdout == expected
    # The cache holds the spec as written: another --host-id, or none, from the same entry.
    third = run_poolkeeper(tmp_path, str(path))
    assert "not validated again" in third.stderr
    assert third.stdout == "fleet ('postgresql:///pk?host=/tmp/pgdir', 'web-1', 30.0)\n"


@pytest.mark.parametrize("cached", [False, True], ids=["validated", "cached"])
def test_host_id_without_a_fleet_section_is_a_usage_error(tmp_path: Path, cached: bool) -> None:
    path = write(tmp_path, HEAD + "jobs:\n  a: {target: fjobs:tick, every: 1m}\n")
    if cached:
        assert run_poolkeeper(tmp_path, str(path)).returncode == 0
    result = run_poolkeeper(tmp_path, str(path), "--host-id", "web-2")
    assert result.returncode == 64
    assert result.stdout == ""
    line = f"poolkeeper run: --host-id: {path} has no fleet: section, so there is no host id to set"
    # A cached start refuses before it logs; a validating one after its "validating" line.
    lines = result.stderr.splitlines()
    if cached:
        assert lines == [line]
    else:
        assert "validating" in lines[0] and lines[1:] == [line]


@pytest.mark.parametrize("name", ["web 1", "", "h" * 65, "web/1", "wéb"])
def test_an_invalid_host_id_is_a_usage_error(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, FLEET_SPEC)
    result = run_poolkeeper(tmp_path, str(path), "--host-id", name)
    assert result.returncode == 64
    assert result.stdout == ""
    assert result.stderr == (
        f"poolkeeper run: --host-id: '{name}' is not a host id: use letters, digits and . _ - "
        "(1 to 64 characters)\n"
    )


# --- the validation cache --------------------------------------------------------------------


def test_the_validation_cache_keeps_the_fleet_settings(tmp_path: Path) -> None:
    path = write(tmp_path, FLEET_SPEC)
    cache = tmp_path / ".cache"  # not on the import path: "cache" would be a new package there
    inputs = validation_cache.Inputs()
    config = load_config(path, inputs=inputs)
    assert validation_cache.store(config, inputs, str(cache)) is None
    cached, why = validation_cache.lookup(str(path), str(cache))
    assert cached == config, why
    assert cached is not None and cached.fleet == config.fleet
    assert jobs_of(cached) == jobs_of(config)
    entry = json.loads(Path(validation_cache.entry_path(str(path), str(cache))).read_text())
    assert {"scope", "on_lost", "on_db_loss"} <= set(entry["config"]["job_fields"])


def test_an_entry_of_the_format_before_fleet_is_a_miss(tmp_path: Path) -> None:
    path = write(tmp_path, FLEET_SPEC)
    cache = tmp_path / ".cache"  # not on the import path: "cache" would be a new package there
    inputs = validation_cache.Inputs()
    assert validation_cache.store(load_config(path, inputs=inputs), inputs, str(cache)) is None
    entry_file = Path(validation_cache.entry_path(str(path), str(cache)))
    entry = json.loads(entry_file.read_text())
    entry["format"] = 2
    entry_file.write_text(json.dumps(entry))
    assert validation_cache.lookup(str(path), str(cache)) == (
        None,
        "cache entry of another format",
    )


# --- reload ----------------------------------------------------------------------------------


def _fleet_config(tmp_path: Path, name: str, fleet: str | None, jobs: str = "") -> Config:
    head = HEAD + (f"fleet: {fleet}\n" if fleet is not None else "")
    return load_config(write(tmp_path, head + "jobs:\n" + jobs, f"{name}.yaml"))


DB = f"postgresql://pk:{SECRET}@db/pk"


@pytest.mark.parametrize(
    ("fleet", "reason"),
    [
        (
            f"{{database: '{DB.replace('@db', '@other')}', host_id: web-1}}",
            "fleet.database changed",
        ),
        (f"{{database: '{DB}', host_id: web-9}}", "fleet.host_id changed"),
        (f"{{database: '{DB}', host_id: web-1, lease: 10s}}", "fleet.lease changed"),
        (f"{{database: '{DB}'}}", "fleet.host_id changed"),
        (None, "the fleet: section was removed"),
    ],
)
def test_a_reload_that_changes_the_fleet_section_is_refused(
    tmp_path: Path, fleet: str | None, reason: str
) -> None:
    old = _fleet_config(tmp_path, "old", f"{{database: '{DB}', host_id: web-1}}")
    refusal = reload.refusal(old, _fleet_config(tmp_path, "new", fleet))
    assert refusal == (
        f"{reason}: a running daemon keeps its place in the fleet (its database, host id and "
        "lease); restart it to apply this (systemctl restart)"
    )


def test_joining_a_fleet_by_reload_is_refused_and_job_changes_are_not(tmp_path: Path) -> None:
    fleet = f"{{database: '{DB}', host_id: web-1}}"
    refusal = reload.refusal(
        _fleet_config(tmp_path, "alone", None), _fleet_config(tmp_path, "fleet", fleet)
    )
    assert refusal is not None and refusal.startswith("the fleet: section was added: ")
    job = "  a: {target: fjobs:tick, every: 1m, scope: host}\n"
    old, new = _fleet_config(tmp_path, "old", fleet), _fleet_config(tmp_path, "new", fleet, job)
    assert reload.refusal(old, new) is None
