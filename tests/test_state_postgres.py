"""What the PostgreSQL state backend promises beyond the StateStore contract (which
tests/test_state_contract.py checks against it): a shared database, its migrations, and how
it fails. Against the session's real server (tests/pg_server.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pg_server
import pytest
from state_runs import T0, end

if not os.environ.get("CI"):  # in CI a missing psycopg fails, as a missing server does
    pytest.importorskip("psycopg", reason="psycopg (the `fleet` extra) is not installed")
import psycopg  # noqa: E402

from poolkeeper.state import postgres
from poolkeeper.state.identity import store_at
from poolkeeper.state.postgres import MIGRATION_LOCK, SCHEMA_VERSION, PostgresStore, redact
from poolkeeper.state.sqlite import SqliteStore
from poolkeeper.state.store import StateUnreadable

# Each migration applied once, in order: one row per version.
ALL_VERSIONS = [(v,) for v in range(1, SCHEMA_VERSION + 1)]

@pytest.fixture
def url() -> str:
    return pg_server.fresh_database()


@pytest.fixture
def opened():
    """Every store a test opens is closed at its end."""
    stores = []

    def open_(location: str, **kw):
        s = store_at(location, **kw)
        stores.append(s)
        return s

    yield open_
    for s in stores:
        s.close()


def _sql(url: str, statement: str, args=()):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else None


def test_store_at_picks_postgres_for_a_libpq_url(url, opened):
    assert isinstance(opened(url), PostgresStore)
    assert isinstance(opened(url.replace("postgresql://", "postgres://", 1)), PostgresStore)


def test_a_second_store_on_the_database_sees_the_first_ones_flushed_runs(url, opened):
    first, second = opened(url), opened(url)
    end(first, "a")
    first.set_last_fire("rollup", T0)
    assert second.history() == [] and second.last_fire("rollup") is None  # buffered only
    first.flush(wait=False)
    assert [r.run_id for r in second.history()] == ["a"]
    assert second.last_fire("rollup") == T0
    assert second.last_outcomes()["rollup"].outcome == "succeeded"
    assert second.counts() == {} and second.counts(overall=True) == {"succeeded": 1}


def test_migrations_are_applied_once_when_stores_open_at_once(url, opened):
    # Eight stores on a new database, released together: without the advisory lock their
    # CREATE TABLEs race (a unique violation in pg_type) and some fall back to memory.
    n = 8
    barrier = threading.Barrier(n)
    stores: list[object] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            barrier.wait()
            stores.append(opened(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(isinstance(s, PostgresStore) for s in stores) and len(stores) == n
    assert _sql(url, "SELECT version FROM pk_schema_version ORDER BY 1") == ALL_VERSIONS


def test_migrations_are_applied_once_by_processes_opening_at_once(url):
    # The same across processes (two daemons started at once), each told to go by a line on
    # its stdin so they connect together.
    code = (
        "import sys; from poolkeeper.state.identity import store_at; "
        "from poolkeeper.state.postgres import PostgresStore; sys.stdin.readline(); "
        "s = store_at(sys.argv[1]); print(type(s).__name__); s.close()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [out.strip() for out, _ in outputs] == ["PostgresStore"] * 4, outputs
    assert _sql(url, "SELECT version FROM pk_schema_version ORDER BY 1") == ALL_VERSIONS


def test_migration_waits_for_the_advisory_lock(url, opened):
    # Whoever holds the lock (another store migrating) holds up a store opening a new
    # database; it applies nothing the holder applied.
    with psycopg.connect(url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(opened(url)))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and result == []  # waiting
        holder.rollback()
    t.join(timeout=30)
    assert isinstance(result[0], PostgresStore)


def test_a_newer_schema_is_refused_with_one_line(url, opened, caplog):
    opened(url).close()
    _sql(url, "INSERT INTO pk_schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateUnreadable) as refused:
        opened(url, readonly=True)
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 1} is newer" in message and "\n" not in message
    # The daemon's store: the error logged, the state kept in memory, the database untouched.
    with caplog.at_level(logging.ERROR):
        daemon = opened(url, log=logging.getLogger("pgtest"))
    assert isinstance(daemon, SqliteStore) and daemon.location is None
    (record,) = [r for r in caplog.records if r.name == "pgtest"]
    assert "is newer" in record.getMessage() and "in memory" in record.getMessage()
    assert "\n" not in record.getMessage()
    end(daemon, "x")
    daemon.flush()
    assert _sql(url, "SELECT count(*) FROM pk_runs") == [(0,)]


def test_an_unreachable_server_gives_the_daemon_memory_and_the_reader_an_error(
    tmp_path, opened, caplog
):
    nowhere = f"postgresql://poolkeeper:secret@/db?host={tmp_path}&connect_timeout=2"
    with pytest.raises(StateUnreadable) as refused:
        opened(nowhere, readonly=True)
    assert "secret" not in str(refused.value) and "\n" not in str(refused.value)
    with caplog.at_level(logging.ERROR):
        daemon = opened(nowhere, log=logging.getLogger("pgtest"))
    assert daemon.location is None
    assert any("in memory" in r.getMessage() for r in caplog.records if r.name == "pgtest")
    end(daemon, "x")
    assert [r.run_id for r in daemon.history()] == ["x"]  # the jobs' history, for now


def test_a_reader_of_a_new_database_reads_it_empty_and_creates_nothing(url, opened):
    reader = opened(url, readonly=True)
    assert reader.history() == [] and reader.counts(overall=True) == {}
    assert _sql(url, "SELECT to_regclass('pk_schema_version') IS NULL") == [(True,)]


def test_a_readers_session_is_read_only(url, opened):
    opened(url).close()
    reader = opened(url, readonly=True)
    conn = reader._conn  # the session itself: what a stray write from it would meet
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("DELETE FROM pk_runs")


def test_writes_resume_after_the_connection_is_killed(url, opened, caplog, monkeypatch):
    monkeypatch.setattr(postgres, "RECONNECT_INTERVAL", 0.0)
    store = opened(url, log=logging.getLogger("pgtest"))
    end(store, "before")
    store.flush()
    _sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'poolkeeper' AND datname = current_database()",
    )
    with caplog.at_level(logging.WARNING):
        end(store, "lost-with-the-connection")
        store.flush()  # fails: logged once, its rows lost, the caller not troubled
        end(store, "after")
        store.flush()  # reconnects
    messages = [r.getMessage() for r in caplog.records if r.name == "pgtest"]
    assert sum("write failed" in m for m in messages) == 1
    assert any("work again" in m for m in messages)
    assert [r.run_id for r in store.history()] == ["after", "before"]


def test_location_names_no_password_and_fds_is_the_connection(url, opened):
    assert redact("postgresql://u:pw@h:5/d?sslmode=require&password=pw") == (
        "postgresql://u@h:5/d?sslmode=require"
    )
    store = opened(url)
    assert store.location == url
    (fd,) = store.fds()
    store.close()
    assert store.fds() == []
    del fd


def test_a_sqlite_store_never_imports_psycopg(tmp_path):
    # psycopg is the `fleet` extra: the SQLite default must work without it.
    code = (
        "import sys; from poolkeeper.state.identity import store_at; "
        f"s = store_at({str(tmp_path / 'state.db')!r}); s.close(); "
        "print('psycopg' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
