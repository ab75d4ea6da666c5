"""Runs `poolkeeper run` as a real process for integration tests and reads what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from poolkeeper.state.identity import store_at

TESTS_DIR = Path(__file__).parent


class DaemonProcess:
    def __init__(
        self,
        tmp_path: Path,
        spec: str,
        *,
        env: dict | None = None,
        keep: str = "30d",
        db: Path | None = None,
        pythonpath: tuple[Path, ...] = (),
        run_args: tuple[str, ...] = (),
        notify_socket: str | None = None,
    ) -> None:
        self.dir = tmp_path
        self.out = tmp_path / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = tmp_path / "poolkeeper.yaml"
        self.db = db or tmp_path / "state.db"
        self.header = (
            f"version: 1\npythonpath: [{', '.join(map(str, (TESTS_DIR, *pythonpath)))}]\n"
            f"state:\n  path: {self.db}\n  keep: {keep}\n"
        )
        self.rewrite(spec)
        self.log_path = tmp_path / "daemon.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        if notify_socket is not None:
            full_env["NOTIFY_SOCKET"] = notify_socket
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolkeeper", "run", str(self.config), "--log-target", "stderr"]
            + list(run_args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    def rewrite(self, spec: str) -> None:
        """Write the config file (what a reload reads): `spec` below the usual header."""
        body = textwrap.dedent(spec).replace("$OUT", str(self.out))
        self.config.write_text(self.header + body)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def units(self) -> int:
        """Units of work that daemon_jobs.loop_units has recorded in $OUT so far."""
        return sum(len(p.read_text().splitlines()) for p in self.out.glob("*.units"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                value = predicate()
                if value:
                    return value
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before {what}:\n{self.log()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        self.wait_for(lambda: text in self.log(), timeout, f"log line {text!r}")

    def signal(self, signum: int = signal.SIGTERM) -> float:
        sent = time.time()
        self.proc.send_signal(signum)
        return sent

    def fast_stop(self, first: int, second: int, draining: str = "draining") -> int:
        """Drain, then a second signal during the drain: a fast stop, which kills the runs
        still in flight. Returns the exit code. Waits for the log line `draining` in between:
        two signals sent at once would merge into one."""
        self.signal(first)
        self.wait_log(draining)
        self.signal(second)
        return self.wait_exit()

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {timeout}s:\n{self.log()}") from None

    def runs(self) -> list[dict]:
        """Every run the daemon has written, by start time (not started yet: first), read
        through the StateStore protocol as `poolkeeper history` reads them."""
        store = store_at(self.db, readonly=True)
        try:
            records = store.history(limit=None)[::-1]  # oldest first
        finally:
            store.close()
        records.sort(key=lambda r: (r.started is not None, r.started or 0.0))
        return [r._asdict() for r in records]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()
