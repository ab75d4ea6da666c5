"""Signals only queue a number and wake the main loop; the loop decides what they mean.

Nothing heavy may run in a signal handler: it interrupts the main loop at an arbitrary
bytecode, possibly in the middle of bookkeeping. The handler appends to a deque, and
`signal.set_wakeup_fd` writes a byte to a pipe the loop waits on, so a signal that arrives
while the loop blocks in `wait()` ends the wait at once.
"""

from __future__ import annotations

import collections
import os
import signal
from collections.abc import Iterable


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

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)

    def fileno(self) -> int:
        """The fd to wait on; readable when a signal arrived."""
        return self._read_fd

    def fds(self) -> tuple[int, int]:
        """Both ends of the pipe (a worker started by fork closes them)."""
        return self._read_fd, self._write_fd

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
        self.restore()
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
