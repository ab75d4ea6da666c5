"""Reload: read the file again, and say what would change if the daemon applied it.

The daemon (daemon.py, `_reload`) validates the new file completely before touching anything:
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

from typing import NamedTuple

from poolkeeper.settings import Config
from poolkeeper.status import count

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
