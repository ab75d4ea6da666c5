"""Remember the last successful validation of a config, so that a start with the same inputs
skips pydantic.

Validating a job spec means importing pydantic and building its model (~150 ms on a 2-core
machine), which is most of what `systemctl start` waits for before READY=1. The result only
depends on inputs that are cheap to compare, so `run` keeps it, as JSON, in
`$CACHE_DIRECTORY` (the units set `CacheDirectory=`), else `$XDG_CACHE_HOME/poolkeeper`, else
`~/.cache/poolkeeper`. A start uses it only when every input is unchanged:

- the bytes of the config file and of every included file, and the names in `include:`;
- every module file loaded when the targets and `pool.preload` were imported (the job code,
  what it imports, poolkeeper and pydantic themselves), by modification time, size and inode:
  the test CPython applies to its own `.pyc` files, plus the inode;
- the module names each directory on the import path offers (a new module there could
  shadow an old one; other files coming and going, like a state DB's journal, do not count);
- the interpreter, poolkeeper's version, the working directory, the user, the number of
  usable CPUs (`workers: auto`) and the environment, less the variables systemd sets anew for
  every start (INVOCATION_ID, JOURNAL_STREAM, ...).

Anything else, an unreadable or malformed cache file included, is a miss: the config is
validated in full and the entry rewritten. The cache is never needed: a write that fails is
logged and the start goes on, and `run --no-config-cache` (or deleting the file) always
validates in full. `poolkeeper check` always validates in full and never writes here.

What a hit cannot see: a module the jobs import only when they run (it was not imported at
validation either), and inputs outside files and the environment (a data file a module reads
at import). Such a change surfaces as a failed run with its traceback, not as a config error
at start; `poolkeeper check` finds it.
"""

from __future__ import annotations

import gc
import importlib.machinery
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poolkeeper.config.settings import Config

from poolkeeper import __version__
from poolkeeper.config.readfile import TooLarge, read_regular, read_regular_stat

if TYPE_CHECKING:  # the private modules have no stubs; hashlib's sha256 has the same interface
    from hashlib import sha256
else:
    try:  # as random.py does: hashlib loads OpenSSL (~8 ms on the way to READY=1); this does not
        from _sha256 import sha256  # CPython 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # CPython 3.12+
        except ImportError:
            from hashlib import sha256

# 2: jobs as rows of values (_compact); 3: `fleet:`, and each job's scope, on_lost, on_db_loss
FORMAT = 3
# An entry holds the validated config (about 190 bytes a job: 10 MB for 50,000 jobs) and a
# digest per import-path directory. The bound only keeps a broken or foreign file from costing
# the start its memory; it is twice the largest config file read (readfile.MAX_CONFIG_BYTES).
MAX_ENTRY_BYTES = 64 * 1024 * 1024
_SUFFIXES = tuple(importlib.machinery.all_suffixes())

# Set by systemd (or a shell) differently for every start; none changes what an import does.
_PER_INVOCATION = frozenset(
    {
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "SYSTEMD_EXEC_PID",
        "MAINPID",
        "MANAGERPID",
        "NOTIFY_SOCKET",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "OLDPWD",
        "_",
    }
)


class Inputs:
    """What a validation read, filled in by spec.load_config(..., inputs=). (A plain class:
    this module is imported on the way to READY=1, a dataclass costs ~1 ms to build.)"""

    def __init__(self) -> None:
        self.config_files: dict[str, str] = {}  # path -> sha256 of the bytes
        self.include_dir: str | None = None
        self.include_names: list[str] = []
        self.module_files: list[str] = []
        self.search_path: list[str] = []

    def add_config_file(self, path: str, raw: bytes) -> None:
        self.config_files[path] = _digest(raw)


def cache_dir() -> str | None:
    explicit = os.environ.get("CACHE_DIRECTORY")
    if explicit:
        return explicit.split(":")[0]
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "poolkeeper")
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        return os.path.join(home, ".cache", "poolkeeper")
    return None


def entry_path(config_path: str, directory: str) -> str:
    name = _digest(os.path.abspath(config_path).encode())[:20]
    return os.path.join(directory, f"config-{name}.json")


def lookup(config_path: str, directory: str) -> tuple[Config | None, str]:
    """(the cached config, why it holds) on a hit, (None, why not) on a miss. A malformed
    entry is a miss."""
    collecting = gc.isenabled()
    gc.disable()  # as in store()
    try:
        return _lookup(config_path, directory)
    finally:
        if collecting:
            gc.enable()


def _lookup(config_path: str, directory: str) -> tuple[Config | None, str]:
    entry = entry_path(config_path, directory)
    try:
        raw, st = read_regular_stat(entry, MAX_ENTRY_BYTES)
        # It names the code the daemon runs: trust only what this user alone could write.
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None, f"{entry} is not this user's alone"
        saved = json.loads(raw)
    except FileNotFoundError:
        return None, "no cached validation"
    except (OSError, ValueError, TooLarge) as exc:
        return None, f"unreadable cache entry ({exc})"
    try:
        why_not = _changed(saved, config_path)
        if why_not:
            return None, why_not
        _check_shape(saved["config"])
        config = _from_compact(saved["config"])
        return config, f"inputs unchanged since {entry} was written"
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return None, f"malformed cache entry ({type(exc).__name__}: {exc})"


def store(config: Config, inputs: Inputs, directory: str) -> str | None:
    """Write the entry for a config that just passed a full validation. None if written, else
    why not (the start goes on either way)."""
    # As in load_config: the copies of a big config are many objects without cycles, which
    # the cyclic collector would rescan while they are built.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _store(config, inputs, directory)
    finally:
        if collecting:
            gc.enable()


def _store(config: Config, inputs: Inputs, directory: str) -> str | None:

    data = _compact(config.to_json())
    # Compared with ==, in C (repr() of 10,000 jobs took longer than validating them): JSON
    # keeps int, float and bool apart, so what == could confuse it does not change; a NaN
    # (never equal) only means no cache entry.
    if _from_compact(json.loads(json.dumps(data))) != config:
        # e.g. kwargs with integer keys or YAML timestamps: JSON would change them
        return "args or kwargs do not survive JSON unchanged"
    entry = {
        "format": FORMAT,
        "environment": _environment(),
        "config_files": inputs.config_files,
        "include": [inputs.include_dir, inputs.include_names],
        "stats": {path: _stat(path) for path in inputs.module_files},
        "search_path": {path: _module_names(path) for path in inputs.search_path},
        "config": data,
    }
    import tempfile

    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(entry))  # json.dump() to a file encodes in Python: 10x slower
            os.replace(tmp, entry_path(config.path, directory))
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        return f"cannot write to {directory}: {exc.strerror or exc}"
    return None


def _changed(saved: dict[str, Any], config_path: str) -> str | None:
    """Why the saved validation no longer holds, or None."""
    if saved.get("format") != FORMAT:
        return "cache entry of another format"
    if saved["config"]["path"] != os.path.abspath(config_path):
        return "cache entry of another config"
    if saved["environment"] != _environment():
        return "the interpreter, poolkeeper, the user or the environment changed"
    for path, digest in saved["config_files"].items():
        try:
            if _digest(read_regular(path)) != digest:
                return f"{path} changed"
        except (OSError, TooLarge):  # the validation will say why, with the file's name
            return f"{path} cannot be read"
    include_dir, names = saved["include"]
    if include_dir is not None and _yaml_names(include_dir) != names:
        return f"the files in {include_dir} changed"
    for path, stat in saved["stats"].items():
        if _stat(path) != stat:
            return f"{path} changed"
    for path, names in saved["search_path"].items():
        if _module_names(path) != names:
            return f"the modules in {path} changed"
    return None


# The jobs of an entry as rows: [[name, target, ...], ...] under one list of field names, and
# each job's retry, backoff and loop as a row too. json.loads of 10,000 jobs as dicts built
# 30,000 dicts at once (26 MB at the peak of a start that keeps 3); as rows, a dict is built
# for one job at a time.
_RECORDS = ("loop", "retry", "backoff")


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    from poolkeeper.config.settings import Job

    fields = list(Job._fields)
    rows = []
    for job in data.pop("jobs").values():
        row = []
        for field in fields:
            value = job[field]
            if field in _RECORDS and value is not None:
                value = list(value.values())  # in field order: _plain() built it so
            row.append(value)
        rows.append(row)
    data["job_fields"] = fields
    data["job_rows"] = rows
    return data


def _from_compact(data: dict[str, Any]) -> Config:
    from poolkeeper.config.settings import Backoff, Config, Job, Loop, Retry

    fields = data["job_fields"]
    if fields != list(Job._fields):
        raise ValueError("cache entry of other job settings")
    records: dict[str, type[Loop] | type[Retry] | type[Backoff]]
    records = {"loop": Loop, "retry": Retry, "backoff": Backoff}

    def jobs() -> Iterator[tuple[str, dict[str, Any]]]:
        for row in data["job_rows"]:
            job = dict(zip(fields, row, strict=True))
            for field, record in records.items():
                value = job[field]
                if value is not None:
                    job[field] = dict(zip(record._fields, value, strict=True))
            yield job["name"], job

    return Config.from_dict({**data, "jobs": jobs()})


def _check_shape(config: dict[str, Any]) -> None:
    """Raise TypeError unless the settings that start the forkserver have the types of a
    validated config (Config.from_dict() checks no types)."""
    pool = config["pool"]
    if not (
        isinstance(pool["start_method"], str)
        and isinstance(pool["preload"], list)
        and isinstance(config["pythonpath"], list)
        and all(isinstance(p, str) for p in [*pool["preload"], *config["pythonpath"]])
    ):
        raise TypeError("pool settings of the wrong type")


def _environment() -> dict[str, Any]:
    env = sorted((k, v) for k, v in os.environ.items() if k not in _PER_INVOCATION)
    return {
        "python": sys.version,
        "executable": sys.executable,
        "poolkeeper": __version__,
        "cwd": os.getcwd(),
        "uid": os.getuid(),
        "cpus": cpu_count(),
        "env": _digest(json.dumps(env).encode()),
    }


def _yaml_names(directory: str) -> list[str] | None:
    try:
        return included_files(directory)
    except OSError:
        return None


def _module_names(directory: str) -> str | None:
    """A digest of the names of the modules and packages the directory offers to `import`."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return None
    names = set()
    for entry in entries:
        if entry.is_dir():
            if entry.name.isidentifier() and entry.name != "__pycache__":
                names.add(entry.name + "/")
        elif entry.name.endswith(_SUFFIXES):
            names.add(entry.name)
    return _digest("\0".join(sorted(names)).encode())


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _digest(data: bytes) -> str:
    return sha256(data).hexdigest()


def cpu_count() -> int:
    """CPUs this process may run on (honours systemd's CPUAffinity= and taskset): what
    `workers: auto` means. Here, not in model.py, because a cache check must count alike."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def included_files(directory: str) -> list[str]:
    """The names of the files `include:` adds: the directory's *.yaml, sorted, hidden ones left
    out. Raises OSError. Here for the same reason as cpu_count()."""
    return sorted(n for n in os.listdir(directory) if n.endswith(".yaml") and not n.startswith("."))
