"""The validation cache: a start whose inputs are unchanged skips pydantic, and any change to an
input (config, included files, job code, import path, environment) validates in full again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from procs import START_METHODS

from poolkeeper.config import validation_cache
from poolkeeper.config.loader import load_config
from poolkeeper.config.settings import Config

SPEC = """\
version: 1
pythonpath: [code]
include: jobs.d
pool: {workers: 3, start_method: forkserver, preload: [cjobs]}
state: {path: auto, keep: 2d}
jobs:
  consume:
    target: cjobs:consume
    loop: {replicas: 2}
    backoff: {initial: 2s, max: 1m}
  nightly:
    target: cjobs:tick
    cron: "30 2 * * MON-FRI"
    timezone: Europe/Paris
    retry: {attempts: 3, initial: 5s}
    args: [1, 2.5, "three", [true, null], {nested: {deep: "ok"}}]
    kwargs: {name: "wärme-café"}
    env: {MODE: nightly}
  later:
    target: cjobs:tick
    at: 2031-06-01T03:00:00+02:00
"""
JOBS = """\
def consume(*, ctx):
    pass

def tick(*args, **kwargs):
    pass
"""
FRAGMENT = """\
jobs:
  extra:
    target: cjobs:tick
    every: 5m
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "cjobs.py").write_text(JOBS)
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "extra.yaml").write_text(FRAGMENT)
    (tmp_path / "poolkeeper.yaml").write_text(SPEC)
    return tmp_path


def validate_and_store(project: Path, cache: Path) -> Config:
    inputs = validation_cache.Inputs()
    config = load_config(project / "poolkeeper.yaml", inputs=inputs)
    assert validation_cache.store(config, inputs, str(cache)) is None
    return config


def lookup(project: Path, cache: Path) -> tuple[Config | None, str]:
    return validation_cache.lookup(str(project / "poolkeeper.yaml"), str(cache))


def test_a_stored_validation_comes_back_identical(project, tmp_path):
    cache = tmp_path / "cache"
    config = validate_and_store(project, cache)
    cached, why = lookup(project, cache)
    assert cached is not None, why
    again = cached
    assert again == config
    assert repr(again) == repr(config)  # types too: 1 stays an int, the datetime a datetime
    assert list(again.jobs) == ["consume", "nightly", "later", "extra"]


def _edit(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()  # a same-size edit within the file system's timestamp granularity
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


CHANGES = {
    "config file": lambda p: _edit(p / "poolkeeper.yaml", SPEC.replace("keep: 2d", "keep: 3d")),
    "included file": lambda p: _edit(p / "jobs.d" / "extra.yaml", FRAGMENT.replace("5m", "6m")),
    "new included file": lambda p: (p / "jobs.d" / "more.yaml").write_text("jobs: {}\n"),
    "removed included file": lambda p: (p / "jobs.d" / "extra.yaml").unlink(),
    "job module": lambda p: _edit(p / "code" / "cjobs.py", JOBS.replace("tick", "tock")),
    "new module on the path": lambda p: (p / "code" / "json.py").write_text(""),
    "environment": lambda p: os.environ.__setitem__("POOLKEEPER_TEST_SETTING", "changed"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_changed_input_is_a_miss(project, tmp_path, monkeypatch, change):
    monkeypatch.setenv("POOLKEEPER_TEST_SETTING", "original")
    cache = tmp_path / "cache"
    validate_and_store(project, cache)
    assert lookup(project, cache)[0] is not None
    CHANGES[change](project)
    cached, why = lookup(project, cache)
    assert cached is None
    assert why  # said in the log: "config ...: validating (<why>)"


def test_files_that_are_not_modules_may_come_and_go(project, tmp_path):
    """A state DB, its journal or a job's output next to the job code must not defeat the cache."""
    cache = tmp_path / "cache"
    validate_and_store(project, cache)
    for name in ("state.db", "state.db-wal", "out.txt", ".hidden", "notes.md"):
        (project / "code" / name).write_text("x")
    (project / "code" / "__pycache__").mkdir(exist_ok=True)
    cached, why = lookup(project, cache)
    assert cached is not None, why


def test_a_damaged_entry_is_a_miss_and_is_rewritten(project, tmp_path):
    cache = tmp_path / "cache"
    validate_and_store(project, cache)
    entry = Path(validation_cache.entry_path(str(project / "poolkeeper.yaml"), str(cache)))
    for damage in (b"\x00garbage", b"{}", b'{"format": 1, "config": {"path": 5}}', b"[1, 2]"):
        entry.write_bytes(damage)
        cached, why = lookup(project, cache)
        assert cached is None, damage
        assert why
    # Every input unchanged, but a job the records cannot be built from: a miss too.
    validate_and_store(project, cache)
    saved = json.loads(entry.read_text())
    saved["config"]["job_rows"][0].pop(1)  # a job's row without its target
    entry.write_text(json.dumps(saved))
    cached, why = lookup(project, cache)
    assert cached is None and why.startswith("malformed cache entry")
    validate_and_store(project, cache)
    assert lookup(project, cache)[0] is not None


def test_an_entry_others_could_have_written_is_not_trusted(project, tmp_path):
    cache = tmp_path / "cache"
    validate_and_store(project, cache)
    entry = Path(validation_cache.entry_path(str(project / "poolkeeper.yaml"), str(cache)))
    assert entry.stat().st_mode & 0o777 == 0o600
    entry.chmod(0o622)
    cached, why = lookup(project, cache)
    assert cached is None and why.endswith("is not this user's alone")
    entry.chmod(0o600)
    assert lookup(project, cache)[0] is not None


def test_arguments_json_would_change_are_not_cached(project, tmp_path):
    _edit(project / "poolkeeper.yaml", SPEC.replace('{nested: {deep: "ok"}}', "{1: one}"))
    inputs = validation_cache.Inputs()
    config = load_config(project / "poolkeeper.yaml", inputs=inputs)
    problem = validation_cache.store(config, inputs, str(tmp_path / "cache"))
    assert problem == "args or kwargs do not survive JSON unchanged"
    assert lookup(project, tmp_path / "cache")[0] is None


def test_an_unwritable_cache_is_reported_not_fatal(project, tmp_path):
    inputs = validation_cache.Inputs()
    config = load_config(project / "poolkeeper.yaml", inputs=inputs)
    (tmp_path / "file").write_text("")
    problem = validation_cache.store(config, inputs, str(tmp_path / "file" / "cache"))
    assert problem is not None and problem.startswith(f"cannot write to {tmp_path}/file/cache")


def test_cache_dir_follows_systemd_then_xdg_then_home(monkeypatch):
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/poolkeeper:/var/cache/other")
    assert validation_cache.cache_dir() == "/var/cache/poolkeeper"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert validation_cache.cache_dir() == "/x/cache/poolkeeper"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert validation_cache.cache_dir() == "/home/u/.cache/poolkeeper"
    monkeypatch.delenv("HOME")
    assert validation_cache.cache_dir() is None


def test_check_never_writes_the_cache(project, tmp_path):
    cache_home = tmp_path / "xdg"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    result = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "check", str(project / "poolkeeper.yaml")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert not cache_home.exists()


MODULE = """\
def tick(out_dir):
    import os
    open(os.path.join(out_dir, f"tick-{os.getpid()}-{os.urandom(4).hex()}"), "w").close()
"""


def test_a_restart_skips_validation_until_the_job_code_changes(daemon_factory, tmp_path):
    """What a user sees: the second start says it did not validate again and runs the jobs the
    same; after the job module changes, the next start validates in full and a target that
    no longer exists fails the start with exit 78 and its file:line:col, as without cache."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "cached_jobs.py").write_text(MODULE)
    spec = """
        pool: {workers: 2, start_method: forkserver}
        jobs:
          tick:
            target: cached_jobs:tick
            every: 100ms
            kwargs: {out_dir: $OUT}
        """

    def start_and_stop(*run_args: str) -> str:
        d = daemon_factory(spec, pythonpath=(code,), run_args=run_args)
        d.wait_log("ready")
        seen = len(list(d.out.iterdir()))
        d.wait_for(lambda: len(list(d.out.iterdir())) > seen, what="a run")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        return d.log()

    first = start_and_stop()
    assert "validating (no cached validation)" in first
    second = start_and_stop()
    assert "not validated again" in second
    full = start_and_stop("--no-config-cache")
    assert "not validated again" not in full

    _edit(code / "cached_jobs.py", MODULE.replace("def tick", "def tock"))
    d = daemon_factory(spec, pythonpath=(code,))
    assert d.wait_exit() == 78
    log = d.log()
    assert "cached_jobs.py changed" in log
    assert (
        f"{d.config}:10:13: target 'cached_jobs:tick': 'cached_jobs' has no attribute 'tick'" in log
    )


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_cached_start_runs_and_drains_under_every_start_method(daemon_factory, start_method):
    """The cached path starts the pool before logging and the daemon exist (cli._run_cached):
    the workers must come up, run and drain under each start method as on the full path."""
    spec = f"""
        pool: {{workers: 3, start_method: {start_method}}}
        jobs:
          consumer:
            target: daemon_jobs:loop_units
            loop: {{replicas: 1}}
            kwargs: {{out_dir: $OUT}}
        """

    for expect_cached in (False, True):
        d = daemon_factory(spec)
        d.wait_log("ready")
        assert ("not validated again" in d.log()) == expect_cached
        before = d.units()
        d.wait_for(lambda d=d, n=before: d.units() > n, what="a unit of work of this start")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert "drain finished" in d.log()
