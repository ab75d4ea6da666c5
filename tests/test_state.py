"""The SQLite backend on real files (tmp_path), no mocks: what is SQLite's own (WAL, batches,
corruption, files it may not write, readers of another user) and the single-instance lock.
What every backend promises is in test_state_contract.py."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from state_runs import T0, end, start

from poolkeeper.state.identity import InstanceLock, StateLocked, resolve_path
from poolkeeper.state.sqlite import SCHEMA_VERSION, SqliteStore


@pytest.fixture
def store(tmp_path):
    lock = InstanceLock(tmp_path / "state.db")
    lock.acquire()
    s = SqliteStore(tmp_path / "state.db")
    s.open()
    yield s
    s.close()
    lock.release()



def rows_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def test_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    s.open()
    start(s, "r1")
    end(s, "r1", outcome="failed", exit_code=3, error="ValueError: boom")
    start(s, 2, job="nightly", at=T0 + 10)
    s.set_last_fire("nightly", T0 + 10)
    s.close()

    s = SqliteStore(path)
    s.open()
    assert s.persistent
    newest, oldest = s.history()
    assert (newest.run_id, newest.job, newest.outcome, newest.ended) == (
        "2",
        "nightly",
        "running",
        None,
    )
    assert oldest.job == "rollup" and oldest.outcome == "failed" and oldest.exit_code == 3
    assert oldest.error == "ValueError: boom" and oldest.worker_pid == 4242
    assert oldest.started == T0 and oldest.ended == T0 + 1 and oldest.duration == 1
    assert s.last_fire("nightly") == T0 + 10 and s.last_fire("rollup") is None
    assert [r.run_id for r in s.history("rollup")] == ["r1"]
    s.close()


def test_schema_is_versioned_and_in_wal_mode(store):
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writes_are_buffered_until_flush_or_batch(tmp_path):
    path = tmp_path / "state.db"
    s = SqliteStore(path, batch=100)
    s.open()
    for i in range(99):
        start(s, i)
    assert rows_on_disk(path) == 0  # nothing written yet: cheap calls
    start(s, 99)  # the 100th fills the batch
    assert rows_on_disk(path) == 100
    for i in range(50):
        end(s, i)
    assert rows_on_disk(path) == 100
    s.flush()
    with sqlite3.connect(path) as conn:
        done = conn.execute("SELECT count(*) FROM runs WHERE outcome='succeeded'").fetchone()[0]
    assert done == 50
    s.close()


def test_many_tiny_runs_are_fast(store):
    import time

    t = time.perf_counter()
    for i in range(20_000):
        start(store, i)
        end(store, i)
    store.flush()
    assert time.perf_counter() - t < 3.0
    assert store.counts() == {"succeeded": 20_000}


def test_corrupt_file_is_moved_aside_and_a_new_db_works(tmp_path, caplog):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not an sqlite database, just garbage " * 100)
    s = SqliteStore(path)
    with caplog.at_level(logging.ERROR, logger="poolkeeper.state.sqlite"):
        s.open()
    assert s.persistent
    aside = list(tmp_path.glob("state.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "corrupt" in caplog.text
    start(s, 1)
    end(s, 1)
    assert [r.run_id for r in s.history()] == ["1"]
    s.close()
    assert rows_on_disk(path) == 1


def test_unwritable_location_falls_back_to_memory(tmp_path, caplog):
    # Tests run as root, so a chmod'ed dir would still be writable: put the DB under a FILE.
    (tmp_path / "afile").write_text("")
    s = SqliteStore(tmp_path / "afile" / "db")
    with caplog.at_level(logging.WARNING, logger="poolkeeper.state.sqlite"):
        InstanceLock(s.path).acquire()  # can't create the lock file either: logged, not fatal
        s.open()
    assert not s.persistent
    assert "in memory" in caplog.text and "lock" in caplog.text
    start(s, 1)
    end(s, 1)
    s.set_last_fire("rollup", T0)
    assert [r.outcome for r in s.history()] == ["succeeded"]
    assert s.last_fire("rollup") == T0
    assert s.mark_abandoned(T0) == 0 and s.prune(1, T0 + 100) == 0
    s.close()


def test_newer_schema_is_left_alone(tmp_path, caplog):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    s = SqliteStore(path)
    with caplog.at_level(logging.ERROR, logger="poolkeeper.state.sqlite"):
        s.open()
    assert not s.persistent and "newer" in caplog.text
    s.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_write_errors_are_logged_once_and_never_raise(tmp_path, caplog):
    path = tmp_path / "state.db"
    s = SqliteStore(path, batch=10)
    s.open()
    with sqlite3.connect(path) as conn:  # someone breaks the table under us
        conn.execute("DROP TABLE runs")
    with caplog.at_level(logging.ERROR, logger="poolkeeper.state.sqlite"):
        for i in range(100):  # ten failing batches
            start(s, i)
        s.flush()
    failures = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1
    s.close()


def test_db_overwritten_under_us_does_not_stop_writes(tmp_path, caplog):
    path = tmp_path / "state.db"
    s = SqliteStore(path, batch=5)
    s.open()
    start(s, "before")
    s.flush()
    s._conn.close()  # drop SQLite's cached pages, as if a long time had passed
    s._conn = sqlite3.connect(path, check_same_thread=False)
    path.write_bytes(b"\x00garbage" * 4096)
    with caplog.at_level(logging.ERROR, logger="poolkeeper.state.sqlite"):
        for i in range(20):
            start(s, i)
            end(s, i)
        s.flush()
    assert "write failed" in caplog.text
    # Recovered onto a fresh file (the bad one moved aside): later writes land on disk.
    assert s.persistent and list(tmp_path.glob("state.db.corrupt-*"))
    end(s, "after")
    s.close()
    assert rows_on_disk(path) >= 1


def _lock_holder(lock_path: Path) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"%d\\n" % os.getpid())
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_held_by_another_process_raises_state_locked(tmp_path):
    path = tmp_path / "state.db"
    holder = _lock_holder(Path(str(path) + ".lock"))
    try:
        with pytest.raises(StateLocked) as info:
            InstanceLock(path).acquire()
        assert info.value.holder == str(holder.pid)
        assert str(holder.pid) in str(info.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # Released by the holder's exit: now we get it, and write our pid.
    s = InstanceLock(path)
    s.acquire()
    assert Path(str(path) + ".lock").read_text().strip() == str(__import__("os").getpid())
    s.release()


def test_second_store_in_process_is_locked_out_until_close(tmp_path):
    a = InstanceLock(tmp_path / "state.db")
    a.acquire()
    with pytest.raises(StateLocked):
        InstanceLock(tmp_path / "state.db").acquire()
    a.release()
    b = InstanceLock(tmp_path / "state.db")
    b.acquire()
    b.release()


def test_concurrent_reader_sees_consistent_snapshots(store):
    start(store, 1)
    store.flush()
    reader = sqlite3.connect(store.path, timeout=0.5)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
        for i in range(2, 500):  # the store writes while the reader's transaction is open
            start(store, i)
        store.flush()
        assert not store._failing
        assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 1  # its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 499
    finally:
        reader.close()


def test_readonly_store_reads_a_live_db_and_tolerates_a_missing_one(store, tmp_path, caplog):
    start(store, 1)
    end(store, 1)
    store.flush()
    ro = SqliteStore(store.path, readonly=True)
    ro.open()
    assert [r.run_id for r in ro.history()] == ["1"]
    ro.close()
    missing = SqliteStore(tmp_path / "nope.db", readonly=True)
    with caplog.at_level(logging.WARNING, logger="poolkeeper.state.sqlite"):
        missing.open()
    assert missing.history() == [] and caplog.text == ""
    assert not (tmp_path / "nope.db").exists()
    missing.close()


def test_resolve_path(tmp_path, monkeypatch):
    cfg = tmp_path / "etc"
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert resolve_path("auto", cfg) == str(cfg / ".poolkeeper" / "state.db")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/poolkeeper:/var/lib/other")
    assert resolve_path("auto", cfg) == "/var/lib/poolkeeper/poolkeeper.db"
    assert resolve_path("data/s.db", cfg) == str(cfg / "data" / "s.db")
    assert resolve_path("/abs/s.db", cfg) == "/abs/s.db"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("~/s.db", cfg) == str(tmp_path / "s.db")


def test_memory_path(tmp_path):
    InstanceLock(":memory:").acquire()
    s = SqliteStore(":memory:")
    s.open()
    end(s, 1)
    assert len(s.history()) == 1 and not s.persistent
    s.close()


# -- State files this daemon may not write: still one daemon, and the documented fallback ----

NOBODY = 65534
DEADLINE = 60.0


# The daemon as an unprivileged user: root would write anything.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def nobody_reaches_the_checkout() -> Iterator[None]:
    """Let `nobody` import poolkeeper and its venv: search permission (o+x, never read) on
    every directory above the checkout and the interpreter that lacks it, for the test only.
    A clone made in `mktemp -d` (0700) is otherwise out of nobody's reach, and the daemon run
    as nobody dies with "No module named poolkeeper" before it tests anything."""
    import poolkeeper

    changed: list[tuple[Path, int]] = []
    targets = {Path(poolkeeper.__file__).resolve().parent.parent, Path(sys.prefix).resolve()}
    for target in targets:
        for directory in [*reversed(target.parents), target]:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH and all(d != directory for d, _ in changed):
                os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((directory, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)


class _Daemon:
    """`poolkeeper run` in the foreground, as `argv_prefix` + the command, logging to a file."""

    def __init__(self, spec: Path, name: str, argv_prefix: list[str]) -> None:
        self.log_path = spec.parent / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*argv_prefix, sys.executable, "-m", "poolkeeper", "run", str(spec)]
                + ["--no-config-cache", "--log-target", "stderr"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} (exit {self.proc.poll()}):\n{self.log()}")
            time.sleep(0.02)

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {DEADLINE}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(DEADLINE)


def _read_only_mount(directory: Path) -> list[str]:
    """A command prefix: run in a private mount namespace where `directory` is read-only."""
    mount = f'mount --bind -o ro {directory} {directory} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]


SETUPS = {
    # (owner of the directory, the command prefix the daemons run under)
    "another user's files": ("root", lambda d: AS_NOBODY),
    "another user's files in its own directory": ("nobody", lambda d: AS_NOBODY),
    "a read-only mount": ("root", _read_only_mount),
}


@pytest.mark.skipif(os.getuid() != 0, reason="runs the daemon as another user: needs root")
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.usefixtures("nobody_reaches_the_checkout")
def test_state_files_it_cannot_write_still_lock_and_fall_back_to_memory(setup: str) -> None:
    """A restart that finds the state files unwritable (they belong to another user, or the
    state directory went read-only) must still be the only daemon of its spec, and keep state
    in memory as documented, with one clear error line, instead of a read-only DB on which
    every write fails."""
    directory = Path(tempfile.mkdtemp(prefix="pk-state-", dir="/tmp"))  # reachable by nobody
    daemons: list[_Daemon] = []
    try:
        os.chmod(directory, 0o755)
        db = directory / "state.db"
        lock = InstanceLock(db)  # what an earlier daemon (as root) left behind
        lock.acquire()
        earlier = SqliteStore(db)
        earlier.open()
        end(earlier, "earlier run")
        earlier.close()
        lock.release()
        owner, how = SETUPS[setup]
        if owner == "nobody":
            os.chown(directory, NOBODY, NOBODY)
        spec = directory / "spec.yaml"
        spec.write_text(
            "version: 1\nstate: {path: state.db}\n"
            "jobs:\n  tick:\n    target: os:getcwd\n    every: 1h\n"
        )
        argv_prefix = how(directory)
        first = _Daemon(spec, "first", argv_prefix)
        daemons.append(first)
        first.wait_log("run succeeded")

        second = _Daemon(spec, "second", argv_prefix)
        daemons.append(second)
        assert second.wait_exit() == 75, second.log()
        assert f"state DB {db} is in use by" in second.log()

        first.proc.send_signal(signal.SIGTERM)
        assert first.wait_exit() == 0, first.log()
        log = first.log()
        assert "without the single-instance lock" not in log
        assert log.count("keeping state in memory") == 1, log
        assert "write failed" not in log
        assert rows_on_disk(db) == 1  # the earlier daemon's run; this one's stayed in memory
    finally:
        for daemon in daemons:
            daemon.kill()
        shutil.rmtree(directory)


@pytest.mark.skipif(os.getuid() != 0, reason="reads as another user: needs root")
@pytest.mark.usefixtures("nobody_reaches_the_checkout")
def test_another_user_reads_the_history_of_a_stopped_daemon() -> None:
    """Reading a WAL database creates its -shm file: a user who may not write the directory
    still reads a stopped daemon's history (not an error, nor an empty table)."""
    directory = Path(tempfile.mkdtemp(prefix="pk-state-", dir="/tmp"))  # reachable by nobody
    try:
        os.chmod(directory, 0o755)
        lock = InstanceLock(directory / "state.db")
        lock.acquire()
        earlier = SqliteStore(directory / "state.db")
        earlier.open()
        end(earlier, "earlier-run", error="it broke")
        earlier.close()
        lock.release()
        spec = directory / "spec.yaml"
        spec.write_text(
            "version: 1\nstate: {path: state.db}\n"
            "jobs:\n  rollup:\n    target: os:getcwd\n    every: 1h\n"
        )
        proc = subprocess.run(
            [*AS_NOBODY, sys.executable, "-m", "poolkeeper", "history", "-c", str(spec)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert proc.returncode == 0, proc.stderr
        assert "earlier-run" in proc.stdout and "it broke" in proc.stdout
        assert not list(directory.glob("state.db-*"))
    finally:
        shutil.rmtree(directory)


def test_a_reader_opens_a_path_with_uri_characters(tmp_path) -> None:
    path = tmp_path / "odd?name#with%20chars.db"
    s = SqliteStore(path)
    s.open()
    end(s, "r1")
    s.close()
    ro = SqliteStore(path, readonly=True)
    ro.open()
    assert [r.run_id for r in ro.history()] == ["r1"]
    ro.close()
