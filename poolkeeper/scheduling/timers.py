"""Keyed timers in one heap: what the main loop waits for, at O(log n) per change.

asyncio's `_run_once` and systemd's sd-event keep their timers in a priority queue and look
only at its head; so does this. Each key (a job's name, say) has at most one live deadline:
`set` replaces it and `cancel` drops it. Both are lazy: the old heap entry stays where it is
and is skipped when it surfaces (its sequence number no longer matches the key's), so neither
searches the heap. The heap is rebuilt when dead entries outnumber the live ones, which bounds
its size at about twice the number of keys.

    timers.set("rollup", 120.0)     # O(log n)
    timers.peek()                   # the earliest live deadline, or None: the loop's timeout
    timers.pop_due(now)             # the keys due at `now`, earliest first; they are removed

The clock is the caller's: deadlines are plain floats on whatever clock it uses (the daemon
keeps one heap for wall-clock fires and others for monotonic deadlines).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


_Entry = tuple[float, int, K]  # (deadline, sequence number, key)


class TimerHeap(Generic[K]):
    def __init__(self) -> None:
        self._heap: list[_Entry[K]] = []
        # key -> its live entry, the very tuple in the heap: an entry is live when it is the
        # one its key maps to (an identity test, and no second tuple per key).
        self._live: dict[K, _Entry[K]] = {}
        self._seq = 0  # ties go in insertion order: a stable, reproducible firing order

    def set(self, key: K, when: float) -> None:
        """`key` is due at `when` (replacing any earlier deadline of `key`)."""
        self._seq += 1
        entry = (when, self._seq, key)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()

    def cancel(self, key: K) -> None:
        """`key` is no longer due (nothing happens if it was not)."""
        self._live.pop(key, None)

    def get(self, key: K) -> float | None:
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def peek(self) -> float | None:
        """The earliest live deadline, or None when there is none."""
        self._drop_dead_head()
        return self._heap[0][0] if self._heap else None

    def peek_key(self) -> K | None:
        """The key of the earliest live deadline, or None."""
        self._drop_dead_head()
        return self._heap[0][2] if self._heap else None

    def pop_due(self, now: float) -> list[K]:
        """The keys whose deadline is at or before `now`, earliest first (ties in the order
        they were set); they are removed."""
        due: list[K] = []
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            key = entry[2]
            if live.get(key) is entry:
                del live[key]
                due.append(key)
        return due

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __iter__(self) -> Iterator[K]:
        return iter(self._live)

    def _drop_dead_head(self) -> None:
        heap, live = self._heap, self._live
        while heap:
            entry = heap[0]
            if live.get(entry[2]) is entry:
                return
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = list(self._live.values())
        heapq.heapify(self._heap)
