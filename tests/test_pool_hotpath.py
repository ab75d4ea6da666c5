"""What the daemon's loop calls for every run, as it calls it: one poll() hands back every
message the workers have sent, however many; the slot counts follow submits and results."""

from __future__ import annotations

import os

from poolkeeper.pool.supervisor import RunEnded, RunStarted, Task


def T(run_id: str, func: str, *args) -> Task:
    return Task(run_id=run_id, job="j", target=f"jobs_for_tests:{func}", args=args)


def test_one_poll_returns_every_result_already_sent(make_pool):
    # Twelve failures with 8 KiB messages: about 110 KB of results, more than one read of
    # the pipe takes; the last run tells us when it begins, i.e. when all of them are sent.
    started_r, started_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        d = make_pool("fork", workers=1, prefetch=20)  # fork: the worker inherits the pipes
        for i in range(12):
            d.pool.submit(T(f"big{i}", "raise_a_huge_message"))
        d.pool.submit(T("last", "signal_then_block", started_w, release_r))
        assert os.read(started_r, 1) == b"s"
        events = d.pool.poll()
        ended = [ev.task.run_id for ev in events if isinstance(ev, RunEnded)]
        assert ended == [f"big{i}" for i in range(12)]
        assert all(ev.outcome == "failed" for ev in events if isinstance(ev, RunEnded))
        assert len(next(ev for ev in events if isinstance(ev, RunEnded)).traceback) > 8000
        # every run's start is reported before its end, and the last one is running
        started = [ev.task.run_id for ev in events if isinstance(ev, RunStarted)]
        assert started == [*ended, "last"]
        assert [t.run_id for t in d.pool.in_flight()] == ["last"]
        os.write(release_w, b"r")
        last = d.until(lambda ev: isinstance(ev, RunEnded))[-1]
        assert (last.task.run_id, last.outcome) == ("last", "succeeded")
    finally:
        for fd in (started_r, started_w, release_r, release_w):
            os.close(fd)


def test_free_and_idle_slots_follow_submits_and_results(make_pool):
    d = make_pool("fork", workers=2, prefetch=0)
    d.wait_ready()
    pool = d.pool
    assert (pool.free_slots(), pool.idle_slots(), pool.busy_count()) == (2, 2, 0)
    pool.submit(T("a", "noop"))
    assert (pool.free_slots(), pool.idle_slots(), pool.busy_count()) == (1, 1, 1)
    pool.submit(T("b", "noop"))
    assert (pool.free_slots(), pool.idle_slots(), pool.busy_count()) == (0, 0, 2)
    ended = set()
    while len(ended) < 2:
        ended |= {ev.task.run_id for ev in d.turn() if isinstance(ev, RunEnded)}
    assert ended == {"a", "b"}
    assert (pool.free_slots(), pool.idle_slots(), pool.busy_count()) == (2, 2, 0)
    assert pool.in_flight() == [] and pool.healthy() == (True, "ok")


def test_plain_results_are_shown_as_the_bounded_repr_shows_them():
    from poolkeeper.pool import worker

    class Loud(str):
        def __repr__(self) -> str:
            return "loud"

    def slow_path(value: object) -> str:
        text = worker._REPR.repr(value)
        cut = worker.RESULT_REPR_MAX
        return text if len(text) <= cut else text[: cut - 3] + "..."

    values = [None, True, 1.5, -12, 10**17, 10**30, "", "abc", "x" * 200, "x" * 201,
              "\U000e0001" * 100, "it's \"quoted\"\n", Loud("a"), [1, "a"], {"k": (1, 2)}]  # fmt: skip
    for value in values:
        assert worker._safe_repr(value) == slow_path(value), value
