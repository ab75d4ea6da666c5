"""The outcome table (poolkeeper/outcomes.py) is the only place that knows the outcomes.

A scan of the package's syntax trees finds no string constant equal to an outcome outside that
module: every other module names `Outcome.FAILED`, not "failed". Text that merely contains the
word ("killed at the drain deadline") is a different constant and is fine. The same scan finds
no second list of the job kinds (poolkeeper/kinds.py).
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

import poolkeeper
from poolkeeper.kinds import JobKind
from poolkeeper.outcomes import RUNNING, Outcome
from poolkeeper.service.logs import MESSAGE_IDS

PACKAGE = Path(poolkeeper.__file__).parent
DOCS = PACKAGE.parent / "docs"


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def _modules(*, but: str):
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 20, "the scan must see the whole package"
    return [path for path in paths if path.relative_to(PACKAGE).as_posix() != but]


def test_no_outcome_string_outside_the_table():
    values = {outcome.value for outcome in Outcome}
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}"
        for path in _modules(but="outcomes.py")
        for node in _string_constants(path)
        if node.value in values
    ]
    assert found == [], "use poolkeeper.outcomes.Outcome instead:\n" + "\n".join(found)


def test_the_scan_sees_outcome_literals():
    tree = ast.parse('if ev.outcome == "lost":\n    log("run lost")\n')
    hits = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert [v for v in hits if v in set(Outcome)] == ["lost"]


def test_no_second_list_of_job_kinds():
    kinds = {kind.value for kind in JobKind}
    found = []
    for path in _modules(but="kinds.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            # A tuple, list or set (a Literal[...] too: its subscript is a tuple).
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                listed = {n.value for n in node.elts if isinstance(n, ast.Constant)} & kinds
                if len(listed) > 1:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == [], "use poolkeeper.kinds.JobKind instead:\n" + "\n".join(found)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_has_a_row(outcome):
    assert logging.getLevelName(outcome.level) in ("INFO", "WARNING", "ERROR")
    assert isinstance(outcome.failure, bool)
    assert isinstance(outcome.retried, bool)
    assert re.fullmatch(r"[0-9a-f]{32}", outcome.message_id)
    assert MESSAGE_IDS[f"run_{outcome}"] == outcome.message_id
    # Retrying a run that went well, or one the daemon stopped itself, would be a bug.
    assert not outcome.retried or outcome.failure


def test_outcomes_are_the_stored_strings():
    assert [str(o) for o in Outcome] == ["succeeded", "failed", "timeout", "lost", "killed"]
    assert Outcome("lost") is Outcome.LOST
    assert RUNNING not in set(Outcome)  # a run in flight has no outcome yet


def test_message_ids_are_unique():
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)


def _documented_runs() -> dict[str, tuple[str, str]]:
    """docs/journal.md's MESSAGE_ID table: id -> (event, priority), rows 'run ...' only."""
    rows = {}
    for line in (DOCS / "journal.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if (
            len(cells) >= 3
            and cells[0].startswith("run ")
            and re.fullmatch(r"`[0-9a-f]{32}`", cells[1])
        ):
            rows[cells[1].strip("`")] = (cells[0], cells[2])
    return rows


def test_message_ids_and_priorities_are_the_documented_ones():
    documented = _documented_runs()
    assert documented.pop(MESSAGE_IDS["run_started"])[0] == "run started"
    assert set(documented) == {outcome.message_id for outcome in Outcome}
    for outcome in Outcome:
        event, priority = documented[outcome.message_id]
        assert priority == logging.getLevelName(outcome.level).lower(), event
        # 'run timed out' for timeout, 'run failed (traceback in MESSAGE)' for failed, ...
        assert event.split()[1].startswith(str(outcome)[:4]), (event, outcome)
