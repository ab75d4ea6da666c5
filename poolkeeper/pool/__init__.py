"""Both ends of a worker's pipe: the supervisor the main loop drives (supervisor.py), the worker
process (worker.py), the job's `ctx` (context.py), multiprocessing's helper processes (the
forkserver and resource tracker: helper_processes.py, prestart.py), and the killing of what a
job left behind (reaper.py).

Code here may run in a child process, so it imports little: the standard library,
`poolkeeper.signals`, `poolkeeper.outcomes`, `poolkeeper.service.logs`, `poolkeeper.service.notify` (for
MAIN_ONLY_ENV: which systemd variables are the main process's only). Never `daemon` or
`config` (a worker must not pay for pydantic, nor see the main loop's state).
"""
