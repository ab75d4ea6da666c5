"""Job functions for the daemon's integration tests (imported by workers via pythonpath)."""

from __future__ import annotations

import logging
import os
import subprocess
import time


def loop_units(ctx, out_dir):
    """A well-behaved loop: one unit of work per turn, returns when the drain starts."""
    units = 0
    while not ctx.stopping.is_set():
        units += 1
        with open(os.path.join(out_dir, f"{ctx.run_id}.units"), "a") as f:
            f.write(f"{time.time()}\n")
        ctx.heartbeat()
        ctx.stopping.wait(0.05)
    with open(os.path.join(out_dir, f"{ctx.run_id}.returned"), "w") as f:
        f.write(str(units))
    return units


def slow(ctx, seconds, out_dir):
    """An in-flight run that ignores the stop event but ends within the drain budget."""
    with open(os.path.join(out_dir, f"slow-{ctx.run_id}.started"), "w") as f:
        f.write(str(time.time()))
    time.sleep(seconds)
    return "slept"


def stubborn(ctx, out_dir):
    """Ignores the stop event for ever, with a grandchild: must be killed at the deadline."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(os.path.join(out_dir, "stubborn.pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    while True:
        time.sleep(1)


def fail(ctx):
    logging.getLogger("daemon_jobs").info("about to fail")
    raise RuntimeError("boom")


def ok():
    return 42


def hold(seconds):
    """A run of a known length, to see how runs of one job overlap (or don't)."""
    time.sleep(seconds)


# -- hostile jobs (issue 8: what job code does to the worker it runs in) ----------------------

# The descriptor listdir() reads /proc/self/fd through is closed when it returns: it is
# the one entry that no longer exists.
FD_LISTER = (
    "import os, sys\n"
    "fds = [n for n in os.listdir('/proc/self/fd') if os.path.exists('/proc/self/fd/' + n)]\n"
    "open(sys.argv[1], 'w').write(' '.join(sorted(fds, key=int)))\n"
)


def list_inherited_fds(out_dir):
    """Start processes the careless ways (os.system, close_fds=False): they inherit every
    descriptor of the worker that is not close-on-exec. Each writes the fds it has."""
    import sys

    system_out = os.path.join(out_dir, "fds.system")
    os.system(f"{sys.executable} -c {_quoted(FD_LISTER)} {system_out}")
    popen_out = os.path.join(out_dir, "fds.popen")
    subprocess.run([sys.executable, "-c", FD_LISTER, popen_out], close_fds=False, check=True)


def _quoted(text):
    import shlex

    return shlex.quote(text)


def detach_sleeper(out_dir):
    """`setsid sleep 301 &` through a shell that does not close descriptors (os.system)."""
    pid_file = os.path.join(out_dir, "sleeper.pid")
    os.system(f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 301' < /dev/null &")


def leave_a_thread(out_dir=None):
    """Return, leaving a non-daemon thread that sleeps for a day (as many libraries do)."""
    import threading

    threading.Thread(target=time.sleep, args=(1e5,), name="left-behind").start()
    if out_dir is not None:
        open(os.path.join(out_dir, f"thread-{os.getpid()}"), "w").close()
    return os.getpid()


class _FlushBlocks:
    """A stdout whose flush never returns: a pipe whose reader stopped reading."""

    def write(self, text):
        return len(text)

    def flush(self):
        import threading

        threading.Event().wait()


def wedge_stdout(out_dir):
    """Leave sys.stdout so that flushing it blocks: the worker's exit flushes it."""
    import sys

    sys.stdout = _FlushBlocks()
    open(os.path.join(out_dir, "wedged"), "w").close()


def fork_a_helper(out_dir):
    """Double-fork a helper that never execs (a job's background thread of work, detached):
    it keeps every descriptor the worker had at the time of the fork."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # detach, fork the helper, exit
        os.setsid()
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(60)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    helper = int(os.read(r, 32))
    os.close(r)
    os.waitpid(middle, 0)
    with open(os.path.join(out_dir, "helper.pids"), "a") as f:
        f.write(f"{helper}\n")
    return helper


def end_on_go(out_dir):
    """Wait for the test's `go` file, then end; the marker says the result is on its way."""
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(out_dir, "go")) and time.monotonic() < deadline:
        time.sleep(0.01)
    open(os.path.join(out_dir, f"ended-{os.getpid()}"), "w").close()
    return os.getpid()


# -- Hostile jobs that detach processes (tests/test_detached_descendants.py) -----------------


def _double_fork(argv):
    """Start argv the way a classic daemon detaches: fork, setsid, fork again, the middle
    process exits at once. Returns the grandchild's pid (orphaned: re-parented)."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.execvp(argv[0], argv)
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        grandchild = int(f.read())
    os.waitpid(middle, 0)
    return grandchild


def detach_children(out_dir, tag):
    """Three `sleep`s in sessions of their own, started three ways; their pids go to
    out_dir/<tag>.pids (written atomically)."""
    shell = subprocess.run(
        ["sh", "-c", "setsid sleep 301 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    popen = subprocess.Popen(["sleep", "302"], start_new_session=True)
    pids = [int(shell.stdout), popen.pid, _double_fork(["sleep", "303"])]
    path = os.path.join(out_dir, f"{tag}.pids")
    with open(path + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.rename(path + ".tmp", path)
    return popen


def detach_then_hang(ctx, out_dir):
    """Detached children, then a hang past any timeout."""
    kept = detach_children(out_dir, "hang")
    while kept:
        time.sleep(1)


def detach_then_loop(ctx, out_dir):
    """A well-behaved loop whose detached children outlive it unless someone kills them."""
    detach_children(out_dir, "loop")
    while not ctx.stopping.is_set():
        ctx.heartbeat()
        ctx.stopping.wait(0.05)
    return "stopped"


def detach_then_die(ctx, out_dir):
    """Detached children, then the worker dies at once: nobody below the main process is
    left to kill them."""
    detach_children(out_dir, "die")
    os.kill(os.getpid(), 9)


def say_hello(ctx):
    """A job whose first act is a line on stdout, naming its run as the daemon's log does."""
    print(f"hello from run {ctx.run_id[:8]}", flush=True)


def loop_says_bye(ctx):
    """A loop that waits for the drain, then says so on stdout."""
    print("the loop runs", flush=True)
    ctx.stopping.wait()
    print("the loop saw the drain", flush=True)
