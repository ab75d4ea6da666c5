"""LibYAML and PyYAML's pure-Python parser read a spec the same way: the same values, the same
positions, the same issues, and the same error line (file, line, column, words). The LibYAML
path is the fast one (a 10,000-job spec); the pure path is the reference and what runs when
PyYAML has no LibYAML, so each test here runs both, the pure one forced."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolkeeper.config import yamlload
from poolkeeper.config.loader import ConfigError, load_config
from poolkeeper.config.yamlload import MAX_DEPTH, LoadError, load_yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "config" / "example.yaml").read_text()

pytestmark = pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without LibYAML")


def _key_label(path: tuple[Any, ...]) -> str | None:
    return None if path[:1] == ("free",) else "key"


def outcome(raw: bytes, libyaml: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Everything load_yaml says about `raw`: the error line, or the values, the issues and
    every recorded position."""
    monkeypatch.setattr(yamlload, "LIBYAML", libyaml)
    try:
        doc, issues = load_yaml(raw, "spec.yaml", _key_label)
    except LoadError as exc:
        return str(exc)
    return repr(doc.data), [str(i) for i in issues], {path: doc.locs[path] for path in doc.locs}


def assert_same(text: str | bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    fast = outcome(raw, True, monkeypatch)
    pure = outcome(raw, False, monkeypatch)
    assert fast == pure
    return pure


def nested(depth: int, flow: bool, anchor: bool = False) -> str:
    """A value `depth` levels deep under `x:` (the root mapping is level 1, `x`'s value 2)."""
    inner = depth - 2
    prefix = "a: &a [1]\n" if anchor else ""
    if flow:
        return prefix + "x: " + "[" * inner + "y" + "]" * inner + "\n"
    return prefix + "x:\n" + "".join("  " * i + "- \n" for i in range(inner)) + "  " * inner + "y\n"


MALFORMED = {
    "bad indent": "version: 1\njobs:\n  a:\n    target: x:y\n   every: 5m\n",
    "unclosed flow": "version: 1\njobs: {a: [\n",
    "tab indent": "version: 1\njobs:\n\ta: 1\n",
    "tab after a value": "version: 1\nx: 1\t# note\n",
    "two documents": "version: 1\n---\nversion: 1\n",
    "control character": "version: 1\nx: \x07\n",
    "unsupported tag": "version: 1\nstate: {path: !env STATE}\n",
    "bad explicit int": "version: 1\npool: {workers: !!int four}\n",
    "odd tag handle": "x: !*!ya'\n",
    "empty tagged scalar": "!\n",
    "empty tagged value": "a: !\nb: ! ''\n",
    "duplicate key": "version: 1\npool: {}\npool: {}\n",
    "duplicate key in flow": "x: {a: 1, a: 2}\n",
    "key YAML 1.1 makes a boolean": "jobs:\n  no: 1\n  0700: 2\n",
    "free keys": "free: {1: a, yes: b, 1.5: c}\n",
    "undefined alias": "x: *nowhere\n",
    "duplicate anchor": "a: &x 1\nb: &x 2\nc: *x\n",
    "recursive alias": "a: &a [1, *a]\n",
    "alias bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(5)),
    "merge": "base: &b {every: 1h, timeout: 5m}\njob: {<<: *b, timeout: 1m}\n",
    "merge of a list": "a: &a {x: 1}\nb: &b {y: 2}\nc: {<<: [*a, *b], z: 3}\n",
    "inline merge list": "c:\n  <<: [{x: 1}, {y: 2}]\n  z: 3\n",
    "merge of a scalar": "a: {<<: 1}\n",
    "mapping as key": "? [a, b]\n: 1\n",
    "mapping as key in flow": "{[a]: 1}\n",
    "empty values in flow": "x: {a: , b}\ny: [a, {c: }]\n",
    "empty values in block": "x:\ny:\n  -\n  - z:\n",
    "question mark in flow": "x: [http://h/x?y=1]\n",
    "question mark in block": "x: http://h/x?y=1\n",
    "comment after block header": "x: |#\n  a\n",
    "block scalars": "x: |\n  a\n  b\ny: >-\n  c\n  d\n",
    "quoted and plain": "a: 'yes'\nb: \"1:30\"\nc: yes\nd: 1:30\ne: 0700\nf: ~\ng: 2030-01-01\n",
    "non-ascii columns": "clé: {é: [à, ü]}\nx: {y: @bad}\n",
    "non-ascii": "clé: {é: [à, ü]}\nx: ünï\ny: {z: 'ü'}\n",
    "byte order mark at the start": "\ufeffversion: 1\nx: [1\n",
    "byte order mark inside": "x: a\ufeffb\n",
    "line separators": "x: a\u2028b\ny: c\x85d\n",
    "crlf": "version: 1\r\njobs:\r\n  a: {every: 5m}\r\n  b: [1,\r\n",
    "document markers": "%YAML 1.1\n---\nx: 1\n...\n",
    "only a marker": "---\n",
    "empty": "",
    "a comment": "# nothing\n",
    "a bare scalar": "hello\n",
    "not utf-8": b"version: 1\njobs:\n  caf\xe9: {}\n",
    "flow too deep": nested(MAX_DEPTH + 1, flow=True),
    "flow just deep enough": nested(MAX_DEPTH, flow=True),
    "block too deep": nested(MAX_DEPTH + 1, flow=False),
    "block just deep enough": nested(MAX_DEPTH, flow=False),
    "too deep, with anchors": nested(MAX_DEPTH + 1, flow=False, anchor=True),
    "just deep enough, with anchors": nested(MAX_DEPTH, flow=False, anchor=True),
    "deep key": "? " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n: 1\n",
    "10k deep flow": "x: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "10k deep block": "x:\n" + "- " * 10_000 + "x\n",
    "alias deeper than written": "a: &a " + "[" * 30 + "]" * 30 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",
}  # fmt: skip


@pytest.mark.parametrize("name", MALFORMED)
def test_both_parsers_say_the_same(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same(MALFORMED[name], monkeypatch)


def test_the_errors_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spot checks that the comparison above compares messages, not two identical crashes.
    said = assert_same(MALFORMED["bad indent"], monkeypatch)
    assert said == (
        "spec.yaml:5:4: YAML syntax error: expected <block end>, but found '<block mapping start>'"
        " (while parsing a block mapping at line 3)"
    )
    said = assert_same(MALFORMED["flow too deep"], monkeypatch)
    assert said.endswith(f"nesting deeper than {MAX_DEPTH} levels; refusing to load it")
    said = assert_same(MALFORMED["question mark in flow"], monkeypatch)
    assert said.startswith("spec.yaml:1:")
    assert isinstance(assert_same(MALFORMED["flow just deep enough"], monkeypatch), tuple)


def test_an_honest_spec_takes_the_libyaml_path() -> None:
    # The fast path must not quietly hand everything to the pure one.
    assert yamlload.LIBYAML
    assert yamlload._compose_libyaml(EXAMPLE) is not None


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(EXAMPLE)),
            st.integers(0, 12),
            st.text(alphabet=" \n\t:-[]{},&*!|>'\"#%@`?~<0123456789abcxyzé\ufeff\x85", max_size=6),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mutations_of_the_example_read_the_same(edits: list[tuple[int, int, str]]) -> None:
    text = EXAMPLE
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert_same(text, monkeypatch)


def _spec(tmp_path: Path, count: int, broken: bool = False) -> Path:
    (tmp_path / "noop_jobs.py").write_text(
        "def tick(*args, **kwargs):\n    pass\n\n\ndef spin(*, ctx, batch=1):\n    pass\n"
    )
    lines = [
        "version: 1",
        "pythonpath: [.]",
        f"pool: {{workers: {count // 10 + 2}}}",
        "state: {path: state.db}",
        "defaults: {timeout: 1m, env: {APP: x}}",
        "jobs:",
    ]
    for i in range(count):
        if i % 10 == 0:
            lines.append(f"  spin{i}: {{target: noop_jobs:spin, loop: {{replicas: 1}}}}")
        elif i % 2:
            lines += [f"  tick{i}:", "    target: noop_jobs:tick", f"    every: {i % 50 + 1}m"]
            lines.append(f"    args: [{i}, x]")
        else:
            lines += [f"  cron{i}:", "    target: noop_jobs:tick", f'    cron: "{i % 60} 3 * * *"']
            lines.append(f"    kwargs: {{n: {i}}}")
        if broken and i % 37 == 5 and i % 10:
            lines.append("    retry: {attempts: yes, initial: 5}")
    path = tmp_path / "spec.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("broken", [False, True])
def test_load_config_is_the_same_on_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    spec = _spec(tmp_path, 300, broken)
    results = []
    for libyaml in (True, False):
        monkeypatch.setattr(yamlload, "LIBYAML", libyaml)
        try:
            results.append(load_config(spec))
        except ConfigError as exc:
            results.append([str(issue) for issue in exc.issues])
    assert results[0] == results[1]
    if broken:
        assert isinstance(results[0], list) and len(results[0]) >= 8
        assert any(":attempts" in line or "retry.attempts" in line for line in results[0])
    else:
        assert not isinstance(results[0], list) and len(results[0].jobs) == 300


@pytest.mark.parametrize(
    "name",
    [
        "flow just deep enough",
        "block just deep enough",
        "just deep enough, with anchors",
        "merge",
        "merge of a list",
        "empty values in block",
        "quoted and plain",
        "block scalars",
        "non-ascii",
        "alias deeper than written",
    ],
)
def test_within_the_caps_libyaml_decides_alone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The boundaries of the fast path: these need no second parse by the pure one.
    def no_pure(*args: object) -> None:
        raise AssertionError("the pure parser was asked")

    monkeypatch.setattr(yamlload, "_compose_pure", no_pure)
    try:
        load_yaml(MALFORMED[name].encode(), "spec.yaml", _key_label)
    except LoadError:
        pass


def test_the_pool_hints_parse_is_reused_only_for_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from poolkeeper.config.hints import pool_hints

    spec = _spec(tmp_path, 20)
    fresh = load_config(spec)
    assert pool_hints(str(spec)) is not None  # keeps its parse for the validation

    def no_parse(*args: object) -> None:
        raise AssertionError("parsed again")

    with monkeypatch.context() as patched:
        patched.setattr(yamlload, "_compose_libyaml", no_parse)
        patched.setattr(yamlload, "_compose_pure", no_parse)
        assert load_config(spec) == fresh  # the kept parse, taken once
        assert gc.get_freeze_count() == 0  # what was frozen with it is the collector's again
        with pytest.raises(AssertionError, match="parsed again"):
            load_config(spec)

    assert pool_hints(str(spec)) is not None
    spec.write_text(spec.read_text() + "  late: {target: noop_jobs:tick, every: 1h}\n")
    assert len(load_config(spec).jobs) == 21  # the file changed: parsed anew


@pytest.mark.parametrize("libyaml", [True, False])
def test_pool_hints_read_only_the_pool_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, libyaml: bool
) -> None:
    from poolkeeper.config.hints import PoolHints, pool_hints

    monkeypatch.setattr(yamlload, "LIBYAML", libyaml)
    (tmp_path / "code").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\njobs: {a: {target: x:y, every: 1h, args: [&big [1, 2]]}}\n"
        "pool: {start_method: spawn, preload: [m1, m2]}\npythonpath: [code]\n"
    )
    assert pool_hints(str(spec)) == PoolHints("spawn", ["m1", "m2"], [str(tmp_path / "code")])
    load_config(spec, import_targets=False)  # takes the kept parse
    for doubtful in (
        "<<: {pool: {start_method: fork}}\n",  # a merge key at the top
        "pool: {}\npool: {start_method: fork}\n",  # which one?
        "- pool\n",
        "pool: {start_method: [fork]}\n",
        "pool: [\n",
    ):
        spec.write_text(doubtful)
        assert pool_hints(str(spec)) is None, doubtful
    yamlload._take_kept()  # as the next load would: nothing stays frozen for later tests
    assert gc.get_freeze_count() == 0
