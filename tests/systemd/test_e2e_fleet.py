"""Fleet mode under a real systemd (docs/fleet.md): poolkeeper@a and poolkeeper@b, two members of
one fleet on one PostgreSQL, run a cron fire once between them, share a loop's replicas, and
take each other's replicas over when one is stopped (it drains), SIGKILLed (it dies) or frozen
(the watchdog kills it before its lease can be taken over: no replica runs twice at once).

The database is a real server started here, listening on loopback TCP: the sandbox shares the
host's network namespace but has its own /tmp, where the session's server keeps its socket.
The jobs (e2e_fleet_jobs.py) record into tables of that database; those records, not the
daemon's own view, are what the test checks.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import e2e_support as e2e
import pg_server
import procs
import pytest
from sandbox import Sandbox

from poolkeeper.service import unit as units

JOBS = "e2e_fleet_jobs"
REPLICAS = 2
# Short, to keep the test short: heartbeat and margin are lease/6 (docs/fleet.md, "Timing").
LEASE = 5.0
# WatchdogSec + TimeoutAbortSec < lease - lease/6 (4.2s), as fleet.conf explains; the unit's
# 30s + 45s would let a frozen member outlive its lease.
WATCHDOG = "WatchdogSec=2s\nTimeoutAbortSec=1s\n"
# A takeover is due within lease + heartbeat; the rest is slack for a machine shared with
# other test runs (this is a deadline to wait for, not a measurement: bench/bench_fleet.py).
TAKEOVER = 4 * LEASE


class LoopbackPgServer(pg_server.PgServer):
    """The tests' kind of server (tests/pg_server.py), also listening on 127.0.0.1 at a free
    port; its URLs use TCP."""

    port = 0

    def start(self) -> None:
        super().start()
        assert self.dir is not None and self.pid is not None
        with socket.socket() as probe:  # a free port: the kernel's choice, released at once
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        data = os.path.join(self.dir, "data")
        with open(os.path.join(data, "postgresql.conf"), "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n")
        old = self.pid
        self._run(f"{self.bindir}/pg_ctl", "-D", data, "-l", os.path.join(self.dir, "server.log"),
                  "-m", "fast", "-w", "-t", "60", "restart")  # fmt: skip
        procs.reap_zombies()
        procs.ALLOWED.discard(old)
        with open(os.path.join(data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        procs.ALLOWED.add(self.pid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def fleet_db() -> Iterator[str]:
    """The URL of an empty database on a server of this module's own."""
    server = LoopbackPgServer()
    if why := server.unavailable():  # in CI a failure, as for the session's server
        message = f"the fleet end-to-end test cannot run: {why}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        server.start()
        yield server.fresh_database()
    finally:
        server.stop()


def _sql(dsn: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def _create_job_tables(dsn: str) -> None:
    for statement in (
        "CREATE TABLE e2e_cron (scheduled_at double precision UNIQUE, unit text, fence bigint)",
        "CREATE TABLE e2e_cron_twice (scheduled_at double precision, unit text)",
        "CREATE TABLE e2e_beats (replica int, unit text, fence bigint, at timestamptz)",
    ):
        _sql(dsn, statement)


def _spec(dsn: str) -> str:
    """One spec for both members (a fleet's hosts share it); each gets its host id from its
    instance name (the drop-in's --host-id %i: on one machine both would be the host name)."""
    return e2e.config(
        f"""
        once:
          target: {JOBS}:once
          cron: "* * * * *"
          args: ["{dsn}"]
        beat:
          target: {JOBS}:beat
          loop: {{replicas: {REPLICAS}}}
          args: ["{dsn}"]
        """,
        workers=3,
        drain="5s",
        extra=f"fleet:\n  database: {dsn}\n  lease: {LEASE:g}s\n",
    )


# Two members on one machine: each its own host id, its instance name (both would default to
# the host name).
HOST_ID_FROM_INSTANCE = (
    f"ExecStart=\nExecStart={units.exec_quote(e2e.COMMAND)} run /etc/poolkeeper/%i.yaml"
    " --host-id %i\n"
)


def _install_member(sb: Sandbox, name: str, spec: str) -> str:
    # A SIGKILLed member stays dead, as a crashed host would: no Restart= to bring it back.
    dropin = HOST_ID_FROM_INSTANCE + WATCHDOG + "Restart=no\n"
    unit = e2e.install_instance(sb, name, spec, dropin)
    e2e.keep_loaded(sb, unit)
    return unit


def _placement(dsn: str) -> dict[int, tuple[str, int]]:
    """replica -> (member, fence) of the replicas that beat within the last second."""
    rows = _sql(
        dsn,
        "SELECT DISTINCT ON (replica) replica, unit, fence FROM e2e_beats"
        " WHERE at > now() - interval '1s' ORDER BY replica, at DESC",
    )
    return {int(r): (str(u), int(f)) for r, u, f in rows}


def _wait_placement(
    sb: Sandbox, dsn: str, members: set[str], what: str
) -> dict[int, tuple[str, int]]:
    """Every replica beating, on exactly `members` (each of them runs at least one)."""

    def placed() -> dict[int, tuple[str, int]] | None:
        now = _placement(dsn)
        ok = len(now) == REPLICAS and {u for u, _ in now.values()} == members
        return now if ok else None

    return sb.wait_for(placed, TAKEOVER, what)


def _overlaps(dsn: str) -> list[tuple[object, ...]]:
    """Two runs of one replica beating at once: [first, last beat] of each (replica, fence)
    against every other fence of the replica."""
    return _sql(
        dsn,
        """
        WITH span AS (SELECT replica, fence, unit, min(at) AS first, max(at) AS last
                      FROM e2e_beats GROUP BY replica, fence, unit)
        SELECT x.replica, x.unit, x.fence, y.unit, y.fence FROM span x JOIN span y
          ON x.replica = y.replica AND x.fence < y.fence AND y.first <= x.last
        """,
    )


# Up to a minute for the cron fire, then four takeovers of up to TAKEOVER each.
@pytest.mark.timeout(300)
def test_two_members_share_the_work_and_take_each_others_over(
    systemd_sandbox: Sandbox, fleet_db: str
):
    sb = systemd_sandbox
    dsn = fleet_db
    _create_job_tables(dsn)
    e2e.prepare(sb)
    sb.write_file(f"{e2e.JOBS_DIR}/{JOBS}.py", (e2e.JOBS_SOURCE.parent / f"{JOBS}.py").read_text())
    spec = _spec(dsn)
    a, b = _install_member(sb, "a", spec), _install_member(sb, "b", spec)
    with e2e.running(sb, a, b):
        sb.systemctl("start", a, b)
        both_up = float(_sql(dsn, "SELECT extract(epoch FROM now())")[0][0])
        pk = e2e.COMMAND
        _wait_placement(sb, dsn, {"a", "b"}, "the replicas spread over a and b")

        # A cron fire while both members run: one row, from one of them (the job's UNIQUE
        # constraint would fail a second run, and e2e_cron_twice would hold it).
        sb.wait_for(
            lambda: _sql(dsn, "SELECT unit FROM e2e_cron WHERE scheduled_at >= %s", (both_up,)),
            75,
            "a cron fire (every minute) after both members started",
        )

        # Fleet-wide control from root's shell on one member: status lists both hosts; a pause
        # on a stops the loop on b too, a resume on b brings it back on both.
        for unit in (a, b):
            fleet = json.loads(sb.run(*pk, "status", "--json", "--unit", unit).stdout)["fleet"]
            assert {h["host_id"] for h in fleet["hosts"] if h["live"]} == {"a", "b"}
            assert fleet["specs_differ"] is False
        sb.run(*pk, "pause", "beat", "--unit", a)
        sb.wait_for(lambda: not _placement(dsn), TAKEOVER, "no replica beating after the pause")
        sb.run(*pk, "resume", "beat", "--unit", b)
        before = _wait_placement(sb, dsn, {"a", "b"}, "the replicas back on a and b")

        # A clean stop drains a (its replicas return, exit 0) and b takes them over.
        sb.systemctl("stop", a)
        assert sb.show(a, "Result", "ExecMainStatus") == {
            "Result": "success",
            "ExecMainStatus": "0",
        }
        after = _wait_placement(sb, dsn, {"b"}, "b running every replica after a stopped")
        _assert_fences_grew(before, after, moved_from="a")

        # b dies with everything it ran (SIGKILL to every process of the unit); a, started
        # again, takes its replicas back once b's lease has run out.
        sb.systemctl("start", a)
        before = _wait_placement(sb, dsn, {"a", "b"}, "the replicas spread again")
        sb.systemctl("kill", "-s", "KILL", b)
        after = _wait_placement(sb, dsn, {"a"}, "a running every replica after b was killed")
        _assert_fences_grew(before, after, moved_from="b")

        # a freezes (SIGSTOP to its main process: its workers run on). The watchdog kills the
        # unit, workers included, before b can take a's replicas over: no replica beats twice.
        sb.systemctl("start", b)
        before = _wait_placement(sb, dsn, {"a", "b"}, "the replicas spread once more")
        sb.systemctl("kill", "--kill-who=main", "-s", "STOP", a)
        after = _wait_placement(sb, dsn, {"b"}, "b running every replica after a froze")
        _assert_fences_grew(before, after, moved_from="a")
        assert sb.show(a, "Result")["Result"] == "watchdog"

        sb.systemctl("stop", b)
    assert _overlaps(dsn) == []
    assert _sql(dsn, "SELECT scheduled_at, unit FROM e2e_cron_twice") == []
    fires = _sql(dsn, "SELECT count(*), count(DISTINCT scheduled_at) FROM e2e_cron")
    assert fires[0][0] == fires[0][1] >= 1


def _assert_fences_grew(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], *, moved_from: str
) -> None:
    """A replica that moved runs under a new, larger fencing token (its slot's epoch), so a
    writer that still held the old one can be refused."""
    moved = [r for r, (unit, _) in before.items() if unit == moved_from]
    assert moved
    for replica in moved:
        assert after[replica][1] > before[replica][1], (replica, before, after)


LOCAL_PG = "pk-e2e-postgresql.service"
LOCAL_SOCKET = "/run/pk-e2e-postgresql"  # RuntimeDirectory= of LOCAL_PG


def test_a_member_reaches_a_local_database_by_its_socket_with_peer_authentication(
    systemd_sandbox: Sandbox,
):
    """A host that runs the fleet's database itself (fleet.conf's commented lines): the shipped
    template and fleet.conf, hardened as they are (PrivateUsers=, ProtectSystem=strict), reach
    it over its unix socket, and peer authentication knows the unit's user as `poolkeeper`."""
    sb = systemd_sandbox
    e2e.prepare(sb)
    bindir = pg_server.PgServer().bindir
    assert bindir is not None, "PostgreSQL is not installed (the README's make test installs it)"
    data = "/var/lib/pk-e2e-postgresql"
    sb.run("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "700", data)
    sb.run("runuser", "-u", "postgres", "--", f"{bindir}/initdb", "-D", data, "-U", "postgres",
           "--auth-local=peer", "--auth-host=reject", "--no-sync")  # fmt: skip
    unit = ""
    try:
        # Type=notify: Debian's server speaks sd_notify, so this returns once it accepts.
        sb.run("systemd-run", f"--unit={LOCAL_PG}", "-p", "Type=notify", "-p", "User=postgres",
               "-p", f"RuntimeDirectory={LOCAL_SOCKET.removeprefix('/run/')}",
               f"{bindir}/postgres", "-D", data, "-c", "listen_addresses=",
               "-c", f"unix_socket_directories={LOCAL_SOCKET}", "-c", "fsync=off")  # fmt: skip
        for sql in ("CREATE ROLE poolkeeper LOGIN", "CREATE DATABASE pk OWNER poolkeeper"):
            _local_psql(sb, bindir, "postgres", sql)
        spec = e2e.config(
            "tick:\n  target: e2e_jobs:quick\n  every: 200ms\n",
            extra=f"fleet:\n  database: postgresql:///pk?host={LOCAL_SOCKET}\n",
        )
        unit = e2e.install_instance(sb, "local", spec, HOST_ID_FROM_INSTANCE)
        sb.write_file(f"/etc/systemd/system/{unit}.d/fleet.conf", units.FLEET)
        sb.systemctl("daemon-reload")
        sb.systemctl("start", unit)
        e2e.wait_journal(sb, "fleet: registered as local", "-u", unit)
        e2e.wait_journal(sb, "quick run", "-u", unit, "JOB=tick")
        assert sb.show(unit, "User", "PrivateUsers", "WatchdogUSec") == {
            "User": "poolkeeper",
            "PrivateUsers": "yes",
            "WatchdogUSec": "15s",
        }
        sb.systemctl("stop", unit)  # its runs are written before it exits
        runs = _local_psql(
            sb, bindir, "pk", "SELECT DISTINCT host_id FROM pk_runs WHERE job = 'tick'"
        )
        assert runs.split() == ["local"]
    finally:
        if unit:
            e2e.cleanup(sb, unit)
            sb.run("rm", "-rf", f"/etc/systemd/system/{unit}.d")
        sb.systemctl("stop", LOCAL_PG, check=False)
        sb.systemctl("reset-failed", LOCAL_PG, check=False)
        sb.run("rm", "-rf", data)
        sb.systemctl("daemon-reload")


def _local_psql(sb: Sandbox, bindir: str, database: str, sql: str) -> str:
    """psql as the server's own user, by peer authentication on the local socket."""
    return sb.run("runuser", "-u", "postgres", "--", f"{bindir}/psql", "-h", LOCAL_SOCKET,
                  "-d", database, "-XAtqc", sql).stdout  # fmt: skip
