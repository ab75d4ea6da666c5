"""`poolkeeper top`: a live view of the running daemon, one row per job, refreshed in place.

Imported by the `top` command only: it brings `rich` (the terminal rendering) in with it, which
no other command pays for. Where the figures come from:

- the daemon's status reply over the control socket (docs/json.md, `status --json`): each
  job's state, next fire and runs in flight, the workers, the queue, and the count of runs
  finished (two readings give runs/s);
- the state DB: each job's last run (outcome, duration) and its runs of the last hour, kept as
  a sliding window: the first reading counts the hour, each later one only the runs that
  ended since the last reading and those that left the hour (two ranges of the `ended`
  index), so a refresh costs the same with a day of history or a minute.

The daemon builds its reply in its main loop (some 0.1 s at 50,000 jobs): a refresh comes no
sooner than ten times what the last one took, whatever `--interval` asks.

Without a terminal on stdout (a pipe, a file) it prints one snapshot as plain text, taken
over one interval (runs/s needs two readings) and exits.
"""

from __future__ import annotations

import os
import select
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from poolkeeper import exitcodes
from poolkeeper.config.durations import format_duration
from poolkeeper.outcomes import Outcome
from poolkeeper.printable import printable
from poolkeeper.report import open_readonly, table, took_text
from poolkeeper.service import control

if TYPE_CHECKING:
    from poolkeeper.config.settings import Config
    from poolkeeper.state.store import RunRecord, StateStore

HOUR = 3600.0
# Runs reach the state DB some time after they end (the daemon writes behind, about twice a
# second, more under load): the hour's window ends this much before now, so that a run is
# counted once it is written, never skipped for having been written late.
WRITE_LAG = 5.0
COLUMNS = ("JOB", "STATE", "NEXT", "OK/1H", "FAILED/1H", "LAST TOOK", "LAST OUTCOME")
_FAILURES = {outcome.value for outcome in Outcome if outcome.failure}


class HourCounts:
    """Runs of the last hour per job, succeeded and failed (timeout and lost included), kept
    up to date by two small reads of the state DB per update (see the module's docstring)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._upto: float | None = None
        self.ok: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def update(self, now: float) -> None:
        upto = now - WRITE_LAG
        if self._upto is None:
            self._add(self._store.ended_between(upto - HOUR, upto), 1)
        elif upto > self._upto:
            self._add(self._store.ended_between(self._upto, upto), 1)
            self._add(self._store.ended_between(self._upto - HOUR, upto - HOUR), -1)
        self._upto = upto if self._upto is None else max(self._upto, upto)

    def _add(self, counts: dict[str, dict[str, int]], sign: int) -> None:
        for job, outcomes in counts.items():
            for outcome, n in outcomes.items():
                into = self.ok if outcome == Outcome.SUCCEEDED else None
                if outcome in _FAILURES:
                    into = self.failed
                if into is not None:
                    # Never below 0: a run pruned (`keep:` under an hour) before it left the hour.
                    into[job] = max(0, into.get(job, 0) + sign * n)


class Snapshot(NamedTuple):
    """One reading: the daemon's reply (None when it did not answer, `problem` says why)."""

    taken: float  # wall clock
    reply: dict[str, Any] | None
    problem: str | None
    last: dict[str, RunRecord]
    rate: float | None  # runs finished per second since the previous reading
    cost: float  # seconds the reading took


class Source:
    """Readings of one daemon and its state DB."""

    def __init__(self, config: Config, socket_path: str | None) -> None:
        self.config = config
        self.socket_path = socket_path
        self.store = open_readonly(config)
        self.hour = HourCounts(self.store)
        self._previous: tuple[float, int, int] | None = None  # (monotonic, pid, finished)

    def close(self) -> None:
        self.store.close()

    def read(self) -> Snapshot:
        began = time.monotonic()
        reply, problem = self._ask()
        last = self.store.last_outcomes()
        taken = time.time()
        self.hour.update(taken)
        rate = None
        mono = time.monotonic()
        if reply is not None:
            pid, finished = reply.get("pid"), reply.get("finished")
            if isinstance(pid, int) and isinstance(finished, int):
                before = self._previous
                if before is not None and before[1] == pid and mono > before[0]:
                    rate = max(0, finished - before[2]) / (mono - before[0])
                self._previous = (mono, pid, finished)
        return Snapshot(taken, reply, problem, last, rate, time.monotonic() - began)

    def _ask(self) -> tuple[dict[str, Any] | None, str | None]:
        if self.socket_path is None:
            return None, "this config keeps no state file, so its daemon has no control socket"
        try:
            reply = control.request(self.socket_path, {"command": "status"}, timeout=5.0)
        except control.ControlError as exc:
            return None, str(exc)
        if reply is None or reply.get("ok") is not True:
            return None, f"the daemon says: {(reply or {}).get('message')}"
        return reply, None


def header(snap: Snapshot) -> list[str]:
    """The lines above the table."""
    clock = datetime.fromtimestamp(snap.taken).strftime("%H:%M:%S")
    if snap.reply is None:
        return [f"poolkeeper top  {clock}  daemon: not reachable ({snap.problem})"]
    r = snap.reply
    workers = r.get("workers") or {}
    rate = "-" if snap.rate is None else f"{snap.rate:.1f}"
    return [
        f"poolkeeper top  {clock}  pid {r.get('pid')}  {r.get('phase')}  "
        f"workers {workers.get('busy')}/{workers.get('total')} busy  "
        f"runs/s {rate}  queued {r.get('queued')}",
        str(r.get("message", "")),
    ]


def rows(snap: Snapshot, hour: HourCounts) -> list[tuple[str, ...]]:
    """One row of COLUMNS per job of the daemon, in its order."""
    jobs: dict[str, Any] = snap.reply.get("jobs", {}) if snap.reply is not None else {}
    out: list[tuple[str, ...]] = []
    for name, view in jobs.items():
        record = snap.last.get(name)
        running = view.get("running") or 0
        state = str(view.get("state"))
        out.append(
            (
                name,
                f"{state} ({running})" if running > 1 else state,
                _next(view.get("next"), snap.taken),
                str(hour.ok.get(name, 0)),
                str(hour.failed.get(name, 0)),
                took_text(record.duration) if record else "-",
                record.outcome if record else "never",
            )
        )
    return out


def _next(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    left = when - now
    if left < 1:
        return "now" if left > -1 else "due"
    if left < 86400:
        return "in " + format_duration(round(left))
    return datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M")


def print_snapshot(source: Source, interval: float, out: TextIO) -> int:
    """Not a terminal: one snapshot, plain text (two readings `interval` apart, for runs/s)."""
    first = source.read()
    if first.reply is None:
        print(f"poolkeeper: {printable(first.problem)}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    time.sleep(interval)
    snap = source.read()
    if snap.reply is None:
        snap = first
    for line in header(snap):
        out.write(printable(line) + "\n")
    table([COLUMNS, *rows(snap, source.hour)], out)
    return exitcodes.OK


def live(source: Source, interval: float) -> int:
    """The live view, until `q` or Ctrl-C: the terminal's alternate screen (left as it was
    found), keys read without echo or line buffering."""
    import termios
    import tty

    from rich.console import Console
    from rich.live import Live

    # The terminal's own size, followed as it changes: rich would take COLUMNS and LINES from
    # the environment for good (a shell or a test runner may have exported them once).
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)  # one key at a time, no echo; Ctrl-C still interrupts
        with Live(console=console, screen=True, auto_refresh=False) as view:
            while True:
                snap = source.read()
                view.update(_screen(snap, source.hour, console.size.height), refresh=True)
                if _quit_within(fd, max(interval, 10 * snap.cost)):
                    return exitcodes.OK
    except KeyboardInterrupt:
        return exitcodes.OK
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _screen(snap: Snapshot, hour: HourCounts, height: int) -> Any:
    """What one refresh shows: the header, then as many job rows as the terminal holds."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    lines = [Text(printable(line)) for line in header(snap)]
    body = rows(snap, hour)
    room = max(1, height - len(lines) - 3)  # the table's header, a blank line, the last line
    shown, left = body[:room], len(body) - room
    grid = Table(box=None, pad_edge=False, header_style="bold reverse")
    for column in COLUMNS:
        grid.add_column(column, no_wrap=True, overflow="ellipsis")
    for row in shown:
        grid.add_row(*(printable(cell) for cell in row))
    more = [Text(f"... {left:,} more jobs")] if left > 0 else []
    keys = Text("q: quit", style="dim")
    return Group(*lines, Text(""), grid, *more, keys)


def _quit_within(fd: int | None, seconds: float) -> bool:
    """Wait up to `seconds` for `q` on the terminal; True if it came."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            typed = os.read(fd, 64)
            if not typed:  # the terminal is gone
                return True
            if b"q" in typed.lower():
                return True


def run(config: Config, socket_path: str | None, interval: float) -> int:
    source = Source(config, socket_path)
    try:
        if not sys.stdout.isatty():
            return print_snapshot(source, interval, sys.stdout)
        return live(source, interval)
    finally:
        source.close()
