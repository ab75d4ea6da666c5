"""Job functions for the pool tests: importable by module path in any worker (the tests pass
this directory in the pool's pythonpath, so spawn and forkserver workers find it too)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

PRELOADED_AT = time.time()


def noop() -> None:
    return None


def add(a: int, b: int) -> int:
    return a + b


def divide(a: int, b: int) -> float:
    return a / b


def echo_ctx(ctx) -> dict:
    return {
        "job": ctx.job,
        "run_id": ctx.run_id,
        "attempt": ctx.attempt,
        "scheduled_at": ctx.scheduled_at,
        "stopping": ctx.stopping.is_set(),
    }


def fleet_ctx(ctx) -> tuple:
    """ctx.replica and ctx.fence, and what the run's environment says of them."""
    env = tuple(os.environ.get(k) for k in ("POOLKEEPER_REPLICA", "POOLKEEPER_FENCE"))
    return ctx.replica, ctx.fence, env, repr(ctx)


def my_pid() -> int:
    return os.getpid()


def pid_and_pgid() -> tuple[int, int]:
    return os.getpid(), os.getpgid(0)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def wait_for_file(path: str, timeout: float = 30.0) -> int:
    """Block until `path` exists (the test creates it), then return our pid."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def write_pid_then_block(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(0.05)


def grandchild_then_block(path: str) -> None:
    """Start a `sleep 1000` grandchild, block SIGTERM, publish both pids, hang."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    child = subprocess.Popen(["sleep", "1000"])
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(0.05)


def env_value(key: str) -> str | None:
    return os.environ.get(key)


def notify_env() -> list:
    return [os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")]


def signal_dispositions() -> tuple:
    """Whether SIGTERM and SIGINT are caught (survived without SIG_IGN, which would be
    inherited by what a job execs)."""
    return tuple(
        callable(signal.getsignal(sig)) and signal.getsignal(sig) is not signal.default_int_handler
        for sig in (signal.SIGTERM, signal.SIGINT)
    )


def raise_system_exit() -> None:
    sys.exit(3)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def return_unpicklable():
    return lambda: 1


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("cannot be pickled")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable()


def die_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_exit3() -> None:
    os._exit(3)


def die_abort() -> None:
    os.abort()


def die_segfault() -> None:
    ctypes.string_at(0)


def loop_with_heartbeat(ctx, hang_after: float = 1e9) -> str:
    """A loop job: heartbeats until `hang_after` seconds, then hangs in stuck_here()."""
    t0 = time.monotonic()
    while not ctx.stopping.is_set():
        if time.monotonic() - t0 > hang_after:
            stuck_here()
        ctx.heartbeat()
        ctx.stopping.wait(0.02)
    return "stopped"


def stuck_here() -> None:
    while True:
        time.sleep(0.1)


def wait_until_stopping(ctx, limit: float = 30.0) -> bool:
    return ctx.stopping.wait(limit)


def log_something(ctx) -> None:
    ctx.log.warning("hello from the job")
    logging.getLogger("some.library").warning("hello from a library")


def allocate_mib(n: int) -> int:
    global _HOARD
    _HOARD = bytearray(n * 1024 * 1024)
    for i in range(0, len(_HOARD), 4096):
        _HOARD[i] = 1
    return len(_HOARD)


_HOARD = b""


class Namespace:
    class Inner:
        @staticmethod
        def method(x: int) -> int:
            return x * 2


def preloaded_at() -> float:
    return PRELOADED_AT


def worker_setup_marker() -> None:
    os.environ["POOLKEEPER_TEST_SETUP"] = "done"


def setup_log_file(path: str) -> None:
    """worker_setup for the logging test: one line per record with the journal fields."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(
        "%(JOB)s|%(RUN_ID)s|%(ATTEMPT)s|%(WORKER_PID)s|%(name)s|%(message)s"))  # fmt: skip
    logging.getLogger().addHandler(handler)


def drive(spec_json: str) -> None:
    """Run a WorkerPool in this process (a test's driver subprocess) and print events as JSON lines.

    spec: {"method", "workers", "tasks": [Task kwargs...], "pythonpath": [...]}. Prints
    {"pids": {...}} once every task has started, then keeps the pool running until killed
    (or until every task ended, if "exit_when_done")."""
    import json
    import multiprocessing.connection
    from multiprocessing import forkserver, resource_tracker

    from poolkeeper.pool.supervisor import RunEnded, RunStarted, Task, WorkerPool

    spec = json.loads(spec_json)
    pool = WorkerPool(workers=spec["workers"], start_method=spec["method"],
                pythonpath=spec.get("pythonpath", []))  # fmt: skip
    pool.start()
    tasks = [Task(**t) for t in spec["tasks"]]
    pending = list(tasks)
    started: set[str] = set()
    ended: set[str] = set()
    announced = False

    def out(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        while pending and pool.free_slots():
            pool.submit(pending.pop(0))
        deadline = pool.next_deadline()
        timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        multiprocessing.connection.wait(pool.waitables(), timeout)
        for ev in pool.poll():
            record = {"type": type(ev).__name__}
            for key in ("outcome", "error", "kind", "pid", "detail", "worker_pid", "reason"):
                if hasattr(ev, key):
                    record[key] = getattr(ev, key)
            if hasattr(ev, "task"):
                record["run_id"] = ev.task.run_id
            out(record)
            if isinstance(ev, RunStarted):
                started.add(ev.task.run_id)
            elif isinstance(ev, RunEnded):
                ended.add(ev.task.run_id)
        if not announced and started >= {t.run_id for t in tasks if t.target.endswith("block")}:
            ready = [w.pid for w in pool._workers if w.state == "ready"]
            if len(ready) == spec["workers"]:
                announced = True
                out({"pids": {
                    "workers": ready,
                    "forkserver": forkserver._forkserver._forkserver_pid,
                    "resource_tracker": resource_tracker._resource_tracker._pid,
                }})  # fmt: skip
        if spec.get("exit_when_done") and ended >= {t.run_id for t in tasks}:
            pool.close(timeout=5)
            return


# -- a test-side driver for a WorkerPool running inside pytest -------------------------------------

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


class Driver:
    """Drives a WorkerPool like the daemon's loop does, collecting events."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.events: list = []

    def turn(self, max_wait: float = 0.2) -> list:
        import multiprocessing.connection

        deadline = self.pool.next_deadline()
        timeout = (
            max_wait if deadline is None else max(0.0, min(max_wait, deadline - time.monotonic()))
        )
        multiprocessing.connection.wait(self.pool.waitables(), timeout)
        evs = self.pool.poll()
        self.events.extend(evs)
        return evs

    def until(self, pred, timeout: float = 10.0) -> list:
        """Turn until pred(new_event) was true for some event; return all events seen."""
        seen = []
        limit = time.monotonic() + timeout
        while time.monotonic() < limit:
            for ev in self.turn():
                seen.append(ev)
                if pred(ev):
                    return seen
        raise AssertionError(f"condition not met in {timeout}s; events: {seen}")

    def run(self, tasks, timeout: float = 20.0, resubmit: bool = True) -> dict:
        """Submit every task, return {run_id: RunEnded}. NotStarted tasks are resubmitted."""
        from poolkeeper.pool.supervisor import NotStarted, RunEnded

        pending = list(tasks)
        ended: dict = {}
        want = {t.run_id for t in tasks}
        limit = time.monotonic() + timeout
        while set(ended) != want:
            if time.monotonic() > limit:
                raise AssertionError(
                    f"runs not ended in {timeout}s: {want - set(ended)}; {self.events[-20:]}"
                )
            while pending and self.pool.free_slots():
                self.pool.submit(pending.pop(0))
            for ev in self.turn():
                if isinstance(ev, RunEnded) and ev.task.run_id in want:
                    assert ev.task.run_id not in ended, f"two outcomes for {ev.task.run_id}"
                    ended[ev.task.run_id] = ev
                elif isinstance(ev, NotStarted) and resubmit and ev.task.run_id in want:
                    pending.append(ev.task)
        return ended

    def ready_pids(self) -> list[int]:
        return [w.pid for w in self.pool._workers if w.state == "ready"]

    def wait_ready(self, n: int | None = None, timeout: float = 10.0) -> list[int]:
        n = self.pool.target_size if n is None else n
        limit = time.monotonic() + timeout
        while len(self.ready_pids()) < n:
            if time.monotonic() > limit:
                raise AssertionError(f"only {self.ready_pids()} ready; {self.events[-10:]}")
            self.turn()
        return self.ready_pids()


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] != "Z"


def wait_gone(pids, timeout: float) -> list[int]:
    """Poll /proc until none of pids lives; return those still alive at the timeout."""
    limit = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if p and pid_alive(p)]
        if not alive or time.monotonic() > limit:
            return alive
        time.sleep(0.01)


# -- hostile jobs (issue 8) ---------------------------------------------------------------------


class _ReprBomb:
    def __repr__(self) -> str:
        raise MemoryError("repr() went all the way to the end")


def big_result() -> list:
    """A result whose full repr() is some 7 MB; its last element's repr() blows up."""
    return [*range(10**6), _ReprBomb()]


def kill_the_parent() -> int:
    """SIGTERM the process that started this worker (under forkserver: the forkserver)."""
    parent = os.getppid()
    os.kill(parent, signal.SIGTERM)
    return parent


def raise_a_huge_message() -> None:
    raise ValueError("x" * 1_000_000)


# -- A worker is a child subreaper: jobs' own waits must still work (test_detached_descendants) -

_KEPT: list = []


def exit_code_of_a_subprocess(code: int) -> int:
    return subprocess.run(["sh", "-c", f"exit {code}"]).returncode


def keep_a_child_and_orphan_another(code: int) -> list[int]:
    """A child kept for a later run to wait for, and an orphan that exits at once (re-parented
    to the worker, which must reap it)."""
    _KEPT.append(subprocess.Popen(["sh", "-c", f"exit {code}"]))
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            pid = os.fork()
            if pid == 0:
                os.execvp("true", ["true"])
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        orphan = int(f.read())
    os.waitpid(middle, 0)
    return [_KEPT[-1].pid, orphan]


def wait_for_the_kept_child() -> int:
    return _KEPT.pop().wait()


def detached_spawner_then_hang(path: str) -> None:
    """A detached shell that starts a `sleep` every 10 ms for up to 5 s (its session id goes to
    `path`), then a hang: a kill must freeze the tree to catch every sleep."""
    script = (
        f"echo $$ > {path}.tmp && mv {path}.tmp {path}; i=0; "
        "while [ $i -lt 500 ]; do sleep 60 & sleep 0.01; i=$((i+1)); done; wait"
    )
    kept = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    while kept:
        time.sleep(0.05)


# -- One poll() returns every result already sent (test_pool_hotpath) --------------------------


def signal_then_block(started_fd: int, release_fd: int) -> None:
    """Tell the test (one byte on an inherited pipe) that this run began, which means every
    result before it is in the pipe; then wait for the test's byte."""
    os.write(started_fd, b"s")
    os.read(release_fd, 1)
