"""Scale: what the daemon costs as the number of jobs grows, each figure beside the 10-job row
and the baselines of the same run (issue 10).

The real daemon (`python -m poolkeeper run SPEC`, 2 fork workers, no-op jobs, the state DB in a
temporary directory), with NOTIFY_SOCKET bound to a unix datagram socket that this script reads
(READY=1 is timed there). After each run the daemon gets SIGTERM and the run history is read
from its SQLite DB. Per number of jobs N:

* check: wall time of `poolkeeper check SPEC` (median), and per job beyond the 10-job row.
* start to READY=1: cold (first start of the spec: full validation) and cached (the same spec
  again: the validation cache hits).
* RSS of the main process (/proc/PID/status VmRSS) after READY=1 (idle run) and after the burst.
* burst: N jobs `every: 1h`, a fresh state DB: every first fire is at start. Runs/s from the
  first start to the last end, counted in the DB, capped at --burst-cap seconds; beside what
  20 jobs `every: 1ms` sustain in the same run (issue 10: >= 0.8x at 10,000, >= 0.5x at 50,000).
* idle CPU: N jobs `every: 1h` whose last fire (seeded in the DB) was just now: nothing is due;
  main-process utime+stime over --idle seconds.
* steady: N jobs `every: N/1000 s` (1,000 runs/s in all), fire phases spread over the period by
  seeding each job's last fire (see seed_phases); over --window seconds: lateness (started minus
  scheduled) p50/p99/max, counting a run that was due in the window but never started as
  infinitely late; runs/s achieved; main-process CPU per run and in % of a core.

Baselines, measured before and after the rows: 20 jobs `every: 1ms` (sustained runs/s, main CPU
per run), and multiprocessing.Pool(2) (fork) imap_unordered of no-op calls, the raw rate of the
same two workers (issue 10: the daemon end to end >= 0.5x of it).

Prints markdown tables; writes a plot (runs/s and main CPU per run against the number of jobs)
to bench/scale.png with matplotlib (`pip install -e '.[bench]'`; --no-plot without it).

Usage: .venv/bin/python bench/bench_scale.py [--jobs 10,100,1000,10000,50000] [--quick]
       [--rounds N] [--json FILE]; --from-json FILE re-prints the tables and plot of a run.
Numbers only, never asserted: the machine is shared and noisy; compare ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's poolkeeper, for the state store (seeding, reading)

from poolkeeper.state.identity import store_at  # noqa: E402

DEFAULT_JOBS = (10, 100, 1_000, 10_000, 50_000)
STEADY_RATE = 1000.0  # runs/s asked of the steady phase, spread over the N jobs
CLK_TCK = os.sysconf("SC_CLK_TCK")
JOB_MODULE = "def noop():\n    return None\n"
# Environment a daemon under systemd would get anew: not the bench's to pass on.
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- /proc --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# --- the daemon ---------------------------------------------------------------------------


class NotifyListener:
    """The NOTIFY_SOCKET end: a thread reads every datagram (an unread socket would fill up and
    block the daemon's sends for up to its send timeout) and notes when READY=1 came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.ready_at: float | None = None  # time.monotonic()
        self.ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = now
                self.ready.set()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    popen_wall: float
    popen_mono: float
    ready_mono: float
    listener: NotifyListener

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def start_to_ready(self) -> float:
        return self.ready_mono - self.popen_mono

    @property
    def ready_wall(self) -> float:
        return self.popen_wall + self.start_to_ready


class Row:
    """One directory per spec size: the job module, the specs, the state DB, the notify
    socket, the validation cache and the daemon's log."""

    def __init__(self, tmp: Path, n: int, log_level: str) -> None:
        self.dir = tmp
        self.n = n
        self.log_level = log_level
        (tmp / "jobs").mkdir()
        (tmp / "jobs" / "scalejobs.py").write_text(JOB_MODULE)
        self.db = tmp / "state" / "state.db"
        self.cache = tmp / "cache"
        self.cache.mkdir()
        self.names = [f"j{i:05d}" for i in range(n)]

    def spec(self, label: str, every: str, names: list[str] | None = None) -> Path:
        jobs = "".join(
            f"  {name}:\n    target: scalejobs:noop\n    every: {every}\n"
            for name in (names or self.names)
        )
        path = self.dir / f"{label}.yaml"
        path.write_text(
            "version: 1\n"
            f"pythonpath: [{self.dir / 'jobs'}]\n"
            "pool: {workers: 2, start_method: fork}\n"
            f"state: {{path: {self.db}}}\n"
            "jobs:\n" + jobs
        )
        return path

    def fresh_state(self) -> None:
        shutil.rmtree(self.db.parent, ignore_errors=True)
        self.db.parent.mkdir()

    def seed(self, fires: dict[str, float]) -> None:
        """Last fire times through the daemon's own store, as a previous daemon left them."""
        store = store_at(self.db)
        try:
            for name, when in fires.items():
                store.set_last_fire(name, when)
            store.flush()
        finally:
            store.close()

    def start(self, spec: Path, timeout: float) -> Started:
        sock = self.dir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        listener = NotifyListener(sock)
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        env.update(NOTIFY_SOCKET=str(sock), CACHE_DIRECTORY=str(self.cache), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "poolkeeper", "run", str(spec), "--log-target", "stderr"]
        cmd += ["--log-level", self.log_level]
        popen_wall, popen_mono = time.time(), time.monotonic()
        try:
            with open(self.dir / "daemon.log", "ab") as out:
                # Its own session: on an error the whole group (workers too) can be killed.
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        except BaseException:
            listener.close()
            raise
        started = Started(proc, popen_wall, popen_mono, 0.0, listener)
        try:
            deadline = popen_mono + timeout
            while not listener.ready.wait(0.05):
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited ({proc.returncode}) before READY=1")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no READY=1 within {timeout:.0f}s")
            assert listener.ready_at is not None
            started.ready_mono = listener.ready_at
        except BaseException:
            self.stop(started)
            self.dump_log_tail()
            raise
        return started

    def stop(self, started: Started, timeout: float = 60.0) -> None:
        """SIGTERM (the daemon drains and flushes its history), then SIGKILL to the group if
        it does not exit; always reaped, the notify socket always closed."""
        proc = started.proc
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log(f"daemon {proc.pid} did not exit {timeout:.0f}s after SIGTERM: SIGKILL")
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Workers left in the group by a daemon that died: not ours to keep.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            started.listener.close()

    def dump_log_tail(self) -> None:
        with contextlib.suppress(OSError):
            tail = (self.dir / "daemon.log").read_text(errors="replace").splitlines()[-15:]
            log("daemon log tail:\n  " + "\n  ".join(tail))

    def runs(self) -> list[tuple[str, float | None, float | None, float | None]]:
        """(job, scheduled, started, ended) of every run, from the stopped daemon's DB."""
        store = store_at(self.db, readonly=True)
        try:
            return [(r.job, r.scheduled, r.started, r.ended) for r in store.history(limit=None)]
        finally:
            store.close()

    def ended_count(self) -> int | None:
        """Runs ended so far, read while the daemon runs (it flushes at least every ~0.5 s);
        None if the DB cannot be read yet."""
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
            try:
                return int(
                    conn.execute("SELECT count(*) FROM runs WHERE ended IS NOT NULL").fetchone()[0]
                )
            finally:
                conn.close()
        except sqlite3.Error:
            return None


# --- measurements -------------------------------------------------------------------------


@dataclass
class Result:
    jobs: int
    check_s: float = math.nan
    ready_cold_s: float = math.nan
    ready_cached_s: float = math.nan
    rss_ready: int = 0  # cached start (no validation: pydantic not imported)
    rss_ready_cold: int = 0  # cold start (validated in full)
    rss_burst: int = 0  # after the burst (the cold start's process)
    burst_runs: int = 0
    burst_rate: float = math.nan
    burst_capped: bool = False
    burst_cpu_per_run: float = math.nan
    idle_cpu: float = math.nan  # fraction of a core
    steady_every: float = 0.0
    steady_spread: float = 0.0  # fraction of the period the phases cover (0: in phase)
    steady_bunched: int = 0
    steady_asked: int = 0
    steady_ran: int = 0
    steady_rate: float = math.nan
    steady_cpu: float = math.nan  # fraction of a core
    steady_cpu_per_run: float = math.nan
    late_p50: float = math.nan
    late_p99: float = math.nan
    late_max: float = math.nan
    late_ran_p99: float = math.nan  # among the runs that started
    errors: list[str] = field(default_factory=list)


def time_check(spec: Path, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "poolkeeper", "check", str(spec)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=900,
        )
        took = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"check failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        samples.append(took)
    return statistics.median(samples)


def measure_burst(row: Row, res: Result, spec: Path, cap: float, ready_timeout: float) -> None:
    row.fresh_state()
    d = row.start(spec, ready_timeout)
    try:
        res.ready_cold_s = d.start_to_ready
        res.rss_ready_cold = rss_bytes(d.pid)
        cpu0 = cpu_seconds(d.pid)
        deadline = time.monotonic() + cap
        while time.monotonic() < deadline:
            if (row.ended_count() or 0) >= row.n:
                break
            time.sleep(0.1)
        else:
            res.burst_capped = True
        stop_wall, cpu1 = time.time(), cpu_seconds(d.pid)
        res.rss_burst = rss_bytes(d.pid)
    finally:
        row.stop(d)
    runs = row.runs()
    starts = [s for _, _, s, _ in runs if s is not None]
    done = [e for _, _, _, e in runs if e is not None and e <= stop_wall]
    if not starts or not done:
        raise RuntimeError("no run in the burst")
    res.burst_runs = len(done)
    first = min(starts)
    span = (max(done) if len(done) >= row.n else stop_wall) - first
    res.burst_rate = len(done) / span if span > 0 else math.nan
    after_ready = sum(1 for e in done if e > d.ready_wall)
    if after_ready >= 200:  # fewer: a per-run figure of the tick counter's noise
        res.burst_cpu_per_run = (cpu1 - cpu0) / after_ready


def measure_idle(row: Row, res: Result, spec: Path, idle: float, ready_timeout: float) -> float:
    """A cached start (the burst's spec again). Every job but one has a last fire of now
    (`every: 1h`: nothing due for an hour); the one, the probe, fires at the start, so its
    scheduled_at tells when the daemon armed its jobs. Returns that time minus the Popen: what
    the steady run, also a cached start, aims its phases with."""
    row.fresh_state()
    row.seed(dict.fromkeys(row.names[1:], time.time()))
    d = row.start(spec, ready_timeout)
    try:
        res.ready_cached_s = d.start_to_ready
        res.rss_ready = rss_bytes(d.pid)
        time.sleep(min(2.0, idle / 2))  # the start's own work (the probe, STATUS, a flush)
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(idle)
        c1, t1 = cpu_seconds(d.pid), time.monotonic()
        res.idle_cpu = (c1 - c0) / (t1 - t0)
    finally:
        row.stop(d)
    probe = [sched for job, sched, _, _ in row.runs() if job == row.names[0] and sched]
    if not probe:
        raise RuntimeError("the probe job did not run")
    return min(probe) - d.popen_wall


def seed_phases(
    names: list[str], every: float, t_seed: float, d_lo: float, d_hi: float
) -> tuple[dict[str, float], float]:
    """Last fires that spread the first fires over the period. An interval job's first fire
    is max(now, min(last, now) + every) (scheduling/triggers.py), `now` being when the daemon
    armed its jobs, known only roughly in advance (t_seed + d, d in [d_lo, d_hi]): a last fire
    in (t_seed + d_hi - every, t_seed + d_lo] is kept as is for any such d, so the phases can
    cover every - (d_hi - d_lo) of the period, evenly. Returns (fires, covered fraction)."""
    width = every - (d_hi - d_lo)
    if width < every / 5:  # too short a period to aim at: leave the jobs in phase
        return {}, 0.0
    lo = t_seed + d_hi - every
    n = len(names)
    # Interleaved (a stride through the names), so neighbouring names are not neighbouring phases.
    stride = next(s for s in range(max(1, int(n**0.5)), 0, -1) if math.gcd(s, n) == 1)
    fires = {names[(i * stride) % n]: lo + width * (i + 0.5) / n for i in range(n)}
    return fires, width / every


def measure_steady(
    row: Row, res: Result, d_cached: float, window: float, ready_timeout: float
) -> None:
    every = row.n / STEADY_RATE
    res.steady_every = every
    spec = row.spec("steady", f"{every * 1000:g}ms")
    # A first start of this spec fills the validation cache, so that the measured start is a
    # cached one like the idle run's, whose start time (d_cached) aims the phases: a cached
    # start does less, and varies less, than a cold one. Nothing is due in it for a period.
    row.fresh_state()
    t0 = time.monotonic()
    row.seed(dict.fromkeys(row.names, time.time()))
    seeding = time.monotonic() - t0  # the measured start waits for as much seeding
    row.stop(row.start(spec, ready_timeout))
    row.fresh_state()
    t_seed = time.time()
    d_lo = 0.9 * (d_cached + seeding) - 0.03
    d_hi = 1.3 * (d_cached + seeding) + 0.1
    fires, res.steady_spread = seed_phases(row.names, every, t_seed, d_lo, d_hi)
    if fires:
        row.seed(fires)
    d = row.start(spec, ready_timeout)
    try:
        # After the start's own burst (if the jobs are in phase, or aimed badly) and the first
        # fires.
        begin = max(time.time(), t_seed + d_hi) + 1.0
        time.sleep(max(0.0, begin - time.time()))
        c0, a = cpu_seconds(d.pid), time.time()
        time.sleep(window)
        c1, b = cpu_seconds(d.pid), time.time()
        time.sleep(1.0)  # runs due just before b get to start
    finally:
        row.stop(d)
    runs = row.runs()
    first: dict[str, float] = {}
    for job, sched, _, _ in runs:
        if sched is not None and (job not in first or sched < first[job]):
            first[job] = sched
    common = Counter(first.values()).most_common(1)
    res.steady_bunched = common[0][1] if common and common[0][1] > 1 else 0
    if res.steady_bunched and fires:
        # Where the aim failed: at the daemon's start (d > d_hi) or one period after it
        # (d < d_lo: the last fire lay in the daemon's future).
        log(
            f"{row.n:,} jobs: {res.steady_bunched} first fires at t_seed+"
            f"{common[0][0] - t_seed:.3f}s; aimed at d in [{d_lo:.3f}, {d_hi:.3f}]s, "
            f"Popen at t_seed+{d.popen_wall - t_seed:.3f}s"
        )
    late = [s - sc for _, sc, s, _ in runs if sc is not None and s is not None and a <= sc < b]
    res.steady_asked = max(round((b - a) * STEADY_RATE), len(late))
    res.steady_ran = len(late)
    ended = sum(1 for _, _, _, e in runs if e is not None and a < e <= b)
    res.steady_rate = ended / (b - a)  # what it did, due in the window or before
    res.steady_cpu = (c1 - c0) / (b - a)
    if ended:
        res.steady_cpu_per_run = (c1 - c0) / ended
    late.sort()
    res.late_ran_p99 = _pct(late, 0.99)
    # A run due in the window that never started is infinitely late.
    late += [math.inf] * (res.steady_asked - len(late))
    res.late_p50, res.late_p99, res.late_max = (
        _pct(late, 0.50),
        _pct(late, 0.99),
        late[-1] if late else math.nan,
    )


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_row(n: int, args: argparse.Namespace) -> Result:
    res = Result(jobs=n)
    with tempfile.TemporaryDirectory(prefix=f"pk-scale-{n}-") as tmp:
        row = Row(Path(tmp), n, args.log_level)
        spec = row.spec("hourly", "1h")
        steps = ["check", "burst", "idle", "steady"]
        d_cached = math.nan
        for step in steps:
            try:
                log(f"{n:,} jobs: {step}")
                if step == "check":
                    repeat = 1 if args.quick or n > 1000 else 3
                    res.check_s = time_check(spec, repeat)
                elif step == "burst":
                    measure_burst(row, res, spec, args.burst_cap, args.ready_timeout)
                elif step == "idle":
                    d_cached = measure_idle(row, res, spec, args.idle, args.ready_timeout)
                elif not math.isnan(d_cached):
                    measure_steady(row, res, d_cached, args.window, args.ready_timeout)
            except Exception as exc:  # one failed step: say so in the table, go on with the rest
                log(f"{n:,} jobs: {step} failed: {type(exc).__name__}: {exc}")
                res.errors.append(f"{step}: {exc}")
    return res


# --- baselines ----------------------------------------------------------------------------


def _noop(_: int) -> None:
    return None


def raw_pool_rate(runs: int) -> float:
    """multiprocessing.Pool(2), fork, imap_unordered of no-op calls, chunksize 1 (one call per
    message, as the daemon sends one run per message)."""
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        list(pool.imap_unordered(_noop, range(200), chunksize=1))  # workers up and warm
        t0 = time.perf_counter()
        for _ in pool.imap_unordered(_noop, range(runs), chunksize=1):
            pass
        took = time.perf_counter() - t0
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return runs / took


def saturated_daemon(window: float, ready_timeout: float, log_level: str) -> tuple[float, float]:
    """20 jobs `every: 1ms`: (runs/s sustained, main-process CPU s per run)."""
    with tempfile.TemporaryDirectory(prefix="pk-scale-1ms-") as tmp:
        row = Row(Path(tmp), 20, log_level)
        spec = row.spec("fast", "1ms")
        row.fresh_state()
        d = row.start(spec, ready_timeout)
        try:
            time.sleep(1.0)
            c0, a = cpu_seconds(d.pid), time.time()
            time.sleep(window)
            c1, b = cpu_seconds(d.pid), time.time()
        finally:
            row.stop(d)
        ended = sum(1 for _, _, _, e in row.runs() if e is not None and a < e <= b)
    return ended / (b - a), (c1 - c0) / ended if ended else math.nan


@dataclass
class Baselines:
    saturated: list[float] = field(default_factory=list)  # runs/s
    saturated_cpu: list[float] = field(default_factory=list)  # s per run
    raw: list[float] = field(default_factory=list)  # runs/s

    def measure(self, args: argparse.Namespace, when: str) -> None:
        log(f"baselines ({when}): 20 jobs every 1ms, multiprocessing.Pool(2)")
        try:
            rate, cpu = saturated_daemon(args.baseline_window, args.ready_timeout, args.log_level)
            self.saturated.append(rate)
            self.saturated_cpu.append(cpu)
        except Exception as exc:
            log(f"20 jobs every 1ms failed: {type(exc).__name__}: {exc}")
        self.raw.append(raw_pool_rate(args.raw_runs))


def median_result(samples: list[Result]) -> Result:
    """Per field, the median of the rounds (a failed measurement, NaN, left out)."""
    if len(samples) == 1:
        return samples[0]
    out = Result(jobs=samples[0].jobs)
    for name, value in asdict(samples[0]).items():
        values = [getattr(s, name) for s in samples]
        if name == "errors":
            out.errors = [e for s in samples for e in s.errors]
        elif isinstance(value, bool):
            setattr(out, name, any(values))
        elif isinstance(value, int | float) and name != "jobs":
            kept = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            med = statistics.median(kept) if kept else math.nan
            setattr(out, name, type(value)(med) if kept or isinstance(value, float) else value)
    return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


# --- output -------------------------------------------------------------------------------


def _ms(s: float) -> str:
    if math.isnan(s):
        return "—"
    if math.isinf(s):
        return "never"
    return f"{s * 1000:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def _x(ratio: float) -> str:
    # Two significant digits below 0.1: before the scale work a ratio can be 0.003x.
    return f"{ratio:.2f}x" if ratio >= 0.1 or ratio == 0 else f"{ratio:.2g}x"


def _ratio(value: float, ref: float) -> str:
    if math.isnan(value) or math.isnan(ref) or ref == 0:
        return ""
    return f" ({_x(value / ref)})"


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b else "—"


def _us(s: float) -> str:
    return "—" if math.isnan(s) else f"{s * 1e6:,.0f} µs"


def _pc(f: float) -> str:
    return "—" if math.isnan(f) else f"{f * 100:.2f}%"


def table(results: list[Result], base: Baselines) -> str:
    ref = next(r for r in results if r.jobs == min(x.jobs for x in results))
    sat = _mean(base.saturated)
    out = [
        f"Ratios in brackets: to the {ref.jobs}-job row; burst runs/s: to 20 jobs `every: 1ms` "
        f"({sat:,.0f} runs/s, the mean of {len(base.saturated)} measurements of this run).",
        "",
        "| jobs | check | per job beyond the first row | start to READY, cold | start to READY, "
        "cached | RSS after READY, cold | RSS after READY, cached | RSS after the burst "
        "| burst runs/s | main CPU/run, burst | idle main CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        extra = _us((r.check_s - ref.check_s) / (r.jobs - ref.jobs)) if r.jobs != ref.jobs else ""
        burst = "—" if math.isnan(r.burst_rate) else f"{r.burst_rate:,.0f}"
        if r.burst_capped:
            burst += f" (capped: {r.burst_runs:,} of {r.jobs:,} runs)"
        out.append(
            f"| {r.jobs:,} | {_ms(r.check_s)}{_ratio(r.check_s, ref.check_s)} | {extra} "
            f"| {_ms(r.ready_cold_s)}{_ratio(r.ready_cold_s, ref.ready_cold_s)} "
            f"| {_ms(r.ready_cached_s)}{_ratio(r.ready_cached_s, ref.ready_cached_s)} "
            f"| {_mib(r.rss_ready_cold)}{_ratio(r.rss_ready_cold, ref.rss_ready_cold)} "
            f"| {_mib(r.rss_ready)}{_ratio(r.rss_ready, ref.rss_ready)} "
            f"| {_mib(r.rss_burst)}{_ratio(r.rss_burst, ref.rss_burst)} "
            f"| {burst}{_ratio(r.burst_rate, sat)} "
            f"| {_us(r.burst_cpu_per_run)} "
            f"| {_pc(r.idle_cpu)}{_ratio(r.idle_cpu, ref.idle_cpu)} |"
        )
    out += [
        "",
        f"Steady: N jobs `every: N/{STEADY_RATE:,.0f} s` ({STEADY_RATE:,.0f} runs/s asked); "
        "lateness = started minus scheduled; a run due in the window that never started counts "
        "as never (infinitely late).",
        "",
        "| jobs | every | phases | runs/s done (due in the window: started of asked) "
        "| lateness p50 | p99 | max "
        "| p99 of the runs that started | main CPU | main CPU/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.steady_asked:
            out.append(f"| {r.jobs:,} | | | — | | | | | | |")
            continue
        phases = f"spread over {r.steady_spread:.0%}" if r.steady_spread else "in phase"
        if r.steady_bunched:
            phases += f", {r.steady_bunched:,} first fires together"
        out.append(
            f"| {r.jobs:,} | {_ms(r.steady_every)} | {phases} "
            f"| {r.steady_rate:,.0f} ({r.steady_ran:,} of {r.steady_asked:,}) "
            f"| {_ms(r.late_p50)} | {_ms(r.late_p99)} | {_ms(r.late_max)} "
            f"| {_ms(r.late_ran_p99)} | {_pc(r.steady_cpu)} "
            f"| {_us(r.steady_cpu_per_run)}{_ratio(r.steady_cpu_per_run, ref.steady_cpu_per_run)} |"
        )
    raw = _mean(base.raw)
    out += [
        "",
        "| baseline | runs/s | main CPU/run |",
        "|---|---|---|",
        f"| 20 jobs `every: 1ms`, sustained (poolkeeper end to end) "
        f"| {_runs(base.saturated)} | {_us(_mean(base.saturated_cpu))} |",
        f"| multiprocessing.Pool(2), fork, imap_unordered no-op, chunksize 1 | {_runs(base.raw)} "
        "| |",
        f"| poolkeeper end to end / raw pool | {_x(sat / raw)} (goal >= 0.5x) | |",
    ]
    goals = [
        ("burst runs/s, 10,000 jobs / 20 jobs every 1ms", 10_000, "burst", ">= 0.8x"),
        ("burst runs/s, 50,000 jobs / 20 jobs every 1ms", 50_000, "burst", ">= 0.5x"),
        ("idle main CPU, 10,000 jobs", 10_000, "idle", "<= 1%"),
        ("RSS after READY (cached start), 10,000 jobs / 10 jobs", 10_000, "rss", "<= 2x"),
        ("RSS after READY (cold start), 10,000 jobs / 10 jobs", 10_000, "rss_cold", "<= 2x"),
        ("lateness p99 at 1,000 runs/s over 1,000 jobs", 1_000, "late", "<= 5 ms"),
    ]
    by_n = {r.jobs: r for r in results}
    lines = []
    for label, n, what, goal in goals:
        r = by_n.get(n)
        if r is None:
            continue
        if what == "burst":
            value = _x(r.burst_rate / sat)
        elif what == "idle":
            value = _pc(r.idle_cpu)
        elif what == "rss":
            value = f"{r.rss_ready / ref.rss_ready:.2f}x" if ref.rss_ready else "—"
        elif what == "rss_cold":
            value = f"{r.rss_ready_cold / ref.rss_ready_cold:.2f}x" if ref.rss_ready_cold else "—"
        else:
            value = _ms(r.late_p99)
        lines.append(f"| {label} | {value} | {goal} |")
    if lines:
        out += ["", "| done when | measured | goal |", "|---|---|---|", *lines]
    errors = [f"- {r.jobs:,} jobs, {e}" for r in results for e in r.errors]
    if errors:
        out += ["", "Failed steps:", *errors]
    return "\n".join(out)


def _runs(values: list[float]) -> str:
    if not values:
        return "—"
    each = " / ".join(f"{v:,.0f}" for v in values)
    return f"{_mean(values):,.0f} ({each})" if len(values) > 1 else each


def plot(results: list[Result], base: Baselines, path: Path) -> None:
    import matplotlib  # the `bench` extra; only this script needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.jobs for r in results]

    def positive(values: list[float]) -> list[float]:  # a log axis has no 0
        return [v if v > 0 else math.nan for v in values]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(xs, positive([r.burst_rate for r in results]), "o-", label="first-fire burst")
    left.plot(
        xs, positive([r.steady_rate for r in results]), "s--", label="steady (1,000 runs/s asked)"
    )
    if base.saturated:
        left.axhline(_mean(base.saturated), color="grey", ls=":", label="20 jobs every 1ms")
    if base.raw:
        left.axhline(_mean(base.raw), color="black", ls="-.", label="raw Pool(2) imap_unordered")
    left.set(xscale="log", yscale="log", xlabel="jobs in the spec", ylabel="runs/s")
    left.set_title("runs/s")
    left.legend(fontsize=8)
    right.plot(xs, positive([r.steady_cpu_per_run * 1e6 for r in results]), "s--", label="steady")
    right.plot(xs, positive([r.burst_cpu_per_run * 1e6 for r in results]), "o-", label="burst")
    if base.saturated_cpu:
        right.axhline(
            _mean(base.saturated_cpu) * 1e6, color="grey", ls=":", label="20 jobs every 1ms"
        )
    right.set(xscale="log", yscale="log", xlabel="jobs in the spec", ylabel="µs per run")
    right.set_title("main-process CPU per run")
    right.legend(fontsize=8)
    fig.suptitle(f"poolkeeper, 2 fork workers, no-op jobs ({time.strftime('%Y-%m-%d')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs",
        default=",".join(str(n) for n in DEFAULT_JOBS),
        help="numbers of jobs, comma-separated (10 is always added: the reference row)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke run: 10,100,1000, short windows"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of every row; medians are shown"
    )
    parser.add_argument("--burst-cap", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU (default 10)")
    parser.add_argument("--window", type=float, default=10.0, help="steady window, s (default 10)")
    parser.add_argument("--baseline-window", type=float, default=5.0)
    parser.add_argument("--raw-runs", type=int, default=30_000)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument("--plot", type=Path, default=HERE / "scale.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: the tables and plot of a --json file"
    )
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results = [Result(**r) for r in saved["results"]]
        base = Baselines(**saved["baselines"])
        print(table(results, base), flush=True)
        if not args.no_plot:
            plot(results, base, args.plot)
        return 0
    if args.quick:
        if args.jobs == parser.get_default("jobs"):
            args.jobs = "10,100,1000"
        args.burst_cap, args.idle, args.window = 5.0, 3.0, 3.0
        args.baseline_window, args.raw_runs = 2.0, 5_000
    sizes = sorted({10, *(int(x) for x in args.jobs.split(",") if x.strip())})

    # SIGTERM to the bench unwinds like Ctrl-C: every `finally` stops its daemon.
    signal.signal(signal.SIGTERM, _interrupted)
    base = Baselines()
    rounds: list[list[Result]] = []
    for number in range(1, args.rounds + 1):
        # Interleaved: each round measures the baselines and every row, so a change in the
        # shared machine's speed hits them alike.
        base.measure(args, f"round {number} of {args.rounds}")
        rounds.append([measure_row(n, args) for n in sizes])
    base.measure(args, "after the rows")
    results = [median_result([r[i] for r in rounds]) for i in range(len(sizes))]
    print(table(results, base), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [asdict(r) for r in results],
                    "rounds": [[asdict(r) for r in rows] for rows in rounds],
                    "baselines": asdict(base),
                },
                indent=1,
                default=str,
            )
        )
    if not args.no_plot:
        try:
            plot(results, base, args.plot)
            log(f"plot written to {args.plot}")
        except ImportError:
            log("no matplotlib: no plot (pip install -e '.[bench]', or --no-plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
