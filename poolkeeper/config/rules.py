"""The checks of a job spec that need more than one field or the outside world: one schedule
per job, keys that do not apply to a job's kind, pool room for loop replicas, importing targets
and binding their arguments. A library of loader.py; the `check` command is in cli.py.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import sys
import sysconfig
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from poolkeeper.config.yamlload import Issue, Pos
from poolkeeper.kinds import JobKind
from poolkeeper.pool.context import ctx_passing, with_ctx

# A tuple, not the enum: `key in KINDS` must also take a key that is no kind (or no string).
KINDS: tuple[JobKind, ...] = tuple(JobKind)
_EXAMPLES = {
    JobKind.LOOP: "'loop: {}'",
    JobKind.EVERY: "'every: 5m'",
    JobKind.CRON: "'cron: \"0 3 * * *\"'",
    JobKind.AT: "'at: startup'",
}

# Keys that only mean something for some kinds of job. Set on a job of another kind they are
# an error (a silently ignored setting is a bug waiting to happen); from `defaults:` they are
# simply not applied to such jobs. (Keys as keywords: they are the spec's field names, and
# `timeout` would otherwise read as the outcome of that name to tests/test_outcome_table.py.)
_SCHEDULED = (JobKind.EVERY, JobKind.CRON, JobKind.AT)
ONLY_FOR: dict[str, tuple[JobKind, ...]] = dict(
    restart=(JobKind.LOOP,),
    backoff=(JobKind.LOOP,),
    heartbeat_timeout=(JobKind.LOOP,),
    timezone=(JobKind.CRON,),
    jitter=(JobKind.EVERY, JobKind.CRON),
    overlap=(JobKind.EVERY, JobKind.CRON),
    max_concurrent=(JobKind.EVERY, JobKind.CRON),
    timeout=_SCHEDULED,
    retry=_SCHEDULED,
    catchup=_SCHEDULED,
    before_ready=(JobKind.AT,),
)


class _Where(Protocol):  # the protocol messages.Where implements
    def pos(self, rel: tuple[Any, ...], *, key: bool = False) -> Pos: ...


def kind_of(job: Mapping[str, Any]) -> JobKind | None:
    kinds = [kind for kind in KINDS if kind in job]
    return kinds[0] if len(kinds) == 1 else None


def why_not(key: str, kind: JobKind, job: Mapping[str, Any]) -> str | None:
    """Why `key` does not apply to this job, or None when it does."""
    if key in ONLY_FOR and kind not in ONLY_FOR[key]:
        kinds = ", ".join(ONLY_FOR[key])
        return f"{key}: does not apply to {_a(repr(str(kind)))} job, only to {kinds} jobs"
    if key == "before_ready" and job.get("at") != "startup":
        return "before_ready: only applies to 'at: startup' jobs"
    if key == "catchup" and job.get("at") == "startup":
        return "catchup: does not apply to 'at: startup' jobs"
    if key == "max_concurrent" and job.get("overlap", "skip") != "allow":
        return "max_concurrent: only applies with 'overlap: allow'"
    return None


def merge_defaults(job: Mapping[Any, Any], defaults: Mapping[Any, Any]) -> dict[Any, Any]:
    """The job's keys plus the defaults it does not set. The schedule keys are one choice: a
    default schedule only applies to a job that sets none. Defaults that do not apply to the
    job's kind are left out, so `defaults: {timezone: UTC}` can serve the cron jobs only."""
    merged = dict(job)
    has_schedule = any(kind in job for kind in KINDS)
    for key, value in defaults.items():
        if key not in merged and not (key in KINDS and has_schedule):
            merged[key] = value
    kind = kind_of(merged)
    if kind is None:
        return merged
    return {
        k: v
        for k, v in merged.items()
        if k in job or not isinstance(k, str) or why_not(k, kind, merged) is None
    }


def job_shape_issues(
    name: str, job: Mapping[Any, Any], from_defaults: set[Any], where: _Where
) -> list[Issue]:
    """Exactly one schedule, with a value; no key that does not apply to the job's kind."""
    kinds = [kind for kind in KINDS if kind in job]
    if not kinds:
        return [
            Issue.at(
                where.pos(()), f"job '{name}' has no schedule: set one of loop, every, cron, at"
            )
        ]
    if len(kinds) > 1:
        listed = " and ".join(f"'{kind}'" for kind in kinds)
        return [
            Issue.at(
                where.pos(()),
                f"job '{name}' sets {listed}: a job has exactly one of loop, every, cron, at",
            )
        ]
    kind = kinds[0]
    if job[kind] is None:
        return [Issue.at(where.pos((kind,)), f"{kind}: has no value; write e.g. {_EXAMPLES[kind]}")]
    issues = []
    for key in job:
        reason = (
            why_not(key, kind, job) if isinstance(key, str) and key not in from_defaults else None
        )
        if reason:
            issues.append(Issue.at(where.pos((key,), key=True), reason))
    return issues


# --- Fleet scope -------------------------------------------------------------------------------

SCOPES = ("fleet", "host")


def resolved_scope(scope: Any, fleet_mode: bool) -> str:
    """A job's scope: as written, else 'fleet' when the spec has a `fleet:` section."""
    if scope in SCOPES:
        return str(scope)
    return "fleet" if fleet_mode else "host"


def scope_issues(job: Mapping[Any, Any], fleet_mode: bool, where: _Where) -> list[Issue]:
    """`scope: fleet` needs a `fleet:` section; what runs as a host starts (`at: startup`,
    `before_ready`) cannot be a fleet job. `job`: a job with its defaults merged, or
    `defaults:` itself (its scope is checked; the rest only means something in a job). A
    scope that is no valid choice is the model's to report."""
    scope = job.get("scope")
    if scope is not None and scope not in SCOPES:
        return []
    if scope == "fleet" and not fleet_mode:
        message = "scope: fleet needs a fleet: section (the database the hosts share); add one or set scope: host"
        return [Issue.at(where.pos(("scope",)), message)]
    if resolved_scope(scope, fleet_mode) != "fleet":
        return []
    if job.get("before_ready") is True:
        message = "before_ready runs on each host as it starts: set scope: host"
        return [Issue.at(where.pos(("before_ready",)), message)]
    if job.get("at") == "startup":
        message = "at: startup runs on each host as it starts: set scope: host"
        return [Issue.at(where.pos(("at",)), message)]
    return []


def capacity_issues(
    loop_replicas: Mapping[str, int | None], workers: int, wheres: Mapping[str, _Where]
) -> list[Issue]:
    """Loop replicas hold a worker each for their whole life: they must leave one worker for
    the scheduled jobs (if any), or those would never run. `loop_replicas`: per job name, its
    loop's replicas, or None for a scheduled job."""
    loops = [(name, count) for name, count in loop_replicas.items() if count is not None]
    scheduled = sum(1 for count in loop_replicas.values() if count is None)
    room = workers - 1 if scheduled else workers
    total = 0
    for name, replicas in loops:
        total += replicas
        if total > room:
            need = sum(replicas for _, replicas in loops)
            listed = ", ".join(f"{n}: {r}" for n, r in loops)
            kept = (
                f", one of them kept free for the {scheduled} scheduled job{'s' if scheduled != 1 else ''}"
                if scheduled
                else ""
            )
            message = (
                f"loop replicas need {need} worker{'s' if need != 1 else ''} ({listed}) but pool.workers is {workers}{kept}; "
                f"at most {room} replicas fit: raise pool.workers or lower the replicas"
            )
            return [Issue.at(wheres[name].pos((JobKind.LOOP,)), message)]
    return []


# --- Importing targets ---------------------------------------------------------------------------


class Importer:
    """Imports job code with `pythonpath` in front of sys.path, as the workers will. On exit,
    sys.path is restored and modules imported from outside the installed locations (the job
    code itself, and whatever a failed import left half-done) are dropped from sys.modules, so
    a later check, or a reload in the daemon, sees the files as they are then."""

    def __init__(self, pythonpath: list[str]):
        self.pythonpath = pythonpath
        self.search_path: list[str] = []  # sys.path while importing
        self.module_files: list[str] = []  # the file of every module loaded by then
        # Per target, what resolve() found: 10,000 jobs may name a handful of targets, and a
        # module is imported once per Importer anyway.
        self._resolved: dict[str, tuple[Any, str | None]] = {}
        self._signatures: dict[str, inspect.Signature | None] = {}

    def __enter__(self) -> Importer:
        self._saved_path = list(sys.path)
        self._saved_modules = set(sys.modules)
        sys.path[:0] = self.pythonpath
        importlib.invalidate_caches()  # files written within the same second stay invisible otherwise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.search_path = [os.path.abspath(p) for p in sys.path if isinstance(p, str)]
        self.module_files = sorted(
            {
                f
                for m in list(sys.modules.values())
                if isinstance(f := getattr(m, "__file__", None), str)
            }
        )
        sys.path[:] = self._saved_path
        installed = _installed_dirs()
        for name in set(sys.modules) - self._saved_modules:
            if not _is_installed(name, sys.modules.get(name), installed):
                sys.modules.pop(name, None)

    def import_module(self, module: str) -> str | None:
        """Import `module`; a one-line problem or None."""
        try:
            with _quiet():
                importlib.import_module(module)
        except ModuleNotFoundError as exc:
            return f"cannot import module '{module}': {_one_line(str(exc))}"
        except SystemExit as exc:
            return f"importing module '{module}' called sys.exit({exc.code!r})"
        except BaseException as exc:  # noqa: B036 - job code may raise anything; report, don't die
            return f"importing module '{module}' raised {exception_line(exc)}"
        return None

    def resolve(self, target: str) -> tuple[Any, str | None]:
        """'pkg.mod:obj.attr' -> (the object, None) or (None, a one-line problem)."""
        found = self._resolved.get(target)
        if found is None:
            found = self._resolved[target] = self._resolve(target)
        return found

    def signature(self, target: str, fn: Any) -> inspect.Signature | None:
        """The signature of the resolved target, None if it has none (some builtins)."""
        if target not in self._signatures:
            try:
                self._signatures[target] = inspect.signature(fn)
            except (TypeError, ValueError):
                self._signatures[target] = None
        return self._signatures[target]

    def _resolve(self, target: str) -> tuple[Any, str | None]:
        module, _, attrs = target.partition(":")
        problem = self.import_module(module)
        if problem:
            return None, problem
        obj: Any = sys.modules[module]
        walked = module
        for attr in attrs.split("."):
            try:
                with _quiet():
                    obj = getattr(obj, attr)
            except AttributeError:
                return None, f"'{walked}' has no attribute '{attr}'"
            except BaseException as exc:  # noqa: B036 - a module __getattr__ may raise anything
                return None, f"getting '{attr}' from '{walked}' raised {exception_line(exc)}"
            walked += f"{'.' if ':' in walked else ':'}{attr}"
        return obj, None


@dataclass(frozen=True)
class Call:
    """How the daemon will call a job's target: fn(*args, ctx=..., **kwargs)."""

    target: str
    args: tuple[Any, ...] | None  # None: args/kwargs are invalid themselves, bind nothing
    kwargs: Mapping[str, Any] | None
    loop: bool
    where: _Where


def call_to_check(job: Mapping[Any, Any], bad_keys: set[Any], where: _Where) -> list[Call]:
    """The call to check for a job whose target is valid, even if other settings are not:
    an unimportable target is worth reporting along with everything else."""
    if "target" in bad_keys or not isinstance(job.get("target"), str):
        return []
    args, kwargs = job.get("args", []), job.get("kwargs", {})
    bindable = "args" not in bad_keys and "kwargs" not in bad_keys
    return [
        Call(
            target=job["target"],
            args=tuple(args) if bindable else None,
            kwargs=kwargs if bindable else None,
            loop=kind_of(job) == JobKind.LOOP,
            where=where,
        )
    ]


def target_issues(call: Call, importer: Importer) -> list[Issue]:
    """The target imports, is a plain callable, and accepts args/kwargs (plus ctx)."""
    target, where = f"target '{call.target}'", call.where
    fn, problem = importer.resolve(call.target)
    if problem:
        return [Issue.at(where.pos(("target",)), f"{target}: {problem}")]
    if not callable(fn):
        return [
            Issue.at(
                where.pos(("target",)), f"{target} is not callable (it is {_a(type(fn).__name__)})"
            )
        ]
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        message = f"{target} is an async function; targets are called synchronously, so it would never run"
        return [Issue.at(where.pos(("target",)), message)]
    if call.kwargs is not None and "ctx" in call.kwargs:
        message = "kwargs: 'ctx' is reserved: poolkeeper passes the run context as ctx"
        return [Issue.at(where.pos(("kwargs", "ctx"), key=True), message)]
    signature = importer.signature(call.target, fn)
    if signature is None:  # some builtins have no signature: nothing to check
        return []
    passing = ctx_passing(signature)
    if call.loop and not passing:
        message = f"{target} is a loop job's target but has no 'ctx' parameter, so it cannot see ctx.stopping and would never stop on its own"
        return [Issue.at(where.pos(("target",)), message)]
    if call.args is None or call.kwargs is None:
        return []
    try:
        # Bind exactly the call the worker makes.
        args, kwargs = call.args, call.kwargs
        if passing:
            args, kwargs = with_ctx(passing, args, kwargs, None)
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        reason = _one_line(str(exc))
        if passing == "keyword" and "'ctx'" in reason:
            reason += " (ctx is passed first when it is the first parameter, else as a keyword: declare it first, e.g. 'def run(ctx, n)', or keyword-only, e.g. 'def run(n, *, ctx)')"
        at = ("args",) if call.args else ("kwargs",) if call.kwargs else ("target",)
        return [
            Issue.at(where.pos(at), f"{target} cannot be called with these arguments: {reason}")
        ]
    return []


@contextlib.contextmanager
def _quiet() -> Any:
    """Job code that prints at import must not garble `check`'s one-line output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def exception_line(exc: BaseException) -> str:
    """'Type: message (at file:line)' of an exception raised by job code (or by us)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = _one_line(str(exc))
    return f"{type(exc).__name__}{': ' + text if text else ''}{where}"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines)[:300]


def _a(noun: str) -> str:
    article = "an" if noun.strip("'")[:1] in "aeiou" else "a"
    return f"{article} {noun}"


def _installed_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def _is_installed(name: str, module: Any, installed: tuple[str, ...]) -> bool:
    if name == "poolkeeper" or name.startswith("poolkeeper."):
        return True
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) or getattr(module, "__file__", None)
    if origin in (None, "built-in", "frozen"):
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if not locations:
            return module is not None  # builtins stay; a None placeholder goes
        origin = locations[0]
    return os.path.realpath(str(origin)).startswith(installed)


__all__ = [
    "Importer",
    "KINDS",
    "capacity_issues",
    "exception_line",
    "job_shape_issues",
    "merge_defaults",
    "resolved_scope",
    "scope_issues",
    "target_issues",
]
