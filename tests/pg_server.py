"""A real PostgreSQL server for the tests of the PostgreSQL state backend: one per test session,
started on first use (so a session that runs no PostgreSQL test starts none) and stopped at
the end of the session by the `postgres_server` fixture of conftest.py.

As root (Debian 12's `make test`) the server runs as the `postgres` user, through `runuser`:
`pg_ctl` refuses to run as root (which is also why pytest-postgresql cannot be used here). It
listens on a unix socket in its own temporary directory only (listen_addresses=''), never on
a port another server could hold; fsync is off, since the data is thrown away.

`fresh_database()` gives each test an empty database of its own (CREATE DATABASE), dropping
the previous test's first, so the cluster holds one or two at a time.

In CI (`CI` set) a missing server is a failure; elsewhere the tests that need it are skipped,
saying why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import procs
import pytest

SERVER_USER = "postgres"


def _bindir() -> str | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PgServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir: str | None = None
        self.pid: int | None = None
        self._databases: list[str] = []
        self._serial = 0

    def _as_server_user(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SERVER_USER, "--", *argv]
        return list(argv)

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            self._as_server_user(*argv), capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")

    def unavailable(self) -> str | None:
        """Why no server can be started here, or None."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "psycopg (the `fleet` extra) is not installed: make venv installs it"
        if self.bindir is None:
            return "no PostgreSQL server installed (apt-get install postgresql)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                return f"running as root and there is no {SERVER_USER!r} user to run the server"
        return None

    def start(self) -> None:
        assert self.bindir is not None
        # /tmp, not pytest's tmp_path: the server user must reach it, and a unix socket path
        # must stay under 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="poolkeeper-pg-")
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        data = os.path.join(self.dir, "data")
        self._run(
            f"{self.bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"
        )
        # In postgresql.conf rather than `pg_ctl -o`: options given with -o are lost when the
        # server restarts (a later test may restart it).
        with open(os.path.join(data, "postgresql.conf"), "a") as conf:
            conf.write(
                f"listen_addresses = ''\nunix_socket_directories = '{self.dir}'\n"
                "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n"
            )
        self.resume()

    def resume(self) -> None:
        """Start the server on its data directory (first start, or after halt())."""
        assert self.dir is not None
        data = os.path.join(self.dir, "data")
        log = os.path.join(self.dir, "server.log")
        self._run(f"{self.bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start")
        # pg_ctl's shell exits once the server is up: the postmaster is then re-parented to
        # pytest (a subreaper, see procs.py), which must not count it as a test's leftover.
        with open(os.path.join(data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        procs.ALLOWED.add(self.pid)

    def halt(self) -> None:
        """Stop the server (`pg_ctl stop -m fast`: sessions are cut) and keep its data, for a
        test of a database outage; resume() starts it again."""
        assert self.dir is not None and self.pid is not None
        data = os.path.join(self.dir, "data")
        self._run(f"{self.bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        while self.pid in procs.children():  # pg_ctl -w returns once postmaster.pid is gone
            procs.reap_zombies()
            time.sleep(0.01)
        procs.reap_zombies()
        procs.ALLOWED.discard(self.pid)
        self.pid = None

    def stop(self) -> None:
        if self.dir is None:
            return
        data = os.path.join(self.dir, "data")
        try:
            if self.pid is not None:
                self._run(f"{self.bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.pid in procs.children():
                    procs.reap_zombies()
                    time.sleep(0.02)
                procs.reap_zombies()
        finally:
            if self.pid is not None:
                procs.ALLOWED.discard(self.pid)
                if self.pid in procs.children():  # pg_ctl failed: don't leave it running
                    procs.kill_all([self.pid])
            self.pid = None
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def url(self, database: str = "postgres") -> str:
        assert self.dir is not None
        return f"postgresql://postgres@/{database}?host={self.dir}"

    def admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(statement)

    def fresh_database(self) -> str:
        """The URL of a new, empty database; the previous ones are dropped (their tests have
        closed their stores by now; FORCE ends any session a test left open)."""
        while self._databases:
            self.admin(f"DROP DATABASE IF EXISTS {self._databases.pop()} WITH (FORCE)")
        self._serial += 1
        name = f"t{os.getpid()}_{self._serial}"
        self.admin(f"CREATE DATABASE {name}")
        self._databases.append(name)
        return self.url(name)


_server: PgServer | None = None


def server() -> PgServer:
    """The session's server, started on first use (or the test skipped: see the module)."""
    global _server
    if _server is None:
        candidate = PgServer()
        why = candidate.unavailable()
        if why is not None:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL tests cannot run: {why}", pytrace=False)
            pytest.skip(f"PostgreSQL tests: {why}")
        _server = candidate
        try:
            _server.start()
        except BaseException:
            _server.stop()
            raise
    if _server.pid is None:
        pytest.fail("the test session's PostgreSQL server failed to start earlier", pytrace=False)
    return _server


def fresh_database() -> str:
    return server().fresh_database()


def stop() -> None:
    """The end of the session: stop the server if one was started, remove its directory."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None
