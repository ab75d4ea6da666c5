"""`status --json`, `history --json`, `next --json` (docs/json.md): every field of each document,
from a real daemon and from the state DB it leaves; `history --since/--outcome`; and the README's
`jq` examples run by a real jq on the real output."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from poolkeeper.state.identity import store_at

README = Path(__file__).parent.parent / "README.md"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

SPEC = """
    pool: {workers: 3, start_method: fork}
    jobs:
      tick: {target: daemon_jobs:ok, every: 100ms}
      bad: {target: daemon_jobs:fail, every: 100ms}
      consume:
        target: daemon_jobs:loop_units
        loop: {replicas: 1}
        kwargs: {out_dir: $OUT}
      yearly: {target: daemon_jobs:ok, cron: "0 0 1 1 *", timezone: Europe/Berlin}
    """

STATUS_KEYS = {"source", "config", "daemon", "jobs"}
DAEMON_KEYS = {"phase", "pid", "message", "workers", "queued", "finished"}
JOB_KEYS = {
    "name",
    "kind",
    "scope",
    "schedule",
    "state",
    "next_fire",
    "running",
    "last_run_id",
    "last_outcome",
    "last_started",
    "last_ended",
    "last_duration",
    "last_error",
}
RUN_KEYS = {
    "job",
    "run_id",
    "attempt",
    "scheduled",
    "started",
    "ended",
    "duration",
    "outcome",
    "exit_code",
    "signal",
    "worker_pid",
    "error",
}
NEXT_KEYS = {"job", "kind", "schedule", "timezone", "fires"}


def pk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "poolkeeper", *args], capture_output=True, text=True, timeout=60
    )


def as_json(*args: str):
    proc = pk(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def epoch(text: str) -> float:
    assert RFC3339.match(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def runs_of(d, job: str) -> list[dict]:
    return [r for r in d.runs() if r["job"] == job]


def test_status_json_from_the_daemon_then_from_the_state_db(daemon_factory):
    d = daemon_factory(SPEC)
    d.wait_log("ready")
    d.wait_for(
        lambda: runs_of(d, "tick") and runs_of(d, "bad") and runs_of(d, "consume"),
        what="every job but yearly to have a run",
    )
    assert pk("pause", "yearly", "-c", str(d.config)).returncode == 0
    doc = as_json("status", "-c", str(d.config))
    assert set(doc) == STATUS_KEYS
    assert (doc["source"], doc["config"]) == ("daemon", str(d.config))
    daemon = doc["daemon"]
    assert set(daemon) == DAEMON_KEYS
    assert (daemon["phase"], daemon["pid"]) == ("running", d.pid)
    assert daemon["message"].startswith("4 jobs, ") and "1 paused" in daemon["message"]
    assert daemon["workers"]["total"] == 3
    assert 1 <= daemon["workers"]["busy"] <= 3  # the loop replica holds one
    assert isinstance(daemon["queued"], int) and daemon["queued"] >= 0
    assert daemon["finished"] >= 2  # tick and bad have ended a run each
    jobs = {job["name"]: job for job in doc["jobs"]}
    assert [job["name"] for job in doc["jobs"]] == ["tick", "bad", "consume", "yearly"]
    for job in doc["jobs"]:
        assert set(job) == JOB_KEYS
        assert job["scope"] == "host"  # no fleet: section: every job runs on this host
    tick, bad, consume, yearly = (jobs[n] for n in ("tick", "bad", "consume", "yearly"))
    assert (tick["kind"], tick["schedule"]) == ("every", "every 100ms")
    assert tick["state"] in ("idle", "running") and tick["running"] in (0, 1)
    assert abs(epoch(tick["next_fire"]) - time.time()) < 30
    assert tick["last_outcome"] == "succeeded" and tick["last_error"] is None
    last_tick = [r for r in runs_of(d, "tick") if r["run_id"] == tick["last_run_id"]]
    assert len(last_tick) == 1  # a run of the history
    assert epoch(tick["last_started"]) <= epoch(tick["last_ended"])
    assert isinstance(tick["last_duration"], float) and tick["last_duration"] >= 0
    assert (bad["last_outcome"], bad["last_error"]) == ("failed", "RuntimeError: boom")
    assert (consume["kind"], consume["schedule"], consume["state"]) == (
        "loop",
        "1 replica(s)",
        "running",
    )
    assert (consume["running"], consume["next_fire"]) == (1, None)
    assert (yearly["kind"], yearly["state"], yearly["next_fire"]) == ("cron", "paused", None)
    assert yearly["schedule"] == "cron '0 0 1 1 *' Europe/Berlin"
    for field in ("last_run_id", "last_outcome", "last_started", "last_ended", "last_duration"):
        assert yearly[field] is None

    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    offline = as_json("status", "-c", str(d.config))
    assert set(offline) == STATUS_KEYS and offline["source"] == "state"
    assert offline["daemon"] == {
        "phase": None,
        "pid": None,
        "message": None,
        "workers": {"busy": None, "total": None},
        "queued": None,
        "finished": None,
    }
    jobs = {job["name"]: job for job in offline["jobs"]}
    for job in offline["jobs"]:
        assert set(job) == JOB_KEYS and (job["state"], job["running"]) == (None, None)
    assert jobs["tick"]["last_outcome"] == "succeeded"
    assert epoch(jobs["tick"]["next_fire"]) > 0  # from the file's schedule
    assert jobs["consume"]["next_fire"] is None and jobs["consume"]["last_outcome"] is not None
    new_year = datetime.fromtimestamp(epoch(jobs["yearly"]["next_fire"]), ZoneInfo("Europe/Berlin"))
    assert (new_year.month, new_year.day, new_year.hour, new_year.minute) == (1, 1, 0, 0)


@pytest.fixture
def recorded(tmp_path):
    """A spec and a state DB with runs of known times and fields: one 2 days old, one ended
    a minute ago, one still running."""
    spec = tmp_path / "jobs.yaml"
    spec.write_text(
        f"version: 1\nstate: {{path: {tmp_path / 'state.db'}}}\njobs:\n"
        "  rollup: {target: os:getcwd, every: 5m}\n"
        "  nightly: {target: os:getcwd, cron: '30 2 * * *', timezone: Europe/Berlin}\n"
        "  ingest: {target: os:getcwd, loop: {replicas: 1}}\n"
    )
    now = time.time()
    store = store_at(tmp_path / "state.db")
    common = {"job": "rollup", "exit_code": None}
    store.run_ended(
        run_id="old",
        attempt=1,
        scheduled_at=now - 2 * 86400,
        started_at=now - 2 * 86400,
        ended_at=now - 2 * 86400 + 0.25,
        outcome="succeeded",
        signal=None,
        worker_pid=10,
        error=None,
        **common,
    )
    store.run_ended(
        run_id="recent",
        attempt=2,
        scheduled_at=1000.0,
        started_at=now - 63,
        ended_at=now - 60,
        outcome="lost",
        signal=9,
        worker_pid=11,
        error="worker died: SIGKILL",
        **common,
    )
    store.run_started(
        run_id="now", job="rollup", attempt=1, scheduled_at=now, started_at=now, worker_pid=12
    )
    store.close()
    return spec, now


def test_history_json_has_every_field_of_every_run(recorded):
    spec, now = recorded
    runs = as_json("history", "-c", str(spec))
    assert [r["run_id"] for r in runs] == ["now", "recent", "old"]  # newest first
    for run in runs:
        assert set(run) == RUN_KEYS
    running, lost, old = runs
    assert running | {"started": None, "scheduled": None} == {
        "job": "rollup",
        "run_id": "now",
        "attempt": 1,
        "scheduled": None,
        "started": None,
        "ended": None,
        "duration": None,
        "outcome": "running",
        "exit_code": None,
        "signal": None,
        "worker_pid": 12,
        "error": None,
    }
    assert abs(epoch(running["started"]) - now) < 0.002
    assert (lost["attempt"], lost["outcome"], lost["signal"], lost["worker_pid"]) == (
        2,
        "lost",
        9,
        11,
    )
    assert lost["scheduled"] == "1970-01-01T00:16:40.000Z"
    assert lost["error"] == "worker died: SIGKILL" and lost["exit_code"] is None
    assert lost["duration"] == pytest.approx(3.0)
    assert abs(epoch(lost["ended"]) - (now - 60)) < 0.002
    assert old["duration"] == pytest.approx(0.25) and old["outcome"] == "succeeded"


def test_history_since_and_outcome_filter_and_refuse_bad_values(recorded):
    spec, _ = recorded
    ids = lambda *a: [r["run_id"] for r in as_json("history", "-c", str(spec), *a)]  # noqa: E731
    assert ids("--since", "1h") == ["now", "recent"]
    assert ids("--since", "30s") == ["now"]
    assert ids("--since", "3d") == ["now", "recent", "old"]
    assert ids("--outcome", "lost") == ["recent"]
    assert ids("--outcome", "running") == ["now"]
    assert ids("--outcome", "succeeded", "--since", "1h") == []
    assert ids("rollup", "--outcome", "succeeded", "-n", "1") == ["old"]
    table = pk("history", "-c", str(spec), "--since", "1h").stdout.splitlines()
    assert [line.split()[4] for line in table[1:]] == ["now", "recent"]  # the table too
    for bad, says in (
        (["--outcome", "broken"], "poolkeeper: --outcome: unknown outcome 'broken' (known: "),
        (["--since", "5"], "poolkeeper: --since: a duration needs a unit, e.g. '5s'"),
        (["--since", "soon"], "poolkeeper: --since: 'soon' is not a duration"),
    ):
        proc = pk("history", "-c", str(spec), *bad)
        assert proc.returncode == 64 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(says), proc.stderr


def test_next_json_lists_fire_times_in_utc(recorded):
    spec, _ = recorded
    doc = as_json("next", "nightly", "-n", "3", "-c", str(spec))
    assert set(doc) == NEXT_KEYS
    assert (doc["job"], doc["kind"], doc["timezone"]) == ("nightly", "cron", "Europe/Berlin")
    assert doc["schedule"] == "cron '30 2 * * *' Europe/Berlin"
    assert len(doc["fires"]) == 3
    local = [datetime.fromtimestamp(epoch(f), ZoneInfo("Europe/Berlin")) for f in doc["fires"]]
    assert all((t.hour, t.minute) == (2, 30) for t in local)
    assert local == sorted(local) and local[0] > datetime.now(UTC)
    loop = as_json("next", "ingest", "-c", str(spec))
    assert (loop["kind"], loop["fires"], loop["timezone"]) == ("loop", [], None)


# The README's examples, as written there (`CONFIG` stands for the spec), run by a real jq.
JQ_EXAMPLES = {
    'poolkeeper status --json -c CONFIG | jq -r \'.jobs[] | select(.last_outcome != "succeeded") '
    "| .name'": "rollup\nnightly\ningest\n",
    "poolkeeper history --json -c CONFIG --since 1h --outcome lost | jq -r '.[] | "
    "[.job, .started, .error] | @tsv'": None,
    "poolkeeper history --json -c CONFIG -n 1000 | jq 'group_by(.outcome) | "
    "map({(.[0].outcome): length}) | add'": '{\n  "lost": 1,\n  "running": 1,\n  "succeeded": 1\n}\n',
    "poolkeeper next nightly --json -c CONFIG | jq -r '.fires[0]'": None,
}


def test_the_readme_jq_examples_work(recorded):
    spec, _ = recorded
    assert shutil.which("jq"), "jq is missing: `make deps` installs it (APT_PACKAGES)"
    readme = README.read_text()
    bin_dir = Path(sys.executable).parent
    for example, expected in JQ_EXAMPLES.items():
        assert example in readme, example
        command = example.replace("CONFIG", str(spec))
        proc = subprocess.run(
            ["bash", "-c", f"set -eo pipefail; PATH={bin_dir}:$PATH; {command}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stderr == "", (example, proc.stderr)
        if expected is not None:
            assert proc.stdout == expected, example
        else:
            assert proc.stdout.strip(), example


def test_status_of_20000_jobs_comes_from_the_daemon(daemon_factory):
    """The status reply of 20,000 jobs is some 3 MB: over the control socket's old 1 MiB,
    `status` fell back to the file and said 'daemon: not reachable'."""
    n = 20_000
    jobs = "".join(f"  j{i}: {{target: daemon_jobs:ok, cron: '0 0 1 1 *'}}\n" for i in range(n))
    d = daemon_factory("pool: {workers: 1, start_method: fork}\njobs:\n" + jobs)
    d.wait_log("ready", timeout=120)
    text = pk("status", "-c", str(d.config))
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"daemon: {n:,} jobs, 0/1 workers busy"), text.stdout[:200]
    assert text.stdout.count("\n") == 2 + n
    # Read by jq, not parsed here: 20,000 jobs as Python objects would grow this process, and
    # the tests that fork workers from it (test_pool_supervision's RSS limits) would see it.
    summary = subprocess.run(
        f"{sys.executable} -m poolkeeper status --json -c {d.config} | jq -c "
        "'[.source, .daemon.pid, (.jobs | length), .jobs[-1].name, .jobs[-1].state]'",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(summary.stdout) == ["daemon", d.pid, n, f"j{n - 1}", "idle"], summary.stderr
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_status_says_why_it_falls_back_when_a_daemon_answers_unusably(recorded, tmp_path):
    """A daemon that is there but whose answer cannot be used (refused, cut, garbled) is
    said on stderr; before, it passed for 'not reachable' (how the 1 MiB bound hid)."""
    spec, _ = recorded
    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b'{"ok": false, "message": "the reply is too big", "exit": 70}\n')

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        proc = pk("status", "--json", "-c", str(spec), "--socket", path)
    finally:
        thread.join(10)
        server.close()
    assert proc.returncode == 0 and json.loads(proc.stdout)["source"] == "state"
    assert proc.stderr == (
        "poolkeeper: the daemon says: the reply is too big; showing the jobs of the file and "
        "the state DB instead\n"
    )
    quiet = pk("status", "--json", "-c", str(spec), "--socket", path)  # nobody listens now
    assert (quiet.returncode, quiet.stderr) == (0, "")
