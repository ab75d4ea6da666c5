"""poolkeeper under a real systemd 252: start to READY=1 and stop of an idle unit, from systemd's
own timestamps, against a minimal Type=notify Python service in the same sandbox.

* start: ActiveEnterTimestampMonotonic - ExecMainStartTimestampMonotonic (fork of the main
  process to READY=1 processed). poolkeeper: 4 workers (forkserver), one idle job. Baseline:
  `python -c` that sends READY=1 at once. Both run the shipped unit's [Service] settings (user,
  hardening: namespace set-up is part of what systemd times), only ExecStart= differs.
  Goal: poolkeeper <= baseline + 150 ms.
* stop: InactiveEnterTimestampMonotonic - ActiveExitTimestampMonotonic of the idle unit
  (SIGTERM, drain of nothing, join of 4 workers, exit). Goal: < 100 ms.

Needs root and the tests' sandbox (tests/systemd/sandbox.py). Prints a markdown table.
Usage: python bench/bench_systemd.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "systemd"), str(ROOT / "tests")]

import e2e_support as e2e  # noqa: E402
from sandbox import Sandbox  # noqa: E402

from poolkeeper.service import unit as units  # noqa: E402

BASELINE = (
    "import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
    "a = os.environ['NOTIFY_SOCKET']; s.connect('\\0' + a[1:] if a[0] == '@' else a); "
    "s.send(b'READY=1'); import signal; signal.pause()"
)

SPEC = e2e.config(
    """
    idle:
      target: e2e_jobs:quick
      every: 1h
    """,
    workers=4,
)


def timestamps(sb: Sandbox, unit: str) -> dict[str, int]:
    names = (
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
        "ActiveExitTimestampMonotonic",
        "InactiveEnterTimestampMonotonic",
    )
    return {k: int(v) for k, v in sb.show(unit, *names).items()}


def measure(
    sb: Sandbox, units: list[str], rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """(starts, stops) per unit in ms. The units take turns within each round, so a change
    in the shared machine's speed hits them alike."""
    results: dict[str, tuple[list[float], list[float]]] = {unit: ([], []) for unit in units}
    for round_number in range(rounds + 1):  # the first round warms the page cache
        for unit in units:
            sb.systemctl("start", unit)
            sb.systemctl("stop", unit)
            if round_number == 0:
                continue
            ts = timestamps(sb, unit)
            starts, stops = results[unit]
            starts.append(
                (ts["ActiveEnterTimestampMonotonic"] - ts["ExecMainStartTimestampMonotonic"]) / 1000
            )
            stops.append(
                (ts["InactiveEnterTimestampMonotonic"] - ts["ActiveExitTimestampMonotonic"]) / 1000
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sb = Sandbox.boot()
    try:
        pk = e2e.install_instance(sb, "bench", SPEC)
        base = e2e.install_instance(
            sb,
            "bench-baseline",
            SPEC,
            f'ExecStart=\nExecStart={e2e.PYTHON} -c "{BASELINE}"\n',
        )
        # The unit's user cannot write __pycache__: compile what a checkout may have stale
        # (a `pip install` compiles at install time).
        sb.run(e2e.PYTHON, "-m", "compileall", "-q", str(ROOT / "poolkeeper"), e2e.JOBS_DIR)
        cold = e2e.install_instance(
            sb,
            "bench-cold",
            SPEC,
            f"ExecStart=\nExecStart={units.exec_quote(e2e.COMMAND)} run --no-config-cache "
            "%E/poolkeeper/bench-cold.yaml\n",
        )
        for unit in (pk, cold, base):
            e2e.keep_loaded(sb, unit)
        try:
            results = measure(sb, [pk, cold, base], args.rounds)
            (pk_start, pk_stop), (cold_start, _), (base_start, base_stop) = (
                results[pk],
                results[cold],
                results[base],
            )
            hits = sum("not validated again" in m for m in e2e.journal_messages(sb, "-u", pk))
        finally:
            e2e.cleanup(sb, pk, cold, base)
    finally:
        sb.poweroff()
    med = statistics.median
    print(f"systemd 252 sandbox, {args.rounds} rounds, median (min-max) in ms\n")
    print("| measure | poolkeeper (4 workers) | minimal notify service | difference | goal |")
    print("| --- | --- | --- | --- | --- |")
    base_cell = f"{med(base_start):.0f} ({min(base_start):.0f}-{max(base_start):.0f})"
    for label, starts in (
        ("start to READY (config unchanged: validation cached)", pk_start),
        ("start to READY (`--no-config-cache`: full validation)", cold_start),
    ):
        print(
            f"| {label} | {med(starts):.0f} ({min(starts):.0f}-{max(starts):.0f}) "
            f"| {base_cell} | +{med(starts) - med(base_start):.0f} | <= +150 |"
        )
    print(
        f"| stop (idle) | {med(pk_stop):.0f} ({min(pk_stop):.0f}-{max(pk_stop):.0f}) "
        f"| {med(base_stop):.0f} ({min(base_stop):.0f}-{max(base_stop):.0f}) "
        f"| +{med(pk_stop) - med(base_stop):.0f} | < 100 |"
    )
    print(f"\n{hits} of the {args.rounds + 1} cached starts (the first warms up) used the cache.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
