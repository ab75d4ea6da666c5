"""Fleet mode through real daemons on one real PostgreSQL (what the chaos test does not):
control from any host (pause, resume, run-now, status), a clean stop handing the replicas over
at once, the job's view of its fence. Each host is a `poolkeeper run --host-id`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pg_server
import pytest
from daemon_harness import DaemonProcess

if not os.environ.get("CI"):
    pytest.importorskip("psycopg", reason="psycopg (the `fleet` extra) is not installed")
import psycopg  # noqa: E402

LEASE = "3s"


def _spec(url: str, jobs: str) -> str:
    return f"fleet: {{database: \"{url}\", lease: {LEASE}}}\npool: {{workers: 2}}\n{jobs}"


@pytest.fixture
def fleet(tmp_path):
    """Start hosts on one fresh database: `start(name, jobs) -> DaemonProcess`."""
    url = pg_server.fresh_database()
    hosts: list[DaemonProcess] = []

    def start(name: str, jobs: str) -> DaemonProcess:
        d = DaemonProcess(tmp_path / name, _spec(url, jobs), run_args=("--host-id", name))
        hosts.append(d)
        d.wait_log("fleet: registered as " + name)
        return d

    start.url = url  # type: ignore[attr-defined]
    yield start
    for d in hosts:
        if d.proc.poll() is None:
            d.signal()
            try:
                d.wait_exit()
            finally:
                d.close()
        else:
            d.close()


def _sql(url: str, statement: str, args: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description is not None else []


def _cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "poolkeeper", *args, "-c", str(d.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _runs(d: DaemonProcess) -> list[list[str]]:
    path = d.out / "runs"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


JOBS = """\
jobs:
  tick: {target: "fleet_daemon_jobs:note", every: 200ms, args: ["$OUT"]}
"""


def test_a_fleet_fire_runs_once_with_its_fence_and_pause_from_one_host_holds_everywhere(fleet):
    a = fleet("a", JOBS)
    b = fleet("b", JOBS)
    a.wait_for(lambda: len(_runs(a)) + len(_runs(b)) >= 15, what="15 ticks across the fleet")
    runs = _runs(a) + _runs(b)
    times = [r[1] for r in runs]
    assert len(times) == len(set(times)), "a fire ran twice"
    # the job sees the fire's fence, in ctx and in its environment
    fences = {r[1]: r[2] for r in runs}
    assert all(r[2] == r[3] != "None" for r in runs)
    rows = _sql(fleet.url, "SELECT scheduled, fence FROM pk_fires WHERE state = 'ended'")
    assert {f"{s:.3f}": str(f) for s, f in rows}.items() >= fences.items()

    # pause through a, seen by b; nothing runs anywhere while paused
    assert _cli(a, "pause", "tick").returncode == 0
    b.wait_log("tick: paused across the fleet")
    before = len(_runs(a)) + len(_runs(b))
    # a whole second of fire times (five of them) comes and goes: none is run
    until = time.time() + 1.0
    a.wait_for(lambda: time.time() >= until, what="a second of fire times while paused")
    assert len(_runs(a)) + len(_runs(b)) == before
    assert _sql(fleet.url, "SELECT count(*) FROM pk_fires WHERE state = 'ready'") == [(0,)]
    # resumed through b
    assert _cli(b, "resume", "tick").returncode == 0
    a.wait_for(lambda: len(_runs(a)) + len(_runs(b)) > before + 3, what="runs after resume")


def test_run_now_from_any_host_runs_once_in_the_fleet(fleet):
    jobs = """\
jobs:
  nightly: {target: "fleet_daemon_jobs:note", cron: "0 3 * * *", args: ["$OUT"]}
"""
    a = fleet("a", jobs)
    b = fleet("b", jobs)
    for host in (a, b, a):
        assert _cli(host, "run-now", "nightly").returncode == 0
    a.wait_for(lambda: len(_runs(a)) + len(_runs(b)) >= 3, what="three runs by hand")
    keys = _sql(fleet.url, "SELECT fire_key, state FROM pk_fires")
    assert len(keys) == 3 and all(k.startswith("manual:") and s == "ended" for k, s in keys)
    # the history is the fleet's, the same from every host
    a.wait_for(
        lambda: len(json.loads(_cli(b, "history", "--json").stdout)) == 3,
        what="three runs in the fleet's history",
    )
    from_a = json.loads(_cli(a, "history", "--json").stdout)
    assert sorted(r["run_id"] for r in from_a) == sorted(
        r["run_id"] for r in json.loads(_cli(b, "history", "--json").stdout)
    )
    assert all(r["outcome"] == "succeeded" for r in from_a)


LOOP = """\
jobs:
  hold: {target: "fleet_daemon_jobs:hold", loop: {replicas: 2}, args: ["$OUT"]}
"""


def _holding(d: DaemonProcess) -> set[int]:
    """The replicas running on host `d` now (a killed run's worker is gone with it)."""
    held = set()
    for path in d.out.glob("replica-*"):
        words = path.read_text().split()
        if words and words[0] == "running" and _alive(int(words[1])):
            held.add(int(path.name.split("-")[1]))
    return held


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_replicas_spread_over_hosts_and_a_clean_stop_hands_them_over(fleet):
    a = fleet("a", LOOP)
    a.wait_for(lambda: _holding(a) == {0, 1}, what="a holds both replicas")
    b = fleet("b", LOOP)
    # equal capacity: one each, the move made only after a's run of it ended
    b.wait_for(lambda: len(_holding(b)) == 1 and len(_holding(a)) == 1, what="one each")
    # status from any host lists every host; --json gives each host's fields
    status = _cli(b, "status")
    assert status.returncode == 0, status.stderr
    assert "fleet: 2 live hosts, this is b" in status.stdout
    document = json.loads(_cli(a, "status", "--json").stdout)["fleet"]
    assert document["host_id"] == "a" and document["specs_differ"] is True  # their $OUT differ
    hosts = {h["host_id"]: h for h in document["hosts"]}
    assert set(hosts) == {"a", "b"}
    for h in hosts.values():
        assert set(h) == {
            "incarnation", "host_id", "version", "spec_hash", "pid", "capacity", "busy",
            "started", "lease_until", "live",
        }
        assert h["live"] is True and h["capacity"] == 2 and h["lease_until"].endswith("Z")
    a.signal()
    assert a.wait_exit() == 0
    # a left: b takes a's replica at once (a clean stop ends the lease now)
    b.wait_for(lambda: _holding(b) == {0, 1}, timeout=10, what="b holds both replicas")
    # a is gone from the fleet (it left) and says so when asked without a daemon of its own
    status = _cli(a, "status")
    assert "fleet: 1 live host\n" in status.stdout and "gone" in status.stdout
    epochs = _sql(fleet.url, "SELECT replica, epoch, owner_inc IS NOT NULL FROM pk_slots")
    assert len(epochs) == 2 and all(owned for _, _, owned in epochs)
    assert len({e for _, e, _ in epochs}) == 2


def test_a_host_without_the_database_keeps_host_jobs_and_stops_fleet_replicas(fleet):
    jobs = """\
jobs:
  hold: {target: "fleet_daemon_jobs:hold", loop: {replicas: 1}, args: ["$OUT"]}
  local: {target: "fleet_daemon_jobs:note", every: 200ms, scope: host, args: ["$OUT"]}
"""
    a = fleet("a", jobs)
    a.wait_for(lambda: _holding(a) == {0}, what="a holds the replica")
    # the database refuses this host from now on (its connections ended, new ones refused)
    name = psycopg.conninfo.conninfo_to_dict(fleet.url)["dbname"]
    _sql(pg_server.server().url(), f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    _sql(
        pg_server.server().url(),
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'poolkeeper%%'",
    )
    a.wait_log("fleet: killing 1 fleet runs", timeout=10)
    a.wait_for(lambda: not _holding(a), what="the replica's run killed")
    assert "run killed" in a.log() and "lease expired" in a.log()
    ran = len([r for r in _runs(a) if r[0] == "local"])
    a.wait_for(
        lambda: len([r for r in _runs(a) if r[0] == "local"]) > ran + 3, what="host jobs go on"
    )


def test_a_host_started_with_host_id_keeps_it_across_reloads(fleet):
    a = fleet("a", JOBS)
    a.rewrite(_spec(fleet.url, JOBS + '  tock: {target: "fleet_daemon_jobs:note", every: 1h, args: ["$OUT"]}\n'))
    done = _cli(a, "reload", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    a.wait_log("reload applied")
    status = _cli(a, "status")
    assert "tock" in status.stdout
    assert "fleet: registered as a" in a.log() and "registered as" not in a.log().split("reload applied")[1]


def test_a_fleet_database_with_a_newer_schema_is_refused_in_one_line(tmp_path):
    url = pg_server.fresh_database()
    _sql(url, "CREATE TABLE pk_schema_version (version integer PRIMARY KEY)")
    _sql(url, "INSERT INTO pk_schema_version VALUES (99)")
    d = DaemonProcess(tmp_path, _spec(url, JOBS), run_args=("--host-id", "a"))
    try:
        assert d.wait_exit() == 78
        refused = [line for line in d.log().splitlines() if "schema version 99" in line]
        assert refused and "newer than this poolkeeper's" in refused[0]
        assert "Traceback" not in d.log()
    finally:
        d.close()
