"""The journal as a user queries it: `journalctl -u UNIT JOB=name` gives one job's lines (its
own `logging` and `ctx.log` records, and the failed run's traceback), and
`journalctl MESSAGE_ID=...` finds every run that failed."""

from __future__ import annotations

import e2e_support as e2e
from sandbox import Sandbox

from poolkeeper.service.logs import MESSAGE_IDS

FIELDS = ("JOB", "RUN_ID", "ATTEMPT", "WORKER_PID")


def test_job_records_carry_the_job_fields_and_message_ids(systemd_sandbox: Sandbox):
    sb = systemd_sandbox
    unit = e2e.install_instance(
        sb,
        "journal",
        e2e.config(
            """
            boom:
              target: e2e_jobs:fail
              at: startup
              kwargs: {message: "the e2e failure ünïcode"}
            chatty:
              target: e2e_jobs:quick
              every: 200ms
            """
        ),
    )
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        failed = e2e.wait_journal(sb, "run failed", "-u", unit, "JOB=boom")
        entries = sb.journal("-u", unit, "JOB=boom")
        messages = [e2e._message(e) for e in entries]

        # Only boom's lines, each with the run's fields; the job's own records included.
        assert {e["JOB"] for e in entries} == {"boom"}
        run_ids = {e["RUN_ID"] for e in entries}
        assert len(run_ids) == 1
        for entry in entries:
            assert all(entry.get(f) for f in FIELDS), entry
        run_id = run_ids.pop()
        prefix = f"boom[{run_id[:8]}] "
        assert f"{prefix}plain logging from the job before it fails" in messages
        assert f"{prefix}ctx.log from the job before it fails" in messages
        job_records = [e for e in entries if e.get("CODE_FILE", "").endswith("e2e_jobs.py")]
        assert {e["_PID"] for e in job_records} == {e["WORKER_PID"] for e in job_records}

        # The failure: one entry with the whole traceback, at PRIORITY=3, with its MESSAGE_ID.
        text = e2e._message(failed[0])
        assert text.startswith(f"{prefix}run failed in ")
        assert "ValueError: the e2e failure ünïcode" in text
        assert "in _deep_failure" in text and "Traceback (most recent call last)" in text
        assert failed[0]["PRIORITY"] == "3"
        assert failed[0]["MESSAGE_ID"] == MESSAGE_IDS["run_failed"]

        # (Other tests of the session may have failed runs too: keep this unit's.)
        by_id = sb.journal(f"MESSAGE_ID={MESSAGE_IDS['run_failed']}")
        mine = [(e["JOB"], e["RUN_ID"]) for e in by_id if e.get("_SYSTEMD_UNIT") == unit]
        assert mine == [("boom", run_id)]
        started = sb.journal("-u", unit, f"MESSAGE_ID={MESSAGE_IDS['run_started']}", "JOB=boom")
        assert [e["RUN_ID"] for e in started] == [run_id]
        # The other job's lines carry its own name.
        e2e.wait_journal(sb, "quick run", "-u", unit, "JOB=chatty")


def test_two_jobs_writing_at_once_do_not_cut_each_others_lines(systemd_sandbox: Sandbox):
    """Each worker writes to a journal stream of its own: a line one job has half written is
    not joined with the line another job writes meanwhile (nor a stack dump with another's
    when the watchdog aborts the whole unit)."""
    sb = systemd_sandbox
    flags = e2e.shared_dir(sb, "/srv/pk-lines")
    unit = e2e.install_instance(
        sb,
        "lines",
        e2e.config(
            f"""
            half:
              target: e2e_jobs:half_line
              at: startup
              kwargs: {{flag_dir: {flags}}}
            whole:
              target: e2e_jobs:whole_line
              at: startup
              kwargs: {{flag_dir: {flags}}}
            """
        ),
        f"ReadWritePaths={flags}\n",
    )
    with e2e.running(sb, unit):
        sb.systemctl("start", unit)
        e2e.wait_journal(sb, "second half", "-u", unit)
        lines = e2e.journal_messages(sb, "-u", unit, "_TRANSPORT=stdout")
        assert "first half of a line, second half" in lines
        assert "a whole line from another job" in lines
