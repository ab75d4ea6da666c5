"""Input a user (or an attacker sharing the terminal) can hand the CLI: devices, FIFOs and huge
files as the config, job text full of terminal escapes, absurd counts, a broken state DB.
Each answer is one clear line and a sysexits code, promptly: never a hang, a traceback or a
MemoryError. Real processes throughout (`python -m poolkeeper ...`)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poolkeeper.state.identity import store_at

# A command that hangs is a failure, not a hung suite: every run has this deadline.
DEADLINE = 60.0
# /dev/zero read to the end would take the machine's memory before MemoryError: a regression
# must fail fast instead (a start with pydantic loaded needs far less than this).
ADDRESS_SPACE = 2 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def pk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", "poolkeeper", *args],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            env={**os.environ, **(env or {})},
            preexec_fn=_limit_memory,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`poolkeeper {' '.join(args)}` still running after {DEADLINE}s")


GOOD_SPEC = """\
version: 1
state: {path: state.db}
jobs:
  tick:
    target: os:getcwd
    every: 5m
"""


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    os.mkfifo(path)
    return path


# -- finding 10: one bounded reader, regular files only --------------------------------------

CONFIG_COMMANDS = [
    ("check", "{}"),
    ("run", "{}", "--no-config-cache"),
    ("run", "{}"),
    ("history", "-c", "{}"),
    ("status", "-c", "{}"),
    ("next", "tick", "-c", "{}"),
    ("reload", "-c", "{}"),
    ("reload", "--wait", "-c", "{}"),
    ("pause", "tick", "-c", "{}"),
]


@pytest.mark.parametrize("argv", CONFIG_COMMANDS, ids=lambda argv: " ".join(argv[:-1] or argv))
def test_a_fifo_as_the_config_is_refused_at_once(fifo: Path, argv: tuple[str, ...]) -> None:
    proc = pk(*(arg.format(fifo) for arg in argv))
    assert proc.returncode == 66, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"{fifo}: cannot read the file: not a regular file (it is a FIFO)"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["check", "run", "history -c", "reload --wait -c"])
def test_a_device_as_the_config_is_refused_without_reading_it(command: str) -> None:
    proc = pk(*command.split(), "/dev/zero")
    assert proc.returncode == 66, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "/dev/zero: cannot read the file: not a regular file (it is a character device)"
    )


@pytest.mark.parametrize("command", ["check", "run", "history -c", "reload --wait -c"])
def test_a_huge_config_is_refused_before_it_is_read(tmp_path: Path, command: str) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write(GOOD_SPEC)
        # Sparse, instant to make: more than the address space the command may use, so
        # reading it first would end in MemoryError.
        f.truncate(ADDRESS_SPACE + (1 << 30))
    proc = pk(*command.split(), str(big))
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"{big}:1:1: the file is larger than 32768 KiB; refusing to parse it"
    )


def test_an_included_fifo_is_one_problem_of_the_check(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    os.mkfifo(tmp_path / "conf.d" / "jobs.yaml")
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_SPEC.replace("jobs:\n", "include: conf.d\njobs:\n"))
    proc = pk("check", str(spec))
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr == (
        f"{spec}:3:10: include: cannot read '{tmp_path}/conf.d/jobs.yaml': "
        "not a regular file (it is a FIFO)\n"
    )


def test_a_cached_validation_of_a_file_now_a_fifo_does_not_block_the_start(
    tmp_path: Path,
) -> None:
    """The cache compares the digest of every config file it validated: that read too."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_SPEC)
    env = {"CACHE_DIRECTORY": str(tmp_path / "cache")}
    # Stored by a process with the environment of the start below, as a first start would.
    store = (
        "import os, sys; from poolkeeper.config import validation_cache; from poolkeeper.config.loader import "
        "load_config; i = validation_cache.Inputs(); "
        "sys.exit(validation_cache.store(load_config(sys.argv[1], inputs=i), i, "
        "validation_cache.cache_dir()))"
    )
    stored = subprocess.run(
        [sys.executable, "-c", store, str(spec)], env={**os.environ, **env}, timeout=DEADLINE
    )
    assert stored.returncode == 0
    spec.unlink()
    os.mkfifo(spec)
    proc = pk("run", str(spec), env=env)
    assert proc.returncode == 66, proc.stderr
    assert f"config {spec}: validating ({spec} cannot be read)" in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"{spec}: cannot read the file: not a regular file (it is a FIFO)"
    )


def test_a_growing_or_lying_file_is_cut_at_the_limit(tmp_path: Path) -> None:
    """/proc files say size 0 and a file may grow after the check: the read itself is bounded."""
    from poolkeeper.config.readfile import TooLarge, read_regular

    assert read_regular("/proc/self/status", 1 << 20).startswith(b"Name:")
    with pytest.raises(TooLarge):
        read_regular("/proc/self/maps", 10)
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(GOOD_SPEC))
    assert read_regular(str(spec), len(GOOD_SPEC)) == GOOD_SPEC.encode()
    with pytest.raises(TooLarge):
        read_regular(str(spec), len(GOOD_SPEC) - 1)


# -- finding 13: counts, and a state DB the readers cannot read -----------------------------


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD_SPEC)
    return path


def _record_runs(db: Path, count: int) -> None:
    store = store_at(db)
    for i in range(count):
        store.run_ended(
            run_id=f"run{i}",
            job="tick",
            attempt=1,
            scheduled_at=1000.0 + i,
            started_at=1000.0 + i,
            ended_at=1001.0 + i,
            outcome="failed",
            error=f"error {i}",
        )
    store.close()


@pytest.mark.parametrize("n", ["-5", "0", "-1", "x", "1.5", "9" * 5000])
@pytest.mark.parametrize("command", ["history", "next tick"])
def test_a_count_that_is_not_positive_is_a_usage_error(spec: Path, command: str, n: str) -> None:
    _record_runs(spec.parent / "state.db", 3)
    proc = pk(*command.split(), "-n", n, "-c", str(spec))
    assert proc.returncode == 64, proc.stdout
    error = proc.stderr.splitlines()[-1]
    assert error.startswith(f"poolkeeper {command.split()[0]}: error: argument -n: expected a ")
    assert len(error) < 200 and proc.stdout == ""


def test_a_huge_history_count_is_capped_and_said(spec: Path) -> None:
    _record_runs(spec.parent / "state.db", 3)
    proc = pk("history", "-n", "99999999999999999999", "-c", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 + 3
    assert proc.stderr == (
        "poolkeeper: -n 99999999999999999999 is more than 100000; showing at most 100000\n"
    )


def test_a_huge_next_count_is_capped_and_said(spec: Path) -> None:
    proc = pk("next", "tick", "-n", "100000000", "-c", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1000
    assert proc.stderr == "poolkeeper: -n 100000000 is more than 1000; showing at most 1000\n"


def _corrupt_header(db: Path) -> None:
    db.write_bytes(b"this is not an sqlite database, just garbage " * 100)


def _corrupt_pages(db: Path) -> None:
    """A valid header over garbage: only a query that reads the pages finds out."""
    _record_runs(db, 500)
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xa5" * (len(data) - page)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("breakage", [_corrupt_header, _corrupt_pages])
@pytest.mark.parametrize("command", ["history", "status"])
def test_an_unreadable_state_db_is_an_error_not_an_empty_answer(
    spec: Path, command: str, breakage
) -> None:
    db = spec.parent / "state.db"
    breakage(db)
    proc = pk(command, "-c", str(spec))
    assert proc.returncode == 74, proc.stdout
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"poolkeeper: cannot read the state DB {db}: ")
    assert "not a database" in line or "malformed" in line
    assert "in memory" not in proc.stderr
    assert list(spec.parent.glob("state.db.corrupt-*")) == []  # a reader moves nothing aside


# -- finding 12: job and user text reaches the terminal escaped -------------------------------

# Clears the screen, sets the window title, a C1 CSI, a right-to-left override.
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\x9b6n\u202egnp.exe"
SHOWN = "\\x1b[2J\\x1b]0;pwned\\x07\\x9b6n\\u202egnp.exe"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")

HOSTILE_JOBS = f"""
def shout(ctx):
    ctx.log.warning("the job logs " + {HOSTILE!r})
    raise RuntimeError({HOSTILE!r})
"""


def _no_raw_controls(text: str) -> None:
    for char in RAW:
        assert char not in text, f"raw {char!r} in output:\n{text!r}"


def test_a_jobs_error_text_is_printed_escaped(daemon_factory, tmp_path: Path) -> None:
    """The daemon's foreground log, `history` and `status`: the error as the job raised it,
    but shown with its control characters escaped."""
    jobs = tmp_path / "code"
    jobs.mkdir()
    (jobs / "hostile_jobs.py").write_text(HOSTILE_JOBS)
    d = daemon_factory(
        "jobs:\n  shout:\n    target: hostile_jobs:shout\n    every: 1h\n", pythonpath=(jobs,)
    )
    d.wait_log("run failed")
    d.signal()
    assert d.wait_exit() == 0
    log = d.log()
    _no_raw_controls(log)
    assert f"RuntimeError: {SHOWN}" in log  # the traceback's last line, newlines kept
    assert f"the job logs {SHOWN}" in log
    assert [r["error"] for r in d.runs()] == [f"RuntimeError: {HOSTILE}"]  # stored as raised

    history = pk("history", "-c", str(d.config))
    assert history.returncode == 0, history.stderr
    _no_raw_controls(history.stdout)
    assert f"RuntimeError: {SHOWN}" in history.stdout.splitlines()[1]
    status = pk("status", "-c", str(d.config))
    assert status.returncode == 0, status.stderr
    _no_raw_controls(status.stdout)
    assert f"failed (RuntimeError: {SHOWN})" in status.stdout


@pytest.mark.parametrize("command", ["history", "next"])
def test_an_unknown_job_argument_is_echoed_escaped(spec: Path, command: str) -> None:
    proc = pk(command, HOSTILE, "-c", str(spec))
    assert proc.returncode == 64, proc.stderr
    _no_raw_controls(proc.stderr)
    assert f"no job named '{SHOWN}'" in proc.stderr


def test_check_escapes_keys_and_the_file_name(tmp_path: Path) -> None:
    spec = tmp_path / "spec\x1b]0;x\x07.yaml"
    spec.write_text(GOOD_SPEC + '  "\\e[2Jbad\\u202e": {target: os:getcwd, every: 5m}\n')
    proc = pk("check", str(spec))
    assert proc.returncode == 78, proc.stderr
    _no_raw_controls(proc.stderr)
    shown = str(tmp_path / "spec\\x1b]0;x\\x07.yaml")
    assert proc.stderr.startswith(f"{shown}:7:3: job name '\\x1b[2Jbad\\u202e': ")
    missing = pk("check", str(tmp_path / "\x1b[2J.yaml"))
    assert missing.returncode == 66
    assert missing.stderr == f"{tmp_path}/\\x1b[2J.yaml: cannot read the file: " + (
        "No such file or directory\n"
    )


def _many_jobs(path: Path, count: int) -> None:
    with open(path, "w") as f:
        f.write("version: 1\nstate: {path: state.db}\njobs:\n")
        for i in range(count):
            f.write(
                f"  job{i}:\n    target: os:getcwd\n    every: 1h\n    timeout: 5m\n"
                f"    env: {{A: x, B: y, C: z}}\n"
            )


@pytest.mark.parametrize("count", [10_000, 50_000])
def test_a_spec_of_many_jobs_loads(tmp_path: Path, count: int) -> None:
    # 10,000 jobs: about 1 MB and 180,000 nodes, more than the old plain node cap of 100,000.
    spec = tmp_path / "many.yaml"
    _many_jobs(spec, count)
    proc = pk("check", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"ok, {count} jobs")


def test_an_alias_bomb_small_as_written_is_refused(tmp_path: Path) -> None:
    # 30 lines, ~60 nodes as written; each level doubles: 2**30 values once expanded.
    lines = ["version: 1", "l0: &l0 [lol, lol]"]
    lines += [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 30)]
    lines.append("jobs: {a: {target: os:getcwd, every: 1h, args: [*l29]}}")
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join(lines) + "\n")
    proc = pk("check", str(spec))  # the deadline turns a regression into a failure
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"{spec}:")
    assert proc.stderr.splitlines()[-1].endswith(
        "too many aliases/nodes: the document expands to more than 100000 values"
        " (an alias bomb?); refusing to load it"
    )
