"""Invalid job specs: each is refused with exit 78 and exactly the expected `LINE:COL: message`
lines (every error, in file order). A few go through the real CLI to prove exit codes and that
no traceback ever reaches the user."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poolkeeper.cli import check_file

JOBS_PY = """
import sys

def tick(ctx):
    pass

def work(n, *, ctx, region="eu"):
    pass

def plain(a, b=1):
    pass

def late_ctx(n, ctx):
    pass

def spin():
    while True:
        pass

async def fetch(ctx):
    pass

class Box:
    def method(self):
        pass

VALUE = 3
"""

EXTRA_MODULES = {
    "boom.py": "x = 1\ny = x / 0\n",
    "quits.py": "import sys\nsys.exit(3)\n",
    "interrupts.py": "raise KeyboardInterrupt\n",
    "chatty.py": "print('hello from import')\nimport sys\nprint('on stderr', file=sys.stderr)\ndef run(ctx):\n    pass\n",
}

HEAD = "version: 1\npythonpath: [.]\npool: {workers: 4}\njobs:\n"  # jobs start at line 5


def write_spec(directory: Path, text: str, name: str = "spec.yaml") -> Path:
    (directory / "jobs.py").write_text(JOBS_PY)
    for module, source in EXTRA_MODULES.items():
        (directory / module).write_text(source)
    path = directory / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def run_check(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check_file(str(path), out, err)
    return code, out.getvalue(), err.getvalue()


def job(body: str) -> str:
    """HEAD plus a job `a` (line 5) whose settings (from line 6) are `body`."""
    return HEAD + "  a:\n" + textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", "    ")


CASES: list[tuple[str, str, list[str]]] = [
    # --- the file itself
    ("empty", "", ["1:1: the file is empty; a job spec starts with 'version: 1'"]),
    (
        "comments only",
        "# nothing here\n",
        ["1:1: the file is empty; a job spec starts with 'version: 1'"],
    ),
    (
        "top is a list",
        "- version: 1\n",
        ["1:1: the top level must be a mapping (version:, jobs:, ...), got a list"],
    ),
    (
        "top is a scalar",
        "hello\n",
        ["1:1: the top level must be a mapping (version:, jobs:, ...), got the string 'hello'"],
    ),
    (
        "syntax: bad indent",
        "version: 1\njobs:\n  a:\n    target: x:y\n   every: 5m\n",
        [
            "5:4: YAML syntax error: expected <block end>, but found '<block mapping start>' (while parsing a block mapping at line 3)"
        ],
    ),
    (
        "syntax: unclosed flow",
        "version: 1\njobs: {a: [\n",
        ["3:1: YAML syntax error: expected the node content, but found '<stream end>'"],
    ),
    (
        "syntax: tab",
        "version: 1\njobs:\n\ta: 1\n",
        ["3:1: YAML syntax error: a tab character; YAML indents with spaces only"],
    ),
    (
        "two documents",
        "version: 1\n---\nversion: 1\n",
        [
            "2:1: YAML syntax error: but found another document (expected a single document in the stream at line 1)"
        ],
    ),
    (
        "not utf-8",
        b"version: 1\njobs:\n  caf\xe9: {}\n",
        ["3:6: the file is not UTF-8: invalid byte 0xe9"],
    ),
    (
        "control char",
        "version: 1\nx: \x07\n",
        ["2:4: the file contains the control character U+0007, which YAML does not allow"],
    ),
    (
        "unsupported tag",
        "version: 1\nstate: {path: !env STATE}\n",
        ["2:15: unsupported YAML tag '!env'"],
    ),
    (
        "bad explicit int",
        "version: 1\npool: {workers: !!int four}\n",
        ["2:17: 'four' is not a valid !!int"],
    ),
    # --- top level
    (
        "missing version",
        "jobs: {}\n",
        ["1:1: missing required key 'version'; a job spec starts with 'version: 1'"],
    ),
    (
        "version 2",
        "version: 2\n",
        ["1:10: version: must be 1 (the only version of this format), got the integer 2"],
    ),
    (
        "version string",
        "version: '1'\n",
        ["1:10: version: must be 1 (the only version of this format), got the string '1'"],
    ),
    (
        "unknown top key",
        "version: 1\njob:\n  a: {}\n",
        ["2:1: unknown key 'job' (did you mean 'jobs'?)"],
    ),
    (
        "duplicate top key",
        "version: 1\npool: {workers: 2}\npool: {workers: 3}\n",
        [
            "3:1: duplicate key 'pool' (first defined at line 2); YAML would silently keep only the last one"
        ],
    ),
    (
        "duplicate nested key",
        "version: 1\npool:\n  workers: 2\n  start_method: fork\n  workers: 3\n",
        [
            "5:3: duplicate key 'workers' (first defined at line 3); YAML would silently keep only the last one"
        ],
    ),
    ("jobs is a list", "version: 1\njobs: [a, b]\n", ["2:7: jobs: expected a mapping, got a list"]),
    (
        "pythonpath not a list",
        "version: 1\npythonpath: .\n",
        ["2:13: pythonpath: expected a list, got the string '.'"],
    ),
    (
        "pythonpath missing dir",
        "version: 1\npythonpath: [nowhere]\n",
        ["2:14: pythonpath[0]: directory '{dir}/nowhere' does not exist"],
    ),
    # --- pool / shutdown / state
    (
        "workers zero",
        "version: 1\npool: {workers: 0}\n",
        ["2:17: pool.workers: must be at least 1, got 0"],
    ),
    (
        "workers yes",
        "version: 1\npool: {workers: yes}\n",
        [
            "2:17: pool.workers: expected a number of workers >= 1 or 'auto', got the boolean true from the unquoted YAML 1.1 word 'yes'"
        ],
    ),
    (
        "workers word",
        "version: 1\npool: {workers: many}\n",
        ["2:17: pool.workers: expected a number of workers or 'auto', got the string 'many'"],
    ),
    (
        "start method typo",
        "version: 1\npool: {start_method: forkserve}\n",
        [
            "2:22: pool.start_method: 'forkserve' is not one of: forkserver, spawn, fork (did you mean 'forkserver'?)"
        ],
    ),
    (
        "preload bad name",
        "version: 1\npool: {preload: [my-app]}\n",
        ["2:18: pool.preload[0]: 'my-app' is not a module name like 'myapp.jobs'"],
    ),
    (
        "preload missing module",
        "version: 1\npythonpath: [.]\npool: {preload: [nosuchmod]}\n",
        ["3:18: pool.preload[0]: cannot import module 'nosuchmod': No module named 'nosuchmod'"],
    ),
    (
        "max runs negative",
        "version: 1\npool: {max_runs_per_worker: -1}\n",
        ["2:29: pool.max_runs_per_worker: must be at least 0, got -1"],
    ),
    (
        "memory without unit",
        "version: 1\npool: {max_memory_per_worker: 512}\n",
        [
            "2:31: pool.max_memory_per_worker: a size needs a unit, e.g. '512MiB' (or 0 for no limit)"
        ],
    ),
    (
        "memory bad unit",
        "version: 1\npool: {max_memory_per_worker: 2 GB}\n",
        [
            "2:31: pool.max_memory_per_worker: '2 GB' is not a size; write e.g. '512MiB', '1GiB', '100MB' or 0 for no limit"
        ],
    ),
    (
        "drain sexagesimal",
        "version: 1\nshutdown: {drain_timeout: 1:30}\n",
        [
            "2:27: shutdown.drain_timeout: got the integer 90 from the unquoted YAML 1.1 sexagesimal (base 60) number '1:30'; a duration needs a unit, e.g. '90s'"
        ],
    ),
    (
        "drain zero",
        "version: 1\nshutdown: {drain_timeout: 0s}\n",
        ["2:27: shutdown.drain_timeout: must be positive, got '0s'"],
    ),
    (
        "keep bad unit",
        "version: 1\nstate: {keep: 30 days}\n",
        [
            "2:15: state.keep: '30 days' is not a duration; write e.g. '500ms', '30s', '5m', '1h30m' (units: ms, s, m, h, d)"
        ],
    ),
    (
        "state unknown key",
        "version: 1\nstate: {paht: x.db}\n",
        ["2:9: unknown key 'paht' (did you mean 'path'?)"],
    ),
    # --- jobs: shape
    (
        "job name yaml bool",
        HEAD + "  no: {target: 'jobs:tick', every: 5m}\n",
        [
            "5:3: job name: got the boolean false from the unquoted YAML 1.1 word 'no'; quote it ('no') if you meant the string"
        ],
    ),
    (
        "job name int",
        HEAD + "  0700: {target: 'jobs:tick', every: 5m}\n",
        [
            "5:3: job name: got the integer 448 from the unquoted YAML 1.1 octal number '0700'; quote it ('0700') if you meant the string"
        ],
    ),
    (
        "job name with space",
        HEAD + "  my job: {target: 'jobs:tick', every: 5m}\n",
        [
            "5:3: job name 'my job': use letters, digits and _ - . @ (at most 64, starting with a letter or digit)"
        ],
    ),
    (
        "job empty",
        HEAD + "  a:\n",
        [
            "5:3: job 'a': expected a mapping with a target and one of loop, every, cron, at, got null from an empty value"
        ],
    ),
    (
        "no schedule",
        job("target: jobs:tick"),
        ["5:3: job 'a' has no schedule: set one of loop, every, cron, at"],
    ),
    (
        "two schedules",
        job("target: jobs:tick\nevery: 5m\ncron: '* * * * *'"),
        ["5:3: job 'a' sets 'every' and 'cron': a job has exactly one of loop, every, cron, at"],
    ),
    (
        "schedule without value",
        job("target: jobs:tick\nevery:"),
        ["7:11: every: has no value; write e.g. 'every: 5m'"],
    ),
    ("missing target", job("every: 5m"), ["5:3: job 'a': missing required key 'target'"]),
    (
        "unknown job key",
        job("target: jobs:tick\nevery: 5m\ntimout: 5s"),
        ["8:5: unknown key 'timout' (did you mean 'timeout'?)"],
    ),
    (
        "unknown nested key",
        job("target: jobs:tick\nevery: 5m\nretry: {attempt: 3}"),
        ["8:13: unknown key 'attempt' (did you mean 'attempts'?)"],
    ),
    (
        "duplicate job",
        HEAD
        + "  a: {target: 'jobs:tick', every: 5m}\n  b: {target: 'jobs:tick', every: 5m}\n  a: {target: 'jobs:tick', every: 1m}\n",
        [
            "7:3: duplicate key 'a' (first defined at line 5); YAML would silently keep only the last one"
        ],
    ),
    # --- jobs: values
    (
        "restart no",
        job("target: jobs:tick\nloop: {}\nrestart: no"),
        [
            "8:14: restart: got the boolean false from the unquoted YAML 1.1 word 'no'; quote it ('no') if you meant the string"
        ],
    ),
    (
        "overlap on",
        job("target: jobs:tick\nevery: 5m\noverlap: on"),
        [
            "8:14: overlap: got the boolean true from the unquoted YAML 1.1 word 'on'; quote it ('on') if you meant the string"
        ],
    ),
    (
        "restart typo",
        job("target: jobs:tick\nloop: {}\nrestart: on_failure"),
        [
            "8:14: restart: 'on_failure' is not one of: always, on-failure, never (did you mean 'on-failure'?)"
        ],
    ),
    (
        "jitter enum",
        job("target: jobs:tick\nloop: {}\nbackoff: {jitter: half}"),
        ["8:23: backoff.jitter: 'half' is not one of: full, equal, none"],
    ),
    (
        "every without unit",
        job("target: jobs:tick\nevery: 30"),
        ["7:12: every: a duration needs a unit, e.g. '30s'"],
    ),
    (
        "every sexagesimal",
        job("target: jobs:tick\nevery: 1:30"),
        [
            "7:12: every: got the integer 90 from the unquoted YAML 1.1 sexagesimal (base 60) number '1:30'; a duration needs a unit, e.g. '90s'"
        ],
    ),
    (
        "timeout boolean",
        job("target: jobs:tick\nevery: 5m\ntimeout: off"),
        [
            "8:14: timeout: got the boolean false from the unquoted YAML 1.1 word 'off'; a duration is written like '30s'"
        ],
    ),
    (
        "timeout unit",
        job("target: jobs:tick\nevery: 5m\ntimeout: 5 min"),
        [
            "8:14: timeout: '5 min' is not a duration; write e.g. '500ms', '30s', '5m', '1h30m' (units: ms, s, m, h, d)"
        ],
    ),
    (
        "timeout float",
        job("target: jobs:tick\nevery: 5m\ntimeout: 1.5"),
        ["8:14: timeout: a duration needs a unit, e.g. '1.5s'"],
    ),
    (
        "duration too long",
        job("target: jobs:tick\nevery: 5000d"),
        ["7:12: every: '5000d' is longer than the maximum of 3650d (10 years)"],
    ),
    (
        "retry max below initial",
        job("target: jobs:tick\nevery: 5m\nretry: {initial: 1m, max: 10s}"),
        ["8:12: retry: max (10s) is less than initial (1m)"],
    ),
    (
        "retry attempts bool",
        job("target: jobs:tick\nevery: 5m\nretry: {attempts: yes}"),
        [
            "8:23: retry.attempts: expected a number of attempts, got the boolean true from the unquoted YAML 1.1 word 'yes'"
        ],
    ),
    (
        "factor below one",
        job("target: jobs:tick\nloop: {}\nbackoff: {factor: 0.5}"),
        ["8:23: backoff.factor: must be >= 1, got 0.5"],
    ),
    (
        "replicas zero",
        job("target: jobs:tick\nloop: {replicas: 0}"),
        ["7:22: loop.replicas: must be at least 1, got 0"],
    ),
    (
        "loop not a mapping",
        job("target: jobs:tick\nloop: 2"),
        ["7:11: loop: expected a mapping, got the integer 2"],
    ),
    (
        "bad cron",
        job("target: jobs:tick\ncron: '61 * * * *'"),
        [
            "7:11: cron: '61 * * * *' is not a valid cron expression (5 fields: minute hour day month weekday, e.g. '30 2 * * MON-FRI')"
        ],
    ),
    (
        "cron with seconds",
        job("target: jobs:tick\ncron: '0 0 2 * * *'"),
        [
            "7:11: cron: '0 0 2 * * *' has 6 fields, expected 5 (minute hour day month weekday); seconds are not supported"
        ],
    ),
    (
        "cron never fires",
        job("target: jobs:tick\ncron: '0 0 30 2 *'"),
        [
            "7:11: cron: '0 0 30 2 *' is not a valid cron expression (5 fields: minute hour day month weekday, e.g. '30 2 * * MON-FRI')"
        ],
    ),
    (
        "reboot",
        job("target: jobs:tick\ncron: '@reboot'"),
        ["7:11: cron: '@reboot' is not supported; use 'at: startup'"],
    ),
    (
        "unknown timezone",
        job("target: jobs:tick\ncron: '0 3 * * *'\ntimezone: Europe/Berln"),
        ["8:15: timezone: unknown time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)"],
    ),
    (
        "timezone on interval job",
        job("target: jobs:tick\nevery: 5m\ntimezone: UTC"),
        ["8:5: timezone: does not apply to an 'every' job, only to cron jobs"],
    ),
    (
        "before_ready on interval job",
        job("target: jobs:tick\nevery: 5m\nbefore_ready: true"),
        ["8:5: before_ready: does not apply to an 'every' job, only to at jobs"],
    ),
    (
        "before_ready on dated job",
        job("target: jobs:tick\nat: '2030-01-01T03:00:00'\nbefore_ready: true"),
        ["8:5: before_ready: only applies to 'at: startup' jobs"],
    ),
    (
        "timeout on loop",
        job("target: jobs:tick\nloop: {}\ntimeout: 5m"),
        ["8:5: timeout: does not apply to a 'loop' job, only to every, cron, at jobs"],
    ),
    (
        "max_concurrent without allow",
        job("target: jobs:tick\nevery: 5m\nmax_concurrent: 3"),
        ["8:5: max_concurrent: only applies with 'overlap: allow'"],
    ),
    (
        "at bad datetime",
        job("target: jobs:tick\nat: 2030-02-30T10:00"),
        [
            "7:9: at: '2030-02-30T10:00' is neither 'startup' nor an ISO-8601 datetime like '2025-06-01T03:00:00'"
        ],
    ),
    (
        "at typo",
        job("target: jobs:tick\nat: start"),
        [
            "7:9: at: 'start' is neither 'startup' nor an ISO-8601 datetime like '2025-06-01T03:00:00'"
        ],
    ),
    (
        "env int value",
        job("target: jobs:tick\nevery: 5m\nenv: {PORT: 8080}"),
        ["8:17: env.PORT: expected a string, got the integer 8080; quote it ('8080')"],
    ),
    (
        "env bool value",
        job("target: jobs:tick\nevery: 5m\nenv: {DEBUG: on}"),
        [
            "8:18: env.DEBUG: got the boolean true from the unquoted YAML 1.1 word 'on'; quote it ('on') if you meant the string"
        ],
    ),
    (
        "env bad name",
        job("target: jobs:tick\nevery: 5m\nenv: {'A=B': x}"),
        ["8:11: env.A=B: 'A=B' is not a valid environment variable name"],
    ),
    (
        "kwargs not a mapping",
        job("target: jobs:work\nevery: 5m\nkwargs: [1]"),
        ["8:13: kwargs: expected a mapping, got a list"],
    ),
    (
        "kwargs yaml bool key",
        job("target: jobs:work\nevery: 5m\nkwargs: {n: 1, on: 2}"),
        [
            "8:13: target 'jobs:work' cannot be called with these arguments: got an unexpected keyword argument 'on'",
            "8:20: key: got the boolean true from the unquoted YAML 1.1 word 'on'; quote it ('on') if you meant the string",
        ],
    ),
    # --- targets and calls
    (
        "target format",
        job("target: jobs.tick\nevery: 5m"),
        [
            "6:13: target: 'jobs.tick' is not 'module:function' or 'module:object.attribute' (e.g. 'myapp.jobs:run')"
        ],
    ),
    (
        "target null",
        job("target: ~\nevery: 5m"),
        [
            "6:13: target: got null from the unquoted word '~'; quote it ('~') if you meant the string"
        ],
    ),
    (
        "target missing module",
        job("target: myapp.jobs:run\nevery: 5m"),
        [
            "6:13: target 'myapp.jobs:run': cannot import module 'myapp.jobs': No module named 'myapp'"
        ],
    ),
    (
        "target missing function",
        job("target: jobs:tik\nevery: 5m"),
        ["6:13: target 'jobs:tik': 'jobs' has no attribute 'tik'"],
    ),
    (
        "target not callable",
        job("target: jobs:VALUE\nevery: 5m"),
        ["6:13: target 'jobs:VALUE' is not callable (it is an int)"],
    ),
    (
        "target raises on import",
        job("target: boom:run\nevery: 5m"),
        [
            "6:13: target 'boom:run': importing module 'boom' raised ZeroDivisionError: division by zero (at {dir}/boom.py:2)"
        ],
    ),
    (
        "target calls sys.exit",
        job("target: quits:run\nevery: 5m"),
        ["6:13: target 'quits:run': importing module 'quits' called sys.exit(3)"],
    ),
    (
        "target raises KeyboardInterrupt",
        job("target: interrupts:run\nevery: 5m"),
        [
            "6:13: target 'interrupts:run': importing module 'interrupts' raised KeyboardInterrupt (at {dir}/interrupts.py:1)"
        ],
    ),
    (
        "target async",
        job("target: jobs:fetch\nevery: 5m"),
        [
            "6:13: target 'jobs:fetch' is an async function; targets are called synchronously, so it would never run"
        ],
    ),
    (
        "loop without ctx",
        job("target: jobs:spin\nloop: {}"),
        [
            "6:13: target 'jobs:spin' is a loop job's target but has no 'ctx' parameter, so it cannot see ctx.stopping and would never stop on its own"
        ],
    ),
    (
        "missing argument",
        job("target: jobs:work\nevery: 5m"),
        [
            "6:13: target 'jobs:work' cannot be called with these arguments: missing a required argument: 'n'"
        ],
    ),
    (
        "too many args",
        job("target: jobs:plain\nevery: 5m\nargs: [1, 2, 3]"),
        [
            "8:11: target 'jobs:plain' cannot be called with these arguments: too many positional arguments"
        ],
    ),
    (
        "unknown kwarg",
        job("target: jobs:work\nevery: 5m\nargs: [1]\nkwargs: {regoin: us}"),
        [
            "8:11: target 'jobs:work' cannot be called with these arguments: got an unexpected keyword argument 'regoin'"
        ],
    ),
    (
        "ctx later, given by args too",
        job("target: jobs:late_ctx\nevery: 5m\nargs: [1, 2]"),
        [
            "8:11: target 'jobs:late_ctx' cannot be called with these arguments: multiple values for argument 'ctx' (ctx is passed first when it is the first parameter, else as a keyword: declare it first, e.g. 'def run(ctx, n)', or keyword-only, e.g. 'def run(n, *, ctx)')"
        ],
    ),
    (
        "ctx in kwargs",
        job("target: jobs:work\nevery: 5m\nkwargs: {n: 1, ctx: 2}"),
        ["8:20: kwargs: 'ctx' is reserved: poolkeeper passes the run context as ctx"],
    ),
    (
        "unbound method",
        job("target: jobs:Box.method\nevery: 5m"),
        [
            "6:13: target 'jobs:Box.method' cannot be called with these arguments: missing a required argument: 'self'"
        ],
    ),
    # --- defaults
    (
        "bad default reported once",
        HEAD.replace("jobs:\n", "defaults: {timeout: 30}\njobs:\n")
        + "  a: {target: 'jobs:tick', every: 5m}\n  b: {target: 'jobs:tick', every: 1m}\n",
        ["4:21: timeout: a duration needs a unit, e.g. '30s'"],
    ),
    (
        "default unknown key",
        "version: 1\ndefaults: {retires: 3}\n",
        ["2:12: unknown key 'retires' (did you mean 'retry'?)"],
    ),
    # --- pool room
    (
        "replicas leave no room",
        "version: 1\npythonpath: [.]\npool: {workers: 3}\njobs:\n"
        "  a: {target: 'jobs:tick', loop: {replicas: 2}}\n  b: {target: 'jobs:tick', loop: {replicas: 1}}\n"
        "  c: {target: 'jobs:tick', every: 1m}\n",
        [
            "6:34: loop replicas need 3 workers (a: 2, b: 1) but pool.workers is 3, one of them kept free for the 1 scheduled job; at most 2 replicas fit: raise pool.workers or lower the replicas"
        ],
    ),
    (
        "replicas exceed workers",
        "version: 1\npythonpath: [.]\npool: {workers: 2}\njobs:\n  a: {target: 'jobs:tick', loop: {replicas: 3}}\n",
        [
            "5:34: loop replicas need 3 workers (a: 3) but pool.workers is 2; at most 2 replicas fit: raise pool.workers or lower the replicas"
        ],
    ),
    # --- aliases and limits
    (
        "recursive alias",
        "version: 1\nx: &a [*a]\n",
        ["2:4: an alias refers to a node that contains it (recursive alias)"],
    ),
    (
        "merge key needs mapping",
        "version: 1\npool:\n  <<: 5\n",
        ["3:7: '<<' (merge key) needs a mapping or a list of mappings"],
    ),
    (
        "many errors at once",
        HEAD
        + "  a:\n    target: jobs:tick\n    every: 30\n    restart: no\n  b:\n    target: jobs:nope\n    cron: '* * *'\n",
        [
            "7:12: every: a duration needs a unit, e.g. '30s'",
            "8:5: restart: does not apply to an 'every' job, only to loop jobs",
            "8:14: restart: got the boolean false from the unquoted YAML 1.1 word 'no'; quote it ('no') if you meant the string",
            "10:13: target 'jobs:nope': 'jobs' has no attribute 'nope'",
            "11:11: cron: '* * *' has 3 fields, expected 5 (minute hour day month weekday)",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in CASES])
def test_invalid_spec_is_reported_at_the_right_place(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = write_spec(tmp_path, text)
    code, out, err = run_check(path)
    assert out == ""
    assert err.splitlines() == [f"{path}:{line.format(dir=tmp_path)}" for line in expected]
    assert code == 78


def test_there_are_many_distinct_invalid_cases() -> None:
    assert len({text for _, text, _ in CASES}) >= 45


def test_included_fragment_errors_name_the_fragment(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-a.yaml").write_text("jobs:\n  a: {target: 'jobs:tick', every: 5m}\n")
    (tmp_path / "conf.d" / "20-b.yaml").write_text(
        "pool: {workers: 2}\njobs:\n  a: {target: 'jobs:tick', every: 1m}\n  b: {target: 'jobs:tick', every: 5}\n"
    )
    path = write_spec(
        tmp_path,
        "version: 1\npythonpath: [.]\ninclude: conf.d\njobs:\n  main: {target: 'jobs:tick', every: 5m}\n",
    )
    code, _, err = run_check(path)
    fragment = tmp_path / "conf.d" / "20-b.yaml"
    assert err.splitlines() == [
        f"{fragment}:1:1: unknown key 'pool': an included file may only contain 'jobs:'",
        f"{fragment}:3:3: job 'a' is already defined at {tmp_path}/conf.d/10-a.yaml:2:3",
        f"{fragment}:4:35: every: a duration needs a unit, e.g. '5s'",
    ]
    assert code == 78


def test_relative_path_on_the_command_line_is_echoed_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write_spec(tmp_path / "conf", "version: 1\npool: {workers: 0}\n")
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert check_file("conf/spec.yaml", out, err) == 78
    assert err.getvalue() == "conf/spec.yaml:2:17: pool.workers: must be at least 1, got 0\n"


def test_missing_file_is_one_line_and_66(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    missing = tmp_path / "nope.yaml"
    assert check_file(str(missing), out, err) == 66
    assert err.getvalue() == f"{missing}: cannot read the file: No such file or directory\n"


def test_directory_is_unreadable_66(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert check_file(str(tmp_path), out, err) == 66
    assert err.getvalue() == f"{tmp_path}: cannot read the file: Is a directory\n"


def test_import_output_does_not_leak_into_check_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = write_spec(tmp_path, job("target: chatty:run\nevery: 5m"))
    assert run_check(path)[0] == 0
    captured = capfd.readouterr()
    assert "hello" not in captured.out + captured.err


def test_imported_job_modules_do_not_stick_between_checks(tmp_path: Path) -> None:
    """Two configs with a different `jobs.py` each: the second check must see its own."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    write_spec(first, job("target: jobs:tick\nevery: 5m"))
    path = write_spec(second, job("target: jobs:only_here\nevery: 5m"))
    (second / "jobs.py").write_text("def only_here():\n    pass\n")
    assert run_check(first / "spec.yaml")[0] == 0
    assert run_check(path)[0] == 0
    assert "jobs" not in sys.modules
    assert str(second) not in sys.path


CLI_CASES = [
    ("restart no", 78),
    ("not utf-8", 78),
    ("target calls sys.exit", 78),
    ("target raises KeyboardInterrupt", 78),
    ("many errors at once", 78),
]


@pytest.mark.parametrize(("name", "code"), CLI_CASES)
def test_cli_exit_codes_and_no_traceback(tmp_path: Path, name: str, code: int) -> None:
    text, expected = next((t, e) for i, t, e in CASES if i == name)
    path = write_spec(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"{path}:{line.format(dir=tmp_path)}" for line in expected
    ]


def test_cli_missing_file_exits_66() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "check", "/nonexistent/poolkeeper.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 66
    assert (
        result.stderr
        == "/nonexistent/poolkeeper.yaml: cannot read the file: No such file or directory\n"
    )
