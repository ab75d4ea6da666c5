"""The job spec: the pydantic model of the YAML file and `load_config`, which returns a
`settings.Config`.

Three layers, three places:
- yamlload.py turns bytes into values plus the position of every key and value;
- this module holds the model (which also yields the JSON Schema) and maps pydantic's errors
  back to those positions;
- rules.py holds the checks that need more than one field or the outside world (one schedule
  per job, keys that do not apply to a job's kind, pool room for loop replicas, imports).

The model describes the file as written (durations are strings like '30s') but its validators
convert, so a validated model already holds seconds, bytes and a resolved worker count.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)

from poolkeeper import exitcodes
from poolkeeper.config import rules
from poolkeeper.config.durations import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    format_duration,
    parse_duration,
    parse_size,
)
from poolkeeper.config.settings import Config
from poolkeeper.config.validation_cache import Inputs, cpu_count, included_files
from poolkeeper.config.yamlload import (
    Document,
    Issue,
    LoadError,
    Loc,
    Pos,
    describe,
    load_yaml,
    read_config,
    trap_message,
)
from poolkeeper.kinds import JobKind

__all__ = [
    "Backoff", "Config", "ConfigError", "ConfigFile", "Issue", "Job", "JobSpec", "Loop", "Pool",
    "Retry", "Shutdown", "State", "load_config",
]  # fmt: skip


# --- Field validators -------------------------------------------------------------------------


class Invalid(ValueError):
    """A field's value is wrong. The message gets ", got <the input>" when `show_input`, in
    words that say what YAML made of the text. `wants_string`: the field is written as a
    string, so a non-string that YAML 1.1 made of an unquoted word gets the trap explanation,
    followed by `hint` (default: "quote it")."""

    def __init__(
        self,
        message: str,
        *,
        show_input: bool = False,
        wants_string: bool = False,
        hint: str | None = None,
        any_string: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.show_input = show_input
        self.wants_string = wants_string
        self.hint = hint
        self.any_string = any_string  # any string would do: quoting the input fixes it


def _require_str(value: Any, what: str, hint: str | None = None, any_string: bool = False) -> str:
    if not isinstance(value, str):
        raise Invalid(
            f"expected {what}", show_input=True, wants_string=True, hint=hint, any_string=any_string
        )
    return value


def _duration(value: Any, *, zero_ok: bool = False) -> float:
    if zero_ok and value == 0 and not isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        hint = f"a duration needs a unit, e.g. '{value:g}s'"
        raise Invalid(hint, wants_string=True, hint=hint)
    text = _require_str(value, "a duration like '30s'", hint="a duration is written like '30s'")
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    if seconds <= 0 and not zero_ok:
        raise Invalid(f"must be positive, got '{text}'")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    raise Invalid("expected a size like '512MiB' or 0", show_input=True, wants_string=True)


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        listed = ", ".join(choices)
        text = _require_str(value, f"one of: {listed}")
        if text not in choices:
            raise Invalid(f"'{text}' is not one of: {listed}{did_you_mean(text, choices)}")
        return text

    return validate


def _int_at_least(what: str, minimum: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"expected {what}", show_input=True)
        if value < minimum:
            raise Invalid(f"must be at least {minimum}, got {value}")
        return value

    return validate


def _workers(value: Any) -> int:
    if value == "auto":
        return cpu_count()
    if isinstance(value, str):
        raise Invalid("expected a number of workers or 'auto'", show_input=True)
    return _int_at_least("a number of workers >= 1 or 'auto'", 1)(value)


def _version(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        return 1
    raise Invalid("must be 1 (the only version of this format)", show_input=True)


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
MODULE_PATTERN = rf"^{_IDENT}(?:\.{_IDENT})*$"
TARGET_PATTERN = rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*$"


def _target(value: Any) -> str:
    text = _require_str(value, "'module:function'")
    if not re.fullmatch(TARGET_PATTERN, text):
        raise Invalid(
            f"'{text}' is not 'module:function' or 'module:object.attribute' (e.g. 'myapp.jobs:run')"
        )
    return text


def _module(value: Any) -> str:
    text = _require_str(value, "a module name")
    if not re.fullmatch(MODULE_PATTERN, text):
        raise Invalid(f"'{text}' is not a module name like 'myapp.jobs'")
    return text


def _cron(value: Any) -> str:
    text = _require_str(value, "a cron expression like '30 2 * * MON-FRI'")
    fields = text.split()
    if text.strip() == "@reboot":
        raise Invalid("'@reboot' is not supported; use 'at: startup'")
    if not text.strip().startswith("@") and len(fields) != 5:
        extra = "; seconds are not supported" if len(fields) == 6 else ""
        raise Invalid(
            f"'{text}' has {len(fields)} fields, expected 5 (minute hour day month weekday){extra}"
        )
    from croniter import croniter  # here: ~30 ms of import that only cron jobs need

    try:
        if not croniter.is_valid(text):
            raise ValueError
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except Exception:  # croniter raises several types (and plain ValueError/KeyError) on bad input
        raise Invalid(
            f"'{text}' is not a valid cron expression (5 fields: minute hour day month weekday, "
            "e.g. '30 2 * * MON-FRI')"
        ) from None
    return text


def _timezone(value: Any) -> str:
    text = _require_str(value, "a time zone name like 'Europe/Berlin'")
    try:
        zoneinfo.ZoneInfo(text)
    except Exception:  # ZoneInfoNotFoundError, ValueError on '../x', OSError on odd paths
        raise Invalid(f"unknown time zone '{text}'{did_you_mean(text, _zone_names())}") from None
    return text


def _zone_names() -> list[str]:
    try:
        return sorted(zoneinfo.available_timezones())
    except Exception:
        return []


def _at(value: Any) -> str | datetime:
    text = _require_str(value, "'startup' or an ISO-8601 datetime")
    if text == "startup":
        return text
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise Invalid(
            f"'{text}' is neither 'startup' nor an ISO-8601 datetime like '2025-06-01T03:00:00'"
        ) from None


def _env_name(value: Any) -> str:
    text = _require_str(value, "an environment variable name")
    if not text or "=" in text or "\0" in text:
        raise Invalid(f"'{text}' is not a valid environment variable name")
    return text


def _env_value(value: Any) -> str:
    text = _require_str(value, "a string", any_string=True)
    if "\0" in text:
        raise Invalid("an environment value cannot contain a NUL character")
    return text


def _nonempty(what: str) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        text = _require_str(value, what)
        if not text:
            raise Invalid(f"expected {what}, got an empty string")
        return text

    return validate


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- Field types: validated by the functions above, described to editors as written ------------

_DURATION_SCHEMA = {
    "type": "string",
    "pattern": DURATION_PATTERN,
    "examples": ["500ms", "30s", "5m", "1h30m", "1d"],
}
Duration = Annotated[float, PlainValidator(_duration), WithJsonSchema(_DURATION_SCHEMA)]
DurationOrZero = Annotated[
    float,
    PlainValidator(lambda v: _duration(v, zero_ok=True)),
    WithJsonSchema({"anyOf": [{"const": 0}, _DURATION_SCHEMA]}),
]
Size = Annotated[
    int,
    PlainValidator(_size),
    WithJsonSchema(
        {
            "anyOf": [{"const": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
            "examples": ["512MiB", "1GiB"],
        }
    ),
]


def _enum(literal: Any) -> Any:
    choices = get_args(literal)
    return Annotated[
        literal,
        PlainValidator(_choice(choices)),
        WithJsonSchema({"type": "string", "enum": list(choices)}),
    ]


Jitter = _enum(Literal["full", "equal", "none"])
Restart = _enum(Literal["always", "on-failure", "never"])
Overlap = _enum(Literal["skip", "queue", "allow"])
Catchup = _enum(Literal["none", "once"])
StartMethod = _enum(Literal["forkserver", "spawn", "fork"])
Target = Annotated[
    str, PlainValidator(_target), WithJsonSchema({"type": "string", "pattern": TARGET_PATTERN})
]
ModuleName = Annotated[
    str, PlainValidator(_module), WithJsonSchema({"type": "string", "pattern": MODULE_PATTERN})
]
Cron = Annotated[
    str,
    PlainValidator(_cron),
    WithJsonSchema({"type": "string", "examples": ["30 2 * * MON-FRI", "@hourly"]}),
]
TimeZone = Annotated[
    str,
    PlainValidator(_timezone),
    WithJsonSchema({"type": "string", "examples": ["Europe/Berlin", "UTC"]}),
]
At = Annotated[
    Literal["startup"] | datetime,
    PlainValidator(_at),
    WithJsonSchema({"anyOf": [{"const": "startup"}, {"type": "string", "format": "date-time"}]}),
]
Workers = Annotated[
    int,
    PlainValidator(_workers),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}], "default": "auto"}
    ),
]
Version = Annotated[int, PlainValidator(_version), WithJsonSchema({"const": 1})]
EnvName = Annotated[str, PlainValidator(_env_name), WithJsonSchema({"type": "string"})]
EnvValue = Annotated[str, PlainValidator(_env_value), WithJsonSchema({"type": "string"})]
PathText = Annotated[
    str, PlainValidator(_nonempty("a path")), WithJsonSchema({"type": "string", "minLength": 1})
]


def _count(what: str, minimum: int) -> Any:
    return Annotated[
        int,
        PlainValidator(_int_at_least(what, minimum)),
        WithJsonSchema({"type": "integer", "minimum": minimum}),
    ]


# --- The model ---------------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: YAML already typed every value; coercing '5' to 5 or true to 1 would hide mistakes
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _check_max(initial: float, maximum: float) -> None:
    if maximum < initial:
        raise Invalid(
            f"max ({format_duration(maximum)}) is less than initial ({format_duration(initial)})"
        )


class Loop(_Model):
    """A long-running job: runs until the stop event is set; restarted per `restart`."""

    replicas: _count("a number of replicas", 1) = Field(
        1, description="How many copies run at once; each takes a pool worker."
    )


class Retry(_Model):
    """Retries of a failed scheduled run."""

    attempts: _count("a number of attempts", 1) = Field(
        1, description="Total tries per run; 1 means no retry."
    )
    initial: Duration = Field(
        10.0, description="Delay before the first retry.", json_schema_extra={"default": "10s"}
    )
    factor: float = Field(
        2.0, ge=1, allow_inf_nan=False, description="Each delay is the previous one times this."
    )
    max: Duration = Field(
        600.0, description="Upper bound of the delay.", json_schema_extra={"default": "10m"}
    )
    jitter: Jitter = Field(
        "full", description="full: random in [0, delay]; equal: delay/2 + random half; none."
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> Retry:
        _check_max(self.initial, self.max)
        return self


class Backoff(_Model):
    """Delay before a failed or finished loop job is restarted."""

    initial: Duration = Field(
        1.0, description="Delay after the first failure.", json_schema_extra={"default": "1s"}
    )
    max: Duration = Field(
        300.0, description="Upper bound of the delay.", json_schema_extra={"default": "5m"}
    )
    factor: float = Field(
        2.0, ge=1, allow_inf_nan=False, description="Each delay is the previous one times this."
    )
    jitter: Jitter = Field("full", description="full | equal | none")

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> Backoff:
        _check_max(self.initial, self.max)
        return self


class JobSpec(_Model):
    """One job as written in `jobs:`. Exactly one of loop, every, cron, at."""

    target: Target = Field(
        description="The callable: 'module:function' or 'module:object.attribute'."
    )
    loop: Loop | None = Field(None, description="Long-running job, e.g. {replicas: 2}.")
    every: Duration | None = Field(None, description="Run at this interval, e.g. '5m'.")
    cron: Cron | None = Field(
        None, description="Run on this 5-field cron schedule, e.g. '30 2 * * MON-FRI'."
    )
    at: At | None = Field(
        None, description="Run once: 'startup' or an ISO-8601 datetime (naive = local time)."
    )
    timezone: TimeZone | None = Field(
        None, description="Time zone of a cron schedule (default: local time)."
    )
    before_ready: bool = Field(
        False, description="For 'at: startup': READY=1 waits until this job has finished."
    )
    jitter: DurationOrZero = Field(
        0.0,
        description="Random delay up to this much added to each scheduled run.",
        json_schema_extra={"default": "0s"},
    )
    timeout: Duration | None = Field(
        None, description="Hard limit of a run: the worker is killed and replaced."
    )
    heartbeat_timeout: Duration | None = Field(
        None, description="A loop that doesn't call ctx.heartbeat() this long is hung."
    )
    retry: Retry = Field(
        default_factory=Retry, description="How often and how fast a failed run is retried."
    )
    restart: Restart = Field("always", description="When a loop job is restarted after it ends.")
    backoff: Backoff = Field(
        default_factory=Backoff, description="Delay before a loop job is restarted."
    )
    overlap: Overlap = Field(
        "skip", description="When a run is due while the previous one still runs."
    )
    max_concurrent: _count("a number of runs", 1) = Field(
        1, description="With overlap: allow, how many runs at once."
    )
    catchup: Catchup = Field(
        "none", description="After downtime: none, or once to run once for what was missed."
    )
    args: list[Any] = Field(default_factory=list, description="Positional arguments of the call.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the call."
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, description="Environment variables set for the run."
    )

    @property
    def kind(self) -> JobKind:
        for kind in JobKind:
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a validated job has a schedule")


class Job(JobSpec):
    """A resolved job: the spec plus its name. Equality compares every setting (for reloads)."""

    name: str


def _partial(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """`model` with every field optional (default None), for `defaults:`."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        annotation = (
            Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        )
        fields[key] = (annotation, Field(None, description=info.description))
    partial = create_model(name, __base__=_Model, __doc__=doc, **fields)
    return partial


JobDefaults = _partial(
    JobSpec, "JobDefaults", "Any job key; applied to every job that does not set it."
)


class Pool(_Model):
    """The worker processes."""

    workers: Workers = Field(
        default_factory=lambda: cpu_count(),
        description="Worker processes: a number or 'auto' (CPUs); loop replicas count against it.",
    )
    start_method: StartMethod = Field("forkserver", description="How workers are started.")
    preload: list[ModuleName] = Field(
        default_factory=list, description="Modules imported once before workers start."
    )
    max_runs_per_worker: _count("a number of runs (0 = never recycle)", 0) = Field(
        0, description="Replace a worker after this many runs; 0 = never."
    )
    max_memory_per_worker: Size = Field(
        0, description="Replace a worker whose RSS exceeds this, e.g. '512MiB'; 0 = no limit."
    )


class Shutdown(_Model):
    """The drain on SIGTERM."""

    drain_timeout: Duration = Field(
        30.0,
        description="Budget for in-flight runs after SIGTERM; then they are killed.",
        json_schema_extra={"default": "30s"},
    )


class State(_Model):
    """Run history."""

    path: PathText = Field(
        "auto",
        description="'auto' = $STATE_DIRECTORY/poolkeeper.db, else ./.poolkeeper/state.db; or a path relative to this file.",
    )
    keep: Duration = Field(
        30 * 86400.0, description="Run history retention.", json_schema_extra={"default": "30d"}
    )


class ConfigFile(_Model):
    """A poolkeeper job spec (version 1)."""

    model_config = ConfigDict(title="poolkeeper job spec")

    version: Version = Field(description="Format version: 1.")
    pythonpath: list[PathText] = Field(
        default_factory=list,
        description="Prepended to sys.path; relative entries are relative to this file.",
    )
    include: PathText | None = Field(
        None, description="A directory (relative to this file) whose *.yaml files add jobs."
    )
    pool: Pool = Field(default_factory=Pool, description="The worker processes that run the jobs.")
    shutdown: Shutdown = Field(default_factory=Shutdown, description="How SIGTERM drains the pool.")
    state: State = Field(
        default_factory=State, description="Where run history is kept, and for how long."
    )
    defaults: JobDefaults = Field(
        default_factory=JobDefaults,
        description="Any job key, applied to every job that doesn't set it.",
    )  # type: ignore[valid-type]
    jobs: dict[str, JobSpec] = Field(default_factory=dict, description="The jobs, by name.")


class ConfigError(Exception):
    """The config is invalid (exit_code 78) or cannot be read (66); `issues` says why."""

    def __init__(self, issues: list[Issue], exit_code: int = exitcodes.CONFIG):
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues
        self.exit_code = exit_code


# --- Loading -----------------------------------------------------------------------------------

_SECTIONS = ("pool", "shutdown", "state", "defaults", "jobs")
# Unicode letters and digits are welcome (`\w` of a str pattern): names travel as UTF-8 in
# journal fields and STATUS=, which python-systemd sends correctly.
JOB_NAME_PATTERN = r"^[^\W_][\w.@-]{0,63}$"


def load_config(
    path: str | os.PathLike[str], *, import_targets: bool = True, inputs: Inputs | None = None
) -> Config:
    """Read, validate and resolve a job spec. Raises ConfigError listing every problem found.

    With import_targets, targets and pool.preload modules are imported here (with pythonpath
    applied, and dropped from sys.modules again) and args/kwargs bound to their signatures.
    `inputs`, if given, is filled with what the validation read (for configcache)."""
    return _Loading(os.fspath(path), import_targets, inputs or Inputs()).run()


# --- Loading: files -> raw values -> per-job merge -> model -> checks ----------------------------


def _job_rel(path: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The part of `path` inside a job (or `defaults:`), None outside any job."""
    if path[:1] == ("defaults",):
        return path[1:]
    if path[:1] == ("jobs",) and len(path) >= 2:
        return path[2:]
    return None


def _key_label(path: tuple[Any, ...]) -> str | None:
    """What keys of the mapping at `path` are called in messages. Keys inside args and inside
    kwargs values are the job's own data (None: any scalar is fine there)."""
    if path == ("jobs",):
        return "job name"
    rel = _job_rel(path)
    if rel and (rel[0] == "args" or rel[0] == "kwargs" and len(rel) > 1):
        return None
    return "key"


class _Where:
    """Positions and source scalars for model locs of one validated mapping."""

    def __init__(self, doc: Document, prefix: tuple[Any, ...] = (), what: str | None = None):
        self.doc = doc
        self.prefix = prefix
        self.what = what  # "job 'x'" for messages about the mapping itself

    def pos(self, rel: tuple[Any, ...], *, key: bool = False) -> Pos:
        path = (*self.prefix, *rel)
        return (
            self.doc.key_pos(path) if key or not rel and self.prefix else self.doc.value_pos(path)
        )

    def loc(self, rel: tuple[Any, ...]) -> Loc | None:
        return self.doc.locs.get((*self.prefix, *rel))


class _JobWhere(_Where):
    """Like _Where, but keys merged from `defaults:` point into the defaults section."""

    def __init__(self, doc: Document, name: str, defaults: _Where, merged: set[str]):
        super().__init__(doc, ("jobs", name), f"job '{name}'")
        self.defaults = defaults
        self.merged = merged

    def pos(self, rel: tuple[Any, ...], *, key: bool = False) -> Pos:
        if rel and rel[0] in self.merged:
            return self.defaults.pos(rel, key=key)
        return super().pos(rel, key=key)

    def loc(self, rel: tuple[Any, ...]) -> Loc | None:
        if rel and rel[0] in self.merged:
            return self.defaults.loc(rel)
        return super().loc(rel)


@dataclass
class _RawJob:
    name: Any
    raw: Any
    doc: Document


class _Loading:
    """One load_config call: every stage adds issues; at the end we raise or resolve."""

    def __init__(self, path: str, import_targets: bool, inputs: Inputs):
        self.path = path
        self.inputs = inputs
        self.base = os.path.dirname(os.path.abspath(path))
        self.import_targets = import_targets
        self.issues: list[Issue] = []
        self.loader_issues: set[Issue] = set()
        self.files = [path]  # order of files, for sorting issues
        self.bad_sections: set[Any] = set()
        self.bad_default_keys: set[Any] = set()
        self.calls: list[rules.Call] = []  # targets to import and bind, once pythonpath is known

    def run(self) -> Config:
        doc = self.read_main()
        top = self.validate_top(doc)
        defaults = self.usable_defaults(doc)
        jobs: dict[str, Job] = {}
        wheres: dict[str, _Where] = {}
        for raw_job in self.collect_jobs(doc, top):
            validated = self.validate_job(raw_job, defaults, _Where(doc, ("defaults",)))
            if validated is not None:
                jobs[validated[0].name], wheres[validated[0].name] = validated
        if top is not None and "pool" not in self.bad_sections:
            self.issues += rules.capacity_issues(jobs, top.pool.workers, wheres)
        pythonpath = self.pythonpath(top, doc)
        if self.import_targets and top is not None and pythonpath is not None:
            self.check_imports(top, pythonpath, doc)
        if self.issues:
            raise ConfigError(self.sorted_issues())
        assert top is not None and pythonpath is not None
        return Config.from_dict(
            {
                "path": os.path.abspath(self.path),
                "pythonpath": pythonpath,
                "pool": top.pool.model_dump(),
                "shutdown": top.shutdown.model_dump(),
                "state": {**top.state.model_dump(), "path": self.state_path(top.state.path)},
                "jobs": {name: job.model_dump() for name, job in jobs.items()},
            }
        )

    def read_main(self) -> Document:
        try:
            raw = read_config(self.path)  # bounded, regular files only
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            issue = Issue(self.path, 0, 0, f"cannot read the file: {reason}")
            raise ConfigError([issue], exitcodes.NOINPUT) from None
        except LoadError as exc:
            raise ConfigError([exc.issue]) from None
        self.inputs.add_config_file(os.path.abspath(self.path), raw)
        doc = self.parse(raw, self.path)
        if doc is not None and doc.data is None:
            self.issues.append(
                Issue(self.path, 1, 1, "the file is empty; a job spec starts with 'version: 1'")
            )
        elif doc is not None and not isinstance(doc.data, dict):
            got = describe(doc.data, doc.locs[()].scalar)
            self.issues.append(
                Issue.at(
                    doc.value_pos(()),
                    f"the top level must be a mapping (version:, jobs:, ...), got {got}",
                )
            )
        if doc is None or not isinstance(doc.data, dict):
            raise ConfigError(self.sorted_issues())
        for section in _SECTIONS:  # a section with every key commented out means its defaults
            if section in doc.data and doc.data[section] is None:
                doc.data[section] = {}
        return doc

    def parse(self, raw: bytes, file: str) -> Document | None:
        try:
            doc, issues = load_yaml(raw, file, _key_label)
        except LoadError as exc:
            self.issues.append(exc.issue)
            return None
        self.issues += issues
        self.loader_issues.update(issues)
        return doc

    def validate_top(self, doc: Document) -> ConfigFile | None:
        """Validate everything but the jobs (done one by one, with defaults merged). Return the
        valid sections (invalid ones replaced by their defaults) for the checks that need them."""
        data = dict(doc.data)
        if isinstance(data.get("jobs"), dict):
            data["jobs"] = {}
        errors = _errors(ConfigFile, data)
        self.bad_sections = {error["loc"][0] for error in errors if error["loc"]}
        self.bad_default_keys = {
            e["loc"][1] for e in errors if e["loc"][:1] == ("defaults",) and len(e["loc"]) > 1
        }
        self.issues += [_issue_for(error, _Where(doc), ConfigFile) for error in errors]
        valid = {
            k: v
            for k, v in data.items()
            if k in ConfigFile.model_fields and k not in self.bad_sections
        }
        try:
            return ConfigFile.model_validate({**valid, "version": 1})
        except ValidationError:  # cannot happen: every invalid section was left out
            return None

    def collect_jobs(self, doc: Document, top: ConfigFile | None) -> list[_RawJob]:
        sources = [(doc, doc.data.get("jobs"))]
        if top is not None and top.include is not None:
            sources += self.fragments(doc, top.include)
        found: list[_RawJob] = []
        seen: dict[Any, Pos] = {}
        for source, jobs in sources:
            for name, raw in (jobs if isinstance(jobs, dict) else {}).items():
                here = source.key_pos(("jobs", name))
                if name in seen:
                    first = seen[name]
                    self.issues.append(
                        Issue.at(
                            here,
                            f"job '{name}' is already defined at {first.file}:{first.line}:{first.col}",
                        )
                    )
                    continue
                seen[name] = here
                found.append(_RawJob(name, raw, source))
        return found

    def fragments(self, doc: Document, include: str) -> list[tuple[Document, Any]]:
        where = doc.value_pos(("include",))
        directory = os.path.join(os.path.dirname(self.path), os.path.expanduser(include))
        try:
            names = included_files(directory)
        except OSError as exc:
            self.issues.append(
                Issue.at(
                    where,
                    f"include: cannot read the directory '{directory}': {exc.strerror or exc}",
                )
            )
            return []
        self.inputs.include_dir, self.inputs.include_names = os.path.abspath(directory), names
        found = []
        for name in names:
            shown = os.path.normpath(os.path.join(directory, name))
            self.files.append(shown)
            try:
                raw = read_config(shown)
            except OSError as exc:
                self.issues.append(
                    Issue.at(where, f"include: cannot read '{shown}': {exc.strerror or exc}")
                )
                continue
            except LoadError as exc:
                self.issues.append(exc.issue)
                continue
            self.inputs.add_config_file(os.path.abspath(shown), raw)
            fragment = self.parse(raw, shown)
            if fragment is not None and fragment.data is not None:  # an empty fragment is fine
                found.append((fragment, self.fragment_jobs(fragment)))
        return found

    def fragment_jobs(self, fragment: Document) -> Any:
        data = fragment.data
        if not isinstance(data, dict):
            got = describe(data, fragment.locs[()].scalar)
            self.issues.append(
                Issue.at(
                    fragment.value_pos(()),
                    f"an included file must be a mapping with 'jobs:', got {got}",
                )
            )
            return None
        for key in data:
            if key != "jobs":
                self.issues.append(
                    Issue.at(
                        fragment.key_pos((key,)),
                        f"unknown key '{key}': an included file may only contain 'jobs:'",
                    )
                )
        jobs = data.get("jobs")
        if jobs is not None and not isinstance(jobs, dict):
            got = describe(jobs, fragment.locs[("jobs",)].scalar)
            self.issues.append(
                Issue.at(
                    fragment.value_pos(("jobs",)),
                    f"jobs: expected a mapping of job names to jobs, got {got}",
                )
            )
        return jobs

    def validate_job(
        self, job: _RawJob, defaults: dict[Any, Any], in_defaults: _Where
    ) -> tuple[Job, _Where] | None:
        name = job.name
        here = job.doc.key_pos(("jobs", name))
        name_ok = bool(re.fullmatch(JOB_NAME_PATTERN, name))
        if not name_ok:
            self.issues.append(
                Issue.at(
                    here,
                    f"job name '{name}': use letters, digits and _ - . @ (at most 64, starting with a letter or digit)",
                )
            )
        if not isinstance(job.raw, dict):
            got = describe(job.raw, job.doc.locs[("jobs", name)].scalar)
            self.issues.append(
                Issue.at(
                    here,
                    f"job '{name}': expected a mapping with a target and one of loop, every, cron, at, got {got}",
                )
            )
            return None
        merged = rules.merge_defaults(job.raw, defaults)
        where = _JobWhere(job.doc, name, in_defaults, {k for k in merged if k not in job.raw})
        shape = rules.job_shape_issues(name, merged, where.merged, where)
        errors = _errors(JobSpec, merged)
        self.issues += shape + [_issue_for(error, where, JobSpec) for error in errors]
        self.calls += rules.call_to_check(
            merged, {error["loc"][0] for error in errors if error["loc"]}, where
        )
        if shape or errors or not name_ok:
            return None
        spec = JobSpec.model_validate(merged)
        job_obj = Job.model_construct(
            _fields_set=spec.model_fields_set | {"name"}, **dict(spec), name=name
        )
        return job_obj, where

    def pythonpath(self, top: ConfigFile | None, doc: Document) -> list[str] | None:
        if top is None or "pythonpath" in self.bad_sections:
            return None
        resolved = [
            os.path.normpath(os.path.join(self.base, os.path.expanduser(p))) for p in top.pythonpath
        ]
        if self.import_targets:
            for index, entry in enumerate(resolved):
                if not os.path.isdir(entry):
                    at = doc.value_pos(("pythonpath", index))
                    self.issues.append(
                        Issue.at(at, f"pythonpath[{index}]: directory '{entry}' does not exist")
                    )
        return resolved

    def state_path(self, path: str) -> str:
        if path == "auto":
            return path
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(path)))

    def usable_defaults(self, doc: Document) -> dict[Any, Any]:
        """`defaults:` without the keys already reported as invalid: every job would repeat
        the error and, worse, stop being checked itself."""
        defaults = doc.data.get("defaults")
        if not isinstance(defaults, dict):
            return {}
        return {k: v for k, v in defaults.items() if k not in self.bad_default_keys}

    def check_imports(self, top: ConfigFile, pythonpath: list[str], doc: Document) -> None:
        with rules.Importer(pythonpath) as importer:
            if "pool" not in self.bad_sections:
                for index, module in enumerate(top.pool.preload):
                    problem = importer.import_module(module)
                    if problem:
                        at = doc.value_pos(("pool", "preload", index))
                        self.issues.append(Issue.at(at, f"pool.preload[{index}]: {problem}"))
            for call in self.calls:
                self.issues += rules.target_issues(call, importer)
        self.inputs.module_files = importer.module_files
        self.inputs.search_path = importer.search_path

    def sorted_issues(self) -> list[Issue]:
        # One message per position: a loader problem there (a key YAML 1.1 turned into a
        # boolean, an unsupported tag) already explains what the model says about that spot.
        spoken_for = {(i.file, i.line, i.col) for i in self.loader_issues}
        unique: dict[Issue, None] = {}
        for issue in self.issues:
            if issue in self.loader_issues or (issue.file, issue.line, issue.col) not in spoken_for:
                unique.setdefault(issue, None)
        rank = {file: index for index, file in enumerate(self.files)}
        return sorted(unique, key=lambda i: (rank.get(i.file, len(rank)), i.line, i.col))


def _errors(model: type[BaseModel], data: Any) -> list[Any]:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return exc.errors(include_url=False)
    return []


# --- Pydantic errors -> messages at positions --------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _issue_for(error: Any, where: _Where, model: type[BaseModel]) -> Issue:
    loc = tuple(error["loc"])
    at_key = bool(loc) and loc[-1] == "[key]"  # a dict key failed its own validation
    if at_key:
        loc = loc[:-1]
    kind = error["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        return Issue.at(
            where.pos(loc, key=True),
            f"unknown key '{key}'{did_you_mean(str(key), _fields_at(model, loc[:-1]))}",
        )
    if kind == "missing":
        owner = _shown(loc[:-1]) or (where.what if where.prefix else None)
        message = f"missing required key '{loc[-1]}'"
        if loc == ("version",):
            message += "; a job spec starts with 'version: 1'"
        return Issue.at(where.pos(loc[:-1], key=True), f"{owner}: {message}" if owner else message)
    value = error.get("input")
    source = where.loc(loc)
    scalar = source.scalar if source is not None and not at_key else None
    message = _message(kind, error, value, scalar)
    shown = _shown(loc)
    return Issue.at(where.pos(loc, key=at_key), f"{shown}: {message}" if shown else message)


def _message(kind: str, error: Any, value: Any, scalar: Any) -> str:
    got = describe(value, scalar)
    trap = scalar is not None and scalar.plain and scalar.text != "" and got != describe(value)
    if kind == "value_error" and isinstance(error["ctx"]["error"], Invalid):
        exc: Invalid = error["ctx"]["error"]
        if exc.wants_string and trap and not isinstance(value, str):
            return f"got {got}; {exc.hint or f'quote it ({chr(39)}{scalar.text}{chr(39)}) if you meant the string'}"
        message = f"{exc.message}, got {got}" if exc.show_input else exc.message
        if (
            exc.any_string
            and scalar is not None
            and scalar.plain
            and scalar.text
            and value is not None
        ):
            message += f"; quote it ('{scalar.text}')"  # e.g. PORT: 8080 -> '8080'
        return message
    if kind == "string_type":
        return trap_message(value, scalar)
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }[kind]
        bound = next(iter(error["ctx"].values()))
        return f"must be {op} {bound:g}, got {value:g}"
    if kind == "finite_number":
        return f"must be a finite number, got {got}"
    return str(error.get("msg", "invalid value"))


def _shown(loc: tuple[Any, ...]) -> str:
    """('retry', 'initial') -> 'retry.initial', ('pythonpath', 0) -> 'pythonpath[0]'. Locs of
    job settings and of `defaults:` are shown the same, so a bad default reported for the
    defaults section and for each job that inherits it is one message."""
    if loc[:1] == ("defaults",):
        loc = loc[1:]
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model allows in the mapping at `loc` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if (
            isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            current = _unwrap(current.model_fields[part].annotation)
        elif get_origin(current) is dict:
            current = _unwrap(get_args(current)[1])
        else:
            return []
    return (
        list(current.model_fields)
        if isinstance(current, type) and issubclass(current, BaseModel)
        else []
    )


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / Annotated[X, ...] -> X."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation
