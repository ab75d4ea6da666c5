"""Reload: read the file again, say what would change (`plan`), and apply it (`Reloading`,
the daemon's side, run inside its main loop).

The daemon validates the new file completely before touching anything:
a file that `poolkeeper check` would reject changes nothing. A valid one is compared with the
running config by job name (`plan`):

    added       start now
    removed     its runs see ctx.stopping, finish within shutdown.drain_timeout (then are
                killed), and nothing of it starts again
    changed     removed, then added with the new definition once its last old run has ended
                (so old and new replicas never hold more workers than validation promised)
    unchanged   not touched: in-flight runs go on, schedules keep their next fire
    pool        (workers, start_method, preload, recycling limits, pythonpath) every job is
                changed and the pool is replaced: drained, closed, and started again

A job is compared on every setting, `defaults:` merged in. Its code is not compared: a
changed module is picked up by a restart, not a reload (workers keep what they imported).
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import NamedTuple

from poolkeeper import exitcodes
from poolkeeper.config.settings import Config
from poolkeeper.daemon.jobs import JobRuntime
from poolkeeper.daemon.status import count, first_of
from poolkeeper.outcomes import Outcome
from poolkeeper.pool.prestart import add_to_sys_path
from poolkeeper.pool.supervisor import pool_for
from poolkeeper.service.control import refused
from poolkeeper.service.logs import event

# Settings a worker process is made with: changing one means new workers.
POOL_SETTINGS = (
    "workers",
    "start_method",
    "preload",
    "max_runs_per_worker",
    "max_memory_per_worker",
)


class Plan(NamedTuple):
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]
    pool_changed: list[str]  # e.g. ['pool.workers', 'pythonpath']: the pool is replaced

    @property
    def changes_anything(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.pool_changed)

    def summary(self) -> str:
        """e.g. `1 job added (report), 1 changed (consume), 3 unchanged`."""
        parts = []
        for what, names in (
            ("added", self.added),
            ("removed", self.removed),
            ("changed", self.changed),
        ):
            if names:
                parts.append(f"{count(len(names), 'job')} {what} ({', '.join(names)})")
        if self.unchanged:
            parts.append(f"{count(len(self.unchanged), 'job')} unchanged")
        if self.pool_changed:
            parts.append(f"pool replaced ({', '.join(self.pool_changed)})")
        return "; ".join(parts) or "no jobs"


def plan(old: Config, new: Config) -> Plan:
    pool_changed = [
        f"pool.{name}"
        for name in POOL_SETTINGS
        if getattr(old.pool, name) != getattr(new.pool, name)
    ]
    if old.pythonpath != new.pythonpath:
        pool_changed.append("pythonpath")
    added = [name for name in new.jobs if name not in old.jobs]
    removed = [name for name in old.jobs if name not in new.jobs]
    kept = [name for name in new.jobs if name in old.jobs]
    if pool_changed:  # every job starts again, in the new pool
        return Plan(added, removed, kept, [], pool_changed)
    changed = [name for name in kept if new.jobs[name] != old.jobs[name]]
    unchanged = [name for name in kept if new.jobs[name] == old.jobs[name]]
    return Plan(added, removed, changed, unchanged, [])


def refusal(old: Config, new: Config) -> str | None:
    """Why `new` cannot be applied by a reload at all, or None."""
    if old.state.path != new.state.path:
        return (
            f"state.path changed ({old.state.path} -> {new.state.path}): a running daemon "
            "keeps its state database; restart it to apply this (systemctl restart)"
        )
    return None


class Reloading:
    """The daemon's side of a reload: a mixin of `Daemon`, run inside its main loop.

    Its state (set up by the daemon): `retiring`, run id -> (its old JobRuntime, kill time),
    for runs of removed, changed or paused jobs that were told to stop; `held`, new definitions
    waiting for their old runs to end; `next_pool`, the config of a pool that replaces the
    current one once it is drained; `reload_rejected`, why the last reload was rejected."""

    def _reload(self, why: str) -> dict:
        """Returns the outcome for `poolkeeper reload --wait`: ok, message, problems."""
        if self.phase != "running":
            self.log.warning("%s while %s: not reloading", why, self.phase)
            return refused(f"the daemon is {self.phase}: not reloading", exitcodes.UNAVAILABLE)
        self.notifier.reloading()
        try:
            self.log.info("%s: reloading %s", why, self.config.path)
            new, problems = self._read_config_again()
            if new is None:
                self._reject(problems)
                reply = refused(self._rejected_line(problems), exitcodes.CONFIG)
                return {**reply, "problems": problems}
            changes = plan(self.config, new)
            self.reload_rejected = None
            self._apply(new, changes)
            message = "reload applied: " + (
                changes.summary() if changes.changes_anything else "nothing changed"
            )
            self.log.info("%s", message, extra=event("reload_applied"))
            return {"ok": True, "message": message, "problems": []}
        finally:
            # Validation imported the job modules (seconds, for some): that was this turn's
            # work, not a stuck loop, so it must not cost a watchdog ping.
            self.last_turn = time.monotonic()
            self.notifier.status(self.status_text(self.last_turn), force=True)
            self.notifier.ready()

    def _read_config_again(self) -> tuple[Config | None, list[str]]:
        """The file validated exactly as `poolkeeper check` does it (never from the cache),
        or why it cannot be applied."""
        from poolkeeper.config.model import ConfigError, load_config

        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            return None, [str(issue) for issue in exc.issues] or [str(exc)]
        except Exception as exc:  # a bug in validation must not take the running jobs down
            self.log.exception("reload: validating %s failed", self.config.path)
            return None, [f"internal error while validating: {type(exc).__name__}: {exc}"]
        why_not = refusal(self.config, new)
        return (None, [why_not]) if why_not else (new, [])

    def _reject(self, problems: list[str]) -> None:
        for problem in problems:
            self.log.error("%s", problem)
        self.reload_rejected = first_of(problems)
        self.log.error("%s", self._rejected_line(problems), extra=event("reload_rejected"))

    @staticmethod
    def _rejected_line(problems: list[str]) -> str:
        return (
            f"reload rejected: {count(len(problems), 'problem')}; still running the previous config"
        )

    def _apply(self, new: Config, changes: Plan) -> None:
        now = time.monotonic()
        self.config = new
        if changes.pool_changed:
            self.pool.drain()  # every run sees ctx.stopping; queued ones come back NotStarted
            for name in list(self.jobs):
                self._retire_job(self.jobs.pop(name), now)
            self.held = dict(new.jobs)  # all of them, in the new pool
            self.next_pool = new
            return
        for name in (*changes.removed, *changes.changed):
            self.held.pop(name, None)
            if name in self.jobs:
                self._retire_job(self.jobs.pop(name), now)
        for name in (*changes.added, *changes.changed):
            self.held[name] = new.jobs[name]
        if self.next_pool is not None:
            self.next_pool = new
        self._start_held()

    def _retire_job(self, job: JobRuntime, now: float) -> None:
        """Its waiting runs are dropped; its runs in flight see ctx.stopping and get the
        drain budget to end, then they are killed."""
        job.pending.clear()
        self._stop_in_flight(job, list(job.running.values()), now)

    def _stop_in_flight(self, job: JobRuntime, tasks: list, now: float) -> None:
        """These runs see ctx.stopping and get the drain budget to end (then are killed);
        they are neither retried nor restarted."""
        if tasks:
            self.pool.stop_runs(tasks)
            kill_at = now + self.config.shutdown.drain_timeout
            for task in tasks:
                self.retiring[task.run_id] = (job, kill_at)

    def _start_held(self) -> None:
        """Start each new definition whose job has no old run left (in the new pool, once a
        pool replacement has happened)."""
        if self.next_pool is not None or self.phase != "running" or not self.held:
            return
        busy = {job.name for job, _ in self.retiring.values()}
        now_wall, now_mono = time.time(), time.monotonic()
        for name in [name for name in self.held if name not in busy]:
            runtime = JobRuntime(self.held.pop(name), random.Random(self.rng.random()))
            runtime.start(now_wall, now_mono, self.state.last_fire(name))
            self.jobs[name] = runtime

    def _kill_overdue_retiring(self, now: float) -> None:
        overdue = []
        for run_id, (job, kill_at) in self.retiring.items():
            if kill_at <= now:
                self.retiring[run_id] = (job, math.inf)  # once: its end is the pool's to report
                if run_id in job.running:
                    overdue.append(job.running[run_id])
        if overdue:
            self.log.warning(
                "%d stopped runs (of jobs reloaded or paused) still running after %ss: "
                "killing them (%s)",
                len(overdue),
                self.config.shutdown.drain_timeout,
                ", ".join(sorted({task.job for task in overdue})),
            )
            why = (
                f"killed: still running {self.config.shutdown.drain_timeout:g}s after its job "
                "was reloaded or paused (shutdown.drain_timeout)"
            )
            for ev in self.pool.kill_runs(Outcome.KILLED, overdue, reason=why):
                self._on_ended(ev)

    def _replace_pool(self) -> None:
        """A reload changed the pool and the old one is drained: close it, start the new one,
        then the jobs."""
        old, new = self.pool, self.next_pool
        for ev in old.close():
            self._on_ended(ev)
        self._handle_events(old.poll())
        add_to_sys_path(new.pythonpath)
        self.pool = pool_for(new, self.log_target, logging.getLogger().level)
        self.pool.start()
        self.next_pool = None
        self.log.info(
            "reload: pool replaced: %s (%s)",
            count(new.pool.workers, "worker"),
            new.pool.start_method,
        )
        self._start_held()
