"""Valid job specs load into the resolved Config the daemon runs; the shipped example and
schema stay in step with the model; durations and sizes parse as documented."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.cli import check_file
from poolkeeper.config.durations import format_duration, format_size, parse_duration, parse_size
from poolkeeper.config.loader import ConfigError, load_config
from poolkeeper.config.schema import json_schema
from poolkeeper.config.settings import Config
from poolkeeper.config.validation_cache import cpu_count
from poolkeeper.config.yamlload import Issue

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"

JOBS_PY = "def tick(ctx):\n    pass\n\ndef work(n, *, ctx, region='eu'):\n    pass\n"


def write(directory: Path, text: str, name: str = "spec.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_minimal_spec_gets_every_default(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "version: 1\njobs:\n  a: {target: 'm:f', every: 5m}\n"),
        import_targets=False,
    )
    assert isinstance(config, Config)
    assert config.path == str(tmp_path / "spec.yaml")
    assert config.pythonpath == []
    assert config.pool.workers == cpu_count() >= 1
    assert (config.pool.start_method, config.pool.preload) == ("forkserver", [])
    assert (config.pool.max_runs_per_worker, config.pool.max_memory_per_worker) == (0, 0)
    assert config.shutdown.drain_timeout == 30.0
    assert (config.state.path, config.state.keep) == ("auto", 30 * 86400.0)
    job = config.jobs["a"]
    assert (job.name, job.target, job.kind, job.every) == ("a", "m:f", "every", 300.0)
    assert (job.loop, job.cron, job.at, job.timezone) == (None, None, None, None)
    assert (job.before_ready, job.jitter, job.timeout, job.heartbeat_timeout) == (
        False,
        0.0,
        None,
        None,
    )
    assert (
        job.retry.attempts,
        job.retry.initial,
        job.retry.factor,
        job.retry.max,
        job.retry.jitter,
    ) == (1, 10.0, 2.0, 600.0, "full")
    assert (job.restart, job.overlap, job.max_concurrent, job.catchup) == (
        "always",
        "skip",
        1,
        "none",
    )
    assert (job.backoff.initial, job.backoff.max, job.backoff.factor, job.backoff.jitter) == (
        1.0,
        300.0,
        2.0,
        "full",
    )
    assert (job.args, job.kwargs, job.env) == ([], {}, {})


def test_every_kind_and_setting_resolves(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "jobs.py").write_text(JOBS_PY)
    spec = """\
version: 1
pythonpath: [code]
pool: {workers: 4, start_method: spawn, preload: [jobs], max_runs_per_worker: 50, max_memory_per_worker: 1.5GiB}
shutdown: {drain_timeout: 1m30s}
state: {path: state/pk.db, keep: 12h}
jobs:
  ingest:
    target: jobs:tick
    loop: {replicas: 2}
    restart: on-failure
    backoff: {initial: 500ms, max: 5m, factor: 3, jitter: equal}
    heartbeat_timeout: 60s
  rollup:
    target: jobs:work
    every: 5m
    jitter: 10s
    timeout: 2m
    retry: {attempts: 3, initial: 10s, factor: 2, max: 10m, jitter: none}
    overlap: allow
    max_concurrent: 2
    args: [7]
  nightly:
    target: jobs:tick
    cron: "30 2 * * MON-FRI"
    timezone: Europe/Berlin
    catchup: once
  warm:
    target: jobs:work
    at: startup
    before_ready: true
    kwargs: {n: 100, region: us}
    env: {CACHE_URL: "redis://localhost", ANSWER: "yes"}
  later:
    target: jobs:tick
    at: 2030-06-01 03:00:00+02:00
"""
    config = load_config(write(tmp_path, spec))
    assert config.pythonpath == [str(tmp_path / "code")]
    assert config.pool._asdict() == {
        "workers": 4, "start_method": "spawn", "preload": ["jobs"],
        "max_runs_per_worker": 50, "max_memory_per_worker": 3 * 512 * 1024**2,
    }  # fmt: skip
    assert config.shutdown.drain_timeout == 90.0
    assert (config.state.path, config.state.keep) == (str(tmp_path / "state" / "pk.db"), 43200.0)
    assert list(config.jobs) == ["ingest", "rollup", "nightly", "warm", "later"]
    ingest, rollup, nightly, warm, later = config.jobs.values()
    assert (ingest.kind, ingest.loop.replicas, ingest.restart, ingest.heartbeat_timeout) == (
        "loop",
        2,
        "on-failure",
        60.0,
    )
    assert (
        ingest.backoff.initial,
        ingest.backoff.max,
        ingest.backoff.factor,
        ingest.backoff.jitter,
    ) == (0.5, 300.0, 3.0, "equal")
    assert (
        rollup.every,
        rollup.jitter,
        rollup.timeout,
        rollup.overlap,
        rollup.max_concurrent,
        rollup.args,
    ) == (300.0, 10.0, 120.0, "allow", 2, [7])
    assert (rollup.retry.attempts, rollup.retry.max, rollup.retry.jitter) == (3, 600.0, "none")
    assert (nightly.kind, nightly.cron, nightly.timezone, nightly.catchup) == (
        "cron",
        "30 2 * * MON-FRI",
        "Europe/Berlin",
        "once",
    )
    assert (warm.kind, warm.at, warm.before_ready, warm.kwargs) == (
        "at",
        "startup",
        True,
        {"n": 100, "region": "us"},
    )
    assert warm.env == {"CACHE_URL": "redis://localhost", "ANSWER": "yes"}
    assert later.at == datetime.fromisoformat("2030-06-01T03:00:00+02:00")


def test_defaults_merge_into_jobs_that_do_not_set_the_key(tmp_path: Path) -> None:
    spec = """\
version: 1
defaults:
  timeout: 5m
  timezone: UTC
  retry: {attempts: 2}
  env: {A: "1"}
  every: 1h
jobs:
  plain: {target: 'm:f'}
  own: {target: 'm:f', every: 5m, timeout: 10s, env: {B: "2"}}
  cronjob: {target: 'm:f', cron: '0 * * * *'}
  looper: {target: 'm:f', loop: {}}
"""
    jobs = load_config(write(tmp_path, spec), import_targets=False).jobs
    assert (jobs["plain"].every, jobs["plain"].timeout, jobs["plain"].retry.attempts) == (
        3600.0,
        300.0,
        2,
    )
    assert jobs["plain"].timezone is None  # timezone only applies to cron jobs: not merged
    assert (jobs["own"].every, jobs["own"].timeout, jobs["own"].env) == (
        300.0,
        10.0,
        {"B": "2"},
    )  # key-level
    assert (jobs["cronjob"].kind, jobs["cronjob"].every, jobs["cronjob"].timezone) == (
        "cron",
        None,
        "UTC",
    )
    assert (jobs["looper"].kind, jobs["looper"].timeout, jobs["looper"].retry.attempts) == (
        "loop",
        None,
        1,
    )


def test_include_adds_fragment_jobs_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path / "conf.d", "jobs:\n  b: {target: 'm:f', every: 1m}\n", "20-b.yaml")
    write(tmp_path / "conf.d", "jobs:\n  a: {target: 'm:f', every: 1m}\n", "10-a.yaml")
    write(tmp_path / "conf.d", "# all commented out\n", "30-empty.yaml")
    write(tmp_path / "conf.d", "jobs:\n  x: {}\n", "notes.txt")
    write(tmp_path / "conf.d", "jobs:\n  y: {}\n", ".hidden.yaml")
    spec = write(
        tmp_path,
        "version: 1\ninclude: conf.d\ndefaults: {timeout: 1m}\njobs:\n  main: {target: 'm:f', every: 5m}\n",
    )
    config = load_config(spec, import_targets=False)
    assert list(config.jobs) == ["main", "a", "b"]
    assert config.jobs["b"].timeout == 60.0  # defaults apply to included jobs too


def test_relative_paths_resolve_against_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "etc" / "lib", JOBS_PY, "jobs.py")
    write(
        tmp_path / "etc",
        "version: 1\npythonpath: [lib, /opt/x/../y]\nstate: {path: ../var/db}\njobs:\n  a: {target: 'jobs:tick', every: 1m}\n",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/spec.yaml", import_targets=False)
    assert config.path == str(tmp_path / "etc" / "spec.yaml")
    assert config.pythonpath == [str(tmp_path / "etc" / "lib"), "/opt/y"]
    assert config.state.path == str(tmp_path / "var" / "db")


def test_workers_auto_and_sections_left_empty(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "version: 1\npool:\n  workers: auto\nshutdown:\nstate:\ndefaults:\njobs:\n")
    )
    assert config.pool.workers == cpu_count()
    assert config.jobs == {}


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    spec = "version: 1\njobs:\n  a: &base {target: 'm:f', every: 5m, timeout: 1m}\n  b:\n    <<: *base\n    timeout: 2m\n"
    jobs = load_config(write(tmp_path, spec), import_targets=False).jobs
    assert (jobs["b"].target, jobs["b"].every, jobs["b"].timeout) == ("m:f", 300.0, 120.0)


def test_args_keep_yaml_data_as_written(tmp_path: Path) -> None:
    spec = "version: 1\njobs:\n  a:\n    target: 'm:f'\n    every: 5m\n    args: [on, 1:30, {2: x, yes: y}, 2024-01-01]\n"
    job = load_config(write(tmp_path, spec), import_targets=False).jobs["a"]
    assert job.args == [True, 90, {2: "x", True: "y"}, "2024-01-01"]


def test_import_targets_false_skips_imports(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "version: 1\njobs:\n  a: {target: 'no.such:mod', every: 5m}\n"),
        import_targets=False,
    )
    assert list(config.jobs) == ["a"]
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "spec.yaml")
    assert caught.value.exit_code == 78
    assert [str(i) for i in caught.value.issues] == [
        f"{tmp_path / 'spec.yaml'}:3:15: target 'no.such:mod': cannot import module 'no.such': No module named 'no'"
    ]


def test_config_error_carries_issues_and_exit_codes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "none.yaml")
    assert missing.value.exit_code == 66
    with pytest.raises(ConfigError) as invalid:
        load_config(write(tmp_path, "version: 1\npool: {workers: 0}\n"))
    issue = invalid.value.issues[0]
    assert isinstance(issue, Issue)
    assert (issue.file, issue.line, issue.col) == (str(tmp_path / "spec.yaml"), 2, 17)
    assert str(issue) == f"{issue.file}:{issue.line}:{issue.col}: {issue.message}"
    assert invalid.value.exit_code == 78


def test_jobs_compare_equal_when_unchanged(tmp_path: Path) -> None:
    spec = "version: 1\njobs:\n  a: {target: 'm:f', every: 5m, args: [1]}\n  b: {target: 'm:f', every: 5m}\n"
    one = load_config(write(tmp_path, spec), import_targets=False)
    two = load_config(
        write(
            tmp_path, spec.replace("b: {target: 'm:f', every: 5m}", "b: {target: 'm:f', every: 6m}")
        ),
        import_targets=False,
    )
    assert one.jobs["a"] == two.jobs["a"]
    assert one.jobs["b"] != two.jobs["b"]


def test_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out, err = io.StringIO(), io.StringIO()
    assert check_file("config/example.yaml", out, err) == 0
    assert (out.getvalue(), err.getvalue()) == ("config/example.yaml: ok, 4 jobs\n", "")
    result = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "check", "config/example.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "config/example.yaml: ok, 4 jobs\n",
        "",
    )


def test_example_uses_every_kind_of_job() -> None:
    config = load_config(EXAMPLE)
    assert {job.kind for job in config.jobs.values()} == {"loop", "every", "cron", "at"}
    assert EXAMPLE.read_text().startswith(
        "# yaml-language-server: $schema=./poolkeeper.schema.json\n"
    )


def test_shipped_schema_is_current() -> None:
    shipped = json.loads((ROOT / "config" / "poolkeeper.schema.json").read_text())
    assert shipped == json_schema(), (
        "stale: run `make schema` (poolkeeper schema > config/poolkeeper.schema.json)"
    )


def test_schema_describes_the_file_as_written() -> None:
    schema = json_schema()
    job = schema["$defs"]["JobSpec"]
    assert job["additionalProperties"] is False
    assert job["required"] == ["target"]
    assert job["properties"]["every"]["anyOf"][0]["type"] == "string"
    assert job["properties"]["restart"]["enum"] == ["always", "on-failure", "never"]
    assert all(prop.get("description") for prop in job["properties"].values())
    assert all(prop.get("description") for prop in schema["properties"].values())
    assert schema["properties"]["version"] == {
        "const": 1,
        "description": "Format version: 1.",
        "title": "Version",
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1.5h", 5400),
        ("1h30m", 5400),
        ("2m30s", 150),
        ("1d", 86400),
        (".5s", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "", "5 m", "1x", "-5s", "1h 30m", "s", "1e3s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (90, "1m30s"), (5400, "1h30m"), (86400, "1d"), (1.25, "1.25s"), (0, "0s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=3650 * 86400 * 1000))
def test_format_then_parse_duration_round_trips(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        (0, 0),
        ("512MiB", 512 * 1024**2),
        ("1GiB", 1024**3),
        ("100MB", 10**8),
        ("2G", 2 * 1024**3),
        ("10kB", 10000),
        ("64B", 64),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["512", 512, "1 GiB", "1gb", "-1MiB", "MiB"])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_check_counts_jobs_in_the_ok_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\njobs:\n  a: {target: 'os:getpid', every: 5m}\n")
    out, err = io.StringIO(), io.StringIO()
    assert check_file(str(path), out, err) == 0
    assert (out.getvalue(), err.getvalue()) == (f"{path}: ok, 1 job\n", "")
    assert os.getpid()  # the target above is a real callable


def test_job_names_may_use_unicode_letters(tmp_path):
    from poolkeeper.config.loader import load_config

    spec = tmp_path / "u.yaml"
    spec.write_text(
        "version: 1\njobs:\n  wärme-café:\n    target: os:getcwd\n    every: 5m\n",
        encoding="utf-8",
    )
    assert list(load_config(spec).jobs) == ["wärme-café"]


def test_the_readme_annotated_spec_is_valid(tmp_path):
    """The spec a user copies from the README must pass validation (its targets are examples:
    not imported)."""
    import re
    from pathlib import Path

    from poolkeeper.config.loader import load_config

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [text] = re.findall(r"## A job spec, annotated\n\n```yaml\n(.*?)```", readme, re.S)
    (tmp_path / "conf.d").mkdir()  # its `include:`
    spec = tmp_path / "poolkeeper.yaml"
    spec.write_text(text)
    config = load_config(spec, import_targets=False)
    assert list(config.jobs) == ["ingest", "rollup", "nightly", "warm"]
