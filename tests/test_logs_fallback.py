"""Without python-systemd (the optional `systemd` extra) poolkeeper still logs for journald:
stderr lines with `<N>` priority prefixes, which journald turns into PRIORITY."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from daemon_harness import TESTS_DIR


def test_journal_target_without_python_systemd_prefixes_priorities(tmp_path):
    # A `systemd` package that cannot be imported stands for a machine without the extra.
    hide = tmp_path / "hide" / "systemd"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('python-systemd is not installed')\n")
    spec = tmp_path / "jobs.yaml"
    spec.write_text(
        textwrap.dedent(f"""\
        version: 1
        pythonpath: [{TESTS_DIR}]
        state: {{path: {tmp_path / "state.db"}}}
        pool: {{workers: 2, start_method: fork}}
        jobs:
          flaky:
            target: daemon_jobs:fail
            at: startup
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(hide.parent), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolkeeper", "run", str(spec), "--log-target", "journal"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if "run failed" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    lines += rest.splitlines()
    assert proc.returncode == 0, lines
    failed = next(line for line in lines if "run failed" in line)
    assert failed.startswith("<3>flaky[")  # ERROR -> priority 3, the job leads the line
    assert any(line.startswith("<6>") and "ready" in line for line in lines)
    # A traceback keeps its priority on every line, so journald files it with the error.
    assert any(line.startswith("<3>") and "RuntimeError: boom" in line for line in lines)
