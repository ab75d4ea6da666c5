"""The supervised process pool: poolkeeper's engine.

Processes, pipes and messages::

    main process (the daemon's single loop)                     worker (one per slot)
    +---------------------------------------+                  +----------------------------+
    | WorkerPool                            |  duplex pipe     | worker_main() (worker.py): |
    |   one WorkerHandle per worker         |  (protocol.py)   |   a _WorkerLoop            |
    |   submit(task) --------------------------("T", ...)---->  |   set up: own pgid,        |
    |                                       |  ("C", seq)  ->  |   subreaper, signals,      |
    |                                       |  None (stop) ->  |   preload, faulthandler    |
    |   poll():                             |                  |   loop: recv, run, send    |
    |     1. read all ready messages  <--------("R"|"I"|"H"|    |                            |
    |     2. reap exited workers      <--+  |   "D"|"N", ...)  |   thread: poll(main pidfd) |
    |     3. enforce deadlines (SIGKILL  |  |                  |     -> kill tree + group   |
    |        the worker's tree)          |  |                  +----------------------------+
    |     4. respawn (rate-limited)      |  |                        ^  process group: the
    |                                    |  |                        |  worker + its job's
    |                                    |  |                        |  grandchildren
    |   one epoll fd over: pipes, worker +--pidfds (readable = the worker exited)
    +---------------------------------------+
    stop pipe: one per worker, its read end is the job's ctx.stopping; the main process writes
    a byte into every one to drain, or into one to stop that worker's run (stop_runs())

Where each part lives: the messages on the pipe, their framing, and the records poll() returns
in poolkeeper/pool/protocol.py (both ends import it); one worker as seen from here (its
process, pipe, queued tasks, state, deadlines, what its death or kill means for each task) in
poolkeeper/pool/handle.py; the forkserver's death in poolkeeper/pool/forkserver_watch.py; the
respawn backoff in poolkeeper/pool/respawns.py. This module decides across workers: which one
takes a task, when to kill, retire and respawn, and what its caller is told.

Why not multiprocessing.Pool / ProcessPoolExecutor / billiard / pebble / loky: see
docs/design.md ("Pool"): they lose results of killed workers, wedge on a lock held by a killed
idle worker (cpython#96062), break every future after one death or lack per-task timeouts.
Here each worker has its own pipe owned by the main process, so a death affects exactly the
runs that worker held, and nothing is ever shared that a dying process could leave locked.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from poolkeeper.outcomes import Outcome
from poolkeeper.pool import helper_processes, protocol
from poolkeeper.pool.forkserver_watch import ForkserverWatch
from poolkeeper.pool.handle import (
    DYING,
    READY,
    RETIRING,
    STARTING,
    Slot,
    WorkerHandle,
    killpg,
    pick,
    start_worker,
)
from poolkeeper.pool.protocol import (
    Event,
    NotStarted,
    RunEnded,
    RunStarted,
    Task,
    WorkerEvent,
)
from poolkeeper.pool.respawns import Respawns
from poolkeeper.pool.worker import WorkerConfig, format_tb, one_line

__all__ = [
    "NotStarted",
    "PoolFull",
    "RunEnded",
    "RunStarted",
    "Task",
    "WorkerEvent",
    "WorkerPool",
    "pool_for",
]

log = logging.getLogger("poolkeeper.pool.supervisor")

# A task this big is only sent to a worker known to be reading its pipe, never queued behind a
# run: a full socket buffer would block the main process in send().
BUFFERED_MAX = 32 * 1024
# healthy() tolerances: a deadline this far in the past not acted upon, a killed worker that
# does not go away.
OVERDUE = 2.0
DYING_TOO_LONG = 10.0

_CONN, _PIDFD, _SENTINEL, _FORKSERVER = 0, 1, 2, 3


class PoolFull(Exception):
    """submit() found no worker that can take the task now."""


class WorkerPool:
    """A fixed-size pool of supervised worker processes. Never blocks, never sleeps: the
    caller waits on waitables() until next_deadline(), then calls poll()."""

    def __init__(
        self,
        *,
        workers: int,
        start_method: str = "forkserver",
        preload: Sequence[str] = (),
        pythonpath: Sequence[str] = (),
        max_runs_per_worker: int = 0,
        max_memory_per_worker: int = 0,
        worker_setup: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefetch: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._ctx = multiprocessing.get_context(start_method)
        self.start_method = start_method
        self.target_size = workers
        self.preload = tuple(preload)
        self.pythonpath = tuple(os.path.abspath(p) for p in pythonpath)
        self.max_runs = max_runs_per_worker
        self.max_memory = max_memory_per_worker
        self.worker_setup = worker_setup
        self._clock = clock
        self.prefetch = max(0, prefetch)
        helper_processes.note_new_pool(start_method)
        self._stopping = False  # drain() or close(): every worker's stop pipe is written
        self._workers: list[WorkerHandle] = []  # every process not yet reaped, in start order
        # fd -> (its worker, which fd of it); the forkserver's pidfd has no worker
        self._fdmap: dict[int, tuple[WorkerHandle | None, int]] = {}
        self._epoll: select.epoll | None = None
        self._main_pidfd: int | None = None
        self._events: list[Event] = []
        self._seq = itertools.count(1)
        self._respawns = Respawns()
        self._closing = False
        self._closed = False
        self._started = False
        # The forkserver our workers come from, watched: a job can kill it (SIGTERM to its
        # parent), and the exit status of every worker it started is lost with it.
        self._forkserver = ForkserverWatch(
            watch=lambda fd: self._watch(fd, None, _FORKSERVER),
            unwatch=self._unwatch,
            alive=lambda pid: sum(
                1 for w in self._workers if w.forkserver == pid and w.state != DYING
            ),
        )

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._epoll = select.epoll()
        self._main_pidfd = os.pidfd_open(os.getpid())
        if self.start_method == "forkserver" and not helper_processes.forkserver_running():
            self._ctx.set_forkserver_preload(helper_processes.forkserver_preload(self.preload))
        helper_processes.start_helpers(self.start_method)  # now, shielded from signals
        helper_processes.open_pools.add(self)
        atexit.register(_close_at_exit, weakref.ref(self))
        now = self._clock()
        for _ in range(self.target_size):
            self._spawn(now)

    def close(self, *, timeout: float | None = None) -> list[RunEnded]:
        """Stop accepting tasks, set every ctx.stopping, hand back queued tasks, let running ones
        finish; after `timeout` SIGKILL the rest ('killed'). Joins every worker (one still there
        WORKER_EXIT_GRACE after its last run has its group killed). Returns the
        RunEnded of every run that ended during close; other events produced meanwhile
        (NotStarted of handed-back tasks, WorkerEvents) are left for one more poll()."""
        if self._closed or not self._started:
            self._closed = True
            return []
        self._closing = True
        self._stop_all()
        self._drain_queued()
        for w in self._workers:
            if w.state != DYING:
                w.tell_to_exit(self._clock())
                if w.state != STARTING:
                    self._set_state(w, RETIRING)
        deadline = None if timeout is None else self._clock() + timeout
        ended: list[RunEnded] = []
        rest: list[Event] = []
        killed = False
        while self._workers:
            now = self._clock()
            if deadline is not None and now >= deadline and not killed:
                killed = True
                self._kill_all(Outcome.KILLED, "killed at shutdown: drain timeout")
            wake = self.next_deadline()
            if deadline is not None and not killed:
                wake = deadline if wake is None else min(wake, deadline)
            wait = None if wake is None else max(0.0, wake - self._clock())
            assert self._epoll is not None  # start() made it; only _release() closes it
            # its fd: typeshed's wait() takes no object with a fileno(), which is all it needs
            multiprocessing.connection.wait([self._epoll.fileno()], timeout=wait)
            for ev in self.poll():
                if isinstance(ev, RunEnded):
                    ended.append(ev)
                else:
                    rest.append(ev)
        self._events = rest + self._events
        self._release()
        return ended

    def _release(self) -> None:
        self._closed = True
        self._forkserver.stop()
        if self._epoll is not None:
            self._epoll.close()
        if self._main_pidfd is not None:
            os.close(self._main_pidfd)
            self._main_pidfd = None
        helper_processes.open_pools.discard(self)
        helper_processes.stop_if_unused()

    # -- the daemon's interface ---------------------------------------------------------------

    def waitables(self) -> list[Any]:
        """One epoll object over every worker pipe and pidfd: readable when poll() has work."""
        return [] if self._epoll is None or self._closed else [self._epoll]

    def size(self) -> int:
        n = 0
        for w in self._workers:
            if w.state is READY or w.state is STARTING:
                n += 1
        return n

    def busy_count(self) -> int:
        n = 0
        for w in self._workers:
            if w.queue and w.state is not DYING:
                n += 1
        return n

    def in_flight(self) -> list[Task]:
        return [s.task for w in self._workers for s in w.queue if not s.reported]

    def worker_views(self) -> list[tuple[int, str, list[tuple[Task, float | None]]]]:
        """(pid, state, [(task, started epoch or None)]) of every worker not yet reaped, for
        the daemon's state dump (SIGUSR1)."""
        return [
            (w.pid, w.state, [(s.task, s.started_at) for s in w.queue if not s.reported])
            for w in self._workers
        ]

    def free_slots(self) -> int:
        if self._closing:
            return 0
        prefetch, max_runs = self.prefetch, self.max_runs
        n = 0
        for w in self._workers:
            n += w.room(prefetch, max_runs)
        return n

    def idle_slots(self) -> int:
        """Workers with nothing to do: where a loop task (never queued) can go."""
        if self._closing:
            return 0
        prefetch, max_runs = self.prefetch, self.max_runs
        n = 0
        for w in self._workers:
            if not w.queue and w.room(prefetch, max_runs):
                n += 1
        return n

    def submit(self, task: Task, announce: Callable[[RunStarted], None] | None = None) -> None:
        """Hand `task` to a worker now (one write to its pipe, O(workers) to pick it). Raises
        PoolFull if no worker can take it (free_slots() is 0, or a big payload waits for a
        worker that reads its pipe). A task whose arguments cannot be pickled ends at once
        (RunEnded 'failed', from the next poll()); one whose worker went away comes back as
        NotStarted. A task given to an idle worker starts now: its RunStarted is in the next
        poll().

        With `announce`, the task only goes to an idle worker (PoolFull otherwise, as for a
        big payload: the worker's R wakes the caller) and `announce(RunStarted)` is called
        before the worker can begin it, instead of the event: what the caller logs then comes
        before anything the job prints (the daemon's "run started" line). Should the write
        fail, the worker died under the run, which ends lost like any run whose worker dies."""
        if self._closing or not self._started:
            raise PoolFull("pool is closed" if self._closing else "pool is not started")
        w = self._pick(task.loop, big=announce is not None)
        seq = next(self._seq)
        awaits = w.awaits()
        try:
            payload = protocol.encode_task(task, seq, not awaits)
            if not awaits and len(payload) > BUFFERED_MAX:
                w = self._pick(task.loop, big=True)
                awaits = w.awaits()
                payload = protocol.encode_task(task, seq, not awaits)
        except PoolFull:
            raise
        except Exception as exc:  # unpicklable args: this run fails, no worker is touched
            self._events.append(
                RunEnded(task, Outcome.FAILED, None, time.time(), None, None, None,
                         f"cannot send arguments: {one_line(exc)}", format_tb(exc))
            )  # fmt: skip
            return
        sent_at = time.time()
        if announce is not None:  # w awaits (picked as for a big payload)
            w.queue.append(Slot(task, seq))
            w.assigned += 1
            started = w.promote(self._clock(), sent_at)
            if started is not None:
                announce(started)
            w.send(payload)
            return
        if not w.send(payload):
            self._events.append(NotStarted(task, f"worker {w.pid} went away"))
            return
        w.queue.append(Slot(task, seq))
        w.assigned += 1
        if awaits:  # READY with an empty queue: it starts the task as soon as it reads it
            self._promote(w, self._clock(), sent_at)

    def poll(self) -> list[Event]:
        """Non-blocking. Reads every message every worker has sent so far (however many: one
        batch), reaps exited workers, enforces deadlines, starts replacements; returns every
        event since the last poll(), in the order they happened for each run. Costs
        O(workers + messages)."""
        if self._epoll is not None and not self._closed:
            ready = self._epoll.poll(0)
            if ready:
                exited = self._read_messages(ready)
                if exited:
                    self._reap(exited)
            now = self._clock()
            self._enforce_deadlines(now)
            self._respawn(now)
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """Earliest clock time at which poll() must run even if nothing is readable."""
        if self._events:
            return self._clock()
        best: float | None = None
        for w in self._workers:
            t = w.deadline()
            if t is not None and (best is None or t < best):
                best = t
            if w.exited:  # exit status not in yet (forkserver reports it a bit later)
                t = self._clock() + 0.01
                best = t if best is None else min(best, t)
        if self._replacing() and self.size() < self.target_size:
            best = self._respawns.at if best is None else min(best, self._respawns.at)
        return best

    def kill_runs(
        self,
        outcome: Outcome = Outcome.KILLED,
        tasks: Sequence[Task] | None = None,
        reason: str | None = None,
    ) -> list[RunEnded]:
        """SIGKILL the process groups of the workers running `tasks` (default: every run).
        Each targeted run ends with `outcome` (returned, not repeated by poll()) and the error
        `reason` (default: "<outcome> on request"); a targeted task still queued behind
        another run is cancelled and ends the same way, with started_at None. Untargeted
        queued tasks of a killed worker come back as NotStarted."""
        ids = None if tasks is None else {t.run_id for t in tasks}
        why = reason or f"{outcome} on request"
        out: list[RunEnded] = []
        now = self._clock()
        for w in list(self._workers):
            if w.state == DYING or not w.queue:
                continue
            head = w.queue[0]
            if head.started_clock is not None and (ids is None or head.task.run_id in ids):
                targets = {s.task.run_id for s in w.queue} if ids is None else ids
                out.extend(self._kill(w, outcome, why, targets, emit=False))
                continue
            out.extend(w.end_unstarted(outcome, ids, now))
        return out

    def drain(self) -> None:
        """Set every run's ctx.stopping and hand back every task not yet started
        (NotStarted). A drain is for stopping: a worker that dies or is killed from now on
        is not replaced (a fast stop must not start workers only to stop them)."""
        self._stop_all()
        self._drain_queued()

    def stop_runs(self, tasks: Sequence[Task]) -> None:
        """Set ctx.stopping for these runs only (a reload removed or changed their job). A
        running one ends on its own terms (usually a loop returning: `succeeded`); its worker
        then retires, since its stop cannot be taken back, and a fresh one replaces it. One
        not started yet is cancelled (NotStarted)."""
        ids = {t.run_id for t in tasks}
        for w in list(self._workers):
            if w.state == DYING or not w.queue:
                continue
            head = w.queue[0]
            if head.started_clock is not None and head.task.run_id in ids:
                w.signal_stop()
                if w.state != RETIRING:
                    self._retire(w, f"its run {head.task.run_id} ({head.task.job}) was stopped")
            w.cancel_queued(ids)

    def healthy(self) -> tuple[bool, str]:
        if self._closed:
            return True, "closed"
        now = self._clock()
        for w in self._workers:
            if w.state == DYING and now - w.state_since > DYING_TOO_LONG:
                return False, f"worker {w.pid} still alive {now - w.state_since:.0f}s after SIGKILL"
            t = w.deadline()
            if t is not None and now - t > OVERDUE and w.queue:
                task = w.queue[0].task
                return False, f"run {task.run_id} ({task.job}) is {now - t:.1f}s past its deadline"
        trouble = self._respawns.trouble(now)
        if trouble is not None:
            return False, trouble
        if (
            self._replacing()
            and self.size() < self.target_size
            and now - self._respawns.at > OVERDUE
        ):
            return False, f"{self.size()}/{self.target_size} workers and no respawn under way"
        return True, "ok"

    # -- poll, step 1: messages -------------------------------------------------------------

    def _read_messages(self, ready: list[tuple[int, int]]) -> list[WorkerHandle]:
        exited = []
        for fd, _ in ready:
            entry = self._fdmap.get(fd)
            if entry is None:
                continue
            w, kind = entry
            if kind == _FORKSERVER:
                self._forkserver.died()
                continue
            assert w is not None  # every fd but the forkserver's pidfd is a worker's
            if kind == _CONN:
                self._read(w)
            elif kind == _PIDFD:
                assert w.pidfd is not None  # _spawn() watches it only if it has one
                self._unwatch(w.pidfd)
                w.exited = True
                exited.append(w)
            else:  # the forkserver reported the exit status
                exited.append(w)
        return exited

    def _read(self, w: WorkerHandle) -> None:
        messages = w.read()
        if messages is None:  # the worker's end is closed: it exited (its pidfd tells us the rest)
            self._unwatch(w.fd)
            return
        for msg in messages:
            self._on_message(w, msg)

    def _on_message(self, w: WorkerHandle, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "D":
            self._on_done(w, msg)
        elif kind == "H":
            w.last_heartbeat = self._clock()
        elif kind == "N":
            slot = self._pop(w, msg[1])
            if slot is not None and not slot.reported:
                self._events.append(NotStarted(slot.task, msg[2]))
            self._after_run(w)
        elif kind == "R":
            self._respawns.failures = 0
            if w.state == STARTING:
                self._set_state(w, READY)
                ready_in = self._clock() - w.born
                self._events.append(WorkerEvent("started", w.pid, f"ready in {ready_in:.3f}s"))
            self._promote(w, self._clock())
        elif kind == "I":
            w.init_error = msg[1]
            self._respawns.last_error = msg[1]
            log.error("worker %d failed to initialise: %s\n%s", w.pid, msg[1], msg[2])
            self._events.append(WorkerEvent("init_failed", w.pid, msg[1]))

    def _on_done(self, w: WorkerHandle, msg: tuple[Any, ...]) -> None:
        _, seq, ok, started, ended, result_repr, error, tb, rss = msg
        slot = self._pop(w, seq)
        if slot is not None and not slot.reported:
            if slot.started_clock is None:  # ran although cancelled: it started after all
                self._events.append(RunStarted(slot.task, w.pid, started))
            self._events.append(
                RunEnded(slot.task, Outcome.SUCCEEDED if ok else Outcome.FAILED, started, ended,
                         w.pid, None, None, error, tb, result_repr)
            )  # fmt: skip
        w.done += 1
        if self.max_memory and rss > self.max_memory and w.state == READY:
            self._retire(w, f"RSS {rss // 1048576} MiB > {self.max_memory // 1048576} MiB")
        elif self.max_runs and w.done >= self.max_runs and w.state == READY:
            self._retire(w, f"{w.done} runs")
        self._after_run(w)

    def _pop(self, w: WorkerHandle, seq: int) -> Slot | None:
        if not w.queue or w.queue[0].seq != seq:  # cannot happen unless the worker is broken
            log.error("worker %d answered for task %s out of order; killing it", w.pid, seq)
            self._kill(w, Outcome.LOST, "protocol error")
            return None
        w.kill_at = None
        return w.queue.popleft()

    def _after_run(self, w: WorkerHandle) -> None:
        if w.queue:
            self._promote(w, self._clock())
        elif w.told_to_exit:
            w.start_exit_clock(self._clock())

    def _promote(self, w: WorkerHandle, now: float, wall: float | None = None) -> None:
        started = w.promote(now, wall)
        if started is not None:
            self._events.append(started)

    # -- poll, step 2: reap -----------------------------------------------------------------

    def _reap(self, exited: list[WorkerHandle]) -> None:
        for w in exited:
            if w not in self._workers:
                continue
            # Messages sent before dying still count (a result is a result).
            while w.fd in self._fdmap and select.select([w.fd], [], [], 0)[0]:
                self._read(w)
            code = w.proc.exitcode
            if code is None:
                if self.start_method == "forkserver" and not w.sentinel_watched:
                    w.sentinel_watched = True
                    self._watch(w.proc.sentinel, w, _SENTINEL)
                continue  # next_deadline() brings us back shortly
            self._finish(w, code)

    def _finish(self, w: WorkerHandle, code: int) -> None:
        # The job's grandchildren share the worker's process group; the group id stays
        # reserved until they are all gone, so this cannot hit an unrelated process.
        killpg(w.pid)
        exit_code, sig, how = w.exit_status(code, self._forkserver.is_dead)
        never_ready = w.state == STARTING or w.init_error is not None
        self._events.extend(w.end_runs_at_exit(never_ready, exit_code, sig, how))
        expected = w.state in (DYING, RETIRING) or self._closing
        if not expected:
            log.warning("worker %d died: %s", w.pid, how)
        self._events.append(WorkerEvent("exited", w.pid, how))
        if never_ready and not self._closing:
            error = f"worker died during initialisation: {how}" if w.init_error is None else None
            self._respawns.failed(self._clock(), error)
        elif w.state == READY and self._replacing():
            self._respawns.owed.append(w.pid)
        self._forget(w)

    def _forget(self, w: WorkerHandle) -> None:
        for fd in (w.fd, w.pidfd, w.proc.sentinel if w.sentinel_watched else None):
            if fd is not None:
                self._unwatch(fd)
        w.release()
        self._workers.remove(w)

    # -- poll, step 3: deadlines ------------------------------------------------------------

    def _enforce_deadlines(self, now: float) -> None:
        for w in list(self._workers):
            kill = w.overdue(now)
            if kill is not None:
                self._kill(w, *kill)

    def _kill(self, w: WorkerHandle, outcome: Outcome | None, error: str | None,
              ids: set[str] | None = None, emit: bool = True) -> list[RunEnded]:  # fmt: skip
        """SIGKILL the worker now, with every process below it and its process group. Its
        running task ends with `outcome` (None: it was already reported); queued ones are
        handed back, or end with `outcome` too if they are in `ids`. The worker is reaped when
        its pidfd fires."""
        w.kill()
        out, handed_back = w.end_runs_at_kill(outcome, error, ids)
        self._events.extend(handed_back)
        if self._replacing() and w.state in (STARTING, READY):
            self._respawns.owed.append(w.pid)
        self._set_state(w, DYING)
        if emit:
            self._events.extend(out)
        return out

    def _kill_all(self, outcome: Outcome, error: str) -> None:
        for w in list(self._workers):
            if w.state != DYING:
                self._kill(w, outcome, error, ids=None)

    # -- drain ----------------------------------------------------------------------------------

    def _drain_queued(self) -> None:
        """Draining: nothing that has not started may start. Cancel every task
        still queued; the worker answers "N" (handed back as NotStarted) unless it had already
        begun it, in which case it simply runs to completion."""
        for w in self._workers:
            if w.state != DYING:
                w.cancel_queued()

    # -- poll, step 4: recycle and respawn ---------------------------------------------------

    def _retire(self, w: WorkerHandle, why: str) -> None:
        """Replace a healthy worker (max runs, memory): it gets no more tasks, finishes the
        run it is in, hands back what is queued, and exits; its replacement starts now."""
        w.retire_reason = why
        self._set_state(w, RETIRING)
        w.cancel_queued()  # queued behind the last run: hand back (a fresh worker takes it)
        w.tell_to_exit(self._clock())
        self._events.append(WorkerEvent("recycled", w.pid, why))

    def _replacing(self) -> bool:
        """Whether dead workers are replaced: not once the pool drains or closes."""
        return not self._closing and not self._stopping

    def _respawn(self, now: float) -> None:
        if not self._replacing():
            return
        missing = self.target_size - self.size()
        if missing <= 0 or now < self._respawns.at:
            return
        if self._respawns.failures:  # probing: one at a time until one comes up
            if any(w.state == STARTING for w in self._workers):
                return
            missing = 1
        for _ in range(missing):
            new = self._spawn(now)
            if new is not None and self._respawns.owed:
                old = self._respawns.owed.pop(0)
                self._events.append(WorkerEvent("replaced", old, f"by worker {new.pid}"))

    def _spawn(self, now: float) -> WorkerHandle | None:
        # start() made both; poll(), the only other caller, runs only before _release()
        assert self._epoll is not None and self._main_pidfd is not None
        inherited = None
        if self.start_method == "fork":  # what the child would otherwise inherit from us
            inherited = [self._epoll.fileno(), *self._fdmap, *(w.stop_w for w in self._workers)]
            inherited += helper_processes.main_only_fds()  # the daemon's: state lock, sockets...
        cfg = WorkerConfig(
            main_pid=os.getpid(),
            pythonpath=self.pythonpath,
            preload=self.preload,
            worker_setup=self.worker_setup,
            max_memory=self.max_memory,
        )
        try:
            w = start_worker(self._ctx, cfg, self._main_pidfd, inherited, now)
        except Exception as exc:  # e.g. the forkserver itself died on a bad preload
            error = f"cannot start a worker: {one_line(exc)}"
            self._respawns.failed(now, error)
            log.error("%s", error)
            self._events.append(WorkerEvent("init_failed", 0, error))
            return None
        if self.start_method == "forkserver":
            w.forkserver = self._forkserver.follow()
        self._workers.append(w)
        if self._stopping:
            w.signal_stop()
        self._watch(w.fd, w, _CONN)
        if w.pidfd is not None:
            self._watch(w.pidfd, w, _PIDFD)
        else:
            w.exited = True
        return w

    # -- helpers ----------------------------------------------------------------------------

    def _pick(self, loop: bool, big: bool) -> WorkerHandle:
        w = pick(self._workers, loop, big, self.prefetch, self.max_runs)
        if w is None:
            raise PoolFull("no worker can take a task now")
        return w

    def _set_state(self, w: WorkerHandle, state: str) -> None:
        if w.state != state:
            w.state = state
            w.state_since = self._clock()

    def _watch(self, fd: int, w: WorkerHandle | None, kind: int) -> None:
        assert self._epoll is not None  # only _spawn() (after start()) watches
        self._epoll.register(fd, select.EPOLLIN)
        self._fdmap[fd] = (w, kind)

    def _unwatch(self, fd: int) -> None:
        if self._fdmap.pop(fd, None) is not None:
            assert self._epoll is not None  # it is in _fdmap: _watch() had the epoll
            self._epoll.unregister(fd)

    def _stop_all(self) -> None:
        self._stopping = True
        for w in self._workers:
            w.signal_stop()

    def _emergency_stop(self) -> None:
        """At interpreter exit without close(): kill and join everything, without waiting for
        runs (multiprocessing's own atexit join would hang on workers that survive SIGTERM)."""
        if self._started and not self._closed:
            self._closing = True
            self._kill_all(Outcome.KILLED, "killed at exit")
            self.close(timeout=0)

    def __repr__(self) -> str:
        return (
            f"<WorkerPool {self.start_method} {self.size()}/{self.target_size} workers, "
            f"{self.busy_count()} busy{', closed' if self._closed else ''}>"
        )


def _close_at_exit(ref: weakref.ref[WorkerPool]) -> None:
    pool = ref()
    if pool is not None:
        pool._emergency_stop()


def pool_for(config: Any, log_target: str, log_level: int | str) -> WorkerPool:
    """The pool `poolkeeper run` runs for a settings.Config (not started yet)."""
    from poolkeeper.service.logs import WorkerLogSetup

    return WorkerPool(
        workers=config.pool.workers,
        start_method=config.pool.start_method,
        preload=config.pool.preload,
        pythonpath=config.pythonpath,
        max_runs_per_worker=config.pool.max_runs_per_worker,
        max_memory_per_worker=config.pool.max_memory_per_worker,
        worker_setup=WorkerLogSetup(log_target, log_level),
        # Fair dispatch (as Celery's -O fair): a run goes only to an idle worker, never
        # queued behind a long run while another worker is about to be free. Trivial runs
        # still match a raw multiprocessing.Pool (bench/RESULTS.md).
        prefetch=0,
    )
