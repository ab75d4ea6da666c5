"""Fleet mode: one spec on many hosts over a shared PostgreSQL (docs/fleet.md).

    keys.py     a fire's key: one per scheduled time, the same on every host
    db.py       the SQL: leases, fires, claims, slots, control (one function per statement)
    member.py   the daemon's fleet thread: talks to the database, never blocks the main loop
    jobs.py     FleetJobRuntime: a job whose runs come from claims and leased slots
    loop.py     FleetSide: the main loop's fleet duties (events, the lease's deadline)
"""
