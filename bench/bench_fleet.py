"""Fleet benchmarks (issue 11), against a real PostgreSQL 15 this run starts (tests/pg_server.py)
and real daemons (tests/fleet_harness.py), the jobs recording themselves (tests/fleet_jobs.py).

1. Claims/s by hosts (1, 2, 4) and batch size (1, 10): poolkeeper.fleet.db.claim_fires called
   directly, one process per host, each with its own connection and its own registered
   incarnation, until FIRES ready fires are all claimed. Every claimed id is counted: a fire
   claimed twice is a duplicate. Rounds interleaved; the baseline is 1 host, batch 1.
2. Fire-to-start latency: an `every: 100ms` job on 3 fleet daemons for LATENCY_FOR seconds
   (started_at, the job's own clock at entry, minus the nominal time), p50/p99/max per host;
   the baseline is the same job on one daemon without `fleet:` for the same time.
3. Failover with `lease: 5s`: 3 daemons, a 3-replica loop and a 200 ms interval job. The host
   that runs replica 0 is SIGKILLed, SIGSTOPped or stopped (SIGTERM); failover = from the
   signal to the first moment replica 0 runs on another host (the start of its first recorded
   span). Also: the interval job's longest gap between starts, and, for SIGSTOP, how long the
   frozen host's run outlived its slot (fenced out by ctx.fence).
4. Rebalancing: the victim started again (a host joins a fleet that runs all 3 replicas on the
   other two): from its start to its first replica run, and from its registration.

Run: .venv/bin/python bench/bench_fleet.py [--rounds N] [--quick]   (prints markdown)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fleet_jobs  # noqa: E402
import pg_server  # noqa: E402
import psycopg  # noqa: E402
from fleet_harness import Fleet, fleet_spec, query, wait_until  # noqa: E402

from poolkeeper.fleet import db  # noqa: E402
from poolkeeper.outcomes import Outcome  # noqa: E402
from poolkeeper.state.postgres import _migrate  # noqa: E402

FIRES = 4000
LEASE = 5.0
HEARTBEAT = LEASE / 6
LATENCY_FOR = 20.0


# -- 1. claims/s -------------------------------------------------------------------------------


def _claimer(url: str, incarnation: str, host: str, batch: int, go, out) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        go.wait()
        ids: list[int] = []
        while True:
            got = db.claim_fires(conn, incarnation, host, ["bench"], batch)
            if not got:
                break
            ids += [c.fire_id for c in got]
        out.put(ids)


def claims_round(url: str, hosts: int, batch: int) -> tuple[float, int]:
    """Claims/s of `hosts` processes claiming `batch` at a time; and duplicates seen."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM pk_fires")
        conn.execute("DELETE FROM pk_hosts")
        conn.execute(
            "INSERT INTO pk_fires (job, fire_key, scheduled, due_at)"
            " SELECT 'bench', 'k' || i, i, now() FROM generate_series(1, %s) i",
            (FIRES,),
        )
        conn.execute("VACUUM ANALYZE pk_fires")
        incs = [
            db.register(
                conn,
                host_id=f"h{i}",
                version="bench",
                spec_hash="bench",
                pid=os.getpid(),
                capacity=batch,
                lease=3600,
            )
            for i in range(hosts)
        ]
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_claimer, args=(url, inc, f"h{i}", batch, go, out))
        for i, inc in enumerate(incs)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # every claimer connected
    start = time.perf_counter()
    go.set()
    claimed = [out.get(timeout=300) for _ in procs]
    took = time.perf_counter() - start
    for p in procs:
        p.join(30)
    ids = [i for part in claimed for i in part]
    assert len(ids) >= FIRES, (len(ids), FIRES)
    return FIRES / took, len(ids) - len(set(ids))


def bench_claims(url: str, rounds: int) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        _migrate(conn)
        db.sync_jobs(conn, [db.JobInfo("bench", "allow", "record", 0)])
    shapes = [(h, b) for b in (1, 10) for h in (1, 2, 4)]
    rates: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    dups = 0
    for _ in range(rounds):  # interleaved: each round measures every shape once
        for shape in shapes:
            rate, dup = claims_round(url, *shape)
            rates[shape].append(rate)
            dups += dup
    base = statistics.median(rates[(1, 1)])
    lines = [
        f"Claims/s ({FIRES} ready fires, `claim_fires` called directly, median of {rounds}"
        " interleaved rounds; ratio to 1 host, batch 1):",
        "",
        "| hosts | batch | claims/s | ratio | rounds |",
        "|---|---|---|---|---|",
    ]
    for h, b in shapes:
        med = statistics.median(rates[(h, b)])
        each = " / ".join(f"{r:,.0f}" for r in rates[(h, b)])
        lines.append(f"| {h} | {b} | {med:,.0f} | {med / base:.2f}x | {each} |")
    lines += ["", f"Fires claimed twice: {dups}."]
    return lines


# -- 2. fire-to-start latency ------------------------------------------------------------------


def _percentiles(url: str, where: str = "TRUE") -> tuple[int, float, float, float]:
    row = query(
        url,
        "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - scheduled_at),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - scheduled_at),"
        f" max(started_at - scheduled_at) FROM fire_runs WHERE job = 'tick' AND {where}",
    )[0]
    return int(row[0]), row[1] * 1000, row[2] * 1000, row[3] * 1000


def _settle_and_measure(url: str, until: float) -> None:
    """Throw away the start (imports, first connections), then record LATENCY_FOR seconds."""
    wait_until(lambda: time.time() > until, 120, "the start to settle")
    query(url, "DELETE FROM fire_runs")
    time.sleep(LATENCY_FOR)


def _latency_of(root: Path, hosts: list[str], fleet: bool) -> str:
    """Run the `every: 100ms` job on `hosts` (fleet members or a single host) and return the
    database its runs are recorded in."""
    url = pg_server.fresh_database()
    fleet_jobs.create_tables(url)
    spec = fleet_spec(url, lease=LEASE if fleet else None, workers=2, every="100ms")
    daemons = Fleet(root / ("fleet" if fleet else "solo"), spec, hosts)
    try:
        daemons.start()
        _settle_and_measure(url, time.time() + 5)
        daemons.stop()
    finally:
        daemons.close()
    return url


def bench_latency(root: Path) -> tuple[list[str], float]:
    base = _percentiles(_latency_of(root, ["solo"], fleet=False))
    url = _latency_of(root, ["a", "b", "c"], fleet=True)
    lines = [
        f"Fire-to-start latency (`every: 100ms`, {LATENCY_FOR:.0f} s; started_at in the job minus"
        " the nominal time; ratio to one daemon without `fleet:`):",
        "",
        "| runs on | runs | p50 | p99 | max | p99 ratio |",
        "|---|---|---|---|---|---|",
        f"| one daemon, no fleet (baseline) | {base[0]} | {base[1]:.1f} ms | {base[2]:.1f} ms"
        f" | {base[3]:.1f} ms | 1.00x |",
    ]
    allp = _percentiles(url)
    lines.append(
        f"| fleet of 3, all | {allp[0]} | {allp[1]:.1f} ms | {allp[2]:.1f} ms | {allp[3]:.1f} ms"
        f" | {allp[2] / base[2]:.2f}x |"
    )
    for host in ("a", "b", "c"):
        n, p50, p99, mx = _percentiles(url, f"host = '{host}'")
        lines.append(f"| fleet, host {host} | {n} | {p50:.1f} ms | {p99:.1f} ms | {mx:.1f} ms | |")
    dups = query(url, "SELECT count(*) FROM violations")[0][0]
    lines += ["", f"Duplicate fires (violations): {dups}. Goal: fleet p99 under 50 ms."]
    return lines, allp[2]


# -- 3/4. failover and rebalancing -------------------------------------------------------------


def _owner(url: str, replica: int) -> str:
    return query(
        url,
        "SELECT host FROM slot_spans WHERE job = 'spin' AND replica = %s"
        " ORDER BY upper(span) DESC LIMIT 1",
        (replica,),
    )[0][0]


def _spread(url: str, since: float) -> bool:
    """Every host runs a replica (a span recorded since `since`)."""
    rows = query(
        url,
        "SELECT count(DISTINCT host), count(DISTINCT replica) FROM slot_spans"
        " WHERE job = 'spin' AND lower(span) > to_timestamp(%s)",
        (since,),
    )
    return rows[0] == (3, 3)


def _first_span(url: str, since: float, where: str, *params: object) -> float | None:
    """When the first run of `spin` that matches `where` and was alive after `since` began."""
    row = query(
        url,
        "SELECT extract(epoch FROM min(lower(span))) FROM slot_spans WHERE job = 'spin'"
        f" AND lower(span) > to_timestamp(%s) AND {where}",
        (since, *params),
    )[0][0]
    return None if row is None else float(row)


def _taken_over(url: str, victim: str, since: float) -> float | None:
    first = _first_span(url, since, "replica = 0 AND host <> %s", victim)
    return None if first is None else first - since


def _longest_gap(url: str, since: float, until: float) -> float:
    starts = [
        r[0]
        for r in query(
            url,
            "SELECT started_at FROM fire_runs WHERE job = 'tick' AND started_at BETWEEN %s AND %s"
            " ORDER BY 1",
            (since - 1, until),
        )
    ]
    return max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=float("nan"))


def _fault_round(
    fleet: Fleet, url: str, fault: str
) -> tuple[float, float, tuple[float, float] | None]:
    """One fault on the host that runs replica 0, and its recovery: (failover, the interval
    job's longest gap, and for a host started again (its start, its registration) to its
    first replica run)."""
    victim = fleet[_owner(url, 0)]
    t0 = time.time()
    if fault == "SIGKILL":
        victim.kill()
    elif fault == "SIGSTOP":
        victim.freeze()
    else:
        victim.stop()
    wait_until(lambda: _taken_over(url, victim.host, t0) is not None, 30, "takeover")
    took = _taken_over(url, victim.host, t0)
    assert took is not None
    back = None
    if fault == "SIGSTOP":
        while time.time() < t0 + LEASE + 1:  # past its lease
            time.sleep(0.05)
        offset = victim.log_path.stat().st_size
        victim.thaw()
        victim.wait_log("fleet: registered as", after=offset)
        joined = t0
    else:
        joined = time.time()
        victim.start()
        registered = victim.wait_log("fleet: registered as")
    gap = _longest_gap(url, t0, time.time())
    wait_until(
        lambda: _first_span(url, joined, "host = %s", victim.host) is not None,
        60,
        f"{victim.host} running a replica again",
    )
    if fault != "SIGSTOP":
        first = _first_span(url, joined, "host = %s", victim.host)
        assert first is not None
        back = (first - joined, first - joined - registered)
    wait_until(lambda: _spread(url, time.time() - 1), 60, "3 replicas on 3 hosts")
    return took, gap, back


def bench_failover(root: Path, rounds: int) -> tuple[list[str], float]:
    url = pg_server.fresh_database()
    fleet_jobs.create_tables(url)
    spec = fleet_spec(url, lease=LEASE, workers=5, every="200ms", replicas=3)
    fleet = Fleet(root / "failover", spec, ["a", "b", "c"])
    results: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": [], "SIGTERM": []}
    gaps: dict[str, list[float]] = {k: [] for k in results}
    rejoin: list[tuple[float, float]] = []
    try:
        fleet.start()
        wait_until(lambda: _spread(url, time.time() - 1), 60, "3 replicas on 3 hosts")
        for _ in range(rounds):
            for fault in results:
                took, gap, back = _fault_round(fleet, url, fault)
                results[fault].append(took)
                gaps[fault].append(gap)
                if back is not None:
                    rejoin.append(back)
        fleet.stop()
    finally:
        fleet.close()
    overlap = max((s for _, s in query(url, fleet_jobs.OUTLIVED)), default=0.0)
    violations = query(url, "SELECT count(*) FROM violations")[0][0]
    lost = query(url, "SELECT count(*) FROM pk_fires WHERE outcome = %s", (Outcome.LOST.value,))[0][
        0
    ]
    lines = [
        f"Failover with `lease: {LEASE:.0f}s` (heartbeat {HEARTBEAT:.2f} s; promise: lease +"
        f" heartbeat = {LEASE + HEARTBEAT:.2f} s); {rounds} rounds, the faults interleaved;"
        " from the signal to replica 0 running on another host:",
        "",
        "| fault | failover median | max | rounds | interval job: longest gap between starts |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for fault, took in results.items():
        worst = max(worst, max(took))
        each = " / ".join(f"{t:.2f}" for t in took)
        lines.append(
            f"| {fault} | {statistics.median(took):.2f} s | {max(took):.2f} s | {each}"
            f" | {max(gaps[fault]):.2f} s |"
        )
    lines += [
        "",
        f"SIGSTOP: the frozen host's run outlived its slot by at most {overlap:.2f} s"
        " (its workers are not frozen; its writes were fenced out by ctx.fence). Fires lost"
        f" with their host: {lost}. Violations (duplicate fires, overlapping slots): {violations}.",
        "",
        "Rebalancing: the stopped or killed host started again, into a fleet running the 3"
        " replicas on the other two:",
        "",
        "| from | median | max |",
        "|---|---|---|",
        f"| its start to its first replica run | {statistics.median(r[0] for r in rejoin):.2f} s"
        f" | {max(r[0] for r in rejoin):.2f} s |",
        f"| its registration to its first replica run | {statistics.median(r[1] for r in rejoin):.2f} s"
        f" | {max(r[1] for r in rejoin):.2f} s |",
    ]
    return lines, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, fewer fires")
    args = parser.parse_args()
    global FIRES, LATENCY_FOR
    rounds = 1 if args.quick else args.rounds
    if args.quick:
        FIRES, LATENCY_FOR = 1000, 8.0
    server = pg_server.PgServer()
    why = server.unavailable()
    if why:
        print(f"bench_fleet: {why}", file=sys.stderr)
        return 1
    pg_server._server = server  # fresh_database() uses it
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            root = Path(tmp)
            out = bench_claims(pg_server.fresh_database(), rounds)
            latency, p99 = bench_latency(root)
            out += [""] + latency
            failover, worst = bench_failover(root, rounds)
            out += [""] + failover
    finally:
        server.stop()
    out += [
        "",
        "| done when | measured | goal |",
        "|---|---|---|",
        f"| failover, worst of every fault | {worst:.2f} s | < 7 s |",
        f"| fire-to-start p99, fleet of 3 | {p99:.1f} ms | < 50 ms |",
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
