"""`poolkeeper top`: in a real terminal (tmux: send-keys, capture-pane) against a real daemon,
and as plain text when stdout is not a terminal; its last-hour counts against a real SQLite."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poolkeeper.state.identity import store_at
from poolkeeper.top import HourCounts

SPEC = """
    pool: {workers: 3, start_method: fork}
    jobs:
      tick: {target: daemon_jobs:ok, every: 200ms}
      bad: {target: daemon_jobs:fail, every: 300ms}
      consume:
        target: daemon_jobs:loop_units
        loop: {replicas: 1}
        kwargs: {out_dir: $OUT}
      yearly: {target: daemon_jobs:ok, cron: "0 0 1 1 *"}
    """
JOBS = ("tick", "bad", "consume", "yearly")


class Tmux:
    """A private tmux server (its own socket and config), killed at the end of the test: its
    panes keep their process's exit status (remain-on-exit) for the test to read."""

    def __init__(self, tmp_path: Path) -> None:
        assert shutil.which("tmux"), "tmux is missing: `make deps` installs it (APT_PACKAGES)"
        self.socket = str(tmp_path / "tmux.sock")
        self.conf = tmp_path / "tmux.conf"
        self.status = tmp_path / "top.status"
        self.conf.write_text("set -g remain-on-exit on\nset -g status off\n")

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-S", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, (args, proc.stderr)
        return proc.stdout

    def start(self, name: str, command: str) -> None:
        self("new-session", "-d", "-x", "120", "-y", "30", "-s", name, command)

    def screen(self, name: str) -> list[str]:
        return [line.rstrip() for line in self(*("capture-pane", "-p", "-t", name)).splitlines()]

    def start_top(self, config: Path) -> None:
        """`poolkeeper top` in a pane of its own; its exit status goes to a file. Not tmux's
        #{pane_dead_status}: tmux 3.3a now and then misses the SIGCHLD of a pane's process
        and leaves it a zombie, with no status. bash, not sh: on Ctrl-C, which the whole
        foreground group gets, bash goes on when its child did not die of it; dash dies."""
        top = shlex.join([sys.executable, "-m", "poolkeeper", "top", "-c", str(config)])
        self.start("top", f"bash -c {shlex.quote(f'{top}; echo $? > {self.status}')}")

    def exit_status(self) -> str:
        """top's exit status once it exited, else ''."""
        return self.status.read_text().strip() if self.status.exists() else ""

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.close()


def until(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job_rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """The job table on a screen, cells cut at the header's column starts."""
    head = next((line for line in lines if line.startswith("JOB ")), None)
    if head is None:
        return {}
    names = ["JOB", "STATE", "NEXT", "OK/1H", "FAILED/1H", "LAST TOOK", "LAST OUTCOME"]
    starts = [head.index(name) for name in names]
    table = {}
    for line in lines[lines.index(head) + 1 :]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        if cells[0] in JOBS:
            table[cells[0]] = dict(zip(names, cells, strict=True))
    return table


def frame(tmux: Tmux) -> list[str]:
    """The screen once a whole frame is on it (its last line drawn): a capture may come in
    the middle of a redraw."""
    return until(lambda: (lines := tmux.screen("top")) and "q: quit" in lines and lines, "a frame")


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_in_a_terminal_refreshes_in_place_and_quits_clean(daemon_factory, tmux, key):
    d = daemon_factory(SPEC)
    d.wait_log("ready")
    tmux.start_top(d.config)
    lines = until(lambda: len(job_rows(lines := frame(tmux))) == 4 and lines, "the job rows")
    header, rows = lines[0], job_rows(lines)
    assert header.startswith("poolkeeper top ") and f"pid {d.pid}  running  workers " in header
    assert "/3 busy" in header and " runs/s " in header and " queued " in header
    assert lines[1].startswith("4 jobs, ")
    assert rows["consume"]["STATE"] == "running" and rows["consume"]["NEXT"] == "-"
    assert rows["yearly"]["LAST OUTCOME"] == "never" and rows["yearly"]["NEXT"].endswith(
        "-01-01 00:00"
    )
    # Values update in place: the hour's counts grow as runs end (and are written).
    first = until(lambda: int(job_rows(frame(tmux))["tick"]["OK/1H"]), "tick's first ok runs")
    until(lambda: int(job_rows(frame(tmux))["tick"]["OK/1H"]) > first, "tick's ok runs to grow")
    lines = frame(tmux)
    now = job_rows(lines)
    assert int(now["bad"]["FAILED/1H"]) >= 1 and now["bad"]["OK/1H"] == "0"
    assert (now["bad"]["LAST OUTCOME"], now["tick"]["LAST OUTCOME"]) == ("failed", "succeeded")
    assert now["tick"]["LAST TOOK"].endswith(("ms", "s"))
    assert sum(line.startswith("JOB ") for line in lines) == 1  # redrawn in place
    tmux("send-keys", "-t", "top", key)
    assert until(lambda: tmux.exit_status(), "top to exit") == "0"
    # The terminal is left as it was found: the alternate screen is gone, nothing of top's
    # stays; only tmux's own line about the pane that ended.
    left = [line for line in tmux.screen("top") if line]
    assert all(line.startswith("Pane is dead (status 0,") for line in left), left
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_top_without_a_terminal_prints_one_plain_snapshot(daemon_factory):
    d = daemon_factory(SPEC)
    d.wait_log("ready")
    d.wait_for(lambda: any(r["job"] == "bad" for r in d.runs()), what="a run of bad")
    top = [sys.executable, "-m", "poolkeeper", "top", "-c", str(d.config)]
    proc = subprocess.run(top, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout  # plain text: no escapes
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("poolkeeper top ") and f"pid {d.pid}  running" in lines[0]
    assert lines[1].startswith("4 jobs, ")
    rows = job_rows(lines)
    assert list(rows) == list(JOBS) and len(lines) == 3 + len(JOBS)
    assert rows["bad"]["LAST OUTCOME"] == "failed" and rows["consume"]["STATE"] == "running"
    rate = float(lines[0].split("runs/s ")[1].split()[0])
    assert rate > 0  # tick and bad finish several runs a second
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    gone = subprocess.run(top, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 69 and gone.stdout == ""
    assert len(gone.stderr.splitlines()) == 1 and "no poolkeeper daemon is listening" in gone.stderr


def test_the_hour_counts_slide_with_two_small_reads(tmp_path):
    """Runs enter the window as they end and leave it an hour later; what was counted once is
    never read again."""
    t = 1_800_000_000.0
    store = store_at(tmp_path / "state.db")

    def ended(run_id: str, job: str, at: float, outcome: str) -> None:
        store.run_ended(
            run_id=run_id,
            job=job,
            attempt=1,
            scheduled_at=at,
            started_at=at,
            ended_at=at,
            outcome=outcome,
        )

    ended("ancient", "a", t - 2 * 3600, "succeeded")  # never in the window
    ended("leaving", "a", t - 3590, "succeeded")
    ended("recent", "a", t - 10, "succeeded")
    ended("broke", "b", t - 20, "timeout")
    ended("stopped", "b", t - 30, "killed")  # neither ok nor a failure
    store.flush()
    reader = store_at(tmp_path / "state.db", readonly=True)
    hour = HourCounts(reader)
    hour.update(t)
    assert (hour.ok, hour.failed) == ({"a": 2}, {"b": 1})
    ended("new", "a", t + 10, "succeeded")
    ended("lost", "b", t + 12, "lost")
    ended("too new", "a", t + 18, "succeeded")  # after now - WRITE_LAG: next time
    store.flush()
    hour.update(t + 20)
    assert (hour.ok, hour.failed) == ({"a": 2}, {"b": 2})  # +new -leaving, +lost
    hour.update(t + 30)
    assert hour.ok == {"a": 3}
    reader.close()
    store.close()


def test_rich_is_imported_by_top_alone(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"version: 1\nstate: {{path: {tmp_path / 'state.db'}}}\njobs:\n  a: {{target: os:getcwd, every: 1h}}\n"
    )
    code = (
        "import sys; from poolkeeper import cli\n"
        f"for argv in (['status', '-c', {str(spec)!r}], ['status', '--json', '-c', {str(spec)!r}],"
        f" ['history', '--json', '-c', {str(spec)!r}]):\n"
        "    assert cli.main(argv) == 0\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'rich'], 'rich imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
