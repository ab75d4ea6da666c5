"""The wire between the supervisor (poolkeeper.pool.supervisor, in the main process) and each
worker (poolkeeper.pool.worker): the messages both ends exchange, their framing, and the records
the supervisor reports to its caller (Task in, RunStarted / RunEnded / NotStarted / WorkerEvent
out).

Both ends import this module, so it imports nothing of poolkeeper's: a worker pays only for
the standard library here.

Messages, each a pickled tuple framed like multiprocessing.Connection (4-byte length):

    main -> worker   ("T", seq, target, args, kwargs, job, run_id, attempt, scheduled_at, env,
                      check_cancel, replica, fence)
                                             run this (check_cancel: it was queued, not awaited)
                     ("C", seq)              cancel seq if not started yet (drain / kill_runs)
                     None                    exit when the queue is done
    worker -> main   ("R", pid)              initialised, ready
                     ("I", error, traceback) initialisation failed; the worker exits
                     ("H",)                  heartbeat of the current run (rate-limited)
                     ("D", seq, ok, started, ended, result_repr, error, traceback, rss)
                     ("N", seq, reason)      seq was cancelled before it started

Why no "started" message: a worker runs its queue in order, so the main process knows a task
starts when the previous result arrives (or at once for an idle worker). A worker holds at
most `prefetch` tasks beyond the running one (the daemon's pool: none), and runs them without
waiting for the main process in between; a prefetched task whose worker dies is handed back as
NotStarted.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

from poolkeeper.outcomes import Outcome

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

_NONE: dict[str, Any] = {}  # the default kwargs and env of a Task; nothing mutates a task's


class Task(NamedTuple):
    run_id: str
    job: str
    target: str  # "pkg.module:func" or "module:obj.attr"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = _NONE
    attempt: int = 1
    scheduled_at: float = 0.0
    timeout: float | None = None  # hard wall-clock limit from the actual start
    heartbeat_timeout: float | None = None  # no ctx.heartbeat() this long = hung
    env: dict[str, str] = _NONE  # set for the run, restored after
    loop: bool = False  # a loop replica: long-lived, never queued behind or ahead of anything
    replica: int | None = None  # ctx.replica: the loop replica's index (fleet mode)
    # ctx.fence: the fencing token of a fleet run (slot epoch or fire fence); also in the run's
    # environment as POOLKEEPER_FENCE (and POOLKEEPER_REPLICA), for the job's subprocesses
    fence: int | None = None


class RunEnded(NamedTuple):
    task: Task
    outcome: Outcome
    started_at: float | None
    ended_at: float
    worker_pid: int | None
    exit_code: int | None
    signal: int | None
    error: str | None
    traceback: str | None
    result_repr: str | None = None


class RunStarted(NamedTuple):
    task: Task
    worker_pid: int
    started_at: float


class NotStarted(NamedTuple):
    task: Task
    reason: str


class WorkerEvent(NamedTuple):
    kind: str  # 'started' | 'exited' | 'replaced' | 'recycled' | 'init_failed'
    pid: int
    detail: str


Event = RunStarted | RunEnded | NotStarted | WorkerEvent


def encode_task(task: Task, seq: int, prefetched: bool) -> bytes:
    """The "T" message that hands `task` to a worker as number `seq`; `prefetched`: it is
    queued behind a run rather than awaited, so the worker checks for a cancel first."""
    return pickle.dumps(
        ("T", seq, task.target, task.args, task.kwargs, task.job, task.run_id,
         task.attempt, task.scheduled_at, task.env, prefetched, task.replica, task.fence),
        PICKLE_PROTOCOL,
    )  # fmt: skip


def frame(data: bytes) -> memoryview:
    """`data` framed as multiprocessing.Connection frames it, ready for one write in the usual
    case of a small message (take_messages reads it back)."""
    if len(data) < 0x7FFFFFFF:
        return memoryview(len(data).to_bytes(4, "big") + data)
    return memoryview(b"\xff\xff\xff\xff" + len(data).to_bytes(8, "big") + data)


def take_messages(buf: bytearray) -> list[Any]:
    """Unpickle every complete message at the front of `buf` (multiprocessing.Connection's
    framing: a 4-byte big-endian length, or -1 and an 8-byte length above 2 GiB) and remove
    them from it; a partial message stays for the next read. Both ends of a worker's pipe read
    this way, non-blocking, so one slow peer never stalls the other."""
    messages = []
    pos, end = 0, len(buf)
    while end - pos >= 4:
        size = int.from_bytes(buf[pos : pos + 4], "big", signed=True)
        head = 4
        if size == -1:
            if end - pos < 12:
                break
            size, head = int.from_bytes(buf[pos + 4 : pos + 12], "big"), 12
        if end - pos - head < size:
            break
        messages.append(pickle.loads(buf[pos + head : pos + head + size]))
        pos += head + size
    del buf[:pos]
    return messages
