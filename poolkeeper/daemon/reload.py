"""Reload: read the file again, say what would change (`plan`), and apply it (`Reloader`,
the daemon's side, held by the `Daemon` and run inside its main loop).

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
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from poolkeeper import exitcodes
from poolkeeper.config.settings import Config, Job
from poolkeeper.daemon.jobs import JobRuntime
from poolkeeper.daemon.status import count, first_of
from poolkeeper.pool.prestart import add_to_sys_path
from poolkeeper.pool.supervisor import pool_for
from poolkeeper.service import metrics_hooks
from poolkeeper.service.control import refused
from poolkeeper.service.logs import event
from poolkeeper.state import identity

if TYPE_CHECKING:
    from poolkeeper.daemon.mainloop import Daemon

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
    return identity.reload_refusal(old, new) or metrics_hooks.reload_refusal(old, new)


class Reloader:
    """The daemon's side of a reload, run inside its main loop: it reads the file again,
    replaces the daemon's config, retires the jobs that changed (their runs go to
    `daemon.retiring`, through `daemon.stop_runs`) and starts their new definitions."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # New definitions waiting for their old runs to end (job name -> definition).
        self.held: dict[str, Job] = {}
        # The config of a pool that replaces the current one once it is drained.
        self.next_pool: Config | None = None
        # Why the last reload was rejected (for STATUS=), or None.
        self.rejected: str | None = None

    def reload(self, why: str) -> dict[str, Any]:
        """Returns the outcome for `poolkeeper reload --wait`: ok, message, problems."""
        d = self.daemon
        if d.phase != "running":
            d.log.warning("%s while %s: not reloading", why, d.phase)
            return refused(f"the daemon is {d.phase}: not reloading", exitcodes.UNAVAILABLE)
        d.notifier.reloading()
        try:
            d.log.info("%s: reloading %s", why, d.config.path)
            new, problems = self._read_config_again()
            if new is None:
                self._reject(problems)
                d.metrics.reloaded(applied=False)
                reply = refused(self._rejected_line(problems), exitcodes.CONFIG)
                return {**reply, "problems": problems}
            changes = plan(d.config, new)
            self.rejected = None
            self._apply(new, changes)
            d.metrics.reloaded(applied=True)
            message = "reload applied: " + (
                changes.summary() if changes.changes_anything else "nothing changed"
            )
            d.log.info("%s", message, extra=event("reload_applied"))
            return {"ok": True, "message": message, "problems": []}
        finally:
            # Validation imported the job modules (seconds, for some): that was this turn's
            # work, not a stuck loop, so it must not cost a watchdog ping.
            d.last_turn = time.monotonic()
            d.notifier.status(d.status_text(d.last_turn), force=True)
            d.notifier.ready()

    def _read_config_again(self) -> tuple[Config | None, list[str]]:
        """The file validated exactly as `poolkeeper check` does it (never from the cache),
        or why it cannot be applied."""
        from poolkeeper.config.loader import ConfigError, load_config

        config = self.daemon.config
        try:
            new = load_config(config.path)
        except ConfigError as exc:
            return None, [str(issue) for issue in exc.issues] or [str(exc)]
        except Exception as exc:  # a bug in validation must not take the running jobs down
            self.daemon.log.exception("reload: validating %s failed", config.path)
            return None, [f"internal error while validating: {type(exc).__name__}: {exc}"]
        override = self.daemon.host_id_override
        if override is not None and new.fleet is not None:  # `run --host-id` still holds
            new = new.with_host_id(override)
        why_not = refusal(config, new)
        return (None, [why_not]) if why_not else (new, [])

    def _reject(self, problems: list[str]) -> None:
        log = self.daemon.log
        for problem in problems:
            log.error("%s", problem)
        self.rejected = first_of(problems)
        log.error("%s", self._rejected_line(problems), extra=event("reload_rejected"))

    @staticmethod
    def _rejected_line(problems: list[str]) -> str:
        return (
            f"reload rejected: {count(len(problems), 'problem')}; still running the previous config"
        )

    def _apply(self, new: Config, changes: Plan) -> None:
        d, now = self.daemon, time.monotonic()
        d.config = new
        if changes.pool_changed:
            d.live_pool.drain()  # every run sees ctx.stopping; queued ones come back NotStarted
            for name in list(d.jobs):
                self._retire_job(d.remove_job(name), now)
            self.held = dict(new.jobs)  # all of them, in the new pool
            self.next_pool = new
            return
        for name in (*changes.removed, *changes.changed):
            self.held.pop(name, None)
            if name in d.jobs:
                self._retire_job(d.remove_job(name), now)
        for name in (*changes.added, *changes.changed):
            self.held[name] = new.jobs[name]
        if self.next_pool is not None:
            self.next_pool = new
        self.start_held()

    def _retire_job(self, job: JobRuntime, now: float) -> None:
        """Its waiting runs are dropped; its runs in flight see ctx.stopping and get the
        drain budget to end, then they are killed."""
        job.drop_pending()
        self.daemon.stop_runs(job, list(job.running.values()), now)

    def start_held(self) -> None:
        """Start each new definition whose job has no old run left (in the new pool, once a
        pool replacement has happened)."""
        d = self.daemon
        if self.next_pool is not None or d.phase != "running" or not self.held:
            return
        busy = d.retiring.jobs_with_runs()
        now_wall, now_mono = time.time(), time.monotonic()
        startable = [name for name in self.held if name not in busy]
        for name in startable:
            d.add_job(d.runtime_for(self.held.pop(name)), now_wall, now_mono)
        if startable:
            d.freeze_what_is_built()

    def forget(self) -> None:
        """The daemon drains: definitions a reload left waiting never start now, and no new
        pool replaces this one."""
        self.held.clear()
        self.next_pool = None

    def replace_pool(self) -> None:
        """A reload changed the pool and the old one is drained: close it, start the new one,
        then the jobs."""
        d = self.daemon
        old, new = d.live_pool, self.next_pool
        assert new is not None  # the daemon calls this only when next_pool is set
        d.handle_events(old.close())
        d.handle_events(old.poll())
        add_to_sys_path(new.pythonpath)
        d.pool = pool_for(new, d.log_target, logging.getLogger().level)
        d.pool.start()
        self.next_pool = None
        d.log.info(
            "reload: pool replaced: %s (%s)",
            count(new.pool.workers, "worker"),
            new.pool.start_method,
        )
        self.start_held()
