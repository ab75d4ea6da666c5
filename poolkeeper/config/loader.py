"""`load_config`: the spec file -> a validated `settings.Config`, or `ConfigError` listing every
problem found, each at its `file:line:col`.

The stages, each adding its issues before the next runs: read the file (readfile, yamlload),
validate the top-level sections (model.py), collect the jobs of the file and of `include:`,
merge `defaults:` into each and validate it (rules.py for what takes more than one field), check
pool room for loop replicas, then import targets and bind their arguments (rules.Importer).
messages.py words the errors and places them.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from poolkeeper import exitcodes
from poolkeeper.config import rules
from poolkeeper.config.messages import JobWhere, Where, issue_for
from poolkeeper.config.model import ConfigModel, JobModel
from poolkeeper.config.settings import Config
from poolkeeper.config.validation_cache import Inputs, included_files
from poolkeeper.config.yamlload import (
    Document,
    Issue,
    LoadError,
    describe,
    load_yaml,
    read_config,
)

__all__ = ["ConfigError", "JOB_NAME_PATTERN", "load_config"]

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """The config is invalid (exit_code 78) or cannot be read (66); `issues` says why."""

    def __init__(self, issues: list[Issue], exit_code: int = exitcodes.CONFIG):
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues
        self.exit_code = exit_code


# --- Loading -----------------------------------------------------------------------------------

_SECTIONS = ("pool", "shutdown", "state", "fleet", "defaults", "jobs", "metrics")
# Unicode letters and digits are welcome (`\w` of a str pattern): names travel as UTF-8 in
# journal fields and STATUS=, which python-systemd sends correctly.
JOB_NAME_PATTERN = r"^[^\W_][\w.@-]{0,63}$"
_JOB_NAME = re.compile(JOB_NAME_PATTERN)


def load_config(
    path: str | os.PathLike[str], *, import_targets: bool = True, inputs: Inputs | None = None
) -> Config:
    """Read, validate and resolve a job spec. Raises ConfigError listing every problem found.

    With import_targets, targets and pool.preload modules are imported here (with pythonpath
    applied, and dropped from sys.modules again) and args/kwargs bound to their signatures.
    `inputs`, if given, is filled with what the validation read (for configcache)."""
    # A big spec is millions of objects (nodes, values, positions, models) without cycles:
    # the cyclic collector would walk them again and again as they are built (with 10,000 jobs
    # it cost more than all the rest). They are collected as usual once we return.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _Loading(os.fspath(path), import_targets, inputs or Inputs()).run()
    finally:
        if collecting:
            gc.enable()


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
        # The spec has a `fleet:` section (valid or not): it decides the jobs' default scope.
        self.fleet_mode = False

    def run(self) -> Config:
        doc = self.read_main()
        top = self.validate_top(doc)
        defaults = self.usable_defaults(doc)
        self.fleet_mode = "fleet" in doc.data
        in_defaults = Where(doc, ("defaults",))
        self.issues += rules.scope_issues(
            {"scope": defaults.get("scope")}, self.fleet_mode, in_defaults
        )
        jobs: dict[str, JobModel] = {}
        wheres: dict[str, Where] = {}
        for raw_job in self.collect_jobs(doc, top):
            validated = self.validate_job(raw_job, defaults, in_defaults)
            if validated is not None:
                jobs[raw_job.name], wheres[raw_job.name] = validated
        if top is not None and "pool" not in self.bad_sections:
            replicas = {name: job.loop.replicas if job.loop else None for name, job in jobs.items()}
            self.issues += rules.capacity_issues(replicas, top.pool.workers, wheres)
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
                "fleet": None if top.fleet is None else top.fleet.model_dump(),
                "jobs": {name: self.job_settings(name, job) for name, job in jobs.items()},
                "metrics": top.metrics.model_dump() if top.metrics is not None else None,
            }
        )

    def job_settings(self, name: str, job: JobModel) -> dict[str, Any]:
        settings = job.model_dump()
        settings["name"] = name
        settings["scope"] = rules.resolved_scope(job.scope, self.fleet_mode)
        return settings

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

    def validate_top(self, doc: Document) -> ConfigModel | None:
        """Validate everything but the jobs (done one by one, with defaults merged). Return the
        valid sections (invalid ones replaced by their defaults) for the checks that need them."""
        data = dict(doc.data)
        if isinstance(data.get("jobs"), dict):
            data["jobs"] = {}
        errors = _errors(ConfigModel, data)
        self.bad_sections = {error["loc"][0] for error in errors if error["loc"]}
        self.bad_default_keys = {
            e["loc"][1] for e in errors if e["loc"][:1] == ("defaults",) and len(e["loc"]) > 1
        }
        self.issues += [issue_for(error, Where(doc), ConfigModel) for error in errors]
        valid = {
            k: v
            for k, v in data.items()
            if k in ConfigModel.model_fields and k not in self.bad_sections
        }
        try:
            return ConfigModel.model_validate({**valid, "version": 1})
        except ValidationError:  # cannot happen: every invalid section was left out
            return None

    def collect_jobs(self, doc: Document, top: ConfigModel | None) -> list[_RawJob]:
        sources = [(doc, doc.data.get("jobs"))]
        if top is not None and top.include is not None:
            sources += self.fragments(doc, top.include)
        found: list[_RawJob] = []
        seen: dict[Any, Document] = {}  # job name -> where it is first defined
        for source, jobs in sources:
            for name, raw in (jobs if isinstance(jobs, dict) else {}).items():
                if name in seen:
                    first = seen[name].key_pos(("jobs", name))
                    self.issues.append(
                        Issue.at(
                            source.key_pos(("jobs", name)),
                            f"job '{name}' is already defined at {first.file}:{first.line}:{first.col}",
                        )
                    )
                    continue
                seen[name] = source
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
        self, job: _RawJob, defaults: dict[Any, Any], in_defaults: Where
    ) -> tuple[JobModel, Where] | None:
        name = job.name
        name_ok = bool(_JOB_NAME.fullmatch(name))
        if not name_ok:
            self.issues.append(
                Issue.at(
                    job.doc.key_pos(("jobs", name)),
                    f"job name '{name}': use letters, digits and _ - . @ (at most 64, starting with a letter or digit)",
                )
            )
        if not isinstance(job.raw, dict):
            got = describe(job.raw, job.doc.locs[("jobs", name)].scalar)
            self.issues.append(
                Issue.at(
                    job.doc.key_pos(("jobs", name)),
                    f"job '{name}': expected a mapping with a target and one of loop, every, cron, at, got {got}",
                )
            )
            return None
        merged = rules.merge_defaults(job.raw, defaults)
        where = JobWhere(job.doc, name, in_defaults, {k for k in merged if k not in job.raw})
        shape = rules.job_shape_issues(name, merged, where.merged, where)
        shape += rules.scope_issues(merged, self.fleet_mode, where)
        model, errors = _validate(JobModel, merged)
        self.issues += shape + [issue_for(error, where, JobModel) for error in errors]
        self.calls += rules.call_to_check(
            merged, {error["loc"][0] for error in errors if error["loc"]}, where
        )
        if shape or model is None or not name_ok:
            return None
        return model, where

    def pythonpath(self, top: ConfigModel | None, doc: Document) -> list[str] | None:
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

    def check_imports(self, top: ConfigModel, pythonpath: list[str], doc: Document) -> None:
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
    return _validate(model, data)[1]


def _validate(model: type[_M], data: Any) -> tuple[_M | None, list[Any]]:
    """(the validated model, []) or (None, pydantic's errors): one validation either way."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, exc.errors(include_url=False)
