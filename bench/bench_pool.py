"""Pool benchmarks, each a ratio against a baseline measured in the same process.

1. Throughput: N no-op runs through poolkeeper's WorkerPool (2 workers, fork and forkserver), driven
   the way the daemon drives it (wait on waitables() until next_deadline(), poll(), submit),
   against raw `multiprocessing.Pool(2).imap_unordered(chunksize=1)`. Goal: >= 0.9x.
2. Loop-shaped: what the daemon's main loop does per run, without its schedule: submit to every
   free slot (prefetch 0, the daemon's), wait, poll() the batch of events, record each start and
   end in a real SqliteStore (a file in a temporary directory), flush(wait=False) every 0.5 s.
   Against the same raw multiprocessing.Pool; also the main process's CPU per run (µs) and the
   longest flush call (the loop's longest stall for the state). Goal: >= 0.5x.
3. Recovery: time from SIGKILL of an idle worker to its replacement reporting ready, against
   the time to start a worker at all (the same pool's start-up).

Prints a markdown table. Usage: python bench/bench_pool.py [--runs N] [--rounds R]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import sys
import tempfile
import time

from poolkeeper.pool.supervisor import RunEnded, RunStarted, Task, WorkerEvent, WorkerPool

WORKERS = 2


def noop(_: object = None) -> None:
    return None


def raw_pool(method: str, n: int) -> float:
    """Runs per second of multiprocessing.Pool(2).imap_unordered(chunksize=1)."""
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(WORKERS) as pool:
        list(pool.imap_unordered(noop, range(200), chunksize=1))  # warm up
        t0 = time.perf_counter()
        for _ in pool.imap_unordered(noop, range(n), chunksize=1):
            pass
        took = time.perf_counter() - t0
    return n / took


def our_pool(method: str, n: int, prefetch: int) -> float:
    """Runs per second through poolkeeper.pool.supervisor.WorkerPool, driven like the daemon's
    main loop."""
    pool = WorkerPool(
        workers=WORKERS,
        start_method=method,
        pythonpath=[os.path.dirname(__file__)],
        prefetch=prefetch,
    )
    pool.start()
    task = Task(run_id="r", job="bench", target="bench_pool:noop")
    try:
        _drive(pool, task, 200)  # warm up: workers ready, target imported
        t0 = time.perf_counter()
        _drive(pool, task, n)
        took = time.perf_counter() - t0
    finally:
        pool.close(timeout=5)
    return n / took


def _drive(pool: WorkerPool, task: Task, n: int) -> None:
    submitted = ended = 0
    wait = multiprocessing.connection.wait
    waitables = pool.waitables()
    while ended < n:
        while submitted < n and pool.free_slots():
            pool.submit(task)
            submitted += 1
        deadline = pool.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if timeout != 0.0:
            wait(waitables, timeout)
        for ev in pool.poll():
            if type(ev) is RunEnded:
                if ev.outcome != "succeeded":
                    raise RuntimeError(f"bench run failed: {ev}")
                ended += 1


def loop_shaped(method: str, n: int) -> tuple[float, float, float, float]:
    """(runs per second, main-process CPU µs per run, of which the loop's thread, longest
    flush call in ms) of n no-op runs driven as the daemon's loop drives the pool and the
    state store (module docstring, measure 2)."""
    from poolkeeper.state.sqlite import SqliteStore

    with tempfile.TemporaryDirectory(prefix="pk-bench-") as tmp:
        store = SqliteStore(os.path.join(tmp, "state.db"))
        store.open()
        pool = WorkerPool(
            workers=WORKERS,
            start_method=method,
            pythonpath=[os.path.dirname(__file__)],
            prefetch=0,
        )
        pool.start()
        try:
            _drive_recorded(pool, store, 200, "w")  # warm up: workers ready, target imported
            c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            longest = _drive_recorded(pool, store, n, "r")
            took, cpu = time.perf_counter() - t0, time.process_time() - c0
            main = time.thread_time() - m0
            if len(store.history(limit=None)) != n + 200:
                raise RuntimeError("bench: the store lost runs")
        finally:
            pool.close(timeout=5)
            store.close()
    return n / took, cpu / n * 1e6, main / n * 1e6, longest * 1e3


def _drive_recorded(pool: WorkerPool, store: object, n: int, prefix: str) -> float:
    """Returns the longest flush call, in seconds."""
    import inspect

    from poolkeeper.state.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    # (an older tree's store flushes in the caller's thread only: bench it as it is)
    behind = "wait" in inspect.signature(store.flush).parameters
    longest = 0.0
    submitted = ended = 0
    wait = multiprocessing.connection.wait
    waitables = pool.waitables()
    next_flush = time.monotonic() + 0.5
    while ended < n:
        while submitted < n and pool.free_slots():
            pool.submit(Task(run_id=f"{prefix}{submitted}", job="bench", target="bench_pool:noop",
                             scheduled_at=time.time()))  # fmt: skip
            submitted += 1
        deadline = pool.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if timeout != 0.0:
            wait(waitables, 0.5 if timeout is None else min(timeout, 0.5))
        for ev in pool.poll():
            if type(ev) is RunEnded:
                if ev.outcome != "succeeded":
                    raise RuntimeError(f"bench run failed: {ev}")
                t = ev.task
                store.run_ended(run_id=t.run_id, job=t.job, attempt=t.attempt,
                                scheduled_at=t.scheduled_at, started_at=ev.started_at,
                                ended_at=ev.ended_at, outcome=ev.outcome, exit_code=ev.exit_code,
                                signal=ev.signal, worker_pid=ev.worker_pid, error=ev.error)  # fmt: skip
                ended += 1
            elif type(ev) is RunStarted:
                t = ev.task
                store.run_started(run_id=t.run_id, job=t.job, attempt=t.attempt,
                                  scheduled_at=t.scheduled_at, started_at=ev.started_at,
                                  worker_pid=ev.worker_pid)  # fmt: skip
        if time.monotonic() >= next_flush:
            next_flush = time.monotonic() + 0.5
            f0 = time.perf_counter()
            if behind:
                store.flush(wait=False)  # type: ignore[call-arg]  # (see `behind`)
            else:
                store.flush()
            longest = max(longest, time.perf_counter() - f0)
    store.flush()
    return longest


def recovery(method: str, rounds: int) -> tuple[float, float]:
    """(median seconds from SIGKILL of an idle worker to its replacement's 'started',
    median seconds for a worker to become ready at pool start)."""
    pool = WorkerPool(workers=WORKERS, start_method=method, pythonpath=[os.path.dirname(__file__)])
    t_start = time.monotonic()
    pool.start()
    starts: list[float] = []
    _until(pool, lambda ev: isinstance(ev, WorkerEvent) and ev.kind == "started", WORKERS,
           on_event=lambda ev: starts.append(time.monotonic() - t_start))  # fmt: skip
    times = []
    try:
        for _ in range(rounds):
            victim = next(w.pid for w in pool._workers if w.state == "ready")
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            _until(pool, lambda ev: isinstance(ev, WorkerEvent) and ev.kind == "started", 1)
            times.append(time.monotonic() - t0)
    finally:
        pool.close(timeout=5)
    return statistics.median(times), statistics.median(starts)


def _until(pool: WorkerPool, pred, count: int, on_event=None) -> None:
    seen = 0
    limit = time.monotonic() + 30
    while seen < count:
        if time.monotonic() > limit:
            raise RuntimeError("timed out waiting for the pool")
        deadline = pool.next_deadline()
        timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        multiprocessing.connection.wait(pool.waitables(), timeout)
        for ev in pool.poll():
            if pred(ev):
                seen += 1
                if on_event:
                    on_event(ev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="best of R for throughput")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for method in ("fork", "forkserver"):
        base = max(raw_pool(method, args.runs) for _ in range(args.repeat))
        # prefetch 0 is what the daemon uses (fair dispatch: a run never waits behind a
        # long one while another worker is free); prefetch 1 is the pool's best case.
        rate, cpu, main, stall = max(loop_shaped(method, args.runs) for _ in range(args.repeat))
        rows.append((f"loop-shaped, {method}: submit, poll, record in SQLite, flush every 0.5 s",
                     f"{base:,.0f} runs/s (same)",
                     f"{rate:,.0f} runs/s; main process {cpu:.1f} µs CPU/run, its loop thread "
                     f"{main:.1f} µs; longest flush call {stall:.1f} ms",
                     f"{rate / base:.2f}x"))  # fmt: skip
        for prefetch in (0, 1):
            ours = max(our_pool(method, args.runs, prefetch) for _ in range(args.repeat))
            rows.append((f"throughput, {method}, {WORKERS} workers, no-op runs, prefetch {prefetch}",
                         f"{base:,.0f} runs/s (multiprocessing.Pool imap_unordered, chunksize=1)",
                         f"{ours:,.0f} runs/s", f"{ours / base:.2f}x"))  # fmt: skip
    for method in ("fork", "forkserver", "spawn"):
        rec, start = recovery(method, args.rounds)
        rows.append((f"SIGKILL -> replacement ready, {method}",
                     f"{start * 1000:.1f} ms (worker start at pool start)",
                     f"{rec * 1000:.1f} ms", f"{rec / start:.2f}x"))  # fmt: skip
    print("| measure | baseline | poolkeeper | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
