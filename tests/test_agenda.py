"""The main loop's timers and ready queue (poolkeeper.daemon.agenda, scheduling.timers) against
brute-force references on random schedules, with an injected clock: no processes, no sleeps.

The reference is the loop as it was before the heaps: every turn, every job's schedule is asked
for its due fires, and every job's ready runs are sorted (loop replicas first, then by due time)
and handed to free workers in that order. Two copies of the same jobs (same specs, same random
seeds) live side by side, one driven by the agenda and one by the reference, through the same
operations (time passing, a wall clock stepped back, runs ending in any outcome, pause, resume,
run-now, a reload replacing or removing a job); they must fire the same jobs at the same times
and dispatch the same runs.
"""

from __future__ import annotations

import random
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from poolkeeper.config.loader import load_config
from poolkeeper.daemon.agenda import Agenda
from poolkeeper.daemon.jobs import JobRuntime, PendingRun
from poolkeeper.pool.supervisor import RunEnded, Task
from poolkeeper.scheduling.timers import TimerHeap

# -- the timer heap alone ----------------------------------------------------------------------

KEYS = st.sampled_from("abcdefgh")
TIMES = st.floats(min_value=0, max_value=100, allow_nan=False)
TIMER_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, TIMES),
        st.tuples(st.just("cancel"), KEYS),
        st.tuples(st.just("pop"), TIMES),
        st.tuples(st.just("peek")),
    ),
    max_size=200,
)


@given(TIMER_OPS)
@settings(max_examples=300, deadline=None)
def test_the_timer_heap_pops_what_a_scan_of_every_deadline_would(ops):
    heap: TimerHeap[str] = TimerHeap()
    model: dict[str, tuple[float, int]] = {}  # key -> (deadline, order it was set in)
    order = 0
    for op in ops:
        if op[0] == "set":
            order += 1
            model[op[1]] = (op[2], order)
            heap.set(op[1], op[2])
        elif op[0] == "cancel":
            model.pop(op[1], None)
            heap.cancel(op[1])
        elif op[0] == "pop":
            now = op[1]
            expected = sorted((v, k) for k, v in model.items() if v[0] <= now)
            for _, key in expected:
                del model[key]
            assert heap.pop_due(now) == [key for _, key in expected]
        assert heap.peek() == min((v[0] for v in model.values()), default=None)
        assert len(heap) == len(model) and set(heap) == set(model)


def test_the_timer_heap_stays_small_when_deadlines_keep_moving():
    heap: TimerHeap[int] = TimerHeap()
    for step in range(100_000):
        heap.set(step % 10, float(step))  # ten keys, each rescheduled 10,000 times
    assert len(heap) == 10
    assert len(heap._heap) <= 2 * 10 + 64 + 1
    assert heap.pop_due(99_990.0) == [0]


# -- jobs: the agenda against the reference loop ------------------------------------------------

# Every kind of job and every rule the ready queue has to respect: overlap skip/queue/allow,
# retries with backoff, loop replicas that restart, cron, a one-shot, jitter.
SPEC = """\
version: 1
pool: {workers: 4}
jobs:
  quick:   {target: m:f, every: 0.7s, overlap: allow, max_concurrent: 2}
  queued:  {target: m:f, every: 1.3s, overlap: queue}
  skipped: {target: m:f, every: 2.1s, overlap: skip, jitter: 0.5s}
  retried:
    target: m:f
    every: 3.7s
    retry: {attempts: 3, initial: 0.5s, factor: 2, jitter: full}
  minutely: {target: m:f, cron: "* * * * *", timezone: UTC}
  once:     {target: m:f, at: startup, retry: {attempts: 2, initial: 1s}}
  looping:
    target: m:f
    loop: {replicas: 2}
    restart: always
    backoff: {initial: 0.3s, factor: 2, max: 2s, jitter: equal}
"""
NAMES = ["quick", "queued", "skipped", "retried", "minutely", "once", "looping"]
WALL0 = 1_800_000_000.0  # wall clock at monotonic 0


def _specs() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobs.yaml"
        path.write_text(textwrap.dedent(SPEC))
        return load_config(path, import_targets=False).jobs


JOB_SPECS = _specs()


class World:
    """One copy of the jobs, driven either by an Agenda or by the reference scan."""

    def __init__(self, with_agenda: bool) -> None:
        self.agenda = Agenda() if with_agenda else None
        self.jobs: dict[str, JobRuntime] = {}
        self.fired: list[tuple[str, float]] = []

    def add(self, name: str, seed: int, now_wall: float, now_mono: float) -> None:
        job = JobRuntime(JOB_SPECS[name], random.Random(seed))
        job.start(now_wall, now_mono, None)
        self.jobs[name] = job
        if self.agenda is not None:
            self.agenda.add(job)

    def remove(self, name: str) -> None:
        job = self.jobs.pop(name)
        if self.agenda is not None:
            self.agenda.remove(job)

    def fire(self, now_wall: float, now_mono: float) -> list[tuple[str, float]]:
        fired: list[tuple[str, float]] = []
        if self.agenda is not None:
            for job, times in self.agenda.fire_due(now_wall, now_mono, lambda job: True):
                fired += [(job.name, t) for t in times]
        else:
            for job in self.jobs.values():
                fired += [(job.name, t) for t in job.fire_due(now_wall, now_mono)]
        return sorted(fired, key=lambda item: (item[1], item[0]))

    def dispatch_by_agenda(
        self, now_mono: float, slots: int
    ) -> list[tuple[JobRuntime, PendingRun, Task]]:
        assert self.agenda is not None
        taken: list[tuple[JobRuntime, PendingRun, Task]] = []

        def take(job: JobRuntime, run: PendingRun) -> bool:
            if len(taken) >= slots:
                return False
            task = job.make_task(run)
            job.dispatched(run, task)
            taken.append((job, run, task))
            return True

        self.agenda.dispatch(now_mono, lambda job: True, take)
        return taken

    def reference_order(self, now_mono: float) -> list[tuple[JobRuntime, PendingRun]]:
        ready = [(job, run) for job in self.jobs.values() for run in job.ready(now_mono)]
        return sorted(ready, key=lambda item: (item[1].replica is None, item[1].due))


def _key(run: PendingRun) -> tuple[Any, ...]:
    return (run.job, run.attempt, run.scheduled_at, run.replica)


def _sort_key(run: PendingRun) -> tuple[bool, float]:
    return (run.replica is None, run.due)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.floats(0.01, 5.0), st.integers(0, 4)),
        st.tuples(st.just("end"), st.integers(0, 50), st.sampled_from(["succeeded", "failed"])),
        st.tuples(st.just("pause"), st.sampled_from(NAMES)),
        st.tuples(st.just("resume"), st.sampled_from(NAMES)),
        st.tuples(st.just("run_now"), st.sampled_from(NAMES)),
        st.tuples(st.just("reload"), st.sampled_from(NAMES), st.booleans()),
        st.tuples(st.just("step_back"), st.floats(1.0, 7200.0)),
    ),
    min_size=1,
    max_size=80,
)


@given(OPS, st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
# Found by this test: a run due now waited behind a loop replica's later restart, because the
# delayed heap was ordered replica-first like the ready queue.
@example(
    ops=[
        ("pause", "quick"),
        ("tick", 0.125, 1),
        ("tick", 0.0625, 4),
        ("end", 0, "succeeded"),
        ("tick", 0.125, 1),
    ],
    seed=0,
)
def test_the_agenda_fires_and_dispatches_what_scanning_every_job_would(ops, seed):
    heap, ref = World(with_agenda=True), World(with_agenda=False)
    mono, wall_offset = 0.0, WALL0
    seeds = random.Random(seed)
    for name in NAMES:
        job_seed = seeds.getrandbits(32)
        heap.add(name, job_seed, mono + wall_offset, mono)
        ref.add(name, job_seed, mono + wall_offset, mono)
    # Runs in flight in both worlds: (heap's job and task, reference's job and task).
    in_flight: list[tuple[JobRuntime, Task, JobRuntime, Task]] = []

    for op in ops:
        wall = mono + wall_offset
        if op[0] == "tick":
            mono += op[1]
            wall = mono + wall_offset
            assert heap.fire(wall, mono) == ref.fire(wall, mono)
            _dispatch_both(heap, ref, mono, op[2], in_flight)
        elif op[0] == "end" and in_flight:
            hjob, htask, rjob, rtask = in_flight.pop(op[1] % len(in_flight))
            for job, task in ((hjob, htask), (rjob, rtask)):
                ev = RunEnded(task, op[2], wall - 0.1, wall, 1, None, None, None, None)
                job.ended(ev, wall, mono, False)
        elif op[0] in ("pause", "resume", "run_now"):
            name = op[1]
            for world in (heap, ref):
                job = world.jobs.get(name)
                if job is None:
                    continue
                if op[0] == "pause":
                    job.pause()
                elif op[0] == "resume":
                    job.resume(wall, mono, set())
                else:
                    job.run_now(wall, mono)
        elif op[0] == "reload":
            name, keep = op[1], op[2]
            if name in heap.jobs:
                heap.remove(name)
                ref.remove(name)
                in_flight[:] = [item for item in in_flight if item[0].name != name]
            if keep:  # a changed definition: a fresh runtime; else the job is gone
                job_seed = seeds.getrandbits(32)
                heap.add(name, job_seed, wall, mono)
                ref.add(name, job_seed, wall, mono)
        elif op[0] == "step_back":
            step = op[1]
            wall_offset -= step
            assert heap.agenda is not None
            # The next turn sees the step: the loop tells the agenda, and the reference's
            # schedules see it when they are asked for their fires (every job, every turn).
            wall = mono + wall_offset
            heap.agenda.clock_stepped_back(wall, step)
            assert heap.fire(wall, mono) == ref.fire(wall, mono)
            _dispatch_both(heap, ref, mono, 0, in_flight)
        _check_consistent(heap)
    # The same history of waiting runs, in the end: nothing got lost in a heap.
    assert _pending(heap) == _pending(ref)


def _dispatch_both(
    heap: World,
    ref: World,
    mono: float,
    slots: int,
    in_flight: list[tuple[JobRuntime, Task, JobRuntime, Task]],
) -> None:
    """The agenda picks up to `slots` runs; they must be ready by the reference's rule and be
    the first `slots` of its order (ties in due time may go either way). The reference then
    dispatches the very same runs, so both worlds stay identical."""
    order = ref.reference_order(mono)
    taken = heap.dispatch_by_agenda(mono, slots)
    assert len(taken) == min(slots, len(order))
    assert sorted(_sort_key(run) for _, run, _ in taken) == [
        _sort_key(run) for _, run in order[: len(taken)]
    ]
    for hjob, hrun, htask in taken:
        match = next((job, run) for job, run in order if _key(run) == _key(hrun))
        order.remove(match)
        rjob, rrun = match
        rtask = rjob.make_task(rrun)
        rjob.dispatched(rrun, rtask)
        in_flight.append((hjob, htask, rjob, rtask))


def _pending(world: World) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: sorted(_key(run) + (run.due,) for run in job.pending)
        for name, job in world.jobs.items()
    }


def _check_consistent(world: World) -> None:
    """What the agenda holds matches the jobs: each job's next fire is its timer, and every
    waiting run is reachable (in the delayed or ready queue, or its job is blocked behind a
    running run and is announced again when it ends)."""
    agenda = world.agenda
    assert agenda is not None
    for job in world.jobs.values():
        assert job.agenda is agenda
        assert agenda.fires.get(job) == job.next_fire
        entries = [*(delayed[2] for delayed in agenda._delayed), *agenda._ready]
        queued = {id(entry[4]) for entry in entries if entry[3] is job}
        for run in job.pending:
            assert id(run) in queued or (job.blocked and job.running), (job.name, run)
    assert agenda.paused == sum(job.paused for job in world.jobs.values())


def _fail(job: JobRuntime, task: Task, wall: float, mono: float) -> str:
    ev = RunEnded(task, "failed", wall - 0.1, wall, 1, None, None, None, None)
    return job.ended(ev, wall, mono, False)


def test_status_counters_follow_backoffs_and_pauses_without_a_scan():
    world = World(with_agenda=True)
    agenda = world.agenda
    assert agenda is not None
    for name in ("retried", "once", "quick"):
        world.add(name, 7, WALL0, 0.0)
    world.fire(WALL0, 0.0)
    taken = {job.name: task for job, _, task in world.dispatch_by_agenda(0.0, 10)}
    assert agenda.backing_off(0.0) == (0, None, 0.0)
    _fail(world.jobs["once"], taken["once"], WALL0 + 1, 1.0)  # retry in 1s (full jitter)
    _fail(world.jobs["retried"], taken["retried"], WALL0 + 1, 1.0)  # retry within 0.5s
    count, first, left = agenda.backing_off(1.0)
    assert count == 2
    assert first is not None and left == min(
        world.jobs[n].backing_off_until - 1.0 for n in ("once", "retried")
    )
    latest = max(world.jobs[n].backing_off_until for n in ("once", "retried"))
    assert agenda.backing_off(latest) == (0, None, 0.0)  # both are due again: none backs off

    world.jobs["quick"].pause()
    world.jobs["once"].pause()
    assert agenda.paused == 2
    world.jobs["once"].resume(WALL0 + 2, 2.0, set())
    world.jobs["once"].resume(WALL0 + 2, 2.0, set())  # twice: still counted once
    assert agenda.paused == 1
    world.remove("quick")  # a reload removed the paused job
    assert agenda.paused == 0


def test_a_job_that_may_not_run_yet_keeps_its_fires_and_runs_until_released():
    """While the daemon starts only before_ready jobs run: the others' fires and loop
    replicas wait, and none of them is lost or doubled once the daemon is ready."""
    world = World(with_agenda=True)
    agenda = world.agenda
    assert agenda is not None
    for name in ("quick", "looping"):
        world.add(name, 3, WALL0, 0.0)
    starting = lambda job: False  # noqa: E731 - what the daemon says of them while starting
    assert list(agenda.fire_due(WALL0 + 5, 5.0, starting)) == []
    taken: list[PendingRun] = []
    agenda.dispatch(5.0, starting, lambda job, run: taken.append(run) is None)
    assert taken == []
    agenda.release_held()
    fired = list(agenda.fire_due(WALL0 + 5, 5.0, lambda job: True))
    assert [(job.name, len(times)) for job, times in fired] == [("quick", 1)]
    agenda.dispatch(5.0, lambda job: True, lambda job, run: taken.append(run) is None)
    assert sorted((run.job, run.replica) for run in taken) == [
        ("looping", 0),
        ("looping", 1),
        ("quick", None),
    ]
    assert [run.replica for run in taken][:2] == [0, 1]  # loop replicas first
