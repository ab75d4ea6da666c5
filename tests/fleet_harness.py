"""A fleet of real `poolkeeper run` daemons on one PostgreSQL database, and the faults the
chaos test and bench/bench_fleet.py inflict on it.

Each daemon has a directory of its own (its spec, its state.path, so its own control socket
next to it, its log), runs `--host-id <name>` in a session of its own, and has
$FLEET_TEST_HOST set for its workers (tests/fleet_jobs.py records it). Faults:

- kill(): SIGKILL of the daemon alone, as a crash does (or the OOM killer). Its workers are in process groups of
  their own (they die with the daemon, by its pidfd); the harness knows their pids from
  before the kill and waits for them (pytest is their subreaper), SIGKILLing any that
  outlive a grace period: `kill()` returns them, so a test can say so.
- freeze()/thaw(): SIGSTOP/SIGCONT of the daemon alone: its workers keep running, as they
  do when a daemon's main process hangs (a paused VM would freeze them too: the milder case).
- terminate_backends(): pg_terminate_backend of every session on the database but ours.
- PgServer.halt()/resume() (tests/pg_server.py): the server stopped and started again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import procs

TESTS_DIR = Path(__file__).parent
HOST_ENV = "FLEET_TEST_HOST"  # fleet_jobs.HOST_ENV (not imported: it needs psycopg)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (by parent pid, read from /proc)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    raw = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _gone(pid: int) -> bool:
    """Whether `pid` has exited (reaping it if it is our zombie child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    except ChildProcessError:
        pass  # not our child (yet): look in /proc
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] == b"Z"
    except OSError:
        return True


def fleet_spec(
    url: str,
    *,
    lease: float | None = 5.0,
    workers: int = 5,
    every: str | None = "200ms",
    cron: bool = False,
    replicas: int = 0,
) -> str:
    """The spec of the chaos test and the bench (below FleetDaemon's header): `tick`, an
    interval job, `minute`, a cron job every minute, `spin`, a loop of `replicas`, each
    recording itself (tests/fleet_jobs.py) in the database at `url`; no `fleet:` section when
    `lease` is None (a single host)."""
    db = f'kwargs: {{db: "{url}"}}'
    lines = [f"pool: {{workers: {workers}}}"]
    if lease is not None:
        lines.append(f'fleet: {{database: "{url}", lease: {lease}s}}')
    lines.append("jobs:")
    if every is not None:
        lines.append(
            f"  tick: {{target: fleet_jobs:record_fire, every: {every}, timeout: 5s,"
            f" log_runs: failures, {db}}}"
        )
    if cron:  # catchup: a minute that fell in an outage runs when it is over
        lines.append(
            f'  minute: {{target: fleet_jobs:record_fire, cron: "* * * * *", catchup: once, {db}}}'
        )
    if replicas:
        lines.append(
            f"  spin: {{target: fleet_jobs:replica_loop, loop: {{replicas: {replicas}}}, {db}}}"
        )
    return "\n".join(lines) + "\n"


class FleetDaemon:
    def __init__(self, root: Path, host: str, spec: str, *, env: dict[str, str] | None = None):
        self.host = host
        self.dir = root / host
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "poolkeeper.yaml"
        self.state = self.dir / "state.db"
        header = (
            f"version: 1\npythonpath: [{TESTS_DIR}]\nstate:\n  path: {self.state}\n  keep: 30d\n"
        )
        body = textwrap.dedent(spec)
        self.config.write_text(header + body)
        self.fleet = "\nfleet:" in "\n" + body  # --host-id is refused without a fleet: section
        self.log_path = self.dir / "daemon.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", HOST_ENV: host, **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.since = 0  # where the log of the current start begins

    def start(self) -> None:
        """Start (or start again: the log is appended to) the daemon."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.since = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"--- harness: start #{self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poolkeeper", "run", str(self.config)]
                + ["--log-target", "stderr"]
                + (["--host-id", self.host] if self.fleet else []),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.dir,  # not the caller's: `python -m` puts the cwd first on sys.path
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0, after: int | None = None) -> float:
        """Wait for `text` in the log past offset `after` (default: since the last start)."""
        offset = self.since if after is None else after
        return wait_until(
            lambda: text in self.log_path.read_bytes()[offset:].decode(errors="replace"),
            timeout,
            f"{self.host}: log line {text!r}",
            alive=[self],
        )

    def kill(self, grace: float = 5.0) -> set[int]:
        """SIGKILL the daemon (a crash). Returns the workers still alive `grace` seconds
        later (then SIGKILLed by the harness): none, if they die with their daemon."""
        assert self.proc is not None
        below = descendants(self.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + grace
        left = {p for p in below if not _gone(p)}
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = {p for p in left if not _gone(p)}
        if left:
            procs.kill_all(list(left))
        return left

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30.0, *, signalled: bool = False) -> int:
        """SIGTERM (a drain, as systemctl stop) and wait for the exit code."""
        assert self.proc is not None
        if not signalled:  # a second SIGTERM would make the drain a fast stop
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.host} did not drain within {timeout}s") from None

    def close(self) -> None:
        """Whatever is left of this daemon and its workers: killed and reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)  # a frozen daemon cannot even die
            except ProcessLookupError:
                pass
            self.kill()


class Fleet:
    """N daemons on one spec (the body below the header: pool, fleet, jobs)."""

    def __init__(self, root: Path, spec: str, hosts: list[str], **kw: Any) -> None:
        self.daemons = {h: FleetDaemon(root, h, spec, **kw) for h in hosts}

    def __getitem__(self, host: str) -> FleetDaemon:
        return self.daemons[host]

    def start(self) -> None:
        for d in self.daemons.values():
            d.start()

    def stop(self) -> dict[str, int]:
        """Drain every running daemon at once (SIGTERM to all, then wait): exit codes."""
        running = [d for d in self.daemons.values() if d.running()]
        for d in running:
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
        return {d.host: d.stop(signalled=True) for d in running}

    def close(self) -> None:
        for d in self.daemons.values():
            d.close()

    def logs(self) -> str:
        return "\n".join(f"===== {h}\n{d.log()[-4000:]}" for h, d in self.daemons.items())


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    alive: Sequence[FleetDaemon] = (),
    poll: float = 0.05,
) -> float:
    """Poll `predicate` until true; return the seconds it took. Fails after `timeout`, or
    at once when a daemon in `alive` has exited."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - a query during an outage: try again
            last = exc
        else:
            last = None
        for d in alive:
            if not d.running():
                raise AssertionError(f"{d.host} exited before {what}:\n{d.log()[-4000:]}")
        if time.monotonic() - start > timeout:
            why = f" (last error: {last})" if last else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{why}")
        time.sleep(poll)


# -- the database -------------------------------------------------------------------------


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement (none for a statement that returns none)."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def terminate_backends(url: str) -> dict[str, int]:
    """pg_terminate_backend of every other session on the database of `url`: how many, by
    application_name."""
    rows = query(
        url,
        "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    killed: dict[str, int] = {}
    for name, ok in rows:
        if ok:
            killed[name] = killed.get(name, 0) + 1
    return killed
