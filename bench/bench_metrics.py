"""Throughput with metrics on against metrics off, in the same run (issue 12: >= 0.95x).

The real daemon (`python -m poolkeeper run SPEC`, 2 fork workers, 20 no-op jobs `every: 1ms`:
the saturated baseline of bench_scale.py, where the main loop's cost per run is all there is),
the state DB in a temporary directory, info logging to a file. Two specs differ only in their
`metrics:` section:

* off: no section (nothing of prometheus_client is imported);
* on: `listen` on a free loopback port and `textfile` every 1s, with this script scraping
  /metrics every SCRAPE_EVERY seconds the whole time (as Prometheus would, harder).

Rounds are interleaved (off, on, on, off, ...) so that the machine's drift (shared, noisy)
falls on both alike; the headline is the median of the rounds' on/off ratios. Per measurement: 1 s to settle after READY=1, then runs ended in a
--window of seconds, counted in the state DB after SIGTERM, and the main process's CPU per run.
Prints a markdown table: each round, the medians and their ratio.

Usage: .venv/bin/python bench/bench_metrics.py [--rounds 8] [--window 5]
Numbers only, never asserted.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from bench_scale import Row, cpu_seconds, log  # noqa: E402

JOBS = 20
SCRAPE_EVERY = 0.5  # seconds; Prometheus scrapes every 15-60 s as a rule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper:
    """GET /metrics every SCRAPE_EVERY seconds in a thread; counts the scrapes that worked."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as reply:
                    if b"poolkeeper_runs_total" in reply.read():
                        self.ok += 1
            except OSError:
                pass

    def close(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.ok


def measure(on: bool, window: float) -> tuple[float, float, int]:
    """(runs/s, main CPU s per run, scrapes answered) of one daemon."""
    with tempfile.TemporaryDirectory(prefix="pk-metrics-bench-") as tmp:
        row = Row(Path(tmp), JOBS, "info")
        spec = row.spec("on" if on else "off", "1ms")
        port = _free_port()
        if on:
            prom = Path(tmp) / "textfile" / "poolkeeper.prom"
            prom.parent.mkdir()
            with spec.open("a") as out:
                out.write(
                    f'metrics: {{listen: "127.0.0.1:{port}", textfile: {prom}, textfile_every: 1s}}\n'
                )
        row.fresh_state()
        d = row.start(spec, 60.0)
        scraper = Scraper(f"http://127.0.0.1:{port}/metrics") if on else None
        try:
            time.sleep(1.0)
            c0, a = cpu_seconds(d.pid), time.time()
            time.sleep(window)
            c1, b = cpu_seconds(d.pid), time.time()
        finally:
            scrapes = scraper.close() if scraper is not None else 0
            row.stop(d)
        ended = sum(1 for _, _, _, e in row.runs() if e is not None and a < e <= b)
    return ended / (b - a), (c1 - c0) / ended if ended else float("nan"), scrapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--window", type=float, default=5.0)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for on in order:
            rate, cpu, scrapes = measure(on, args.window)
            results[on].append((rate, cpu, scrapes))
            log(f"round {r + 1}: metrics {'on' if on else 'off'}: {rate:,.0f} runs/s")
    print(
        f"20 jobs `every: 1ms`, 2 fork workers; {args.rounds} interleaved rounds of "
        f"{args.window:g} s each; on = listener + textfile every 1s + a scrape every "
        f"{SCRAPE_EVERY:g}s.\n"
    )
    print("| round | off runs/s | on runs/s | on/off | off CPU/run | on CPU/run | scrapes answered |")
    print("|---|---|---|---|---|---|---|")
    for r, (off, on) in enumerate(zip(results[False], results[True], strict=True)):
        print(
            f"| {r + 1} | {off[0]:,.0f} | {on[0]:,.0f} | {on[0] / off[0]:.3f}x | "
            f"{off[1] * 1e6:,.0f} µs | {on[1] * 1e6:,.0f} µs | {on[2]} |"
        )
    off_rate = statistics.median(x[0] for x in results[False])
    on_rate = statistics.median(x[0] for x in results[True])
    off_cpu = statistics.median(x[1] for x in results[False])
    on_cpu = statistics.median(x[1] for x in results[True])
    paired = statistics.median(
        on[0] / off[0] for off, on in zip(results[False], results[True], strict=True)
    )
    print(
        f"| median | {off_rate:,.0f} | {on_rate:,.0f} | {on_rate / off_rate:.3f}x "
        f"| {off_cpu * 1e6:,.0f} µs | {on_cpu * 1e6:,.0f} µs | |"
    )
    print(
        f"\nThroughput on/off, the median of the rounds' ratios (each pair measured back to "
        f"back): **{paired:.3f}x** (goal >= 0.95x); main-process CPU per run on/off: "
        f"{on_cpu / off_cpu:.3f}x."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
