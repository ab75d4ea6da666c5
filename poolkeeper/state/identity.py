"""Who a daemon is, decided from its config (not by a backend): where its state is kept, the
single-instance lock that makes it the only daemon of that state, and where its control
socket listens. And the factory that opens the store of a config (`open_store`), which picks
the backend: SQLite (poolkeeper.state.sqlite), or PostgreSQL (poolkeeper.state.postgres) for
a libpq URL.

    state location   `state.path` resolved (state_location): a file, or ':memory:'
    lock             `<location>.lock`, an flock (InstanceLock); none for ':memory:'
    control socket   $RUNTIME_DIRECTORY/control.sock, else `<location>.sock`; none for
                     ':memory:' outside systemd (socket_path)

These names stay where earlier versions put them: a daemon of this version and a stopped one
of an earlier version lock out each other, and clients find either one's socket.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Any

from poolkeeper.state.store import StateStore

SOCKET_NAME = "control.sock"
MEMORY = ":memory:"


class StateLocked(RuntimeError):
    """Another daemon holds the state DB's lock."""

    def __init__(self, path: str, holder: str, *, verified: bool = True):
        self.path = path
        self.holder = holder
        who = f"pid {holder}" if holder else "another process"
        if holder and not verified:  # a lock file we could only read: maybe not its writer's
            who = f"another process (the lock file names pid {holder}, maybe an earlier one)"
        super().__init__(f"state DB {path} is in use by {who} (one daemon per state DB)")


# --- locations -------------------------------------------------------------------------------


def resolve_path(spec_path: str, config_dir: str | os.PathLike[str]) -> str:
    """Where `state.path` points.

    'auto': `$STATE_DIRECTORY/poolkeeper.db` (the first entry when systemd lists several,
    colon-separated), else `.poolkeeper/state.db` next to the config file. A relative path
    is relative to the config file's directory, like `pythonpath`: the DB (and with it the
    one-daemon lock) must not depend on the directory the daemon was started from.
    """
    if spec_path == MEMORY:
        return spec_path
    if spec_path == "auto":
        state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state_dir:
            return os.path.join(state_dir, "poolkeeper.db")
        return os.path.join(config_dir, ".poolkeeper", "state.db")
    return os.path.join(config_dir, os.path.expanduser(spec_path))  # absolute: kept


def state_location(config: Any) -> str:
    """Where a settings.Config keeps its run history (`state.path` resolved)."""
    return resolve_path(config.state.path, os.path.dirname(config.path))


def socket_at(location: str | None) -> str | None:
    """The control socket of the daemon whose state is at `location`: $RUNTIME_DIRECTORY/
    control.sock, else next to its state database; None when there is neither (state.path
    ':memory:')."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if location is None or location == MEMORY:
        return None
    return location + ".sock"


def socket_path(config: Any) -> str | None:
    """Where the daemon of a (validated) config listens: see socket_at."""
    return socket_at(state_location(config))


def reload_refusal(old: Any, new: Any) -> str | None:
    """Why a daemon running `old` cannot become the daemon of `new` by a reload: its lock,
    store and socket were chosen by `old`'s state.path. None when it can."""
    if old.state.path != new.state.path:
        return (
            f"state.path changed ({old.state.path} -> {new.state.path}): a running daemon "
            "keeps its state database; restart it to apply this (systemctl restart)"
        )
    if old.fleet != new.fleet:
        return (
            f"{_fleet_change(old.fleet, new.fleet)}: a running daemon keeps its place in the "
            "fleet (its database, host id and lease); restart it to apply this (systemctl restart)"
        )
    return None


def _fleet_change(old: Any, new: Any) -> str:
    """What changed in `fleet:`, without the database URL (it may hold a password)."""
    if old is None or new is None:
        return "the fleet: section was " + ("added" if old is None else "removed")
    changed = [f"fleet.{key}" for key in old._fields if getattr(old, key) != getattr(new, key)]
    return f"{' and '.join(changed)} changed"


# --- the store ---------------------------------------------------------------------------


def open_store(
    config: Any, *, log: logging.Logger | None = None, readonly: bool = False
) -> StateStore:
    """The open store of a config: the daemon's (`readonly=False`; take its InstanceLock
    first) or a reader's. Never raises for the daemon's store (see poolkeeper.state.store);
    a reader's raises StateUnreadable."""
    return store_at(state_location(config), log=log, readonly=readonly)


def store_at(
    location: str | os.PathLike[str], *, log: logging.Logger | None = None, readonly: bool = False
) -> StateStore:
    """The open store at `location` (a state_location). The backend is picked here: a libpq
    URL (`postgresql://...`, `postgres://...`) is PostgreSQL, anything else an SQLite file."""
    from poolkeeper.state.sqlite import SqliteStore  # sqlite3: not for the control clients

    place = os.fspath(location)
    if place.startswith(("postgresql://", "postgres://")):
        return _postgres_store(place, log=log, readonly=readonly)
    store = SqliteStore(place, log=log, readonly=readonly)
    store.open()
    return store


def _postgres_store(url: str, *, log: logging.Logger | None, readonly: bool) -> StateStore:
    """PostgreSQL's store; for the daemon, an in-memory one when the database is unusable
    (the contract: the state never stops the jobs), like SQLite's fallback."""
    # psycopg (the `fleet` extra) is imported by this module only: without the extra, a
    # SQLite daemon never needs it.
    from poolkeeper.state.postgres import PostgresStore
    from poolkeeper.state.sqlite import SqliteStore
    from poolkeeper.state.store import StateUnreadable

    store = PostgresStore(url, log=log, readonly=readonly)
    try:
        store.open()
    except StateUnreadable as exc:
        if readonly:
            raise
        (log or logging.getLogger("poolkeeper.state.identity")).error(
            "state DB %s unusable (%s): keeping state in memory; run history will not "
            "survive a restart",
            exc.path,
            exc.reason,
        )
        memory = SqliteStore(MEMORY, log=log)
        memory.open()
        return memory
    return store


# --- the single-instance lock --------------------------------------------------------------


class InstanceLock:
    """One daemon per state location: an flock on `<location>.lock`, released by the kernel
    if the daemon dies. Take it before opening the store, release it after the control
    socket is gone."""

    def __init__(
        self, location: str | os.PathLike[str] | None, log: logging.Logger | None = None
    ) -> None:
        path = None if location is None else os.fspath(location)
        self.location = None if path == MEMORY else path
        self.log = log or logging.getLogger("poolkeeper.state.identity")
        self._fd: int | None = None

    @classmethod
    def of(cls, config: Any, log: logging.Logger | None = None) -> InstanceLock:
        return cls(state_location(config), log)

    def acquire(self) -> None:
        """Take `<location>.lock`. Raises StateLocked when another daemon holds it. flock
        needs no write access: a lock file this process may only read (another user's, a
        read-only state directory) is locked all the same. Only where no lock file exists and
        none can be created does the daemon run unlocked (logged): that location cannot hold a
        persistent DB either."""
        if self.location is None or self._fd is not None:
            return
        lock_path = self.location + ".lock"
        try:
            fd, writable = _open_lock_file(lock_path)
        except OSError as exc:
            self.log.warning(
                "cannot create lock file %s (%s): running without the single-instance lock",
                lock_path,
                exc,
            )
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise StateLocked(self.location, holder, verified=writable) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        else:
            self.log.info(
                "lock file %s is read-only for this process: locked all the same, but the pid "
                "in it is not this daemon's",
                lock_path,
            )
        self._fd = fd

    def release(self) -> None:
        """Idempotent. The lock file stays: unlinking a lock file races with a daemon that
        just opened it."""
        if self._fd is not None:
            os.close(self._fd)  # closing the description releases the flock
            self._fd = None

    def fds(self) -> list[int]:
        """The lock's descriptor, which a worker started by fork must close: a job's helper
        that outlives the daemon would otherwise keep the next daemon out."""
        return [] if self._fd is None else [self._fd]


def _open_lock_file(path: str) -> tuple[int, bool]:
    """(descriptor, writable): read-write, created if need be; else read-only if the file
    exists. O_NONBLOCK: a FIFO put in its place must not block the start."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644), True
    except OSError as exc:
        try:
            return os.open(path, os.O_RDONLY | flags), False
        except OSError:
            raise exc from None
