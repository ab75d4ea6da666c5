"""ctx.stopping (poolkeeper.pool.context.Stopping) over a real pipe, as a worker holds it."""

from __future__ import annotations

import os
import threading

from poolkeeper.pool.context import Stopping


def test_stopping_is_set_by_one_byte_and_stays_set():
    r, w = os.pipe()
    try:
        stopping = Stopping(r)
        assert not stopping.is_set() and stopping.wait(0.01) is False
        os.write(w, b"!")
        assert stopping.is_set() and stopping.wait(0) is True and stopping.wait() is True
        # Any timeout threading.Event.wait() takes: longer than poll(2)'s int of milliseconds.
        assert stopping.wait(86400 * 365 * 100) is True and stopping.wait(float("inf")) is True
        assert stopping.is_set()  # nobody reads the byte: it stays set
    finally:
        os.close(r)
        os.close(w)


def test_threads_of_a_job_may_wait_on_it_together():
    """One poll object shared by threads would raise "concurrent poll() invocation"."""
    r, w = os.pipe()
    try:
        stopping = Stopping(r)
        waiting = threading.Semaphore(0)
        woke: list[bool] = []

        def waiter() -> None:
            timed_out = False
            while not stopping.wait(0.05):
                if not timed_out:
                    timed_out = True
                    waiting.release()  # this thread is in its wait loop
            woke.append(stopping.is_set())

        threads = [threading.Thread(target=waiter) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in threads:  # every thread waits (and keeps waiting) before the stop comes
            assert waiting.acquire(timeout=30)
        os.write(w, b"!")
        for t in threads:
            t.join(30)
        assert woke == [True] * 4
    finally:
        os.close(r)
        os.close(w)
