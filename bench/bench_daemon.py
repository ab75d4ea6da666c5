"""Daemon-level stop benchmarks: each figure next to a baseline measured in the same run.

1. SIGTERM to exit, idle: `poolkeeper run` with nothing in flight, against a minimal Python
   process that exits on SIGTERM (the floor any Python daemon pays).
2. Exit after the last in-flight run ends: SIGTERM during a run; from the moment the job
   returns to the daemon's exit, against a `multiprocessing.Pool` that is closed and joined
   the same way.

Run: .venv/bin/python bench/bench_daemon.py [--repeat N]   (prints a markdown table)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).parent

JOB_MODULE = textwrap.dedent(
    """
    import os, time

    def idle():
        return None

    def until_release(marker_dir):
        # Runs until the bench drops a release file, then records when it returned.
        while not os.path.exists(os.path.join(marker_dir, "release")):
            time.sleep(0.001)
        with open(os.path.join(marker_dir, "returned"), "w") as f:
            f.write(repr(time.time()))
    """
)

BASELINE_IDLE = textwrap.dedent(
    """
    import signal, sys
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("ready", flush=True)
    signal.pause()
    """
)

BASELINE_IN_FLIGHT = textwrap.dedent(
    """
    import multiprocessing, signal, sys, os
    sys.path.insert(0, sys.argv[1])
    import benchjobs
    if __name__ == "__main__":
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        pool = multiprocessing.Pool(2)
        result = pool.apply_async(benchjobs.until_release, (sys.argv[2],))
        print("ready", flush=True)
        while not stop:
            signal.pause()
        pool.close()
        pool.join()
        result.get()
    """
)


def _spec(tmp: Path, job: str) -> Path:
    cfg = tmp / "bench.yaml"
    cfg.write_text(
        "version: 1\n"
        f"pythonpath: [{tmp}]\n"
        "pool: {workers: 2, start_method: forkserver}\n"
        f"state: {{path: {tmp / 'state.db'}}}\n"
        "jobs:\n" + job
    )
    return cfg


def _start_daemon(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "poolkeeper", "run", str(cfg), "--log-target", "stderr"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_file(path: Path, proc: subprocess.Popen, text: str | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and (text is None or text in path.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited early: {path.read_text(errors='replace')}")
        time.sleep(0.002)
    raise RuntimeError(f"timed out waiting for {path}")


def _term_to_exit(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return time.monotonic() - t0


def idle_stop_poolkeeper(tmp: Path) -> float:
    cfg = _spec(tmp, "  idle:\n    target: benchjobs:idle\n    every: 1h\n")
    log = tmp / "daemon.log"
    proc = _start_daemon(cfg, log)
    _wait_file(log, proc, " ready")
    _wait_file(log, proc, "run succeeded")  # the first fire is at start: let it pass
    return _term_to_exit(proc)


def idle_stop_baseline(tmp: Path) -> float:
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_IDLE], stdout=subprocess.PIPE)
    proc.stdout.readline()
    took = _term_to_exit(proc)
    proc.stdout.close()
    return took


def _exit_after_return(proc: subprocess.Popen, marker: Path) -> float:
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the stop is under way before the run is allowed to end
    (marker / "release").write_text("")
    proc.wait(60)
    exited = time.time()
    return exited - float((marker / "returned").read_text())


def in_flight_poolkeeper(tmp: Path) -> float:
    marker = tmp / "m1"
    marker.mkdir()
    cfg = _spec(
        tmp,
        "  work:\n    target: benchjobs:until_release\n    at: startup\n"
        f"    kwargs: {{marker_dir: {marker}}}\n",
    )
    log = tmp / "daemon.log"
    proc = _start_daemon(cfg, log)
    _wait_file(log, proc, "run started")
    return _exit_after_return(proc, marker)


def in_flight_baseline(tmp: Path) -> float:
    marker = tmp / "m2"
    marker.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE_IN_FLIGHT, str(tmp), str(marker)], stdout=subprocess.PIPE
    )
    proc.stdout.readline()
    took = _exit_after_return(proc, marker)
    proc.stdout.close()
    return took


def _median(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "benchjobs.py").write_text(JOB_MODULE)
            samples.append(fn(Path(d)))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = [
        ("SIGTERM to exit, idle", idle_stop_poolkeeper, idle_stop_baseline),
        ("exit after the last in-flight run ends", in_flight_poolkeeper, in_flight_baseline),
    ]
    print("| measure | poolkeeper (median) | baseline (median) | ratio |")
    print("|---|---|---|---|")
    for name, ours, base in rows:
        a, b = _median(ours, args.repeat), _median(base, args.repeat)
        print(f"| {name} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
