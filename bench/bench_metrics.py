"""Throughput with metrics on against metrics off, in the same run (issue 12: >= 0.95x).

The real daemon (`python -m poolkeeper run SPEC`, 2 fork workers, 20 no-op jobs `every: 1ms`:
the saturated baseline of bench_scale.py, where the main loop's cost per run is all there is),
the state DB in a temporary directory, info logging to a file. Two specs differ only in their
`metrics:` section:

* off: no section (nothing of prometheus_client is imported);
* on: `listen` on a free loopback port and `textfile` every 1s, with this script scraping
  /metrics every SCRAPE_EVERY seconds the whole time (as a Prometheus with the shortest
  interval in common use would); `--counting-only`: `metrics: {}` (no listener, no file).

Rounds interleaved (off, on, on, off, ...): the median of the rounds' on/off ratios. On this
shared machine one round's ratio moves by +-30%, so beside it the bench measures, in this
process and with the same code, what metrics add to the main process: the hook per run
(`Metrics.run_ended` against `NoMetrics.run_ended`, on a run ended like the daemon's) and
rendering the text (what each scrape and textfile write cost, in a thread of the daemon that
shares its interpreter lock). With the CPU per run of the off rounds, that gives the
throughput a daemon whose main process is the bottleneck keeps (the model line).

Per measurement: 1 s to settle after READY=1, then runs ended in a --window of seconds,
counted in the state DB after SIGTERM, and the main process's CPU per run. Prints markdown.

Usage: .venv/bin/python bench/bench_metrics.py [--rounds 8] [--window 5] [--counting-only]
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
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from bench_scale import Row, Started, cpu_seconds, log  # noqa: E402

JOBS = 20
SCRAPE_EVERY = 1.0  # seconds: the shortest scrape interval in common use (15-60 s as a rule)


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


@dataclass
class Figures:
    rate: float  # runs/s
    cpu: float  # main-process CPU seconds per run
    scrapes: int


class Daemon:
    """One daemon of the comparison, in its own directory."""

    def __init__(self, tmp: Path, on: bool, counting_only: bool) -> None:
        self.on = on
        self.row = Row(tmp, JOBS, "info")
        self.spec = self.row.spec("on" if on else "off", "1ms")
        self.port = _free_port()
        self.scraper: Scraper | None = None
        if on and counting_only:
            metrics = "{}"
        elif on:
            prom = tmp / "textfile" / "poolkeeper.prom"
            prom.parent.mkdir()
            metrics = f'{{listen: "127.0.0.1:{self.port}", textfile: {prom}, textfile_every: 1s}}'
        if on:
            with self.spec.open("a") as out:
                out.write(f"metrics: {metrics}\n")
        self.exposed = on and not counting_only
        self.row.fresh_state()
        self.started: Started | None = None

    def start(self) -> None:
        self.started = self.row.start(self.spec, 60.0)
        if self.exposed:
            self.scraper = Scraper(f"http://127.0.0.1:{self.port}/metrics")

    def cpu(self) -> float:
        assert self.started is not None
        return cpu_seconds(self.started.pid)

    def stop(self) -> int:
        scrapes = self.scraper.close() if self.scraper is not None else 0
        if self.started is not None:
            self.row.stop(self.started)
        return scrapes

    def figures(self, a: float, b: float, c0: float, c1: float, scrapes: int) -> Figures:
        ended = sum(1 for _, _, _, e in self.row.runs() if e is not None and a < e <= b)
        return Figures(ended / (b - a), (c1 - c0) / ended if ended else float("nan"), scrapes)


def measure(daemons: list[Daemon], window: float) -> list[Figures]:
    """Start `daemons` in order, measure them over the same window, stop them."""
    try:
        for d in daemons:
            d.start()
        time.sleep(1.0)
        c0, a = [d.cpu() for d in daemons], time.time()
        time.sleep(window)
        c1, b = [d.cpu() for d in daemons], time.time()
    finally:
        scrapes = [d.stop() for d in daemons]
    return [d.figures(a, b, c0[i], c1[i], scrapes[i]) for i, d in enumerate(daemons)]


def rounds(args: argparse.Namespace) -> list[tuple[Figures, Figures]]:
    """(off, on) per round; which runs first alternates."""
    out = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {}
        for on in order:
            with tempfile.TemporaryDirectory(prefix="pk-mbench-") as tmp:
                results[on] = measure([Daemon(Path(tmp), on, args.counting_only)], args.window)[0]
        off, on_ = results[False], results[True]
        log(f"round {r + 1}: off {off.rate:,.0f}, on {on_.rate:,.0f} runs/s")
        out.append((off, on_))
    return out


def hook_and_render_costs() -> tuple[float, float]:
    """(extra seconds per run of the hook, seconds per render of the text), measured here
    on the daemon's own classes: 20 jobs' figures, the process collector, every family."""
    import logging
    import timeit

    from poolkeeper.config.settings import Config, Metrics
    from poolkeeper.outcomes import Outcome
    from poolkeeper.pool.protocol import RunEnded, Task
    from poolkeeper.service import metrics
    from poolkeeper.service.metrics_hooks import NoMetrics

    class NoHistory:
        def last_outcomes(self) -> dict:
            return {}

    config = Config(  # type: ignore[arg-type]
        path="/x.yaml",
        pythonpath=[],
        pool=None,
        shutdown=None,
        state=None,
        fleet=None,
        jobs={},
        metrics=Metrics(None, None, 15.0),
    )
    on = metrics.Metrics(config, NoHistory(), logging.getLogger("bench"))  # type: ignore[arg-type]
    off = NoMetrics()
    now = time.time()
    ended = [
        RunEnded(Task(f"r{i}", f"j{i % JOBS:05d}", "m:f", scheduled_at=now), Outcome.SUCCEEDED,
                 now + 0.001, now + 0.002, 1, 0, None, None, None)
        for i in range(JOBS)
    ]  # fmt: skip
    n = 20_000

    def each(hook) -> float:
        return (
            min(timeit.repeat(lambda: [hook(ev) for ev in ended], number=n // JOBS, repeat=5)) / n
        )

    extra = each(on.run_ended) - each(off.run_ended)
    render = min(timeit.repeat(on.text, number=50, repeat=5)) / 50
    on.close()
    return extra, render


def table(title: str, pairs: list[tuple[Figures, Figures]]) -> float:
    print(f"\n{title}\n")
    print(
        "| round | off runs/s | on runs/s | on/off | off CPU/run | on CPU/run | scrapes answered |"
    )
    print("|---|---|---|---|---|---|---|")
    for r, (off, on) in enumerate(pairs):
        print(
            f"| {r + 1} | {off.rate:,.0f} | {on.rate:,.0f} | {on.rate / off.rate:.3f}x | "
            f"{off.cpu * 1e6:,.0f} µs | {on.cpu * 1e6:,.0f} µs | {on.scrapes} |"
        )
    ratio = statistics.median(on.rate / off.rate for off, on in pairs)
    off_cpu = statistics.median(off.cpu for off, _ in pairs)
    on_cpu = statistics.median(on.cpu for _, on in pairs)
    print(
        f"| median | {statistics.median(off.rate for off, _ in pairs):,.0f} | "
        f"{statistics.median(on.rate for _, on in pairs):,.0f} | **{ratio:.3f}x** "
        f"(goal >= 0.95x) | {off_cpu * 1e6:,.0f} µs | {on_cpu * 1e6:,.0f} µs "
        f"({on_cpu / off_cpu:.3f}x) | |"
    )
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument(
        "--counting-only",
        action="store_true",
        help="on = `metrics: {}`: no listener, no textfile, no scrapes (counting alone)",
    )
    args = parser.parse_args()
    pairs = rounds(args)
    on = (
        "`metrics: {}` (counting only)"
        if args.counting_only
        else f"listener + textfile every 1s + a scrape every {SCRAPE_EVERY:g}s"
    )
    print(
        f"20 jobs `every: 1ms`, 2 fork workers; {args.rounds} interleaved rounds of "
        f"{args.window:g} s; on = {on}."
    )
    table("End to end:", pairs)
    extra, render = hook_and_render_costs()
    off_rate = statistics.median(off.rate for off, _ in pairs)
    off_cpu = statistics.median(off.cpu for off, _ in pairs)
    renders = 0 if args.counting_only else 1 / SCRAPE_EVERY + 1  # scrapes + textfile per s
    added = extra + renders * render / off_rate
    print(
        f"\nModel: the hook adds {extra * 1e6:.2f} µs per run, a render of the text takes "
        f"{render * 1e3:.2f} ms ({renders:g} a second: {renders * render / off_rate * 1e6:.2f} µs "
        f"per run at {off_rate:,.0f} runs/s), against {off_cpu * 1e6:.0f} µs of main-process "
        f"CPU per run off: throughput on/off **{off_cpu / (off_cpu + added):.3f}x** when the main "
        "process is the bottleneck."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
