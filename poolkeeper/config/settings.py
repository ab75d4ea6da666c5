"""The validated config as plain immutable records: what the daemon runs.

`loader.py` reads the YAML, validates it with pydantic (which also gives the JSON Schema and the
`file:line:col` messages) and hands back these. They are kept apart from the pydantic models
because the daemon's start must not pay for pydantic (~150 ms on a small machine) when
`validation_cache.py` already holds the result of validating the very same inputs: these
records round-trip through JSON without it. Equality compares every setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from poolkeeper.kinds import JobKind

# NamedTuples rather than frozen dataclasses: the same immutable records, built in ~0.2 ms each
# instead of ~1.3 ms (the daemon creates ~20 record classes on its way to READY=1). No field
# has a default: model.py owns the defaults, and everything here is built from complete data.


class Loop(NamedTuple):
    replicas: int


class Retry(NamedTuple):
    attempts: int
    initial: float
    factor: float
    max: float
    jitter: str


class Backoff(NamedTuple):
    initial: float
    max: float
    factor: float
    jitter: str


class Job(NamedTuple):
    name: str
    target: str
    loop: Loop | None
    every: float | None
    cron: str | None
    at: str | datetime | None  # 'startup' or a datetime (naive = local time)
    timezone: str | None
    before_ready: bool
    jitter: float
    timeout: float | None
    heartbeat_timeout: float | None
    retry: Retry
    restart: str
    backoff: Backoff
    overlap: str
    max_concurrent: int
    catchup: str
    args: list[Any]
    kwargs: dict[str, Any]
    env: dict[str, str]
    log_runs: str  # 'all', 'summary' or 'failures' (poolkeeper.daemon.runlog)
    scope: str  # 'fleet' (once across the fleet) or 'host'; resolved at validation
    on_lost: str  # 'record' or 'retry': a fleet fire whose host died
    on_db_loss: str  # 'stop' or 'keep': a fleet loop replica when the lease cannot be renewed

    @property
    def kind(self) -> JobKind:
        for kind in JobKind:
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a validated job has a schedule")

    @classmethod
    def from_dict(cls, data: dict[str, Any], shared: Shared | None = None) -> Job:
        values = dict(data)
        if values.get("loop") is not None:
            values["loop"] = Loop(**values["loop"])
        values["retry"] = Retry(**values["retry"])
        values["backoff"] = Backoff(**values["backoff"])
        at = values.get("at")
        if isinstance(at, str) and at != "startup":  # a datetime, as to_json wrote it
            values["at"] = datetime.fromisoformat(at)
        if shared is not None:
            values = {key: shared.one(value) for key, value in values.items()}
        return cls(**values)


class Shared:
    """One object for equal settings across jobs: 10,000 jobs written alike hold one
    `"skip"`, one `3600.0`, one default Retry, one empty `env`, not 10,000 of each (a config
    of 10,000 jobs went from 12 to 5 MB). Records are never modified, so sharing is safe; a
    value is shared only with values of its own type (1, 1.0 and True stay apart)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[type, Any], Any] = {}

    def one(self, value: Any) -> Any:
        if isinstance(value, (list, dict)):
            if value:  # args, kwargs, env with something in them: the job's own
                return value
            key: tuple[type, Any] = (type(value), ())
        elif isinstance(value, (str, int, float, tuple)) or value is None:
            key = (type(value), value)
        else:
            return value
        try:
            return self._seen.setdefault(key, value)
        except TypeError:  # a tuple holding a list: not hashable, kept as it is
            return value


class Pool(NamedTuple):
    workers: int
    start_method: str
    preload: list[str]
    max_runs_per_worker: int
    max_memory_per_worker: int


class Shutdown(NamedTuple):
    drain_timeout: float


class State(NamedTuple):
    path: str  # 'auto' or absolute
    keep: float


# Here rather than in model.py: `run --host-id` checks a name without importing pydantic.
HOST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_HOST_ID = re.compile(HOST_ID_PATTERN)


def host_id_ok(name: str) -> bool:
    return bool(_HOST_ID.fullmatch(name))


class Fleet(NamedTuple):
    database: str  # a libpq URL (postgresql:// or postgres://); may hold a password
    host_id: str | None  # None: the host name, resolved at run time
    lease: float

    def __repr__(self) -> str:  # a config printed or logged whole must not show the password
        return (
            f"Fleet(database={redacted_url(self.database)!r}, host_id={self.host_id!r}, "
            f"lease={self.lease!r})"
        )


# The password of a libpq URL: in the user info (up to the authority's last '@') or a query
# parameter. Only for text shown to people; the daemon connects with the URL as written.
_URL_PASSWORD = re.compile(r"^([^:/?#]+://[^:@/?#]*):[^/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


def redacted_url(url: str) -> str:
    """`url` with any password shown as '***', for messages and logs."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))


class Metrics(NamedTuple):
    listen: str | None  # 'host:port', as written (poolkeeper.service.metrics binds it)
    textfile: str | None  # absolute
    textfile_every: float


class Config(NamedTuple):
    path: str  # absolute
    pythonpath: list[str]  # absolute
    pool: Pool
    shutdown: Shutdown
    state: State
    fleet: Fleet | None  # None: a single host, no fleet
    jobs: dict[str, Job]  # in file order, included fragments after the main file
    metrics: Metrics | None  # None: no `metrics:` section, no metrics (issue 12)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """The inverse of to_dict(), and of json.loads(to_json())."""
        return cls(
            path=data["path"],
            pythonpath=list(data["pythonpath"]),
            pool=Pool(**data["pool"]),
            shutdown=Shutdown(**data["shutdown"]),
            state=State(**data["state"]),
            fleet=None if data["fleet"] is None else Fleet(**data["fleet"]),
            jobs=_jobs(data["jobs"]),
            metrics=Metrics(**data["metrics"]) if data.get("metrics") is not None else None,
        )

    def with_host_id(self, host_id: str) -> Config:
        """`run --host-id`: this config with fleet.host_id replaced (it has a fleet section)."""
        assert self.fleet is not None
        return self._replace(fleet=self.fleet._replace(host_id=host_id))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _plain(self)  # a NamedTuple becomes a dict
        return data

    def to_json(self) -> dict[str, Any]:
        """to_dict() with datetimes as ISO strings: what json.dumps takes."""
        data = self.to_dict()
        for job in data["jobs"].values():
            if isinstance(job["at"], datetime):
                job["at"] = job["at"].isoformat()
        return data


def _jobs(
    jobs: Mapping[str, dict[str, Any]] | Iterator[tuple[str, dict[str, Any]]],
) -> dict[str, Job]:
    """`jobs`: name -> settings, or (name, settings) pairs made one at a time."""
    shared = Shared()
    pairs = jobs.items() if isinstance(jobs, Mapping) else jobs
    return {shared.one(name): Job.from_dict(job, shared) for name, job in pairs}


def _plain(value: Any) -> Any:
    """Records as dicts, all the way down (args and kwargs copied as they are)."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {key: _plain(item) for key, item in value._asdict().items()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
