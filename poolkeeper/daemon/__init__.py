"""The main loop (mainloop.py) and what it owns in its one thread: the runtime of each job
(jobs.py), reload (reload.py), the control socket's verbs (handlers.py), the runs told to stop
by a reload or a pause (retiring.py), and the STATUS= line and state dump (status.py). The
`Daemon` holds the reloader, the handlers and the retiring runs as objects of their own, each
with a reference back to it: no mixins.

Nothing here blocks: the loop waits once a turn, on the pool's pipes and sentinels, the signal
pipe, the control socket's clients and the next deadline.

May import: every other package. Nothing imports it but `poolkeeper.cli`.
"""
