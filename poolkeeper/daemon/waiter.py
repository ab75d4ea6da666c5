"""The main loop's one wait: a poll set kept for the daemon's whole life.

Building a selector at every turn (register every descriptor, poll, close) cost more than the
rest of a turn at thousands of turns a second. This poll object lives as long as the loop; a
turn registers only what changed since the last one (a client connected or left, a pool was
replaced) and gets back the descriptors that are ready, so that the loop serves only those
(an `accept()` on a listener with nobody waiting is a raised BlockingIOError per turn).

poll(2), not epoll: the interest set is the caller's list at each call, so a descriptor that
was closed and whose number was reused is never silently forgotten, as epoll would forget it.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

_READ = select.POLLIN | select.POLLPRI
_WRITE = select.POLLOUT


class Waiter:
    def __init__(self) -> None:
        self._poll = select.poll()
        self._registered: dict[int, int] = {}  # fd -> events

    def wait(
        self,
        readers: Iterable[FileDescriptorLike],
        writers: Iterable[FileDescriptorLike],
        timeout: float,
    ) -> set[int]:
        """Until one of `readers` is readable or one of `writers` writable (or hung up, or in
        error), at most `timeout` seconds (0: only look). Returns the ready descriptors."""
        want: dict[int, int] = {}
        for obj in readers:
            fd = _fd(obj)
            want[fd] = want.get(fd, 0) | _READ
        for obj in writers:
            fd = _fd(obj)
            want[fd] = want.get(fd, 0) | _WRITE
        if want != self._registered:
            for fd in self._registered.keys() - want.keys():
                self._poll.unregister(fd)
            for fd, events in want.items():
                if self._registered.get(fd) != events:
                    self._poll.register(fd, events)  # registers, or modifies the events
            self._registered = want
        # poll(2) counts milliseconds: round up, or a deadline 0.4 ms away would spin the
        # loop at 0 ms until it passes.
        return {fd for fd, _ in self._poll.poll(math.ceil(timeout * 1000))}


def _fd(obj: FileDescriptorLike) -> int:
    return obj if isinstance(obj, int) else obj.fileno()
