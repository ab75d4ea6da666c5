"""The journal keeps up at 1,000 runs/s and loses nothing that matters (docs/journal.md, "How
many lines a run gets").

journald rate-limits each unit, per priority: by default 10,000 messages per 30 s, scaled up
with the journal's free space. Two lines per run at 1,000 runs/s are over that budget, and what
journald then drops it drops blindly: the daemon's reload and drain lines went with the flood,
and `Suppressed N messages from UNIT` was all that was left of them. With the shipped unit,
20 no-op jobs every 20 ms and one job failing every second for about a minute, with a reload in
the middle: every failure's lines (the job's own and the daemon's `run failed` with its
traceback) and every daemon event are in the journal, and journald suppressed nothing.
"""

from __future__ import annotations

import json
from typing import Any

import e2e_support as e2e
from sandbox import Sandbox

from poolkeeper.service.logs import MESSAGE_IDS

NAME = "jrate"
DB = f"/var/lib/poolkeeper/{NAME}/poolkeeper.db"
# SD_MESSAGE_JOURNAL_DROPPED: journald's own "Suppressed N messages from UNIT".
JOURNAL_DROPPED = "a596d6fe7bfa4994828e72309e95d61e"
# The sandbox turns journald's rate limit off (RateLimitBurst=0, tests/systemd/boot.sh); the
# unit gets journald's defaults back, for itself only.
JOURNALD_DEFAULTS = "LogRateLimitIntervalSec=30s\nLogRateLimitBurst=10000\n"
NOOPS = 20
FAILURES_BEFORE_RELOAD = 30
FAILURES_IN_ALL = 60  # one a second: about a minute of load


def _spec(*, added: bool) -> str:
    jobs = [
        f"noop{i:02d}:\n  target: e2e_jobs:sleep_for\n  every: 20ms\n  kwargs: {{seconds: 0}}\n"
        for i in range(NOOPS)
    ]
    jobs.append('boom:\n  target: e2e_jobs:fail\n  every: 1s\n  kwargs: {message: "boom"}\n')
    if added:
        jobs.append("added:\n  target: e2e_jobs:sleep_for\n  every: 1h\n  kwargs: {seconds: 0}\n")
    return e2e.config("".join(jobs), drain="10s")


def _failed(sb: Sandbox, unit: str) -> list[dict[str, Any]]:
    return sb.journal("-u", unit, "JOB=boom", f"MESSAGE_ID={MESSAGE_IDS['run_failed']}")


def _failures_reach(sb: Sandbox, unit: str, count: int) -> list[dict[str, Any]] | None:
    failed = _failed(sb, unit)
    return failed if len(failed) >= count else None


def _runs_by_job(sb: Sandbox) -> tuple[dict[str, int], list[str]]:
    """(runs per outcome, the run ids of boom's failed runs) from the unit's state DB, read
    there as root (a minute of this load is ~60,000 runs: counted in SQL, not shipped here)."""
    code = (
        "import json, sqlite3, sys\n"
        "db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
        "outcomes = dict(db.execute('SELECT outcome, count(*) FROM runs GROUP BY outcome'))\n"
        "boom = [r for (r,) in db.execute(\"SELECT run_id FROM runs WHERE job = 'boom'\"\n"
        "        \" AND outcome = 'failed'\")]\n"
        "print(json.dumps([outcomes, boom]))\n"
    )
    outcomes, boom = json.loads(sb.run(e2e.PYTHON, "-c", code, DB).stdout)
    return outcomes, boom


def test_a_thousand_runs_a_second_keep_every_failure_and_event_and_nothing_is_suppressed(
    systemd_sandbox: Sandbox,
):
    sb = systemd_sandbox
    unit = e2e.install_instance(sb, NAME, _spec(added=False), JOURNALD_DEFAULTS)
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        e2e.wait_journal(
            sb, "ready", "-u", unit, f"MESSAGE_ID={MESSAGE_IDS['daemon_ready']}", timeout=30
        )
        sb.wait_for(
            lambda: _failures_reach(sb, unit, FAILURES_BEFORE_RELOAD), 90, "30 failures of boom"
        )
        sb.write_file(f"/etc/poolkeeper/{NAME}.yaml", _spec(added=True))
        sb.systemctl("reload", unit, timeout=60)
        sb.wait_for(lambda: _failures_reach(sb, unit, FAILURES_IN_ALL), 90, "60 failures of boom")
        sb.systemctl("stop", unit, timeout=60)
        assert sb.show(unit, "Result")["Result"] == "success"

        outcomes, failed_ids = _runs_by_job(sb)
        runs = sum(outcomes.values())
        lines = len(sb.run("journalctl", "-u", unit, "-o", "cat", timeout=60).stdout.splitlines())
        print(f"runs by outcome: {outcomes}; the unit's journal: {lines:,} lines")

        # journald dropped nothing of the unit's ("Suppressed N messages from UNIT" otherwise).
        dropped = [
            e2e._message(e)
            for e in sb.journal(f"MESSAGE_ID={JOURNAL_DROPPED}")
            if unit in e2e._message(e)
        ]
        assert dropped == [], f"journald suppressed lines of {runs:,} runs: {dropped}"

        # Every daemon event: ready, the reload, the drain.
        def events(kind: str) -> list[str]:
            selection = ("-u", unit, f"MESSAGE_ID={MESSAGE_IDS[kind]}")
            return e2e.journal_messages(sb, *selection)

        assert len(events("daemon_ready")) == 1
        assert events("reload_applied") == [
            f"reload applied: 1 job added (added); {NOOPS + 1} jobs unchanged"
        ]
        assert len(events("drain_started")) == 1
        assert len(events("drain_finished")) == 1

        # Every failure: the daemon's line with the traceback, and the job's own two lines.
        assert len(failed_ids) >= FAILURES_IN_ALL
        by_run: dict[str, list[str]] = {}
        for entry in sb.journal("-u", unit, "JOB=boom"):
            by_run.setdefault(entry.get("RUN_ID", ""), []).append(e2e._message(entry))
        for run_id in failed_ids:
            lines = by_run.get(run_id, [])
            prefix = f"boom[{run_id[:8]}] "
            assert any(
                line.startswith(f"{prefix}run failed in ") and "ValueError: boom" in line
                for line in lines
            ), (run_id, lines)
            assert f"{prefix}plain logging from the job before it fails" in lines, run_id
            assert f"{prefix}ctx.log from the job before it fails" in lines, run_id

        # The successes beyond the per-run budget are counted, per job, not dropped unsaid.
        summaries = sb.journal("-u", unit, f"MESSAGE_ID={MESSAGE_IDS['runs_summarised']}")
        assert {e["JOB"] for e in summaries} >= {f"noop{i:02d}" for i in range(NOOPS)}
