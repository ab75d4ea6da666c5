"""The validated config as plain frozen dataclasses: what the daemon runs.

`spec.py` reads the YAML, validates it with pydantic (which also gives the JSON Schema and the
`file:line:col` messages) and hands back these. They are kept apart from the pydantic models
because the daemon's start must not pay for pydantic (~150 ms on a small machine) when
`configcache.py` already holds the result of validating the very same inputs: these
dataclasses round-trip through JSON without it. Equality compares every setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

KINDS = ("loop", "every", "cron", "at")


@dataclass(frozen=True, slots=True)
class Loop:
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int = 1
    initial: float = 10.0
    factor: float = 2.0
    max: float = 600.0
    jitter: str = "full"


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 1.0
    max: float = 300.0
    factor: float = 2.0
    jitter: str = "full"


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    target: str
    loop: Loop | None = None
    every: float | None = None
    cron: str | None = None
    at: str | datetime | None = None  # 'startup' or a datetime (naive = local time)
    timezone: str | None = None
    before_ready: bool = False
    jitter: float = 0.0
    timeout: float | None = None
    heartbeat_timeout: float | None = None
    retry: Retry = field(default_factory=Retry)
    restart: str = "always"
    backoff: Backoff = field(default_factory=Backoff)
    overlap: str = "skip"
    max_concurrent: int = 1
    catchup: str = "none"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> Literal["loop", "every", "cron", "at"]:
        for kind in KINDS:
            if getattr(self, kind) is not None:
                return kind  # type: ignore[return-value]
        raise AssertionError("a validated job has a schedule")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        values = dict(data)
        if values.get("loop") is not None:
            values["loop"] = Loop(**values["loop"])
        values["retry"] = Retry(**values["retry"])
        values["backoff"] = Backoff(**values["backoff"])
        at = values.get("at")
        if isinstance(at, str) and at != "startup":  # a datetime, as to_json wrote it
            values["at"] = datetime.fromisoformat(at)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Pool:
    workers: int
    start_method: str = "forkserver"
    preload: list[str] = field(default_factory=list)
    max_runs_per_worker: int = 0
    max_memory_per_worker: int = 0


@dataclass(frozen=True, slots=True)
class Shutdown:
    drain_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class State:
    path: str = "auto"  # 'auto' or absolute
    keep: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class Config:
    path: str  # absolute
    pythonpath: list[str]  # absolute
    pool: Pool
    shutdown: Shutdown
    state: State
    jobs: dict[str, Job]  # in file order, included fragments after the main file

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """The inverse of to_dict(), and of json.loads(to_json())."""
        return cls(
            path=data["path"],
            pythonpath=list(data["pythonpath"]),
            pool=Pool(**data["pool"]),
            shutdown=Shutdown(**data["shutdown"]),
            state=State(**data["state"]),
            jobs={name: Job.from_dict(job) for name, job in data["jobs"].items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> dict[str, Any]:
        """to_dict() with datetimes as ISO strings: what json.dumps takes."""
        data = self.to_dict()
        for job in data["jobs"].values():
            if isinstance(job["at"], datetime):
                job["at"] = job["at"].isoformat()
        return data
