"""The kinds of job: the four schedule keys of the spec, exactly one per job.

`JobKind` is a `StrEnum`: each member *is* the key written in the YAML (and shown by `status`),
so it can index the spec's mappings and be compared with a plain string. The order is the one
of every message that lists them ("set one of loop, every, cron, at").

May import: the standard library only (config/, daemon/ and report.py use it).
"""

from __future__ import annotations

import enum


class JobKind(enum.StrEnum):
    LOOP = "loop"  # `loop: {replicas: N}`: long-running, restarted by `restart:`
    EVERY = "every"  # `every: 5m`: on an interval
    CRON = "cron"  # `cron: "0 3 * * *"`
    AT = "at"  # `at: startup` or a date and time: once
