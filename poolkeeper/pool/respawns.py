"""When the supervisor (poolkeeper.pool.supervisor) may start a worker to fill its pool: at
once after a death, or after a backoff while workers keep failing to start; and which dead
workers still owe their replacement a WorkerEvent("replaced").
"""

from __future__ import annotations

from poolkeeper.scheduling.backoff import BackoffDelays

# Respawn backoff after a worker fails to initialise: 0.25 s, doubling, at most 30 s; no jitter
# (one pool, nothing to spread out).
RESPAWN_BACKOFF = BackoffDelays(initial=0.25, factor=2.0, max=30.0, jitter="none", floor=0.0)


class Respawns:
    """The pool's respawn bookkeeping, on the supervisor's clock."""

    __slots__ = ("at", "failures", "last_error", "owed")

    def __init__(self) -> None:
        self.at = 0.0  # no worker is started before this clock time
        self.failures = 0  # workers that failed to start, in a row
        self.last_error = ""
        self.owed: list[int] = []  # pids of dead workers whose replacement is owed

    def failed(self, now: float, error: str | None = None) -> None:
        """A worker failed to start (`error`, if not already noted): back off."""
        self.failures += 1
        if error is not None:
            self.last_error = error
        self.at = now + RESPAWN_BACKOFF.base(self.failures)

    def trouble(self, now: float) -> str | None:
        """What healthy() reports while workers fail to start."""
        if not self.failures:
            return None
        wait = max(0.0, self.at - now)
        return (
            f"workers fail to start ({self.failures} in a row): "
            f"{self.last_error}; next attempt in {wait:.1f}s"
        )
