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

Where: `$RUNTIME_DIRECTORY/control.sock` under systemd (a directory only the unit's user can
enter), else next to the state database (`<state.db>.sock`). Mode 0600, and the peer's
credentials are checked on every connection, so neither the directory nor the mode alone is
trusted.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from poolkeeper.exitcodes import UNAVAILABLE

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096  # one JSON line; anything longer is refused
READ_TIMEOUT = 1.0  # a connected client must send its request this fast: the main loop waits
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes, NUL included


class ControlError(Exception):
    """The socket cannot be reached or the daemon's answer is not one."""


def socket_path(state_db: str | None) -> str | None:
    """Where the daemon of a config listens: $RUNTIME_DIRECTORY/control.sock, else next to
    its state database; None when there is neither (state.path ':memory:')."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    if state_db is None or state_db == ":memory:":
        return None
    return state_db + ".sock"


def socket_of_config(config_path: str) -> str | None:
    """The socket of the daemon running `config_path`, found without validating the file: a
    file that is being fixed (the very reason to reload) may not validate, and it is the
    daemon's job to say why. Only `state.path` is read from it. Raises OSError when the file
    cannot be read (missing, not a regular file) and LoadError when it is too large."""
    runtime_socket = socket_path(None)
    if runtime_socket is not None:
        return runtime_socket
    from poolkeeper.state import StateStore
    from poolkeeper.yamlload import LoadError, load_yaml, read_config

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
    return socket_path(StateStore.resolve_path(spec_path, config_dir))


class ControlServer:
    """The daemon's end: a non-blocking listening socket the main loop waits on."""

    def __init__(self, path: str) -> None:
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise OSError(f"the path is longer than {_UNIX_PATH_MAX} bytes: {path}")
        self.path = path
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

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve(self, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer every connection waiting now; `handle(request) -> reply`. Never raises for
        anything a client does."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # none waiting (EAGAIN), or e.g. EMFILE: try again on the next turn
                return
            with conn:
                self._answer(conn, handle)

    def _answer(self, conn: socket.socket, handle: Callable[[dict], dict]) -> None:
        # Blocking, with a timeout for every read and write: a client that sends slowly, or
        # stops reading, cannot hold the main loop for longer than that.
        conn.settimeout(READ_TIMEOUT)
        uid = _peer_uid(conn)
        if uid not in (0, os.getuid()):
            _reply(conn, refused(f"uid {uid} may not control this daemon", UNAVAILABLE))
            return
        try:
            request = json.loads(_read_line(conn))
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except (OSError, ValueError) as exc:
            _reply(conn, refused(f"bad request: {exc}", UNAVAILABLE))
            return
        _reply(conn, handle(request))

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


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
            raise ControlError(
                f"no poolkeeper daemon is listening on {path}; is it running? "
                "(systemctl status poolkeeper)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        if not wait:
            return None
        try:
            line = _read_line(sock, limit=1 << 20)
            reply = json.loads(line)
        except (OSError, ValueError) as exc:
            raise ControlError(f"no answer from the daemon on {path}: {exc}") from None
        if not isinstance(reply, dict):
            raise ControlError(f"not an answer from the daemon on {path}: {line[:80]!r}")
        return reply


def refused(message: str, exit_code: int) -> dict[str, Any]:
    """A reply that says no: the message for the user and the sysexits code to exit with."""
    return {"ok": False, "message": message, "exit": exit_code}


def _read_line(sock: socket.socket, limit: int = MAX_REQUEST) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            if data:
                break
            raise ValueError("connection closed without a message")
        data += chunk
        if len(data) > limit:
            raise ValueError(f"message longer than {limit} bytes")
    return bytes(data.split(b"\n", 1)[0])


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:  # the client went away (`reload` without --wait does not read)
        pass


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


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
