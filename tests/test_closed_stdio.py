"""Started with stdin, stdout or stderr closed, through a real shell (issue 8, finding 11):
the daemon runs, records its runs and exits 0 after a drain; `check` gives its usual verdict.
Closed descriptors become /dev/null first thing, so nothing the daemon opens lands on 0-2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from daemon_harness import TESTS_DIR

from poolkeeper.state.identity import store_at
from poolkeeper.state.store import StateUnreadable

CLOSED = {
    "stdin": "<&-",
    "stdout": ">&-",
    "stderr": "2>&-",
    "all": "<&- >&- 2>&-",
}
FDS = {"stdin": (0,), "stdout": (1,), "stderr": (2,), "all": (0, 1, 2)}


def _spec(tmp_path, body: str) -> str:
    path = tmp_path / "poolkeeper.yaml"
    path.write_text(
        f"version: 1\npythonpath: [{TESTS_DIR}]\nstate:\n  path: {tmp_path / 'state.db'}\n"
        + body
    )
    return str(path)


def _poolkeeper(redirections: str, *args: str, log) -> subprocess.Popen:
    """`exec poolkeeper ARGS REDIRECTIONS` in sh: the shell closes the descriptors, then
    becomes poolkeeper (same pid)."""
    return subprocess.Popen(
        ["sh", "-c", f'exec "$@" {redirections}', "sh", sys.executable, "-m", "poolkeeper", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _runs(db) -> list[tuple[str, str]]:
    try:
        store = store_at(db, readonly=True)  # not created yet: no runs
        try:
            return [(r.run_id, r.outcome) for r in store.history(limit=None)]
        finally:
            store.close()
    except StateUnreadable:  # being created
        return []


def _wait(predicate, proc, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"exited {proc.returncode} before {what}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("closed", list(CLOSED))
def test_run_with_closed_stdio_runs_and_drains(tmp_path, closed):
    config = _spec(tmp_path, "jobs:\n  tick:\n    target: daemon_jobs:ok\n    every: 100ms\n")
    db = tmp_path / "state.db"
    with open(tmp_path / "out.log", "wb") as log:
        proc = _poolkeeper(CLOSED[closed], "run", config, "--log-target", "stderr", log=log)
        try:
            _wait(lambda: [r for r in _runs(db) if r[1] == "succeeded"], proc, "a run")
            for fd in FDS[closed]:  # /dev/null, not the state DB or a socket
                assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == "/dev/null"
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = (tmp_path / "out.log").read_text()
    assert code == 0, output
    runs = _runs(db)
    assert runs and {outcome for _, outcome in runs} == {"succeeded"}, runs
    if closed in ("stdin", "stdout"):  # the log still reaches the open stderr
        assert "drain finished" in output


@pytest.mark.parametrize("closed", list(CLOSED))
@pytest.mark.parametrize("valid", [True, False], ids=["valid", "invalid"])
def test_check_with_closed_stdio(tmp_path, closed, valid):
    body = "jobs:\n  tick:\n    target: daemon_jobs:ok\n    every: 100ms\n"
    config = _spec(tmp_path, body if valid else body.replace("100ms", "soon"))
    with open(tmp_path / "out.log", "wb") as log:
        proc = _poolkeeper(CLOSED[closed], "check", config, log=log)
        code = proc.wait(30)
    output = (tmp_path / "out.log").read_text()
    assert code == (0 if valid else 78), output
    assert "internal error" not in output and "Traceback" not in output, output
