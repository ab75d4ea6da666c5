"""Run history and the last fire time per job, behind the `StateStore` protocol (store.py,
whose docstring is the contract); SQLite is its first backend (sqlite.py). The daemon's
identity, decided from its config (identity.py): where its state is, the single-instance lock
(one daemon per state), where its control socket listens, and `open_store`, the factory every
other package gets a store from. Readers (`status`, `history`) open the same store read-only.

May import: the standard library, `poolkeeper.outcomes`. Nothing of poolkeeper's other packages.
"""
