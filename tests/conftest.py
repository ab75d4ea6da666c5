"""Suite-wide rules: no test may leave a process running."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import procs  # noqa: E402

procs.become_subreaper()


def _stop_multiprocessing_helpers() -> None:
    """Tests that run a pool inside pytest start multiprocessing's forkserver and resource
    tracker, process-wide singletons that would otherwise outlive the test."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:
                pass


@pytest.fixture(autouse=True, scope="session")
def private_config_cache(tmp_path_factory):
    """`poolkeeper run` keeps its last validation of each config in $XDG_CACHE_HOME (see
    poolkeeper/config/validation_cache.py): the daemons the tests start use a directory of their own,
    never the host's ~/.cache."""
    saved = {key: os.environ.pop(key, None) for key in ("XDG_CACHE_HOME", "CACHE_DIRECTORY")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def postgres_server():
    """The PostgreSQL server of the session (tests/pg_server.py), if a test started it:
    stopped, and its directory removed, when the session ends."""
    import pg_server

    yield
    pg_server.stop()


@pytest.fixture(autouse=True)
def no_stray_processes(request):
    yield
    for child in multiprocessing.active_children():
        child.join(timeout=5)
    _stop_multiprocessing_helpers()
    left = procs.leftovers(grace=5.0)
    if left:
        procs.kill_all(list(left))
        listing = "; ".join(f"{pid}: {cmd}" for pid, cmd in sorted(left.items()))
        pytest.fail(f"test left processes running: {listing}", pytrace=False)


@pytest.fixture
def make_pool():
    """Start a pool in this process (`make(method, **WorkerPool kwargs)` -> a
    jobs_for_tests.Driver); every pool is closed, its workers joined, when the test ends."""
    from jobs_for_tests import TESTS_DIR, Driver

    from poolkeeper.pool.supervisor import WorkerPool

    pools = []

    def make(method: str = "fork", **kw) -> Driver:
        kw.setdefault("workers", 2)
        kw.setdefault("pythonpath", [TESTS_DIR])
        pool = WorkerPool(start_method=method, **kw)
        pools.append(pool)
        pool.start()
        return Driver(pool)

    yield make
    for pool in pools:
        pool.close(timeout=2)


@pytest.fixture
def daemon_factory(tmp_path):
    """Start `poolkeeper run` on a spec (see daemon_harness.DaemonProcess); whatever is still
    running when the test ends is killed, its process group included."""
    from daemon_harness import DaemonProcess

    started: list[DaemonProcess] = []

    def start(spec: str, **kw) -> DaemonProcess:
        d = DaemonProcess(tmp_path, spec, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
