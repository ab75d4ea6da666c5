"""Reload (SIGHUP): a bad file changes nothing; a good one is applied by job name.

The plan is checked on records; the rest with a real daemon, its workers and its state DB.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from poolkeeper.config.settings import Config
from poolkeeper.daemon import reload
from poolkeeper.service import control

LOOP = """
  {name}:
    target: daemon_jobs:loop_units
    loop: {{replicas: 1}}
    kwargs: {{out_dir: $OUT}}{extra}
"""


def loops(
    *names: str, extra: dict[str, str] | None = None, pool: str = "2", method: str = "fork"
) -> str:
    extra = extra or {}
    body = "".join(LOOP.format(name=n, extra=extra.get(n, "")) for n in names)
    return f"pool: {{workers: {pool}, start_method: {method}}}\nshutdown: {{drain_timeout: 5s}}\njobs:{body}"


def running_ids(d) -> dict[str, list[str]]:
    """Run ids by job, in start order, of runs with no outcome yet."""
    out: dict[str, list[str]] = {}
    if "ready" not in d.log():  # before that the state DB may not be there
        return out
    for run in d.runs():
        if run["outcome"] == "running":
            out.setdefault(run["job"], []).append(run["run_id"])
    return out


def reload_and_wait(d, marker: str) -> None:
    seen = d.log().count(marker)
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: d.log().count(marker) > seen, what=f"{marker!r} after SIGHUP")


# -- the plan ---------------------------------------------------------------------------------


def _config(jobs: dict, workers: int = 2, state_path: str = "auto") -> Config:
    job = {
        "target": "m:f", "loop": None, "every": 60.0, "cron": None, "at": None,
        "timezone": None, "before_ready": False, "jitter": 0.0, "timeout": None,
        "heartbeat_timeout": None,
        "retry": {"attempts": 1, "initial": 1.0, "factor": 2.0, "max": 10.0, "jitter": "none"},
        "restart": "always",
        "backoff": {"initial": 1.0, "max": 10.0, "factor": 2.0, "jitter": "none"},
        "overlap": "skip", "max_concurrent": 1, "catchup": "none", "args": [], "kwargs": {},
        "env": {}, "log_runs": "all", "scope": "host", "on_lost": "record", "on_db_loss": "stop",
    }  # fmt: skip
    return Config.from_dict(
        {
            "path": "/x.yaml",
            "pythonpath": [],
            "pool": {
                "workers": workers,
                "start_method": "fork",
                "preload": [],
                "max_runs_per_worker": 0,
                "max_memory_per_worker": 0,
            },  # fmt: skip
            "shutdown": {"drain_timeout": 5.0},
            "state": {"path": state_path, "keep": 86400.0},
            "fleet": None,
            "jobs": {name: {**job, "name": name, **over} for name, over in jobs.items()},
        }
    )


def test_the_plan_compares_jobs_by_name_on_every_setting():
    old = _config({"same": {}, "edited": {}, "gone": {}})
    new = _config({"same": {}, "edited": {"kwargs": {"a": 1}}, "new": {}})
    plan = reload.plan(old, new)
    assert plan == reload.Plan(["new"], ["gone"], ["edited"], ["same"], [])
    assert plan.summary() == (
        "1 job added (new); 1 job removed (gone); 1 job changed (edited); 1 job unchanged"
    )
    assert reload.plan(old, old).changes_anything is False


def test_a_pool_change_changes_every_job():
    old = _config({"a": {}, "b": {}})
    plan = reload.plan(old, _config({"a": {}, "b": {}}, workers=3))
    assert plan == reload.Plan([], [], ["a", "b"], [], ["pool.workers"])


def test_a_new_state_path_is_refused():
    refusal = reload.refusal(_config({}), _config({}, state_path="/elsewhere.db"))
    assert refusal is not None and "restart" in refusal
    assert reload.refusal(_config({}), _config({"a": {}})) is None


# -- a real daemon ----------------------------------------------------------------------------


def test_a_bad_file_changes_nothing_and_says_where(daemon_factory):
    d = daemon_factory(loops("consume"))
    d.wait_for(lambda: running_ids(d).get("consume"), what="the loop's run")
    before = running_ids(d)
    d.rewrite(loops("consume", extra={"consume": "\n    every: 5"}))
    reload_and_wait(d, "reload rejected")
    log = d.log()
    # Every problem, each with its position, as `poolkeeper check` would print them.
    assert f"{d.config}:9:3: job 'consume' sets 'loop' and 'every'" in log
    assert f"{d.config}:13:12: every: a duration needs a unit, e.g. '5s'" in log
    assert "reload rejected: 2 problems; still running the previous config" in log
    units = d.units()
    d.wait_for(lambda: d.units() > units, what="the loop to go on working")
    assert running_ids(d) == before  # the same run: nothing was restarted
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert [(r["job"], r["outcome"]) for r in d.runs()] == [("consume", "succeeded")]


def test_a_good_file_is_applied_by_job_name(daemon_factory):
    d = daemon_factory(loops("keep", "edit", "drop", pool="4"))
    d.wait_for(lambda: len(running_ids(d)) == 3, what="three loops running")
    before = running_ids(d)
    d.rewrite(
        loops("keep", "edit", "fresh", extra={"edit": "\n    heartbeat_timeout: 1m"}, pool="4")
    )
    reload_and_wait(d, "reload applied")
    assert (
        "reload applied: 1 job added (fresh); 1 job removed (drop); 1 job changed (edit); "
        "1 job unchanged"
    ) in d.log()
    d.wait_for(
        lambda: (
            sorted(running_ids(d)) == ["edit", "fresh", "keep"]
            and running_ids(d)["edit"] != before["edit"]
        ),
        what="the new definitions running",
    )
    after = running_ids(d)
    assert after["keep"] == before["keep"]  # untouched
    ended = {r["run_id"]: r["outcome"] for r in d.runs() if r["outcome"] != "running"}
    assert ended == {before["drop"][0]: "succeeded", before["edit"][0]: "succeeded"}
    # The stopped loops returned on their stop event, as in a drain.
    assert (d.out / f"{before['drop'][0]}.returned").exists()
    assert not (d.out / f"{before['keep'][0]}.returned").exists()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert {r["outcome"] for r in d.runs()} == {"succeeded"}


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_pool_change_replaces_the_pool(daemon_factory, method):
    """(Under forkserver the old pool's forkserver goes with it: the suite checks that no
    process is left.)"""
    d = daemon_factory(loops("consume", method=method))
    d.wait_for(lambda: running_ids(d).get("consume"), what="the loop's run")
    first = running_ids(d)["consume"][0]
    d.rewrite(loops("consume", pool="3", method=method))
    reload_and_wait(d, "reload applied")
    d.wait_log(f"pool replaced: 3 workers ({method})")
    d.wait_for(lambda: running_ids(d).get("consume", [first]) != [first], what="a new run")
    old_pid = {r["run_id"]: r["worker_pid"] for r in d.runs()}
    (second,) = running_ids(d)["consume"]
    assert old_pid[second] != old_pid[first]
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert [r["outcome"] for r in d.runs()] == ["succeeded", "succeeded"]


def test_a_removed_job_that_ignores_the_stop_is_killed_after_the_drain_budget(daemon_factory):
    head = """
        pool: {workers: 2, start_method: fork}
        shutdown: {drain_timeout: 500ms}
        jobs:
          other:
            target: daemon_jobs:ok
            every: 1h
        """
    stubborn = """
          stubborn:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
        """
    d = daemon_factory(head + stubborn)
    d.wait_for((d.out / "stubborn.pids").exists, what="the stubborn run")
    d.wait_for(lambda: running_ids(d).get("stubborn"), what="its start in the state DB")
    d.rewrite(head)
    reload_and_wait(d, "reload applied: 1 job removed (stubborn); 1 job unchanged")
    d.wait_for(
        lambda: [r["outcome"] for r in d.runs() if r["job"] == "stubborn"] == ["killed"],
        what="the stubborn run killed",
    )
    assert (
        "1 stopped runs (of jobs reloaded or paused) still running after 0.5s: killing them"
        in d.log()
    )
    [run] = [r for r in d.runs() if r["job"] == "stubborn"]
    assert run["error"] == (
        "killed: still running 0.5s after its job was reloaded or paused (shutdown.drain_timeout)"
    )
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_changed_state_path_is_refused(daemon_factory, tmp_path):
    d = daemon_factory(loops("consume"))
    d.wait_for(lambda: running_ids(d).get("consume"), what="the loop's run")
    d.header = d.header.replace(str(d.db), str(tmp_path / "other.db"))
    d.rewrite(loops("consume"))
    reload_and_wait(d, "reload rejected")
    assert "a running daemon keeps its state database; restart it" in d.log()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not (tmp_path / "other.db").exists()


def test_systemd_hears_reloading_the_verdict_and_ready_again(daemon_factory, tmp_path):
    """RELOADING=1 (with MONOTONIC_USEC), then STATUS= with the verdict, then READY=1: the
    order systemd needs to leave the reloading state with the unit's new status."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(address)
        systemd.settimeout(20)

        def until(prefix: bytes) -> list[bytes]:
            seen = []
            while not seen or not seen[-1].startswith(prefix):
                seen.append(systemd.recv(65536))
            return seen

        d = daemon_factory(loops("consume"), notify_socket=address)
        until(b"READY=1")
        d.rewrite(loops("consume", extra={"consume": "\n    bogus: 1"}))
        d.signal(signal.SIGHUP)
        reloading = until(b"RELOADING=1")[-1]
        assert reloading.split(b"\n")[1].startswith(b"MONOTONIC_USEC=")
        after = until(b"READY=1")
        assert after[-2].startswith(b"STATUS=1 job, ") and (
            f"reload rejected: {d.config}:13:5: unknown key 'bogus'".encode() in after[-2]
        )
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0


def test_a_sighup_during_the_drain_is_ignored(daemon_factory):
    d = daemon_factory("""
        pool: {workers: 1, start_method: fork}
        jobs:
          stubborn:
            target: daemon_jobs:stubborn
            at: startup
            kwargs: {out_dir: $OUT}
        """)
    d.wait_for((d.out / "stubborn.pids").exists, what="the stubborn run")
    d.signal(signal.SIGTERM)
    d.wait_log("draining 1 run in flight")
    d.signal(signal.SIGHUP)
    d.wait_log("SIGHUP while draining: not reloading")
    d.signal(signal.SIGINT)  # fast stop: the stubborn run is killed
    assert d.wait_exit() == 0
    assert [r["outcome"] for r in d.runs()] == ["killed"]


# -- poolkeeper reload --wait, over the control socket -----------------------------------------


def poolkeeper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "poolkeeper", *args], capture_output=True, text=True, timeout=60
    )


def reload_as(uid: int, path: str) -> str:
    """Ask for a reload from a process of another user (a fork that drops to `uid`): the
    reply's message, or the error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                answer = str(control.request(path, {"command": "reload"})["message"])
            except control.ControlError as exc:
                answer = str(exc)
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_reload_wait_reports_the_verdict_and_fails_on_a_rejected_file(daemon_factory):
    d = daemon_factory(loops("consume"))
    d.wait_for(lambda: running_ids(d).get("consume"), what="the loop's run")
    assert stat.S_IMODE(os.stat(f"{d.db}.sock").st_mode) == 0o600

    d.rewrite(loops("consume", extra={"consume": "\n    bogus: 1"}))
    bad = poolkeeper("reload", "--wait", "-c", str(d.config))
    assert bad.returncode == 78, bad
    assert f"{d.config}:13:5: unknown key 'bogus'" in bad.stderr
    assert "reload rejected: 1 problem; still running the previous config" in bad.stderr

    d.rewrite(loops("consume", "more"))
    good = poolkeeper("reload", "--wait", "-c", str(d.config))
    assert (good.returncode, good.stdout) == (
        0,
        "reload applied: 1 job added (more); 1 job unchanged\n",
    )
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not os.path.exists(f"{d.db}.sock")  # removed at exit


def test_reload_without_wait_returns_once_asked(daemon_factory):
    d = daemon_factory(loops("consume"))
    d.wait_log("ready")
    d.rewrite(loops("consume", "more"))
    asked = poolkeeper("reload", "--socket", f"{d.db}.sock")
    assert (asked.returncode, asked.stdout) == (0, f"poolkeeper: reload requested ({d.db}.sock)\n")
    d.wait_log("reload applied: 1 job added (more)")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_reload_with_no_daemon_says_so(tmp_path):
    missing = poolkeeper("reload", "--wait", "--socket", str(tmp_path / "none.sock"))
    assert missing.returncode == 69
    assert "no poolkeeper daemon is listening on" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_control_socket_only_answers_its_own_user(daemon_factory):
    """Two locks: the socket's mode (0600), and the peer's uid checked on every connection."""
    open_dir = tempfile.mkdtemp(prefix="pk-control-", dir="/tmp")  # reachable by `nobody`
    try:
        os.chmod(open_dir, 0o755)
        d = daemon_factory(loops("consume"), db=Path(open_dir) / "state.db")
        d.wait_log("ready")
        sock = f"{d.db}.sock"
        assert "Permission denied" in reload_as(65534, sock)  # the mode stops it
        os.chmod(sock, 0o666)  # with the mode out of the way, the uid check answers
        assert reload_as(65534, sock) == "uid 65534 may not control this daemon"
        assert "reloading" not in d.log()
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


def test_unknown_commands_and_garbage_get_an_answer_not_a_hang(daemon_factory):
    d = daemon_factory(loops("consume"))
    d.wait_log("ready")
    reply = control.request(f"{d.db}.sock", {"command": "explode"})
    assert reply == {
        "ok": False,
        "message": "unknown command 'explode' (known: reload, status, metrics, pause, resume, run-now)",
        "exit": 64,
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(f"{d.db}.sock")
        raw.sendall(b"not json\n")
        assert b"bad request" in raw.recv(4096)
    reply = control.request(f"{d.db}.sock", {"command": "reload"})  # the loop still serves
    assert reply["ok"] and reply["message"] == "reload applied: nothing changed"
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_stale_socket_of_a_killed_daemon_is_replaced(daemon_factory):
    d = daemon_factory(loops("consume"))
    d.wait_log("ready")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert os.path.exists(f"{d.db}.sock")
    again = daemon_factory(loops("consume"))
    again.wait_log("ready")
    assert "no control socket" not in again.log()
    assert poolkeeper("reload", "--wait", "-c", str(again.config)).returncode == 0
    again.signal(signal.SIGTERM)
    assert again.wait_exit() == 0
