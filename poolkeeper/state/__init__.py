"""Run history and the last fire time per job, in SQLite (sqlite.py): one daemon per database,
guarded by a lock file; readers (`status`, `history`) open it read-only.

May import: the standard library, `poolkeeper.outcomes`. Nothing of poolkeeper's other packages.
"""
