"""The pydantic model of the job spec: field validators, field types, and the classes
(`ConfigModel` and the sections and jobs in it). The same classes yield the JSON Schema
(schema.py).

Three layers, three places:
- yamlload.py turns bytes into values plus the position of every key and value;
- this module holds the model; messages.py maps pydantic's errors back to those positions;
- rules.py holds the checks that need more than one field or the outside world (one schedule
  per job, keys that do not apply to a job's kind, pool room for loop replicas, imports).
loader.py (`load_config`) runs them in turn and returns a `settings.Config`.

The model describes the file as written (durations are strings like '30s') but its validators
convert, so a validated model already holds seconds, bytes and a resolved worker count. The
classes end in `Model`, apart from the daemon's records in settings.py (Job, Pool, Retry...);
each class's `title` is its name in the JSON Schema, which predates the suffix.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    create_model,
    model_validator,
)

from poolkeeper.config.durations import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    format_duration,
    parse_duration,
    parse_size,
)
from poolkeeper.config.messages import Invalid, did_you_mean
from poolkeeper.config.settings import HOST_ID_PATTERN, host_id_ok
from poolkeeper.config.validation_cache import cpu_count
from poolkeeper.config.yamlload import describe
from poolkeeper.kinds import JobKind

__all__ = [
    "BackoffModel", "ConfigModel", "FleetModel", "JobDefaultsModel", "JobModel", "LoopModel",
    "PoolModel", "RetryModel", "ShutdownModel", "StateModel", "MetricsModel",
]  # fmt: skip


# --- Field validators -------------------------------------------------------------------------


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
    if not _cron_ok(text):
        raise Invalid(
            f"'{text}' is not a valid cron expression (5 fields: minute hour day month weekday, "
            "e.g. '30 2 * * MON-FRI')"
        )
    return text


@functools.lru_cache(maxsize=4096)  # croniter takes ~0.1 ms; 10,000 jobs repeat expressions
def _cron_ok(text: str) -> bool:
    from croniter import croniter  # here: ~30 ms of import that only cron jobs need

    try:
        if not croniter.is_valid(text):
            return False
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except Exception:  # croniter raises several types (and plain ValueError/KeyError) on bad input
        return False
    return True


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


# libpq's URL schemes. The keyword form ('host=... dbname=...') is not taken: one form to check.
DATABASE_SCHEMES = ("postgresql", "postgres")
DATABASE_PATTERN = r"^postgres(ql)?://"
MIN_LEASE = 2.0


def _database(value: Any) -> str:
    """A libpq URL. The messages never repeat the text: it may hold a password."""
    text = _require_str(value, "a PostgreSQL URL like 'postgresql://user@host/dbname'")
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in DATABASE_SCHEMES:
        raise Invalid(
            "expected a PostgreSQL URL starting with postgresql:// or postgres:// "
            "(e.g. 'postgresql://user@host/dbname')"
        )
    if "\0" in text or any(char.isspace() for char in text):
        raise Invalid("a PostgreSQL URL cannot contain spaces or NUL characters")
    from urllib.parse import urlsplit  # here: only a fleet spec needs it

    try:
        urlsplit(text)
    except ValueError:  # e.g. an unclosed '[' of an IPv6 address
        raise Invalid("not a valid URL (is a '[' of an IPv6 address left unclosed?)") from None
    return text


def _host_id(value: Any) -> str:
    text = _require_str(value, "a host id like 'web-1'")
    if not host_id_ok(text):
        raise Invalid(
            f"'{text}' is not a host id: use letters, digits and . _ - (1 to 64 characters)"
        )
    return text


def _lease(value: Any) -> float:
    seconds = _duration(value)
    if seconds < MIN_LEASE:
        raise Invalid(f"must be at least {format_duration(MIN_LEASE)}, got '{value}'")
    return seconds


def _nonempty(what: str) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        text = _require_str(value, what)
        if not text:
            raise Invalid(f"expected {what}, got an empty string")
        return text

    return validate


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


def _enum_validator(literal: Any) -> PlainValidator:
    return PlainValidator(_choice(get_args(literal)))


def _enum_schema(literal: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "enum": list(get_args(literal))})


# Each alias is spelled out (rather than built by a function) so a type checker sees the Literal.
_Jitter = Literal["full", "equal", "none"]
_Restart = Literal["always", "on-failure", "never"]
_Overlap = Literal["skip", "queue", "allow"]
_Catchup = Literal["none", "once"]
_StartMethod = Literal["forkserver", "spawn", "fork"]
_LogRuns = Literal["all", "summary", "failures"]  # poolkeeper.daemon.runlog.LOG_RUNS
_Scope = Literal["fleet", "host"]
_OnLost = Literal["record", "retry"]
_OnDbLoss = Literal["stop", "keep"]
Jitter = Annotated[_Jitter, _enum_validator(_Jitter), _enum_schema(_Jitter)]
Restart = Annotated[_Restart, _enum_validator(_Restart), _enum_schema(_Restart)]
Overlap = Annotated[_Overlap, _enum_validator(_Overlap), _enum_schema(_Overlap)]
Catchup = Annotated[_Catchup, _enum_validator(_Catchup), _enum_schema(_Catchup)]
StartMethod = Annotated[_StartMethod, _enum_validator(_StartMethod), _enum_schema(_StartMethod)]
LogRuns = Annotated[_LogRuns, _enum_validator(_LogRuns), _enum_schema(_LogRuns)]
Scope = Annotated[_Scope, _enum_validator(_Scope), _enum_schema(_Scope)]
OnLost = Annotated[_OnLost, _enum_validator(_OnLost), _enum_schema(_OnLost)]
OnDbLoss = Annotated[_OnDbLoss, _enum_validator(_OnDbLoss), _enum_schema(_OnDbLoss)]
Database = Annotated[
    str,
    PlainValidator(_database),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DATABASE_PATTERN,
            "examples": ["postgresql:///poolkeeper?host=/run/postgresql"],
        }
    ),
]
HostId = Annotated[
    str, PlainValidator(_host_id), WithJsonSchema({"type": "string", "pattern": HOST_ID_PATTERN})
]
Lease = Annotated[float, PlainValidator(_lease), WithJsonSchema(_DURATION_SCHEMA)]
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


def _count(what: str, minimum: int) -> tuple[PlainValidator, WithJsonSchema]:
    """The metadata of an integer count: Annotated[int, *_count(...)]."""
    return (
        PlainValidator(_int_at_least(what, minimum)),
        WithJsonSchema({"type": "integer", "minimum": minimum}),
    )


# Spelled out (rather than built by a function) so a type checker sees them as aliases of int.
_replicas = _count("a number of replicas", 1)
_attempts = _count("a number of attempts", 1)
_runs = _count("a number of runs", 1)
_runs_per_worker = _count("a number of runs (0 = never recycle)", 0)
Replicas = Annotated[int, _replicas[0], _replicas[1]]
Attempts = Annotated[int, _attempts[0], _attempts[1]]
MaxConcurrent = Annotated[int, _runs[0], _runs[1]]
RunsPerWorker = Annotated[int, _runs_per_worker[0], _runs_per_worker[1]]


# --- The model ---------------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: YAML already typed every value; coercing '5' to 5 or true to 1 would hide mistakes
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _check_max(initial: float, maximum: float) -> None:
    if maximum < initial:
        raise Invalid(
            f"max ({format_duration(maximum)}) is less than initial ({format_duration(initial)})"
        )


class LoopModel(_Model):
    """A long-running job: runs until the stop event is set; restarted per `restart`."""

    model_config = ConfigDict(title="Loop")

    replicas: Replicas = Field(
        1, description="How many copies run at once; each takes a pool worker."
    )


class RetryModel(_Model):
    """Retries of a failed scheduled run."""

    model_config = ConfigDict(title="Retry")

    attempts: Attempts = Field(1, description="Total tries per run; 1 means no retry.")
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
    def _max_not_below_initial(self) -> RetryModel:
        _check_max(self.initial, self.max)
        return self


class BackoffModel(_Model):
    """Delay before a failed or finished loop job is restarted."""

    model_config = ConfigDict(title="Backoff")

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
    def _max_not_below_initial(self) -> BackoffModel:
        _check_max(self.initial, self.max)
        return self


class JobModel(_Model):
    """One job as written in `jobs:`. Exactly one of loop, every, cron, at."""

    model_config = ConfigDict(title="JobSpec")

    target: Target = Field(
        description="The callable: 'module:function' or 'module:object.attribute'."
    )
    loop: LoopModel | None = Field(None, description="Long-running job, e.g. {replicas: 2}.")
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
    retry: RetryModel = Field(
        default_factory=RetryModel, description="How often and how fast a failed run is retried."
    )
    restart: Restart = Field("always", description="When a loop job is restarted after it ends.")
    backoff: BackoffModel = Field(
        default_factory=BackoffModel, description="Delay before a loop job is restarted."
    )
    overlap: Overlap = Field(
        "skip", description="When a run is due while the previous one still runs."
    )
    max_concurrent: MaxConcurrent = Field(
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
    log_runs: LogRuns = Field(
        "all",
        description="Journal lines of runs that succeed: all (a start and an end line each, "
        "up to 100 lines/s for the unit, the rest counted per job every 10s), summary (counted "
        "per job every 10s), failures (none). Runs that do not succeed get theirs in any case.",
    )
    # None until loader.py resolves it: the default depends on the spec's `fleet:` section.
    scope: Scope | None = Field(
        None,
        description="fleet: each fire runs once across the fleet (the default when the spec "
        "has a fleet: section); host: the job runs on every host, as without a fleet (the "
        "default otherwise).",
    )
    on_lost: OnLost = Field(
        "record",
        description="A fleet run whose host died (its lease expired): record it as lost, or "
        "also retry: run the fire again on another host (then at least once, not at most once).",
    )
    on_db_loss: OnDbLoss = Field(
        "stop",
        description="A fleet loop replica when its host cannot reach the database: stop it "
        "before its slot could be taken over elsewhere, or keep it running (two copies of the "
        "replica may then run at once).",
    )

    @property
    def kind(self) -> JobKind:
        for kind in JobKind:
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a validated job has a schedule")


def _partial(model: type[BaseModel], name: str, title: str, doc: str) -> type[BaseModel]:
    """`model` with every field optional (default None), for `defaults:`."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        annotation = (
            Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        )
        fields[key] = (annotation, Field(None, description=info.description))
    base = type(f"_{name}", (_Model,), {"model_config": ConfigDict(title=title)})
    return create_model(name, __base__=base, __doc__=doc, **fields)


if TYPE_CHECKING:
    # A class built at run time is no type to a checker: declare what _partial builds, a _Model
    # (its fields, JobModel's keys with default None, are only read by pydantic).
    class JobDefaultsModel(_Model):
        pass

else:
    JobDefaultsModel = _partial(
        JobModel,
        "JobDefaultsModel",
        "JobDefaults",
        "Any job key; applied to every job that does not set it.",
    )


class PoolModel(_Model):
    """The worker processes."""

    model_config = ConfigDict(title="Pool")

    workers: Workers = Field(
        default_factory=lambda: cpu_count(),
        description="Worker processes: a number or 'auto' (CPUs); loop replicas count against it.",
    )
    start_method: StartMethod = Field("forkserver", description="How workers are started.")
    preload: list[ModuleName] = Field(
        default_factory=list, description="Modules imported once before workers start."
    )
    max_runs_per_worker: RunsPerWorker = Field(
        0, description="Replace a worker after this many runs; 0 = never."
    )
    max_memory_per_worker: Size = Field(
        0, description="Replace a worker whose RSS exceeds this, e.g. '512MiB'; 0 = no limit."
    )


class ShutdownModel(_Model):
    """The drain on SIGTERM."""

    model_config = ConfigDict(title="Shutdown")

    drain_timeout: Duration = Field(
        30.0,
        description="Budget for in-flight runs after SIGTERM; then they are killed.",
        json_schema_extra={"default": "30s"},
    )


class StateModel(_Model):
    """Run history."""

    model_config = ConfigDict(title="State")

    path: PathText = Field(
        "auto",
        description="'auto' = $STATE_DIRECTORY/poolkeeper.db, else ./.poolkeeper/state.db; or a path relative to this file.",
    )
    keep: Duration = Field(
        30 * 86400.0, description="Run history retention.", json_schema_extra={"default": "30d"}
    )


class FleetModel(_Model):
    """Fleet mode: every host running this spec shares one PostgreSQL database."""

    model_config = ConfigDict(title="Fleet")

    database: Database = Field(
        description="The shared PostgreSQL database, as a libpq URL: postgresql://... or "
        "postgres://... (never printed: it may hold a password)."
    )
    host_id: HostId | None = Field(
        None,
        description="This host's name in the fleet: letters, digits and . _ - (at most 64). "
        "Default: the host name. `poolkeeper run --host-id NAME` overrides it.",
    )
    lease: Lease = Field(
        30.0,
        description="How long a host stays live without renewing its lease (at least 2s): "
        "a dead host's work is taken over after this.",
        json_schema_extra={"default": "30s"},
    )

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        # pydantic's own message would repeat the value: a URL written here may hold a password.
        if not isinstance(data, dict):
            got = "a string" if isinstance(data, str) else describe(data)
            raise Invalid(f"expected a mapping with a database: key, got {got}")
        return data


class ConfigModel(_Model):
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
    pool: PoolModel = Field(
        default_factory=PoolModel, description="The worker processes that run the jobs."
    )
    shutdown: ShutdownModel = Field(
        default_factory=ShutdownModel, description="How SIGTERM drains the pool."
    )
    state: StateModel = Field(
        default_factory=StateModel, description="Where run history is kept, and for how long."
    )
    fleet: FleetModel | None = Field(
        None,
        description="Run this spec on several hosts as one fleet over a shared PostgreSQL "
        "database; without it, the host runs alone.",
    )
    defaults: JobDefaultsModel = Field(
        default_factory=JobDefaultsModel,
        description="Any job key, applied to every job that doesn't set it.",
    )
    jobs: dict[str, JobModel] = Field(default_factory=dict, description="The jobs, by name.")
    # --- metrics (issue 12): kept in this one block, the last field -------------------------
    metrics: MetricsModel | None = Field(
        None,
        description="Prometheus metrics (docs/monitoring.md): the section turns them on "
        "(`poolkeeper metrics` prints them); `listen` and `textfile` expose them.",
    )


# --- metrics (issue 12) ------------------------------------------------------------------------


def _listen(value: Any) -> str:
    """`host:port` with an IP address (IPv6 in brackets), `localhost` or nothing (every
    IPv4 interface) as host: bound as written, no name is looked up."""
    text = _require_str(value, "an address like '127.0.0.1:9108' or '[::1]:9108'")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Invalid(f"'{text}' is not 'address:port' with a port from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    if host in ("", "localhost") and version == 4:
        return text
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.version != version:
        raise Invalid(
            f"'{text}': the address must be an IPv4 address, an IPv6 address in brackets "
            "('[::1]:9108'), 'localhost' or empty (every interface: ':9108')"
        )
    return text


def _absolute_prom_path(value: Any) -> str:
    text = _require_str(value, "an absolute path ending in .prom")
    if not text.startswith("/") or not text.endswith(".prom") or "\0" in text:
        raise Invalid(
            f"'{text}' is not an absolute path ending in .prom (node_exporter's textfile "
            "collector reads only *.prom files)"
        )
    return text


Listen = Annotated[
    str,
    PlainValidator(_listen),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:9108", "[::1]:9108", ":9108"]}),
]
PromPath = Annotated[
    str,
    PlainValidator(_absolute_prom_path),
    WithJsonSchema({"type": "string", "pattern": r"^/.*\.prom$"}),
]


class MetricsModel(_Model):
    """Prometheus metrics of the daemon; exposed by an HTTP listener and/or a textfile."""

    model_config = ConfigDict(title="Metrics")

    listen: Listen | None = Field(
        None, description="Serve /metrics over HTTP at this address, e.g. '127.0.0.1:9108'."
    )
    textfile: PromPath | None = Field(
        None,
        description="Write the metrics to this file for node_exporter's textfile collector "
        "(atomically: a temporary file in the same directory, then a rename).",
    )
    textfile_every: Duration = Field(
        15.0, description="How often the textfile is written.", json_schema_extra={"default": "15s"}
    )
