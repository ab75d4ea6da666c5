"""Jobs that report the signal state of the processes they start (tests/test_signals.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time

# Signals whose bits /proc/PID/status must not show ignored or caught in what a job starts.
WATCHED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM, signal.SIGTSTP,
)  # fmt: skip


def signal_masks(pid: int) -> dict[str, list[int]]:
    """SigBlk, SigIgn, SigCgt of /proc/PID/status: which of WATCHED each holds (the whole
    list would not fit in a run's result repr)."""
    masks = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigBlk", "SigIgn", "SigCgt"):
                bits = int(value.strip(), 16)
                masks[key] = [int(sig) for sig in WATCHED if bits & (1 << (sig - 1))]
    return masks


def _stopped_by(proc_wait, send, sig: int) -> int | str:
    send(sig)
    try:
        return proc_wait(5)
    except subprocess.TimeoutExpired:
        return f"survived {signal.Signals(sig).name}"


def exec_child() -> dict:
    """A program the job execs: its masks, then whether SIGTERM (terminate()) stops it."""
    child = subprocess.Popen(["sleep", "30"])  # returns once the exec has succeeded
    try:
        masks = signal_masks(child.pid)
        code = _stopped_by(child.wait, child.send_signal, signal.SIGTERM)
    finally:
        child.kill()
        child.wait()
    return {**masks, "terminate": code}


def _tell_then_sleep(fd: int) -> None:
    os.write(fd, b"up")
    time.sleep(30)


def fork_child() -> dict:
    """A child the job forks without exec (multiprocessing's fork context): its masks once it
    runs the target, then whether terminate() stops it."""
    r, w = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=_tell_then_sleep, args=(w,))
    child.start()
    os.close(w)
    try:
        os.read(r, 2)  # the after-fork hooks have run
        masks = signal_masks(child.pid)
        child.terminate()
        child.join(5)
        code = child.exitcode if child.exitcode is not None else "survived SIGTERM"
    finally:
        os.close(r)
        child.kill()
        child.join()
    return {**masks, "terminate": code}


def worker_survives() -> dict:
    """The worker's own dispositions: caught (not ignored, not default) for the signals a
    worker must survive."""
    return signal_masks(os.getpid())


def c_read_through_a_signal() -> tuple[int, int]:
    """A C-level blocking read() (as a job's C library does) while SIGUSR2 reaches this
    thread, as `systemctl kill -s SIGUSR2` would: (bytes read, errno)."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    me, my_tid = threading.get_ident(), threading.get_native_id()

    def blocked_in_read() -> bool:
        """Our thread sits in a system call on `r` (/proc/.../syscall: number, then args)."""
        with open(f"/proc/self/task/{my_tid}/syscall") as f:
            fields = f.read().split()
        return len(fields) > 1 and fields[1] == hex(r)

    def signal_then_write() -> None:
        deadline = time.monotonic() + 10
        while not blocked_in_read() and time.monotonic() < deadline:
            time.sleep(0.005)
        signal.pthread_kill(me, signal.SIGUSR2)
        # Delivered once no longer pending for our thread: read() has then failed (EINTR)
        # or gone on waiting, and the byte below ends it.
        while usr2_pending() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.write(w, b"x")

    def usr2_pending() -> bool:
        with open(f"/proc/self/task/{my_tid}/status") as f:
            line = next(x for x in f if x.startswith("SigPnd:"))
        return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR2 - 1)))

    helper = threading.Thread(target=signal_then_write)
    helper.start()
    buf = ctypes.create_string_buffer(1)
    n = libc.read(r, buf, 1)
    err = ctypes.get_errno()
    helper.join()
    os.close(r)
    os.close(w)
    return n, err
