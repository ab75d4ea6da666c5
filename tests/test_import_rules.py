"""The import rules of the layout (issue 9), checked on the source rather than described.

The graph is built with `ast` from every `import` and `from ... import` of every module of the
package, those inside functions included (a function-local import is still a dependency, and
still a cycle); only `if TYPE_CHECKING:` blocks are left out, since they never run.
`from poolkeeper.x import y` is an edge to module `poolkeeper.x.y` when y is a module, else to
`poolkeeper.x`.

The fourth rule, pydantic never imported on a cached `poolkeeper run` start, needs a real start:
test_a_cached_start_never_imports_pydantic below.
"""

from __future__ import annotations

import ast
import signal
from pathlib import Path

import pytest

import poolkeeper

PACKAGE_DIR = Path(poolkeeper.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["poolkeeper", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, top: bool = True):
    """(import node, at module level) for every import under `node`, TYPE_CHECKING excluded."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for part in child.orelse:
                yield from _walk(part, top)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, top
        nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, top and not nested)


def _resolve(name: str) -> str | None:
    """The module of ours that `import name` loads last: `name`, or its longest known prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, *, module_level_only: bool = False) -> dict[str, int]:
    """poolkeeper modules that `module` imports -> the line of the first such import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node, top in _walk(tree):
        if module_level_only and not top:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in MODULES else base)
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                found.setdefault(resolved, node.lineno)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, sorted(c)) for c in components]


def _one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A path start -> ... -> start inside the component (breadth first: a shortest one)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return [*paths[v], start]
            if w in members and w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    return component


def _show(path: list[str]) -> str:
    return " -> ".join(
        f"{a} (line {GRAPH[a][b]})" if b is not None else a
        for a, b in zip(path, [*path[1:], None], strict=True)
    )


def test_the_graph_sees_function_local_and_relative_imports():
    """The checker itself: it must see what the rules are about, or it proves nothing."""
    assert "poolkeeper.pool.supervisor" in GRAPH["poolkeeper.daemon.mainloop"]
    # `from poolkeeper.pool import helper_processes` is the module, not the package.
    assert "poolkeeper.pool.helper_processes" in GRAPH["poolkeeper.pool.supervisor"]
    # A function-local import (worker.py's _own_journal_stream).
    assert "poolkeeper.service.logs" in GRAPH["poolkeeper.pool.worker"]
    assert "poolkeeper.service.logs" not in _imports(
        "poolkeeper.pool.worker", module_level_only=True
    )
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [
        ["a", "b", "c", "a"]
    ]


def test_the_shared_tables_import_only_the_standard_library():
    for module in SHARED_TABLES:
        assert not [m for m in GRAPH[module] if m.startswith("poolkeeper")], module


def test_no_import_cycle_between_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(_show(c) for c in cycles)


def _closure(module: str) -> dict[str, list[str]]:
    """Every module that importing `module` loads (module-level imports) -> the chain to it."""
    chains = {module: [module]}
    todo = [module]
    while todo:
        v = todo.pop()
        for w in _imports(v, module_level_only=True):
            if w not in chains:
                chains[w] = [*chains[v], w]
                todo.append(w)
    return chains


def _forbidden(module: str, banned) -> list[str]:
    """What `module` imports anywhere in its code, or loads through module-level imports,
    for which `banned(name)` is true."""
    bad = [
        f"{module}:{line} imports {target}"
        for target, line in GRAPH[module].items()
        if banned(target)
    ]
    bad += [
        "loads " + " -> ".join(chain)
        for target, chain in _closure(module).items()
        if banned(target) and target not in GRAPH[module]
    ]
    return bad


def _under(package: str) -> list[str]:
    return [m for m in MODULES if m == package or m.startswith(package + ".")]


_DAEMON_OR_CONFIG = (["poolkeeper", "daemon"], ["poolkeeper", "config"])


@pytest.mark.parametrize("module", _under("poolkeeper.pool"))
def test_the_pool_imports_nothing_of_the_daemon_or_the_config(module):
    """poolkeeper/pool/ runs in workers: no pydantic, no main-loop state (pool/__init__.py)."""
    bad = _forbidden(module, lambda name: name.split(".")[:2] in _DAEMON_OR_CONFIG)
    assert not bad, "\n".join(bad)


SHARED_TABLES = ("poolkeeper.outcomes", "poolkeeper.kinds")


@pytest.mark.parametrize("module", _under("poolkeeper.scheduling") + _under("poolkeeper.state"))
def test_scheduling_and_state_import_nothing_of_poolkeeper(module):
    """What their package docstrings promise: pure decisions, and a store any backend can
    replace, without the rest of poolkeeper: only the shared tables of outcomes and job kinds
    (standard library only themselves)."""
    own = module.split(".")[:2]
    # `poolkeeper` itself (its __init__) runs on any import of a submodule: not counted.
    allowed = {"poolkeeper", *SHARED_TABLES}
    bad = _forbidden(module, lambda name: name not in allowed and name.split(".")[:2] != own)
    assert not bad, "\n".join(bad)


def test_a_cached_start_never_imports_pydantic(daemon_factory):
    """A start from the validation cache must not pay for pydantic (config/__init__.py): with
    PYTHONPROFILEIMPORTTIME every process of the start (daemon, forkserver, workers) lists
    what it imports. The first, validating start does import it: the probe sees it."""
    spec = """
        pool: {workers: 2, start_method: forkserver}
        jobs:
          consumer:
            target: daemon_jobs:loop_units
            loop: {replicas: 1}
            kwargs: {out_dir: $OUT}
        """

    def imported_on_start() -> tuple[str, set[str]]:
        d = daemon_factory(spec, env={"PYTHONPROFILEIMPORTTIME": "1"})
        d.wait_log("ready")
        before = d.units()
        d.wait_for(lambda: d.units() > before, what="a unit of work of this start")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        log = d.log()
        names = {
            line.rpartition("|")[2].strip()
            for line in log.splitlines()
            if line.startswith("import time:")
        }
        return log, names

    first_log, first = imported_on_start()
    assert "not validated again" not in first_log
    assert "pydantic" in first
    cached_log, cached = imported_on_start()
    assert "not validated again" in cached_log
    assert not {n for n in cached if n.split(".")[0] in ("pydantic", "pydantic_core")}
