"""One worker as the supervisor (poolkeeper.pool.supervisor) sees it: its process, its end of the
pipe and its stop pipe, the tasks handed to it (a Slot each, from submit() to its terminal
event), its state, its deadlines, and what its kill or exit means for each of its tasks.

Everything here runs in the main process and looks at one worker at a time (pick() only
compares them). The supervisor decides for the pool: when a worker is killed, retired or
replaced, and which events its caller sees.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from poolkeeper.outcomes import Outcome
from poolkeeper.pool import protocol, reaper
from poolkeeper.pool.protocol import NotStarted, RunEnded, RunStarted, Task, take_messages
from poolkeeper.pool.worker import PassFd, WorkerConfig, worker_main

log = logging.getLogger("poolkeeper.pool.supervisor")

# A worker's states: STARTING until its "R", READY (takes tasks), RETIRING (told to exit once
# its run is done: recycling, close), DYING (SIGKILLed, waiting to be reaped).
STARTING, READY, RETIRING, DYING = "starting", "ready", "retiring", "dying"

# After SIGUSR1 (faulthandler dumps the hung run's stack), give the dump this long to reach
# stderr before the SIGKILL.
STACK_DUMP_GRACE = 0.3
# A worker told to exit (pool closing, recycling) that has no run left gets this long to do
# so; then its process group is killed. A worker exits without waiting for its job's
# threads, so only something wedged (a log handler that blocks, say) ever takes this long.
WORKER_EXIT_GRACE = 5.0
# What popen_forkserver reports for a worker whose forkserver died before it: the forkserver
# was to send the exit status, and there is none.
_NO_STATUS_FROM_FORKSERVER = 255
# A run cancelled by kill_runs() that reached its worker anyway gets this long to be refused
# ("N") before the worker is killed.
VERDICT_GRACE = 0.05
# One read of a worker's pipe (a full read means there may be more). Not bigger: os.read()
# allocates this much each time, and above 128 KiB malloc maps and unmaps it per call.
READ_SIZE = 1 << 16


class Slot:
    """A task handed to a worker, from submit() until its terminal event."""

    __slots__ = ("task", "seq", "started_at", "started_clock", "cancelled", "reported")

    def __init__(self, task: Task, seq: int) -> None:
        self.task = task
        self.seq = seq
        self.started_at: float | None = None  # epoch, as inferred by the main process
        self.started_clock: float | None = None
        self.cancelled = False  # a cancel was sent: wait for the worker's verdict
        self.reported = False  # its terminal event was already emitted (kill_runs)


class WorkerHandle:
    """The supervisor's record of one worker process, from its start until it is reaped."""

    __slots__ = (
        "proc", "pid", "conn", "fd", "pidfd", "state", "queue", "buf", "assigned", "done",
        "last_heartbeat", "kill_at", "kill_outcome", "kill_error", "born", "state_since",
        "init_error", "exited", "sentinel_watched", "retire_reason", "broken", "stop_w",
        "stop_set", "told_to_exit", "exit_by", "forkserver",
    )  # fmt: skip

    def __init__(self, proc: Any, conn: Any, pidfd: int | None, stop_w: int, now: float) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.conn = conn
        self.fd: int = conn.fileno()
        self.pidfd = pidfd
        self.state = STARTING
        self.queue: collections.deque[Slot] = collections.deque()
        self.buf = bytearray()
        self.assigned = 0  # tasks ever handed to it (recycling counts these)
        self.done = 0
        self.last_heartbeat = now
        self.kill_at: float | None = None  # SIGKILL the group at this clock time
        self.kill_outcome: Outcome | None = None  # ... and end the running task with this
        self.kill_error: str | None = None
        self.born = now
        self.state_since = now
        self.init_error: str | None = None
        self.exited = False  # its pidfd fired; reaping may wait for the exit status
        self.sentinel_watched = False
        self.retire_reason: str | None = None
        self.broken = False  # a send failed: it is dying, give it nothing more
        self.stop_w = stop_w  # write end of its stop pipe (ctx.stopping)
        self.stop_set = False
        self.told_to_exit = False  # None was sent: it exits once its queue is done
        self.exit_by: float | None = None  # ... and is killed if still there at this time
        self.forkserver: int | None = None  # pid of the forkserver that started it

    # -- taking tasks, talking to it -------------------------------------------------------

    def room(self, prefetch: int, max_runs: int) -> int:
        """How many more tasks it can take now. (Called for every worker on every dispatch:
        plain comparisons, no min()/max() calls.)"""
        state = self.state
        if (state is not READY and state is not STARTING) or self.broken:
            return 0
        queue = self.queue
        if queue:
            head = queue[0]
            if head.task.loop or head.cancelled:
                return 0
            room = 1 + prefetch - len(queue)
        else:
            room = 1 + prefetch
        if max_runs and max_runs - self.assigned < room:
            room = max_runs - self.assigned
        return room if room > 0 else 0

    def awaits(self) -> bool:
        """The worker is blocked reading its pipe: what we send is consumed at once."""
        return self.state == READY and not self.queue

    def send(self, msg: Any) -> bool:
        data = msg if isinstance(msg, bytes) else pickle.dumps(msg, protocol.PICKLE_PROTOCOL)
        try:
            frame = protocol.frame(data)
            while frame:
                frame = frame[os.write(self.fd, frame) :]
            return True
        except OSError:  # it died; its pidfd will tell
            self.broken = True
            return False

    def read(self) -> list[Any] | None:
        """Every complete message its pipe holds now (all of them: a read that fills the buffer
        is followed by another while the pipe stays readable, so a burst of results is one
        batch); None once its end is closed. An EOF after some data is left for the next call
        (the pipe stays readable at EOF)."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except OSError:
            data = b""
        if not data:
            return None
        self.buf += data
        while len(data) == READ_SIZE and _readable(self.fd):
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError:
                break
            self.buf += data
        return take_messages(self.buf)

    def promote(self, now: float, wall: float | None = None) -> RunStarted | None:
        """The head of a ready worker's queue is running from now on (the worker runs its
        queue in order and never waits for us in between)."""
        if not self.queue or self.state not in (READY, RETIRING):
            return None
        slot = self.queue[0]
        if slot.started_clock is not None:
            return None
        if slot.cancelled:  # the worker decides; for a killed task, enforce it shortly
            if slot.reported:
                self.kill_at, self.kill_outcome = now + VERDICT_GRACE, None
            return None
        slot.started_clock = now
        slot.started_at = time.time() if wall is None else wall
        self.last_heartbeat = now
        return RunStarted(slot.task, self.pid, slot.started_at)

    def cancel_queued(self, ids: set[str] | None = None) -> None:
        """Ask the worker not to start the tasks it holds but has not begun (only those of
        `ids`, if given); it answers "N" (NotStarted) for each, unless it had already begun it."""
        for slot in self.queue:
            if slot.started_clock is None and not slot.cancelled:
                if ids is None or slot.task.run_id in ids:
                    slot.cancelled = True
                    self.send(("C", slot.seq))

    def end_unstarted(self, outcome: Outcome, ids: set[str] | None, now: float) -> list[RunEnded]:
        """End its queued tasks of `ids` (all if None) with `outcome` before they start
        (kill_runs), and tell the worker not to start them."""
        out: list[RunEnded] = []
        head = self.queue[0]
        for slot in self.queue:
            if slot.reported or (ids is not None and slot.task.run_id not in ids):
                continue
            out.append(ended_unstarted(slot, outcome, self.pid, f"{outcome} before start"))
            slot.reported = True
            if not slot.cancelled:
                slot.cancelled = True
                self.send(("C", slot.seq))
            if slot is head and head.started_clock is None and self.state == READY:
                self.kill_at, self.kill_outcome = now + VERDICT_GRACE, None
        return out

    def signal_stop(self) -> None:
        """Set the worker's ctx.stopping: one byte that nobody reads, so it stays set."""
        if not self.stop_set:
            self.stop_set = True
            try:
                os.write(self.stop_w, b"!")
            except OSError:  # cannot happen with an empty pipe; the worker ends either way
                pass

    # -- its deadlines ---------------------------------------------------------------------

    def deadline(self) -> float | None:
        """The clock time at which the supervisor must act on this worker, if any: a kill
        already decided, the end of its exit grace, its running task's timeout or heartbeat
        timeout."""
        if self.kill_at is not None:
            return self.kill_at
        if self.exit_by is not None and self.state != DYING:
            return self.exit_by
        if not self.queue or self.state == DYING:
            return None
        slot = self.queue[0]
        if slot.started_clock is None:
            return None
        task = slot.task
        best = None
        if task.timeout is not None:
            best = slot.started_clock + task.timeout
        if task.heartbeat_timeout is not None:
            t = self.last_heartbeat + task.heartbeat_timeout
            best = t if best is None else min(best, t)
        return best

    def overdue(self, now: float) -> tuple[Outcome | None, str | None] | None:
        """Whether the supervisor must kill it now: None, or the (outcome, error) its running
        task ends with (outcome None: nothing left to report). A run without heartbeats has its
        stack dumped first, and is due STACK_DUMP_GRACE later."""
        exit_by = self.exit_by
        if exit_by is not None and now >= exit_by and self.state != DYING and not self.exited:
            log.warning(
                "worker %d did not exit within %gs of being told to (its last run left "
                "something that blocks the exit?): killing its process group",
                self.pid, WORKER_EXIT_GRACE,
            )  # fmt: skip
            return None, None
        if self.state == DYING or not self.queue:
            return None
        if self.kill_at is not None:
            return (self.kill_outcome, self.kill_error) if now >= self.kill_at else None
        slot = self.queue[0]
        if slot.started_clock is None:
            return None
        task = slot.task
        if task.timeout is not None and now >= slot.started_clock + task.timeout:
            return Outcome.TIMEOUT, f"timed out after {task.timeout:g}s"
        if (
            task.heartbeat_timeout is not None
            and now >= self.last_heartbeat + task.heartbeat_timeout
        ):
            self.dump_stack_then_kill(slot, now)
        return None

    def dump_stack_then_kill(self, slot: Slot, now: float) -> None:
        secs = slot.task.heartbeat_timeout
        log.warning(
            "run %s (%s) sent no heartbeat for %gs: dumping its stack (worker %d, stderr), "
            "killing it", slot.task.run_id, slot.task.job, secs, self.pid,
        )  # fmt: skip
        try:
            os.kill(self.pid, signal.SIGUSR1)  # faulthandler in the worker prints every thread
        except ProcessLookupError:
            pass
        self.kill_at = now + STACK_DUMP_GRACE
        self.kill_outcome, self.kill_error = Outcome.TIMEOUT, f"no heartbeat for {secs:g}s"

    def tell_to_exit(self, now: float) -> None:
        """Send None: the worker exits once its queue is done, within WORKER_EXIT_GRACE."""
        self.send(None)
        self.told_to_exit = True
        self.start_exit_clock(now)

    def start_exit_clock(self, now: float) -> None:
        """A worker told to exit, with nothing left to run, has WORKER_EXIT_GRACE to go."""
        if self.told_to_exit and not self.queue and self.exit_by is None:
            self.exit_by = now + WORKER_EXIT_GRACE

    # -- its end ---------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the worker now, with every process below it and its process group."""
        q = self.queue
        run = q[0].task if q and q[0].started_clock is not None else None
        reaper.kill_below(
            self.pid, f"below worker {self.pid}" + (f" (running {run.job})" if run else "")
        )
        killpg(self.pid)
        try:
            os.kill(self.pid, signal.SIGKILL)  # in case it has not made itself a group leader yet
        except ProcessLookupError:
            pass

    def end_runs_at_kill(
        self, outcome: Outcome | None, error: str | None, ids: set[str] | None
    ) -> tuple[list[RunEnded], list[NotStarted]]:
        """The fate of its tasks once kill() is done: the running one ends with `outcome`
        (None: it was already reported); queued ones are handed back, or end with `outcome`
        too if they are in `ids`."""
        now = time.time()
        out: list[RunEnded] = []
        handed_back: list[NotStarted] = []
        for slot in self.queue:
            if slot.reported:
                continue
            if outcome is not None and slot.started_clock is not None:
                out.append(
                    RunEnded(slot.task, outcome, slot.started_at, now, self.pid, None,
                             int(signal.SIGKILL), error, None)
                )  # fmt: skip
            elif outcome is not None and ids is not None and slot.task.run_id in ids:
                out.append(ended_unstarted(slot, outcome, self.pid, f"{outcome} before start"))
            else:
                handed_back.append(
                    NotStarted(slot.task, f"worker {self.pid} was killed before starting it")
                )
            slot.reported = True
        self.queue.clear()
        self.kill_at = None
        return out, handed_back

    def exit_status(
        self, code: int, forkserver_dead: Callable[[int | None], bool]
    ) -> tuple[int | None, int | None, str]:
        """(exit code, signal, in words) of its exit status `code` (Process.exitcode)."""
        sig = -code if code < 0 else None
        exit_code = code if code >= 0 else None
        how = f"exit code {code}" if sig is None else signame(sig)
        if code == _NO_STATUS_FROM_FORKSERVER and forkserver_dead(self.forkserver):
            exit_code, how = None, f"exit status unknown: its forkserver ({self.forkserver}) died"
        return exit_code, sig, how

    def end_runs_at_exit(
        self, never_ready: bool, exit_code: int | None, sig: int | None, how: str
    ) -> list[RunEnded | NotStarted]:
        """The fate of its tasks once it has exited (`how`): a started one is lost, the others
        are handed back."""
        now = time.time()
        events: list[RunEnded | NotStarted] = []
        for slot in self.queue:
            if slot.reported:
                continue
            if never_ready:
                events.append(NotStarted(slot.task, f"worker {self.pid} failed to start"))
            elif slot.started_clock is not None or slot.cancelled and slot is self.queue[0]:
                events.append(
                    RunEnded(slot.task, Outcome.LOST, slot.started_at, now, self.pid, exit_code, sig,
                             f"worker died: {how}", None)
                )  # fmt: skip
            else:
                events.append(
                    NotStarted(slot.task, f"worker {self.pid} died ({how}) before starting it")
                )
        self.queue.clear()
        return events

    def release(self) -> None:
        """Close what the main process holds of a reaped worker."""
        self.conn.close()
        os.close(self.stop_w)
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.proc.join(0)
        self.proc.close()


def start_worker(
    ctx: Any, cfg: WorkerConfig, main_pidfd: int, inherited: list[int] | None, now: float
) -> WorkerHandle:
    """Start one worker process of multiprocessing context `ctx`. `inherited` (fork only): the
    main process's descriptors the child must close. Raises what Process.start() raises, with
    nothing left open."""
    parent, child = ctx.Pipe(duplex=True)
    stop_r, stop_w = os.pipe()
    if inherited is not None:
        mine = [parent.fileno(), stop_w, *(fd for fd in inherited if fd != child.fileno())]
        cfg = cfg._replace(close_fds=tuple(mine))
    proc = ctx.Process(
        target=worker_main,
        args=(child, PassFd(main_pidfd), PassFd(stop_r), cfg),
        name="poolkeeper-worker",
    )
    try:
        proc.start()
    except Exception:
        parent.close()
        child.close()
        os.close(stop_r)
        os.close(stop_w)
        raise
    child.close()
    os.close(stop_r)  # the child has its own (inherited, or passed by start())
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # already gone (forkserver reaped it)
        pidfd = None
    return WorkerHandle(proc, parent, pidfd, stop_w, now)


def pick(
    workers: list[WorkerHandle], loop: bool, big: bool, prefetch: int, max_runs: int
) -> WorkerHandle | None:
    """The worker a task goes to: an idle ready one first, then one still starting, then (not
    for a loop task) one with room in its queue; None if none fits. A `big` task only goes to
    a worker that reads its pipe now."""
    best = None
    for w in workers:
        room = w.room(prefetch, max_runs)
        if not room:
            continue
        if not w.queue:
            if w.state == READY:
                return w
            if best is None or best.queue:
                best = w
        elif best is None and not loop:
            best = w
    if best is None or (big and not best.awaits()) or (loop and best.queue):
        return None
    return best


def ended_unstarted(slot: Slot, outcome: Outcome, pid: int, error: str) -> RunEnded:
    return RunEnded(slot.task, outcome, None, time.time(), pid, None, None, error, None)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
