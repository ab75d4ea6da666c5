"""Both ends of a worker's pipe: the supervisor the main loop drives (supervisor.py: WorkerPool),
one worker as it sees it (handle.py), when it replaces workers (respawns.py), the messages
between them (protocol.py), the worker process (worker.py), the job's `ctx` (context.py),
multiprocessing's helper processes (the forkserver and resource tracker: helper_processes.py,
forkserver_watch.py, prestart.py), and the killing of what a job left behind (reaper.py).

Code here may run in a child process, so it imports little: the standard library,
`poolkeeper.signals`, `poolkeeper.outcomes`, `poolkeeper.service.logs`,
`poolkeeper.service.notify` (MAIN_ONLY_ENV: which systemd variables are the main process's
only) and `poolkeeper.scheduling` (pure: the respawn backoff). Never `daemon` or `config` (a
worker must not pay for pydantic, nor see the main loop's state): tests/test_import_rules.py
checks it.
"""
