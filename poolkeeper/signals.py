"""Signals only queue a number and wake the main loop; the loop decides what they mean.

Nothing heavy may run in a signal handler: it interrupts the main loop at an arbitrary
bytecode, possibly in the middle of bookkeeping. The handler appends to a deque, and
`signal.set_wakeup_fd` writes a byte to a pipe the loop waits on, so a signal that arrives
while the loop blocks in `wait()` ends the wait at once.

What every catchable signal does (docs/lifecycle.md, "Signals", has the same table). Under
systemd `systemctl kill -s SIG` reaches every process of the unit, so the table says what the
helper processes do too; none of them may die of a signal the main process survives, or a
worker's run would be lost.

    signal                       main process                  workers, forkserver, tracker
    SIGTERM, SIGINT              drain; again: fast stop       survive (their runs drain)
    SIGQUIT                      fast stop                     survive
    SIGHUP                       reload                        survive
    SIGUSR1                      state dump to the log         worker: stack dump, goes on
    SIGUSR2, SIGALRM, SIGVTALRM,
    SIGPROF, SIGXCPU, SIGPWR,
    SIGIO, SIGSTKFLT, SIGTRAP,
    SIGSYS, SIGTSTP, SIGTTIN,
    SIGTTOU, SIGRTMIN..SIGRTMAX  logged, ignored               survive
    SIGPIPE, SIGXFSZ             ignored (Python's start-up SIG_IGN: writes fail instead)
    SIGCHLD, SIGCONT, SIGURG,
    SIGWINCH                     default: nothing happens (SIGCONT resumes a stopped process)
    SIGABRT, SIGSEGV, SIGBUS,
    SIGFPE, SIGILL               crash: faulthandler dumps every thread's stack, then the
                                 process dies of the signal (kill(2) or a real fault alike)
    SIGKILL, SIGSTOP             cannot be caught

"Survive" is a handler that does nothing in a worker (with SA_RESTART, so a job's system
calls go on; SIG_IGN would be inherited by every program a job execs, while a caught signal
is reset to the default by execve, and poolkeeper's at-fork hook resets it in a child a job
forks without exec), SIG_IGN in the forkserver (it never execs; workers set their own), and
blocked in multiprocessing's resource tracker (a stdlib program we cannot change: its mask
is set when it is spawned). `poolkeeper run` holds the survived signals blocked until the
main loop's handlers are in place (held_during_start). A crash of the main process leaves
its runs `running` in the state DB; the workers die with it, and the next start records
those runs `lost`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from collections.abc import Iterable, Iterator

DRAIN = frozenset({signal.SIGTERM, signal.SIGINT})
FAST_STOP = signal.SIGQUIT
RELOAD = signal.SIGHUP
DUMP = signal.SIGUSR1
# faulthandler's: dump the stacks, then die of the signal. A Python handler cannot serve a
# real fault (the faulting instruction would run again, for ever).
CRASH = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
# The default action does no harm: ignore (CHLD, URG, WINCH) or continue (CONT). Catching
# SIGCHLD would wake the loop at every worker's exit for nothing.
HARMLESS = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH})
# Python sets these to SIG_IGN at start-up (subprocess restores them for what it execs).
IGNORED_BY_PYTHON = frozenset({signal.SIGPIPE, signal.SIGXFSZ})
UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


def caught() -> tuple[int, ...]:
    """Every signal the main process catches (and the loop decides on), which is also every
    signal the helper processes must survive: all of them but the groups above."""
    left_alone = CRASH | HARMLESS | IGNORED_BY_PYTHON | UNCATCHABLE
    return tuple(sorted(s for s in signal.valid_signals() if s not in left_alone))


def held_during_start() -> tuple[int, ...]:
    """What `poolkeeper run` blocks first thing, until the main loop's handlers are in place
    (SignalQueue.install unblocks them): a SIGHUP or SIGUSR1 that comes while the config is
    validated or the pool starts is then handled by the loop instead of killing the daemon.
    Not SIGTERM, SIGINT and SIGQUIT: until the loop runs they end the process at once, as
    a start that hangs must still be stoppable. Processes started meanwhile inherit the mask:
    the forkserver and the resource tracker keep it, workers empty theirs."""
    return tuple(s for s in caught() if s not in DRAIN and s != FAST_STOP)


def name(signum: int) -> str:
    """SIGUSR1, SIGRTMIN+3."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


@contextlib.contextmanager
def blocked(signals: Iterable[int]) -> Iterator[None]:
    """Block `signals` in this thread while a helper program is spawned: the child starts with
    them blocked (the mask survives execve) and so survives them; here they arrive when the
    block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalQueue:
    def __init__(self, signals: Iterable[int]) -> None:
        self._signals = tuple(signals)
        self._pending: collections.deque[int] = collections.deque()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    def install(self) -> None:
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        # A mask inherited from whoever started us would keep them from ever arriving.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)

    def fileno(self) -> int:
        """The fd to wait on; readable when a signal arrived."""
        return self._read_fd

    def fds(self) -> tuple[int, int]:
        """Both ends of the pipe (a worker started by fork closes them)."""
        return self._read_fd, self._write_fd

    def pending(self) -> bool:
        """A signal arrived that pop_all() has not returned yet."""
        return bool(self._pending)

    def pop_all(self) -> list[int]:
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass
        taken = []
        while self._pending:
            taken.append(self._pending.popleft())
        return taken

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_wakeup)

    def close(self) -> None:
        """Stop queueing and close the pipe. The caught signals are ignored from now on: the
        daemon is about to exit, and a late signal must not change its exit status."""
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)
        self._previous.clear()
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
