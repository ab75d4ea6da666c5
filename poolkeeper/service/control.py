"""The control socket: how `poolkeeper reload --wait` asks the running daemon to reload and
learns how it ended.

Why a socket and not only SIGHUP: a signal carries no answer. Under `ExecReload=kill -HUP`,
systemd 252 ends `systemctl reload` as soon as the signal is sent, so a rejected file would be
reported as a success. With `ExecReload=poolkeeper reload --wait`, `systemctl reload` waits
for the daemon's verdict and fails, showing the errors, when the file is rejected.

    client                                  daemon (main loop)
    connect(path) ------------------------> accept; peer's uid must be 0 or the daemon's
    {"command": "reload"}\\n ---------------> read one line (bounded in size and time)
                                            RELOADING=1, validate, apply or reject, READY=1
    <------------------ {"ok": true, "message": "...", "problems": [...]}\\n, then close

A client never holds the main loop: the daemon's end is non-blocking, the loop waits on the
listening socket and on every open connection along with everything else, and each turn
reads or writes only what can be at once. What a client gets, whatever it does:

- a request is one line of at most MAX_REQUEST (4096) bytes, sent within CONNECTION_TIME
  (2 s) of connecting; one JSON object with the keys `command` and, for the commands of one
  job, `job`, string values of at most 256 characters, nesting no deeper than 4 (counted
  before parsing). Anything else is answered `bad request: <why>` (exit 64); a late one
  `no complete request within 2s` (exit 69). Text of the client's echoed in a reply is
  quoted, escaped and cut short.
- a reply is one line of at most MAX_REPLY (64 MiB); the client has CONNECTION_TIME from the
  moment it is ready to read it, then the daemon hangs up on it.
- at most MAX_CONNECTIONS (16) connections are open at once; more are told `too many
  connections` and closed at once. When the daemon runs out of descriptors it stops
  accepting for ACCEPT_PAUSE (0.5 s), and the waiting clients wait.
- handling a request (a reload, say) runs in the loop, as a SIGHUP would; a request that
  makes it fail is a bug: it is logged with its traceback and answered `internal error`
  (exit 70), and the daemon goes on.

Where (decided by poolkeeper.state.identity, with the daemon's lock): `$RUNTIME_DIRECTORY/
control.sock` under systemd (a directory only the unit's user can enter), else next to the state
database (`<state.db>.sock`). Mode 0600, and the peer's
credentials are checked on every connection, so neither the directory nor the mode alone is
trusted.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from poolkeeper.exitcodes import SOFTWARE, UNAVAILABLE, USAGE

MAX_REQUEST = 4096  # bytes: one JSON line; anything longer is refused
# bytes: one JSON line, its newline included; what `request` reads. `status` of 50,000 jobs
# is some 8 MB (1 MiB, the old bound, made `status` of 7,000 jobs fall back to the file):
# this is room for some 400,000 jobs, while still a bound on what a client holds.
MAX_REPLY = 64 << 20
MAX_DEPTH = 4  # JSON nesting of a request (one flat object): refused before parsing
MAX_TEXT = 256  # characters of a request's string values (a job name has at most 64)
REQUEST_KEYS = ("command", "job")

# What answers a request (checked by parse_request) in the daemon: ControlServer.serve's `handle`.
RequestHandler = Callable[[dict[str, str]], dict[str, Any]]
# Seconds a client has, from its connection, to send its request; then, from the moment the
# reply is ready, to read it. Past either, the daemon hangs up: a client costs the main loop
# only the moments when something can be read or written at once.
CONNECTION_TIME = 2.0
MAX_CONNECTIONS = 16  # open at once; more are accepted, told so and closed at once
ACCEPT_PAUSE = 0.5  # seconds without accept() after EMFILE & co: it would fail every turn
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes, NUL included


class ControlError(Exception):
    """The socket cannot be reached or the daemon's answer is not one."""


class NotListening(ControlError):
    """No daemon listens on the socket (no socket file, or nobody accepting): not an error
    for `status`, which then reads the file and the state DB."""


def socket_of_config(config_path: str) -> str | None:
    """The socket of the daemon running `config_path`, found without validating the file: a
    file that is being fixed (the very reason to reload) may not validate, and it is the
    daemon's job to say why. Only `state.path` is read from it. Raises OSError when the file
    cannot be read (missing, not a regular file) and LoadError when it is too large."""
    from poolkeeper.state import identity  # decides where a daemon's socket is

    runtime_socket = identity.socket_at(None)
    if runtime_socket is not None:
        return runtime_socket
    from poolkeeper.config.yamlload import LoadError, load_yaml, read_config

    # The loader every config read goes through: bounded in size, regular files only (a FIFO
    # would block here for ever), no alias bombs. OSError goes to the caller: no input.
    raw = read_config(config_path)
    try:
        data = load_yaml(raw, config_path)[0].data
    except LoadError:
        data = None  # the daemon will say what is wrong with it; assume the default
    state = data.get("state") if isinstance(data, dict) else None
    spec_path = state.get("path") if isinstance(state, dict) else None
    if not isinstance(spec_path, str):
        spec_path = "auto"
    config_dir = os.path.dirname(os.path.abspath(config_path))
    return identity.socket_at(identity.resolve_path(spec_path, config_dir))


class BadRequest(ValueError):
    """A request of the wrong shape; the message says what is wrong, in a bounded length."""


class _Connection:
    """One client: sending its request (`reply` None) until `deadline`, then reading the
    reply (what is left of it in `reply`) until a new deadline."""

    __slots__ = ("sock", "deadline", "received", "reply", "refusal")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()
        self.reply: memoryview | None = None
        self.refusal: dict[str, Any] | None = None  # the answer, whatever the request

    def fileno(self) -> int:
        return self.sock.fileno()


class ControlServer:
    """The daemon's end, served from its main loop without ever blocking it: the loop waits
    on `readers()`, `writers()` and `next_deadline()`, then calls `serve()` once a turn, which
    does only what can be done at once (accept, read, answer a complete request, write)."""

    def __init__(self, path: str, log: logging.Logger | None = None) -> None:
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise OSError(f"the path is longer than {_UNIX_PATH_MAX} bytes: {path}")
        self.path = path
        self._log = log or logging.getLogger(__name__)
        self._open: list[_Connection] = []
        self._accept_paused_until: float | None = None  # after EMFILE and the like
        self._starved = False  # accept() failing for want of descriptors: said so once
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale(path)
            # 0600 from the start: a chmod after bind() would leave a moment of the umask's mode.
            old_umask = os.umask(0o177)
            try:
                self._sock.bind(path)
            finally:
                os.umask(old_umask)
            self._sock.listen(8)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def fds(self) -> list[int]:
        """Every descriptor of the server: the listener and each open client (a worker started
        by fork closes them, poolkeeper.pool.helper_processes.main_only_fds)."""
        return [self._sock.fileno(), *(conn.fileno() for conn in self._open)]

    def readers(self) -> list[socket.socket | _Connection]:
        """What the main loop waits to become readable: the listening socket (unless
        accepting is paused) and every client still sending its request."""
        listening: list[socket.socket | _Connection]
        listening = [self._sock] if self._accept_paused_until is None else []
        return listening + [conn for conn in self._open if conn.reply is None]

    def writers(self) -> list[_Connection]:
        """What the main loop waits to become writable: clients with a reply to finish."""
        return [conn for conn in self._open if conn.reply is not None]

    def next_deadline(self) -> float | None:
        """When serve() has something to do even if no socket becomes ready (monotonic)."""
        deadlines = [conn.deadline for conn in self._open]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        return min(deadlines, default=None)

    def serve(self, handle: RequestHandler, now: float) -> None:
        """Accept who is waiting, read what has arrived, answer each complete request with
        `handle(request) -> reply` (a request checked by `parse_request`), write what fits,
        and hang up on clients that are done or out of time. `now`: time.monotonic().
        Never blocks; never raises for anything a client does."""
        self._accept(now)
        for conn in list(self._open):
            try:
                if conn.reply is None:
                    self._read(conn, handle, now)
                if conn.reply is not None and conn in self._open:
                    self._write(conn, now)
            except Exception:  # a bug of ours: it costs this client, not the daemon
                self._log.exception("control socket: internal error serving a client (a bug)")
                self._hang_up(conn)

    def close(self) -> None:
        for conn in list(self._open):
            if conn.reply is not None:
                self._write(conn, math.inf)  # what fits now; nobody waits for the rest
            self._hang_up(conn)
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self, now: float) -> None:
        if self._accept_paused_until is not None:
            if now < self._accept_paused_until:
                return
            self._accept_paused_until = None
        for _ in range(2 * MAX_CONNECTIONS):  # a bound on the turn, whatever keeps arriving
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                self._starved = False
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # e.g. ECONNABORTED: that client is gone already
                # The client stays in the backlog and the socket stays readable: waiting on
                # it would spin the loop. Stop listening for a while instead.
                self._accept_paused_until = now + ACCEPT_PAUSE
                if not self._starved:  # once until an accept() works again
                    self._starved = True
                    self._log.warning(
                        "control socket: cannot accept a connection (%s); clients wait until "
                        "the daemon has descriptors to spare",
                        exc.strerror or exc,
                    )
                return
            self._starved = False
            self._admit(sock, now)

    def _admit(self, sock: socket.socket, now: float) -> None:
        conn = _Connection(sock, now + CONNECTION_TIME)
        self._open.append(conn)
        try:
            sock.setblocking(False)
            if len(self._open) > MAX_CONNECTIONS:
                why = f"too many connections (at most {MAX_CONNECTIONS} at once); try again"
                self._queue(conn, refused(why, UNAVAILABLE), deadline=now)  # one try to say so
                return
            uid = _peer_uid(sock)
        except OSError:
            self._hang_up(conn)
            return
        if uid not in (0, os.getuid()):
            # Said once the request is in: hanging up before would fail the client's send
            # (EPIPE) instead of telling it why.
            conn.refusal = refused(f"uid {uid} may not control this daemon", UNAVAILABLE)

    def _read(self, conn: _Connection, handle: RequestHandler, now: float) -> None:
        """Whatever has arrived, up to one byte more than MAX_REQUEST; answer a complete
        request (a line, or what came before EOF)."""
        eof = False
        while b"\n" not in conn.received and len(conn.received) <= MAX_REQUEST:
            try:
                chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.received))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # reset by the client
                self._hang_up(conn)
                return
            if not chunk:
                eof = True
                break
            conn.received += chunk
        end = conn.received.find(b"\n")
        if end < 0 and len(conn.received) > MAX_REQUEST:
            reply = refused(f"bad request: longer than {MAX_REQUEST} bytes", USAGE)
            self._queue(conn, reply, deadline=now)  # it may still be sending: no more time
        elif end >= 0 or (eof and conn.received):
            line = bytes(conn.received[:end] if end >= 0 else conn.received)
            reply = conn.refusal or self._answer(line, handle)
            # A reload may have taken seconds: the client gets its time to read from now.
            self._queue(conn, reply, deadline=time.monotonic() + CONNECTION_TIME)
        elif eof:
            self._hang_up(conn)  # connected and left without a word
        elif now >= conn.deadline:
            why = f"no complete request within {CONNECTION_TIME:g}s"
            self._queue(conn, conn.refusal or refused(why, UNAVAILABLE), deadline=now)

    def _answer(self, line: bytes, handle: RequestHandler) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            return refused(f"bad request: {exc}", USAGE)
        try:
            return handle(request)
        except Exception as exc:  # a bug: checked requests are meant never to get here
            self._log.exception(
                "control socket: internal error answering %s (a bug)", repr(request)[:300]
            )
            return refused(
                f"internal error: {type(exc).__name__} (a bug: please report it with the "
                "daemon's log, which has the traceback)",
                SOFTWARE,
            )

    def _queue(self, conn: _Connection, reply: dict[str, Any], deadline: float) -> None:
        conn.reply = memoryview(_encode(reply))
        conn.deadline = deadline

    def _write(self, conn: _Connection, now: float) -> None:
        """What fits in the socket now; hang up once all is sent, or at the deadline."""
        assert conn.reply is not None
        while conn.reply:
            try:
                # MSG_NOSIGNAL: a client gone mid-reply is EPIPE, never a SIGPIPE.
                sent = conn.sock.send(conn.reply, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # EPIPE, ECONNRESET: the client left (`reload` without --wait)
                self._hang_up(conn)
                return
            conn.reply = conn.reply[sent:]
        if not conn.reply or now >= conn.deadline:
            self._hang_up(conn)

    def _hang_up(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.remove(conn)
        try:
            # Not only close(): a worker forked meanwhile holds a copy of the socket, and the
            # client would wait for an EOF that comes only when that worker exits.
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()


def parse_request(line: bytes) -> dict[str, str]:
    """A request, checked before anything uses it: one JSON object of known keys with string
    values of bounded length, `command` among them. Raises BadRequest saying what is wrong.
    The nesting depth is counted before parsing: json recurses once per level."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("not UTF-8") from None
    if _nesting(text) > MAX_DEPTH:
        raise BadRequest(f"nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also too many digits
        raise BadRequest(f"not JSON ({str(exc)[:100]})") from None
    if not isinstance(value, dict):
        raise BadRequest(f"a request is a JSON object, not {_json_type(value)}")
    for key, item in value.items():
        if key not in REQUEST_KEYS:
            raise BadRequest(f"unknown key {shown(key)} (known: {', '.join(REQUEST_KEYS)})")
        if not isinstance(item, str):
            raise BadRequest(f"'{key}' is a string, not {_json_type(item)}")
        if len(item) > MAX_TEXT:
            raise BadRequest(f"'{key}' is longer than {MAX_TEXT} characters")
    if "command" not in value:
        raise BadRequest("no 'command'")
    return value


def shown(text: str, limit: int = 60) -> str:
    """Text a client sent, fit for a message: quoted, control characters escaped (nothing
    reaches a terminal raw), at most `limit` characters of it."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _nesting(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings not
    counted); for text that is not JSON, some number json.loads will reject anyway."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number"}
    return kinds.get(type(value), "a number")


def _encode(reply: dict[str, Any]) -> bytes:
    """One line of JSON (ASCII: ensure_ascii), within what `request` accepts."""
    line = json.dumps(reply).encode() + b"\n"
    if len(line) > MAX_REPLY:
        why = f"the reply is {len(line):,} bytes, more than the {MAX_REPLY:,} a client reads"
        line = json.dumps(refused(why, SOFTWARE)).encode() + b"\n"
    return line


def request(
    path: str, payload: dict[str, Any], *, wait: bool = True, timeout: float | None = None
) -> dict[str, Any] | None:
    """The client's end: send one request; return the daemon's reply (None without `wait`).
    `timeout`: for the whole exchange (None: as long as the daemon takes, e.g. a reload)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotListening(
                f"no poolkeeper daemon is listening on {path}; is it running? "
                f"({running_hint(path)})"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            unsent = None
        except (BrokenPipeError, ConnectionResetError) as exc:
            unsent = exc  # it hung up first (too many clients): its answer says why
        except OSError as exc:
            raise ControlError(f"cannot send to {path}: {exc.strerror or exc}") from None
        if not wait:
            if unsent is not None:
                raise ControlError(f"cannot send to {path}: {unsent.strerror or unsent}")
            return None
        try:
            line = _read_line(sock, limit=MAX_REPLY)
            reply = json.loads(line)
        except (OSError, ValueError) as exc:
            why = exc if unsent is None else f"{unsent.strerror or unsent}"
            raise ControlError(f"no answer from the daemon on {path}: {why}") from None
        if not isinstance(reply, dict):
            raise ControlError(f"not an answer from the daemon on {path}: {line[:80]!r}")
        return reply


def running_hint(path: str) -> str:
    """How to see whether the daemon behind `path` runs: its own unit's status when the socket
    is where the shipped units put it (/run/poolkeeper/poolkeeper/ for poolkeeper.service,
    /run/poolkeeper/NAME/ for poolkeeper@NAME), else how such a daemon is started."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) == 5 and parts[1:3] == ["run", "poolkeeper"] and parts[4] == "control.sock":
        unit = "poolkeeper" if parts[3] == "poolkeeper" else f"poolkeeper@{parts[3]}"
        return f"systemctl status {unit}"
    return "start it with `poolkeeper run CONFIG`, or as a systemd unit"


def refused(message: str, exit_code: int) -> dict[str, Any]:
    """A reply that says no: the message for the user and the sysexits code to exit with."""
    return {"ok": False, "message": message, "exit": exit_code}


def _read_line(sock: socket.socket, limit: int) -> bytes:
    """The first line `sock` sends (without its newline), at most `limit` bytes. Each chunk
    is searched once, on its own: a reply of megabytes costs one pass, not one per chunk."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            if chunks:
                return b"".join(chunks)
            raise ValueError("connection closed without a message")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ValueError(f"message longer than {limit} bytes")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]  # struct.unpack's values are Any
    return uid


def _remove_stale(path: str) -> None:
    """A socket left by a daemon that was SIGKILLed. The caller holds the state DB's lock, so
    no live daemon of this config owns it; anything but a socket is not ours to remove."""
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
