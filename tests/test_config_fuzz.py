"""Whatever the input, `check` answers 0 or 78 with well-formed lines, never a traceback, and
quickly: random spec-shaped data, mutations of the example, random bytes, and hostile YAML."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolkeeper.cli import check_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "config" / "example.yaml").read_text()

FUZZ = settings(
    max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None
)

TOP_KEYS = [
    "version",
    "pythonpath",
    "include",
    "pool",
    "shutdown",
    "state",
    "fleet",
    "defaults",
    "jobs",
    "jbos",
]
SECTION_KEYS = [
    "workers",
    "start_method",
    "preload",
    "max_runs_per_worker",
    "max_memory_per_worker",
    "drain_timeout",
    "path",
    "keep",
    "database",
    "host_id",
    "lease",
]
JOB_KEYS = [
    "target", "loop", "every", "cron", "at", "timezone", "before_ready", "jitter", "timeout", "heartbeat_timeout",
    "retry", "restart", "backoff", "overlap", "max_concurrent", "catchup", "args", "kwargs", "env", "replicas",
    "scope", "on_lost", "on_db_loss",
    "attempts", "initial", "factor", "max", "<<",
]  # fmt: skip
SCALARS = st.one_of(
    st.sampled_from(
        [
            1,
            0,
            -1,
            2,
            3.5,
            True,
            False,
            None,
            "",
            "auto",
            "5m",
            "30s",
            "0s",
            "1h30m",
            "512MiB",
            "0",
            "startup",
            "2030-01-01T00:00:00",
            "fork",
            "forkserver",
            "skip",
            "allow",
            "once",
            "full",
            "on",
            "no",
            "1:30",
            "0700",
            "example_jobs:rollup",
            "example_jobs:consume",
            "example_jobs:warm_cache",
            "example_jobs:nope",
            "os:getcwd",
            "* * * * *",
            "30 2 * * MON-FRI",
            "@daily",
            "Europe/Berlin",
            "Mars/Base",
            ".",
            "conf.d",
            "example_jobs",
            "fleet",
            "host",
            "retry",
            "keep",
            "postgresql:///pk",
            "postgres://u:pw@[::1/pk",
            "web-1",
        ]
    ),  # fmt: skip
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)


def _spec_like() -> st.SearchStrategy[object]:
    keys = st.one_of(st.sampled_from(TOP_KEYS + SECTION_KEYS + JOB_KEYS), st.text(max_size=6))
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)
        ),
        max_leaves=30,
    )


JOB = st.dictionaries(st.sampled_from(JOB_KEYS), _spec_like(), max_size=8)
SPEC = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1"])},
    optional={
        "pythonpath": st.sampled_from([["."], [], ".", ["nowhere"]]),
        "pool": st.dictionaries(st.sampled_from(SECTION_KEYS), _spec_like(), max_size=4),
        "fleet": st.one_of(
            st.dictionaries(st.sampled_from(SECTION_KEYS), _spec_like(), max_size=4), _spec_like()
        ),
        "defaults": JOB,
        "jobs": st.dictionaries(
            st.one_of(st.sampled_from(["a", "b", "on", "1"]), st.text(max_size=5)), JOB, max_size=4
        ),
        "extra": _spec_like(),
    },
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz")
    shutil.copy(ROOT / "config" / "example_jobs.py", directory / "example_jobs.py")
    return directory


def assert_well_behaved(path: Path, budget: float = 2.0) -> int:
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    code = check_file(str(path), out, err)
    elapsed = time.monotonic() - started
    assert code in (0, 78), err.getvalue()
    if code == 0:
        assert re.fullmatch(rf"{re.escape(str(path))}: ok, \d+ jobs?\n", out.getvalue())
        assert err.getvalue() == ""
    else:
        assert out.getvalue() == ""
        lines = err.getvalue().splitlines()
        assert lines
        for line in lines:
            assert re.match(rf"{re.escape(str(path))}:\d+:\d+: \S", line) or line.startswith(
                str(path.parent)
            ), line
        assert "Traceback" not in err.getvalue()
    assert elapsed < budget
    return code


@FUZZ
@given(SPEC)
def test_random_spec_shaped_data(workdir: Path, data: dict[str, object]) -> None:
    path = workdir / "random.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert_well_behaved(path)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(EXAMPLE)),
            st.integers(0, 12),
            st.text(alphabet=" \n\t:-[]{},&*!|>'\"#%@`?~0123456789abcxyzé\x00", max_size=6),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mutations_of_the_example(workdir: Path, edits: list[tuple[int, int, str]]) -> None:
    text = EXAMPLE
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    path = workdir / "mutant.yaml"
    path.write_text(text)
    assert_well_behaved(path)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(workdir: Path, raw: bytes) -> None:
    path = workdir / "bytes.yaml"
    path.write_bytes(raw)
    assert_well_behaved(path)


def test_the_example_itself_passes_the_fuzz_oracle(workdir: Path) -> None:
    path = workdir / "example.yaml"
    path.write_text(EXAMPLE)
    assert assert_well_behaved(path) == 0


BILLION_LAUGHS = (
    "version: 1\n"
    + "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "billion laughs",
            BILLION_LAUGHS,
            "too many aliases/nodes: the document expands to more than 100000 values (an alias bomb?); refusing to load it",
        ),
        (
            "wide aliases",
            "version: 1\nbig: &big ["
            + ", ".join(["x"] * 2000)
            + "]\nuse: ["
            + ", ".join(["*big"] * 200)
            + "]\n",
            "too many aliases/nodes: the document expands to more than 100000 values (an alias bomb?); refusing to load it",
        ),
        (
            "10k deep flow",
            "version: 1\nx: " + "[" * 10_000 + "]" * 10_000 + "\n",
            "too deep or too large: nesting deeper than 50 levels; refusing to load it",
        ),
        (
            "10k deep mappings",
            "version: 1\nx: " + "{a: " * 10_000 + "}" * 10_000 + "\n",
            "too deep or too large: nesting deeper than 50 levels; refusing to load it",
        ),
        (
            "10k deep block sequence",
            "version: 1\nx:\n" + "- " * 10_000 + "x\n",
            "too deep or too large: nesting deeper than 50 levels; refusing to load it",
        ),
    ],
)
def test_hostile_yaml_is_refused_quickly(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    code = check_file(str(path), out, err)
    assert time.monotonic() - started < 1.0
    assert code == 78
    (line,) = err.getvalue().splitlines()
    assert line.startswith(f"{path}:") and line.endswith(message)


def test_a_huge_file_is_refused_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("version: 1\n" + "# padding\n" * 200_000)
    os.truncate(path, 33 << 20)  # sparse: past the 32 MiB limit
    out, err = io.StringIO(), io.StringIO()
    assert check_file(str(path), out, err) == 78
    assert (
        err.getvalue() == f"{path}:1:1: the file is larger than 32768 KiB; refusing to parse it\n"
    )
