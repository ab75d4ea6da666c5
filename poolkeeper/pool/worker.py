"""The worker process: set itself up, then run the tasks the main process sends, one at a time.

Everything here runs in the worker. The messages are described in `poolkeeper/pool/protocol.py`,
the main-process side at the top of `poolkeeper/pool/supervisor.py`. A worker never decides
anything about its own life: it runs what it is sent, reports what happened as plain strings
(never job objects: they might not pickle), and exits when told to, when its pipe reaches EOF,
or (killing its whole process group) when the main process dies. It is a child subreaper, so
whatever a job detaches stays below it, and it kills all of that when it exits
(poolkeeper/pool/reaper.py).
"""

from __future__ import annotations

import collections
import faulthandler
import importlib
import itertools
import logging
import os
import pickle
import reprlib
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import reduction
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, cast

from poolkeeper import signals
from poolkeeper.pool import reaper
from poolkeeper.pool.context import CtxPassing, RunContext, Stopping, ctx_passing, with_ctx
from poolkeeper.pool.prestart import add_to_sys_path
from poolkeeper.pool.protocol import PICKLE_PROTOCOL, frame, take_messages
from poolkeeper.service.notify import MAIN_ONLY_ENV

if TYPE_CHECKING:
    from poolkeeper.pool.helper_processes import ForkServerState

# Exit code of a worker whose initialisation (worker_setup, preload) failed.
INIT_FAILED_EXIT = 3
# ctx.heartbeat() forwards at most one message per this many seconds: a tight loop calling it
# on every item must not flood the main process.
HEARTBEAT_MIN_INTERVAL = 0.25
RESULT_REPR_MAX = 200
ERROR_MAX = 500
TRACEBACK_MAX = 32 * 1024
TRACEBACK_MESSAGE_MAX = 8 * 1024  # of each exception's message in a traceback
# How long a worker whose pipe broke waits for the main process's pidfd to confirm its death.
MAIN_EXIT_WAIT_MS = 5000


class WorkerConfig(NamedTuple):
    """Everything a worker needs to set itself up (pickled for spawn/forkserver)."""

    main_pid: int
    pythonpath: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    worker_setup: Callable[[], None] | None = None
    max_memory: int = 0  # bytes of RSS after a run beyond which the worker takes no more tasks
    # Only for fork: descriptors of the main process (other workers' pipes, the pool's epoll)
    # that the child inherited and must not keep open.
    close_fds: tuple[int, ...] = ()


class PassFd:
    """A file descriptor handed to the worker: inherited as is under fork, duplicated into
    the child by multiprocessing's own fd passing under spawn and forkserver."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_passfd, (reduction.DupFd(self.fd),))


def _rebuild_passfd(dupfd: Any) -> PassFd:
    return PassFd(dupfd.detach())


class _TargetError(Exception):
    """A target that cannot be imported or resolved (the summary is already one line)."""

    def __init__(self, summary: str, tb: str) -> None:
        super().__init__(summary)
        self.summary = summary
        self.tb = tb


def one_line(exc: BaseException) -> str:
    """'ZeroDivisionError: division by zero': type name and the first line of the message."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    # Cut before stripping and splitting: a message of any size costs no more than this.
    head = text[: ERROR_MAX * 4].strip()
    text = head.splitlines()[0] if head else ""
    line = f"{name}: {text}" if text else name
    return line if len(line) <= ERROR_MAX else line[: ERROR_MAX - 3] + "..."


def format_tb(exc: BaseException) -> str:
    try:
        te = traceback.TracebackException.from_exception(exc, compact=True)
        _cut_messages(te)
        text = "".join(te.format())
    except Exception:
        text = f"{one_line(exc)}\n(traceback could not be formatted)\n"
    if len(text) > TRACEBACK_MAX:  # keep the end: that is where the error is
        text = "...(truncated)\n" + text[-TRACEBACK_MAX:]
    return text


class _BoundedRepr(reprlib.Repr):
    """repr() that looks at no more of a value than it can show: the first elements of a
    container, the ends of a string. A plain repr() of a big result (a list of a million
    ints, a 200 MB string) is built in full before it is cut to RESULT_REPR_MAX, several
    times the result's own memory: enough to get a successful run killed under a memory cap.
    Objects with their own __repr__ are still asked for all of it (that is job code)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        many = RESULT_REPR_MAX // 3  # "1, " is the shortest element: more can never show
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = many
        self.maxset = self.maxfrozenset = self.maxdeque = many
        self.maxstring = self.maxlong = self.maxother = RESULT_REPR_MAX

    # reprlib sorts dicts and sets first (a copy of every key); repr() keeps their order.
    if TYPE_CHECKING:
        # reprlib.Repr's helper behind repr_list, repr_tuple...; typeshed omits it
        def _repr_iterable(
            self, x: Any, level: int, left: str, right: str, maxiter: int, trail: str = ""
        ) -> str: ...

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x or level <= 0:
            return "{}" if not x else "{" + self.fillvalue + "}"
        pieces = [
            f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
            for k, v in itertools.islice(x.items(), self.maxdict)
        ]
        if len(x) > self.maxdict:
            pieces.append(self.fillvalue)
        return "{" + ", ".join(pieces) + "}"

    def repr_set(self, x: set[Any], level: int) -> str:
        return self._repr_iterable(x, level, "{", "}", self.maxset) if x else "set()"

    def repr_frozenset(self, x: frozenset[Any], level: int) -> str:
        if not x:
            return "frozenset()"
        return self._repr_iterable(x, level, "frozenset({", "})", self.maxfrozenset)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self._cut(x, repr(x[: self.maxstring]))

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return self._cut(x, repr(x[: self.maxstring]))

    def _cut(self, x: Any, text: str) -> str:
        return text if len(x) <= self.maxstring else text + "..."


_REPR = _BoundedRepr()


def _cut_messages(te: traceback.TracebackException) -> None:
    """Cut each exception message of the chain before formatting, leaving room for the frames
    within TRACEBACK_MAX. A huge message used to be formatted in full (copied twice), then
    the end of the text was kept: all message and none of the frames."""
    todo, seen = [te], set()
    while todo:
        one = todo.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        text = getattr(one, "_str", None)  # the message, as TracebackException keeps it
        if isinstance(text, str) and len(text) > TRACEBACK_MESSAGE_MAX:
            # typeshed omits this private attribute (the message str(exc) gave)
            one._str = text[:TRACEBACK_MESSAGE_MAX] + "...(truncated)"  # type: ignore[attr-defined]
        todo += [t for t in (one.__cause__, one.__context__) if t is not None]
        todo += getattr(one, "exceptions", None) or []


# Results whose builtin repr() is small and cannot run job code: no reprlib dispatch per run.
_PLAIN = (type(None), bool, float)
_SHORT_INT = 10**18


def _safe_repr(value: Any) -> str:
    kind = type(value)
    if kind in _PLAIN or (kind is int and -_SHORT_INT < value < _SHORT_INT):
        return repr(value)
    if kind is str and len(value) <= RESULT_REPR_MAX:
        text = repr(value)
        if len(text) <= RESULT_REPR_MAX:  # what reprlib returns too; longer: it keeps both ends
            return text
    try:
        text = _REPR.repr(value)
    except BaseException as exc:  # a job's __repr__ is job code too
        return f"<repr failed: {one_line(exc)}>"
    return text if len(text) <= RESULT_REPR_MAX else text[: RESULT_REPR_MAX - 3] + "..."


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _die_with_main(pidfd: int) -> None:
    """Daemon thread: block until the main process exits, then kill every process below us
    (detached ones are not in our group) and our process group (us and the job's children). The pidfd was opened by the main process on itself, so there is
    no window in which the pid could have been recycled. PR_SET_PDEATHSIG is no substitute:
    it fires when the parent *thread* exits, and a forkserver worker's parent is the
    forkserver, not the main process."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():
        pass
    reaper.kill_tree(os.getpid())  # what the job detached (setsid...) is below us, not in our group
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _main_gone(pidfd: int) -> None:
    """Our pipe broke (EOF, ECONNRESET): the main process is exiting. Its descriptors close
    before its pidfd tells, so wait for the pidfd, then do what _die_with_main does; exiting
    at once would leave the job's leftovers in our group running, with nobody to kill them."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if poller.poll(MAIN_EXIT_WAIT_MS):
        os.killpg(os.getpgid(0), signal.SIGKILL)


class _RunFields:
    """The journal fields of the run in progress, added to every log record in the worker."""

    pid = 0
    current: tuple[str, str, int] | None = None


def _install_record_factory() -> None:
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record.WORKER_PID = _RunFields.pid
        current = _RunFields.current
        if current is not None:
            record.JOB, record.RUN_ID, record.ATTEMPT = current
        return record

    logging.setLogRecordFactory(factory)


def _set_up(pidfd: PassFd, cfg: WorkerConfig, own_fds: tuple[int, ...]) -> None:
    # Own process group first: the parent watcher and every timeout kill the whole group.
    os.setpgid(0, 0)
    reaper.become_subreaper()  # what a job detaches stays below us (poolkeeper/pool/reaper.py)
    _survive_signals()
    for key in MAIN_ONLY_ENV:
        os.environ.pop(key, None)
    for fd in own_fds:  # not for the job's subprocesses (passed fds arrive inheritable)
        os.set_inheritable(fd, False)
    for fd in cfg.close_fds:
        if fd not in own_fds and fd != pidfd.fd:
            try:
                os.close(fd)
            except OSError:
                pass
    # A forkserver child holds the write end of the forkserver's "alive" pipe; if we kept it,
    # the forkserver would outlive a SIGKILLed daemon for as long as any worker lives.
    from multiprocessing import forkserver

    # (Under fork we would inherit the daemon's own write end, with the same effect.) A job
    # that wants a forkserver of its own gets a fresh one.
    # cast: typeshed omits ForkServer's private attributes (see helper_processes.ForkServerState)
    server = cast("ForkServerState", forkserver._forkserver)
    if server._forkserver_alive_fd is not None:
        try:
            os.close(server._forkserver_alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
        server._forkserver_pid = None
        server._forkserver_address = None
    _keep_fds_from_exec()
    threading.Thread(
        target=_die_with_main, args=(pidfd.fd,), name="poolkeeper-die-with-main", daemon=True
    ).start()
    _own_journal_stream()
    # SIGABRT (systemd's watchdog), SIGSEGV...: a Python traceback on stderr; SIGUSR1: the
    # main process asks for the stack of a hung run, and we go on running.
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    add_to_sys_path(cfg.pythonpath)
    if cfg.worker_setup is not None:
        cfg.worker_setup()
    for name in cfg.preload:
        importlib.import_module(name)
    _RunFields.pid = os.getpid()
    _install_record_factory()


def _survive_signals() -> None:
    """The main process alone decides when a worker stops: systemd's control-group SIGTERM,
    `systemctl kill -s SIG` and a terminal's Ctrl-C reach every process, so a worker survives
    every signal the main process catches (poolkeeper.signals has the table).

    With a handler that does nothing, never SIG_IGN: SIG_IGN is inherited across execve, so
    every program a job starts would ignore SIGTERM; a caught signal is reset to its default
    there. A child a job forks without exec (multiprocessing inside a job) gets the defaults
    from _defaults_after_fork. The mask is emptied too (the forkserver may have been spawned
    with these signals blocked, poolkeeper.pool.helper_processes), after the handlers are in place, so a
    signal pending meanwhile is survived as well."""
    # Under fork we inherit the daemon's handlers and wakeup fd: a signal in a worker must not
    # write into the daemon's self-pipe or run its handlers.
    signal.set_wakeup_fd(-1)
    for sig in signals.caught():
        signal.signal(sig, _survive)
        # Restart system calls the signal interrupts (SA_RESTART): a job's C library blocked
        # in read() must not see EINTR because `systemctl kill` reached the unit.
        signal.siginterrupt(sig, False)
    for sig in signals.HARMLESS:
        signal.signal(sig, signal.SIG_DFL)
    os.register_at_fork(after_in_child=_defaults_after_fork)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _survive(signum: int, frame: Any) -> None:
    """A worker's handler for the signals it survives: nothing (see _survive_signals)."""


def _defaults_after_fork() -> None:
    """In a child a job forks without exec: the dispositions a fresh Python program has
    (SIGINT raises KeyboardInterrupt, the rest their default), as a fresh interpreter would
    have them; a handler the job installed itself stays."""
    faulthandler.unregister(signal.SIGUSR1)  # back to the handler it replaced: _survive
    for sig in signals.caught():
        if signal.getsignal(sig) is _survive:
            fresh = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, fresh)


def _keep_fds_from_exec() -> None:
    """Make every descriptor this worker holds close-on-exec. They are all plumbing: its pipe
    and stop pipe, the main process's pidfd, the resource tracker's pipe, multiprocessing's
    sentinels. spawn and forkserver hand them over inheritable (fd passing, SCM_RIGHTS), and
    a process a job starts without closing fds (os.system, posix_spawn, close_fds=False)
    would keep them: a detached `setsid sleep 301 &` then held the resource tracker's pipe
    open and the daemon's stop waited for it. Descriptors a job opens later are its own."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                pass


def _own_journal_stream() -> None:
    """Under journald, give this worker a journal stream of its own on stdout and stderr.

    Inherited, one stream would serve the daemon and every worker, and journald cuts a stream
    into lines: a line one process has begun and another's line written meanwhile become one
    entry. faulthandler writes a line in pieces, so when the watchdog's SIGABRT reaches the
    whole unit every process's stack dump was mixed into the others'; a job that prints a
    line in two writes is cut the same way. Needs python-systemd (sd_journal_stream_fd);
    without it the worker keeps the inherited stream."""
    from poolkeeper.service.logs import stderr_is_journal

    if not stderr_is_journal():
        return
    try:
        from systemd import journal

        stream = journal.stream("poolkeeper", level_prefix=True)
    except (ImportError, OSError):
        return
    for std in (sys.stdout, sys.stderr):
        try:
            std.flush()
        except (OSError, ValueError, AttributeError):
            pass
    with stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # for the jobs' subprocesses


class _WorkerLoop:
    """The worker's side of its pipe: receive tasks, run them in order, report each."""

    def __init__(self, conn: Any, stopping: Stopping, cfg: WorkerConfig) -> None:
        self.conn = conn
        self.stopping = stopping
        self.cfg = cfg
        self.pid = os.getpid()
        self.send_lock = threading.Lock()
        self.targets: dict[str, tuple[Callable[..., Any], CtxPassing]] = {}
        self.inbox: collections.deque[Any] = collections.deque()
        self.cancelled: set[int] = set()
        self.last_heartbeat = 0.0
        self.over_memory = False
        self.pipe_lost = False  # EOF: the main process is gone (it sends None to stop us)
        # Our own framing reader (multiprocessing's recv_bytes costs two reads and a BytesIO
        # per message): one read returns every message already in the pipe.
        self.fd = conn.fileno()
        self.buf = bytearray()
        self.ready_poller = select.poll()
        self.ready_poller.register(self.fd, select.POLLIN)

    def send(self, msg: tuple[Any, ...]) -> None:
        # Framed as Connection.send_bytes frames it, written without its checks and copies
        # (once per run). Errors are the same: BrokenPipeError, ConnectionResetError.
        data = frame(pickle.dumps(msg, PICKLE_PROTOCOL))
        fd = self.fd
        with self.send_lock:  # ctx.heartbeat() may be called from a job's own threads
            while data:
                data = data[os.write(fd, data) :]

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_MIN_INTERVAL:
            self.last_heartbeat = now
            self.send(("H",))

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            msg = self.next_message()
            if msg is None:
                return
            if msg[0] == "C":
                self.cancelled.add(msg[1])
                continue
            seq, prefetched = msg[1], msg[10]
            if prefetched:
                # A task queued behind another one: the main process may have cancelled it
                # (pool closing) after sending it. A cancel always follows its task, so read
                # whatever has already arrived before deciding.
                self.read_ready()
                if seq in self.cancelled:
                    self.cancelled.discard(seq)
                    self.send(("N", seq, "cancelled before start"))
                    continue
            if self.over_memory:  # the main process retires us; queued tasks go back
                self.send(("N", seq, "worker recycled (memory) before starting it"))
                continue
            result = self.run(msg)
            self.over_memory = bool(self.cfg.max_memory) and result[-1] > self.cfg.max_memory
            self.send(result)
            reaper.after_run(msg[5])

    def next_message(self) -> Any:
        while not self.inbox:
            if not self.fill():
                return None
        return self.inbox.popleft()

    def fill(self) -> bool:
        """Read what the pipe holds (blocking if it is empty) into the inbox; False at EOF."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.pipe_lost = True
            return False
        self.buf += data
        for msg in take_messages(self.buf):
            if msg is not None and msg[0] == "C":
                self.cancelled.add(msg[1])
            else:
                self.inbox.append(msg)
        return True

    def read_ready(self) -> None:
        while self.ready_poller.poll(0):
            if not self.fill():
                self.inbox.append(None)
                return

    # -- one run ----------------------------------------------------------------------------

    def resolve(self, target: str) -> tuple[Callable[..., Any], CtxPassing]:
        hit = self.targets.get(target)
        if hit is not None:
            return hit
        module_name, _, attr_path = target.partition(":")
        if not module_name or not attr_path:
            raise _TargetError(f"invalid target {target!r}: expected 'module:function'", "")
        try:
            obj: Any = importlib.import_module(module_name)
        except BaseException as exc:
            raise _TargetError(
                f"cannot import {module_name!r}: {one_line(exc)}", format_tb(exc)
            ) from None
        try:
            for part in attr_path.split("."):
                obj = getattr(obj, part)
        except AttributeError as exc:
            raise _TargetError(
                f"cannot resolve {target!r}: {one_line(exc)}", format_tb(exc)
            ) from None
        if not callable(obj):
            raise _TargetError(f"target {target!r} is not callable", "")
        import inspect  # here: kept off the start of the main process and of every worker

        passing: CtxPassing
        try:
            passing = ctx_passing(inspect.signature(obj))  # the rule `poolkeeper check` applies
        except (TypeError, ValueError):  # builtins without a signature
            passing = ""
        self.targets[target] = (obj, passing)
        return obj, passing

    def run(self, msg: tuple[Any, ...]) -> tuple[Any, ...]:
        _, seq, target, args, kwargs, job, run_id, attempt, scheduled_at, env, _pf = msg[:11]
        replica, fence = msg[11:]  # ctx.replica, ctx.fence (fleet mode)
        started = time.time()
        if fence is not None:
            env = _fleet_env(env, replica, fence)
        saved_env = _apply_env(env) if env else None
        _RunFields.current = (job, run_id, attempt)
        result_repr = error = tb = None
        try:
            fn, passing = self.resolve(target)
            if passing:
                ctx = RunContext(
                    job=job,
                    run_id=run_id,
                    attempt=attempt,
                    scheduled_at=scheduled_at,
                    log=logging.getLogger(f"poolkeeper.job.{job}"),
                    stopping=self.stopping,
                    heartbeat=self.heartbeat,
                    replica=replica,
                    fence=fence,
                )
                args, kwargs = with_ctx(passing, args, kwargs, ctx)
            result = fn(*args, **kwargs)
            result_repr = _safe_repr(result)
            del result
        except _TargetError as exc:
            error, tb = exc.summary, exc.tb
        except BaseException as exc:  # SystemExit, KeyboardInterrupt included: the run failed
            error, tb = one_line(exc), format_tb(exc)
        finally:
            _RunFields.current = None
            if saved_env is not None:
                _restore_env(saved_env)
        ended = time.time()
        rss = _rss_bytes() if self.cfg.max_memory else 0
        return ("D", seq, error is None, started, ended, result_repr, error, tb, rss)


def _fleet_env(env: dict[str, str], replica: int | None, fence: int) -> dict[str, str]:
    """Task.env plus the fleet run's fencing token (and replica index), for the programs the
    job starts: they cannot see ctx. Ours win over a spec's env of the same name."""
    env = {**env, "POOLKEEPER_FENCE": str(fence)}
    if replica is not None:
        env["POOLKEEPER_REPLICA"] = str(replica)
    return env


def _apply_env(env: dict[str, str]) -> dict[str, str | None]:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def worker_main(conn: Any, main_pidfd: PassFd, stop_fd: PassFd, cfg: WorkerConfig) -> None:
    """Entry point of every worker process (the `target` of its multiprocessing.Process)."""
    try:
        _set_up(main_pidfd, cfg, (conn.fileno(), stop_fd.fd))
    except BaseException as exc:
        try:
            conn.send_bytes(pickle.dumps(("I", one_line(exc), format_tb(exc)), PICKLE_PROTOCOL))
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(INIT_FAILED_EXIT)
    worker = _WorkerLoop(conn, Stopping(stop_fd.fd), cfg)
    try:
        worker.send(("R", worker.pid))
        worker.serve()
    except ConnectionError:  # ECONNRESET: the main process died with a message of ours unread
        worker.pipe_lost = True
    finally:  # told to exit, or the main process is gone: what the jobs left goes too
        reaper.kill_left_behind()
    if worker.pipe_lost:  # no traceback: nobody is left to read it
        _main_gone(main_pidfd.fd)
    _exit(0)


def _exit(code: int) -> NoReturn:
    """Leave now, without the interpreter's shutdown: it would wait for every non-daemon
    thread a job left running (threading._shutdown), possibly for ever, and the main process
    waits for this exit to stop, reload or recycle. What logging and stdio hold is flushed
    first; the job's threads die with us, its subprocesses with our process group."""
    try:
        logging.shutdown()
    except Exception:  # a job's handler: the exit matters more than its last records
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
