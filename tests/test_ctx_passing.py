"""How a job's function gets `ctx` (poolkeeper/pool/context.py: ctx_passing, with_ctx): first
when it is the first parameter, by keyword when it is keyword-only or declared later. One rule
for `poolkeeper check` and the worker: every shape check accepts runs with ctx and its args in a
real pool, and every shape check refuses fails there too."""

from __future__ import annotations

import io
import json
from pathlib import Path

from poolkeeper.cli import check_file
from poolkeeper.pool.supervisor import Task

JOBS_PY = """
def first(ctx, path):
    return type(ctx).__name__, ctx.job, path

def first_default(ctx, path="/default"):
    return type(ctx).__name__, ctx.job, path

def first_positional_only(ctx, /, path):
    return type(ctx).__name__, ctx.job, path

def first_then_rest(ctx, *paths):
    return type(ctx).__name__, ctx.job, paths

def later(path, ctx):
    return type(ctx).__name__, ctx.job, path

def keyword_only(path, *, ctx):
    return type(ctx).__name__, ctx.job, path

def later_positional_only(path, ctx, /):
    return type(ctx).__name__, ctx.job, path

def no_ctx(path):
    return path

class Job:
    def run(self, ctx, path):
        return type(ctx).__name__, ctx.job, path

BOUND = Job()
"""

# (target, args, kwargs, what check says: None = accepted, else the end of its one error line)
SHAPES = [
    ("first", ["/tmp/x"], {}, None),
    ("first", [], {"path": "/tmp/x"}, None),
    ("first_default", [], {}, None),
    ("first_positional_only", ["/tmp/x"], {}, None),
    ("first_then_rest", ["/a", "/b"], {}, None),
    ("later", ["/tmp/x"], {}, None),
    ("keyword_only", ["/tmp/x"], {}, None),
    ("BOUND.run", ["/tmp/x"], {}, None),  # self is bound: ctx is first
    ("no_ctx", ["/tmp/x"], {}, None),
    ("first", ["/a", "/b"], {}, "too many positional arguments"),
    (
        "later",
        ["/tmp/x", "/y"],
        {},
        "multiple values for argument 'ctx' (ctx is passed first when it is the first parameter, else as a keyword: declare it first, e.g. 'def run(ctx, n)', or keyword-only, e.g. 'def run(n, *, ctx)')",
    ),
    (
        "later_positional_only",
        ["/tmp/x"],
        {},
        "'ctx' parameter is positional only, but was passed as a keyword (ctx is passed first when it is the first parameter, else as a keyword: declare it first, e.g. 'def run(ctx, n)', or keyword-only, e.g. 'def run(n, *, ctx)')",
    ),
]


def _check(directory: Path, target: str, args: list, kwargs: dict) -> str | None:
    """`poolkeeper check` on a spec with this one job: None if valid, else its error line."""
    spec = directory / f"spec-{target}-{len(args)}-{len(kwargs)}.yaml"
    spec.write_text(
        "version: 1\npythonpath: [.]\njobs:\n"
        f"  j: {{target: 'jobs:{target}', every: 5m, args: {json.dumps(args)}, kwargs: {json.dumps(kwargs)}}}\n"
    )
    out, err = io.StringIO(), io.StringIO()
    code = check_file(str(spec), out, err)
    if code == 0:
        return None
    (line,) = err.getvalue().splitlines()
    assert code == 78 and "Traceback" not in line
    return line


def test_check_and_the_worker_agree_on_every_shape_of_ctx(tmp_path, make_pool):
    (tmp_path / "jobs.py").write_text(JOBS_PY)
    verdicts = [_check(tmp_path, t, a, k) for t, a, k, _ in SHAPES]
    for (target, _a, _k, expected), verdict in zip(SHAPES, verdicts, strict=True):
        if expected is None:
            assert verdict is None, target
        else:
            assert verdict is not None and verdict.endswith(
                f"cannot be called with these arguments: {expected}"
            ), verdict

    d = make_pool("fork", pythonpath=[str(tmp_path)])
    ended = d.run([
        Task(run_id=str(i), job=f"job{i}", target=f"jobs:{t}", args=tuple(a), kwargs=k)
        for i, (t, a, k, _) in enumerate(SHAPES)
    ])  # fmt: skip
    for i, (target, args, kwargs, expected) in enumerate(SHAPES):
        run = ended[str(i)]
        if expected is not None:  # what check refuses cannot run either
            assert run.outcome == "failed" and run.error.startswith("TypeError: "), target
            continue
        assert run.outcome == "succeeded", (target, run.error)
        got = eval(run.result_repr)
        if target == "no_ctx":
            assert got == "/tmp/x"
            continue
        passed = (
            tuple(args)
            if target == "first_then_rest"
            else (args or [*kwargs.values()] or ["/default"])[0]
        )
        assert got == ("RunContext", f"job{i}", passed), target
