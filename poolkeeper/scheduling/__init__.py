"""Pure decisions on an injected clock and RNG: when a job fires next (triggers.py: interval,
cron, one-shot), and how long to wait after a failure (backoff.py). No sleeping, no reading of
clocks, no I/O.

May import: the standard library, croniter and zoneinfo (lazily), `poolkeeper.outcomes`. Nothing
else of poolkeeper's.
"""
