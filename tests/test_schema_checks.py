"""The published JSON Schema (poolkeeper/config/schema_checks.py), judged by a real JSON Schema
validator (jsonschema, draft 2020-12) against the specs the other tests use: it refuses every
invalid spec of tests/test_config_invalid.py that a schema can judge, and accepts every spec
`check` accepts; where both can judge, they agree."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import pytest
from test_config_invalid import CASES

from poolkeeper.config.loader import ConfigError, load_config
from poolkeeper.config.schema import json_schema
from poolkeeper.config.yamlload import LoadError, load_yaml

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = jsonschema.Draft202012Validator(json_schema())

# Invalid specs of test_config_invalid.CASES that no schema can judge, and why.
CANNOT_JUDGE = {
    # YAML itself, before there is a document to validate (editors report these as YAML)
    **dict.fromkeys(
        [
            "syntax: bad indent", "syntax: unclosed flow", "syntax: tab", "two documents",
            "not utf-8", "control char", "unsupported tag", "bad explicit int",
            "duplicate top key", "duplicate nested key", "duplicate job", "recursive alias",
            "merge key needs mapping",
        ],
        "YAML",
    ),
    # YAML 1.1 typing of keys: an editor reads YAML 1.2, where they are strings
    **dict.fromkeys(["job name yaml bool", "job name int", "kwargs yaml bool key"], "YAML 1.1"),
    # the outside world: files, imports, the call
    **dict.fromkeys(
        [
            "pythonpath missing dir", "preload missing module", "target missing module",
            "target missing function", "target not callable", "target raises on import",
            "target calls sys.exit", "target raises KeyboardInterrupt", "target async",
            "loop without ctx", "missing argument", "too many args", "unknown kwarg",
            "ctx later, given by args too", "unbound method",
        ],
        "imports and calls",
    ),
    # values no pattern can judge: calendars, sums, comparisons between fields
    **dict.fromkeys(
        [
            "bad cron", "cron never fires", "unknown timezone", "at bad datetime",
            "duration too long", "retry max below initial", "replicas leave no room",
            "replicas exceed workers",
        ],
        "semantics",
    ),
}  # fmt: skip


def _data(text: str | bytes):
    """The document as `check` reads it, as JSON (a datetime as the string it was written)."""
    raw = text.encode() if isinstance(text, str) else text
    doc, _issues = load_yaml(raw, "spec.yaml")
    return json.loads(json.dumps(doc.data, default=str))


def _schema_errors(text: str | bytes) -> list[str]:
    return [error.message for error in VALIDATOR.iter_errors(_data(text))]


def _check_accepts(directory: Path, text: str) -> bool:
    spec = directory / "spec.yaml"
    spec.write_text(text)
    try:
        load_config(spec, import_targets=False)
    except ConfigError:
        return False
    return True


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(json_schema())


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(t, e, id=i) for i, t, e in CASES if i not in CANNOT_JUDGE],
)
def test_the_schema_refuses_every_invalid_spec_it_can_judge(text, expected):
    assert _schema_errors(text), f"the schema accepts what check refuses: {expected[0]}"


@pytest.mark.parametrize(
    "text", [pytest.param(t, id=i) for i, t, _ in CASES if CANNOT_JUDGE.get(i) == "semantics"]
)
def test_what_the_schema_cannot_judge_it_leaves_to_check(text):
    """Kept exact: a case the schema learns to judge moves out of CANNOT_JUDGE."""
    assert _schema_errors(text) == []


def test_cannot_judge_names_only_existing_cases():
    assert set(CANNOT_JUDGE) <= {name for name, _, _ in CASES}


def _spec_literals() -> list[tuple[str, str]]:
    """Every spec written out whole in the tests (a string literal starting 'version: 1'),
    the shipped example and the README's annotated spec."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith("version: 1"):
                    found.append((f"{path.name}:{node.lineno}", node.value))
    found.append(("example.yaml", (ROOT / "config" / "example.yaml").read_text()))
    readme = (ROOT / "README.md").read_text()
    [text] = re.findall(r"## A job spec, annotated\n\n```yaml\n(.*?)```", readme, re.S)
    found.append(("README", text))
    return found


def test_the_schema_accepts_every_spec_of_the_tests_that_check_accepts(tmp_path):
    accepted = 0
    for where, text in _spec_literals():
        try:
            valid = _check_accepts(tmp_path, text)
        except LoadError:
            continue
        if valid:
            accepted += 1
            assert _schema_errors(text) == [], where
    assert accepted >= 25  # the scan found the tests' specs


HEAD = "version: 1\njobs:\n"


@pytest.mark.parametrize(
    ("spec", "valid"),
    [
        # exactly one schedule, or none when `defaults:` holds exactly one
        (HEAD + "  a: {target: 'm:f', every: 5m}\n", True),
        (HEAD + "  a: {target: 'm:f'}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 5m, loop: {}}\n", False),
        (HEAD + "  a: {target: 'm:f', every: }\n", False),
        ("version: 1\ndefaults: {every: 5m}\njobs:\n  a: {target: 'm:f'}\n", True),
        ("version: 1\ndefaults: {every: 5m}\njobs:\n  a: {target: 'm:f', cron: '@daily'}\n", True),
        ("version: 1\ndefaults: {every: 5m, cron: '@daily'}\njobs:\n  a: {target: 'm:f'}\n", False),
        ("version: 1\ndefaults: {timeout: 5m}\njobs:\n  a: {target: 'm:f'}\n", False),
        # zero durations: refused where positive, fine for jitter
        (HEAD + "  a: {target: 'm:f', every: 0s}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 0.0m}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 0h0m}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 0.5s}\n", True),
        (HEAD + "  a: {target: 'm:f', every: 0h1m}\n", True),
        (HEAD + "  a: {target: 'm:f', every: 5m, jitter: 0s}\n", True),
        (HEAD + "  a: {target: 'm:f', every: 5m, jitter: 0}\n", True),
        (HEAD + "  a: {target: 'm:f', every: 5m, timeout: 0ms}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 5m, retry: {attempts: 2, initial: 0s}}\n", False),
        ("version: 1\nstate: {keep: 0d}\n", False),
        ("version: 1\nshutdown: {drain_timeout: 00s}\n", False),
        ("version: 1\ndefaults: {timeout: 0s}\n", False),
        # keys of another kind, from the job itself (from `defaults:` they simply do not apply)
        (HEAD + "  a: {target: 'm:f', loop: {}, timeout: 1m}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 1m, restart: never}\n", False),
        (HEAD + "  a: {target: 'm:f', cron: '@daily', timezone: UTC}\n", True),
        ("version: 1\ndefaults: {timezone: UTC}\njobs:\n  a: {target: 'm:f', every: 1m}\n", True),
        (HEAD + "  a: {target: 'm:f', at: startup, before_ready: true}\n", True),
        (HEAD + "  a: {target: 'm:f', at: '2030-01-01T00:00', before_ready: true}\n", False),
        (HEAD + "  a: {target: 'm:f', at: startup, catchup: once}\n", False),
        (HEAD + "  a: {target: 'm:f', at: '2030-01-01T00:00', catchup: once}\n", True),
        # max_concurrent with overlap: allow, from the job or from `defaults:`
        (HEAD + "  a: {target: 'm:f', every: 1m, overlap: allow, max_concurrent: 2}\n", True),
        (HEAD + "  a: {target: 'm:f', every: 1m, overlap: queue, max_concurrent: 2}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 1m, max_concurrent: 2}\n", False),
        (
            "version: 1\ndefaults: {overlap: allow}\njobs:\n"
            "  a: {target: 'm:f', every: 1m, max_concurrent: 2}\n",
            True,
        ),
        # shapes of single values
        (HEAD + "  a: {target: 'm:f', cron: '0 3 * * *'}\n", True),
        (HEAD + "  a: {target: 'm:f', cron: '@hourly'}\n", True),
        (HEAD + "  a: {target: 'm:f', cron: '0 3 * *'}\n", False),
        (HEAD + "  a: {target: 'm:f', cron: '@reboot'}\n", False),
        (HEAD + "  a: {target: 'm:f', at: 'tomorrow'}\n", False),
        (HEAD + "  a: {target: 'm:f', at: '2030-06-01'}\n", True),
        (HEAD + "  wärme-café: {target: 'm:f', every: 1m}\n", True),
        (HEAD + "  b@host.x-1_: {target: 'm:f', every: 1m}\n", True),
        (HEAD + "  -a: {target: 'm:f', every: 1m}\n", False),
        (HEAD + "  a/b: {target: 'm:f', every: 1m}\n", False),
        (HEAD + "  a: {target: 'm:f', every: 1m, env: {'A=B': x}}\n", False),
        # sections left empty mean their defaults
        ("version: 1\npool:\nshutdown:\nstate:\ndefaults:\njobs:\n", True),
    ],
)
def test_check_and_the_schema_agree(tmp_path, spec, valid):
    assert _check_accepts(tmp_path, spec) is valid
    assert (_schema_errors(spec) == []) is valid
