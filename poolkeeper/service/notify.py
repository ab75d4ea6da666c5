"""sd_notify(3) for poolkeeper's main process: READY/RELOADING/STOPPING, throttled STATUS, watchdog.

Facts this module is built on (systemd 252, see /work/shared/reference/systemd-facts.md):

* One AF_UNIX datagram to ``$NOTIFY_SOCKET`` (``@name`` = abstract namespace), newline-separated
  ``KEY=VALUE`` lines, kept under 4096 bytes. A newline inside a value would start a new field,
  so values are flattened to one line.
* ``STATUS=`` that is not valid UTF-8 is dropped by systemd, and a non-latin-1 character makes
  sdnotify lose the whole message. Backends:

  - ``"systemd"``: python-systemd's ``systemd.daemon.notify`` (libsystemd, UTF-8). libsystemd
    reads ``$NOTIFY_SOCKET`` from the process environment on *every* call, while the daemon
    scrubs it from ``os.environ`` before starting workers; so when the environment no longer
    holds the captured address it is exported just for the call, under a lock. Caveat: a fork
    from another thread inside that window would inherit it (harmless under NotifyAccess=main).
  - ``"sdnotify"``: the sdnotify package, which encodes latin-1. Non-ASCII characters are
    written as Python backslash escapes first (``café ✓`` -> ``caf\\xe9 \\u2713``): readable,
    unambiguous, and pure ASCII, so systemd accepts it.
  - ``"socket"``: a plain UTF-8 datagram to the captured address; no dependency and no
    environment juggling.
  - ``"auto"``: ``"systemd"`` if python-systemd is importable, else ``"sdnotify"``.

* Only the main process may notify (NotifyAccess=main drops the others): everything is captured
  at construction, and a copy of the object inherited by a forked worker stays silent.
* Sending never raises: failures are logged at debug level, the daemon carries on.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4095  # systemd reads at most 4096 bytes per datagram
MAX_STATUS_BYTES = 2048  # leaves room for the other fields of the same datagram
DEFAULT_MIN_INTERVAL = 0.25
SEND_TIMEOUT = 1.0  # a full notify queue must not wedge the main loop for long

BACKENDS = ("auto", "systemd", "sdnotify", "socket")

# What systemd gives the main process to notify and be watched with. The daemon captures them
# (Notifier) and then removes them from its environment, and every worker removes them again
# (poolkeeper.pool.worker): with NotifyAccess=main systemd drops a worker's notifications
# anyway, and a worker (or a job's subprocess) must never look like the watchdog's owner.
MAIN_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# libsystemd reads NOTIFY_SOCKET from the C environment: serialize our temporary exports.
_ENV_LOCK = threading.Lock()


def _python_systemd_available() -> bool:
    try:
        from systemd import daemon  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown notify backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "systemd" if _python_systemd_available() else "sdnotify"
    return backend


def ascii_escape(text: str) -> str:
    """'café ✓' -> 'caf\\xe9 \\u2713': what the latin-1 (sdnotify) path sends."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def clip_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `limit` bytes."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def _socket_address(value: str) -> str:
    return "\0" + value[1:] if value.startswith("@") else value


def _parse_usec(value: str | None) -> int | None:
    try:
        usec = int(value) if value is not None else 0
    except ValueError:
        return None
    return usec if usec > 0 else None


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """sd_notify for the main process; a no-op when ``$NOTIFY_SOCKET`` was unset."""

    def __init__(
        self,
        *,
        backend: str = "auto",
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = DEFAULT_MIN_INTERVAL,
    ) -> None:
        env = os.environ if env is None else env
        # Captured now: the daemon removes these from os.environ before it starts workers.
        self._address: str | None = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = _parse_usec(env.get("WATCHDOG_USEC"))
        self._watchdog_pid = env.get("WATCHDOG_PID") or None
        self._pid = os.getpid()
        self.backend = resolve_backend(backend)
        self.enabled: bool = self._address is not None
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()  # guards the socket
        # Guards the status bookkeeping *and* its send, so concurrent callers cannot make an
        # older text arrive after a newer one.
        self._status_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._last_status_at: float | None = None
        self._pending_status: str | None = None

    # -- lifecycle messages ------------------------------------------------------------------

    def ready(self) -> None:
        self.send(READY=1)

    def reloading(self) -> None:
        # MONOTONIC_USEC is only read by systemd >= 253; harmless on 252.
        self.send(RELOADING=1, MONOTONIC_USEC=_monotonic_usec())

    def stopping(self) -> None:
        # Only when really stopping: on 252 the unit sits in deactivating until SIGKILL otherwise.
        self.send(STOPPING=1)

    def extend_timeout(self, seconds: float) -> None:
        self.send(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))

    def fatal(self, status: str, errno: int | None = None) -> None:
        fields: dict[str, object] = {"STATUS": status}
        if errno is not None:
            fields["ERRNO"] = int(errno)
        with self._status_lock:
            self._record_status(status, self._clock())
            self.send(**fields)

    # -- status ------------------------------------------------------------------------------

    def status(self, text: str, *, force: bool = False) -> bool:
        """Send STATUS=text if it changed and the last one is `min_interval` old (or `force`).

        A throttled text is kept; `flush_status()` sends it later. Returns whether it was sent.
        """
        if not self.enabled:
            return False
        with self._status_lock:
            if not force and text == self._last_status:
                self._pending_status = None  # the newest wish is already what systemd shows
                return False
            now = self._clock()
            if not force and self._throttled(now):
                self._pending_status = text
                return False
            self._record_status(text, now)
            return self.send(STATUS=text)

    def flush_status(self) -> None:
        """Send the latest throttled status, if any (call it from the main loop's tick)."""
        with self._status_lock:
            text = self._pending_status
            if text is not None:
                self._record_status(text, self._clock())
                self.send(STATUS=text)

    def _throttled(self, now: float) -> bool:
        last = self._last_status_at
        return last is not None and now - last < self.min_interval

    def _record_status(self, text: str, now: float) -> None:
        self._last_status, self._last_status_at, self._pending_status = text, now, None

    # -- watchdog ----------------------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (ping at half of it), or None when not ours.

        sd_watchdog_enabled(3) semantics, as captured at construction: WATCHDOG_USEC set and
        positive, and WATCHDOG_PID unset or equal to our pid.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != str(self._pid):
            return None
        return self._watchdog_usec / 1_000_000

    def watchdog_ping(self) -> None:
        self.send(WATCHDOG=1)

    # -- transport ---------------------------------------------------------------------------

    def send(self, **fields: object) -> bool:
        """Send KEY=VALUE fields in one datagram; returns whether it went out."""
        return self.raw(self.format(fields))

    def format(self, fields: Mapping[str, object]) -> str:
        lines = []
        for key, value in fields.items():
            text = " ".join(str(value).splitlines())  # a newline would start another field
            # Lone surrogates (undecodable bytes of a path, say) cannot be sent as UTF-8.
            text = text.encode("utf-8", "replace").decode("utf-8")
            if key == "STATUS":
                text = self._status_text(text)
            lines.append(f"{key}={text}")
        return "\n".join(lines)

    def _status_text(self, text: str) -> str:
        if self.backend == "sdnotify":
            text = ascii_escape(text)
        return clip_utf8(text, MAX_STATUS_BYTES)

    def raw(self, message: str) -> bool:
        """Send `message` as is (already KEY=VALUE lines); never raises."""
        if not self.enabled or os.getpid() != self._pid:
            return False  # no socket, or we are a forked copy: only the main process notifies
        try:
            if len(message.encode("utf-8")) > MAX_MESSAGE_BYTES:
                log.debug("notify message too long (%d chars), not sent", len(message))
                return False
            return self._transmit(message)
        except Exception as exc:  # a notify failure must never hurt the daemon
            log.debug("sd_notify %r failed: %s", message[:80], exc)
            self.close()
            return False

    def _transmit(self, message: str) -> bool:
        assert self._address is not None
        if self.backend == "systemd":
            return self._transmit_libsystemd(message)
        if self.backend == "sdnotify":
            _sdnotify_sender()(self._socket()).notify(ascii_escape(message))
            return True
        self._socket().send(message.encode("utf-8"))
        return True

    def _transmit_libsystemd(self, message: str) -> bool:
        from systemd import daemon

        address = self._address
        assert address is not None  # checked by _transmit, our only caller
        with _ENV_LOCK:
            previous = os.environ.get("NOTIFY_SOCKET")
            if previous == address:
                return bool(daemon.notify(message))
            os.environ["NOTIFY_SOCKET"] = address
            try:
                return bool(daemon.notify(message))
            finally:
                if previous is None:
                    del os.environ["NOTIFY_SOCKET"]
                else:
                    os.environ["NOTIFY_SOCKET"] = previous

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(SEND_TIMEOUT)
                try:
                    sock.connect(_socket_address(self._address or ""))
                except OSError:
                    sock.close()
                    raise
                self._sock = sock
            return self._sock

    def fileno(self) -> int | None:
        """The socket's descriptor while connected (a worker started by fork closes it)."""
        sock = self._sock
        return None if sock is None else sock.fileno()

    def close(self) -> None:
        """Drop the socket (a later send reconnects, e.g. after systemd re-executed)."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


@functools.cache
def _sdnotify_sender() -> type:
    import sdnotify

    # sdnotify has no type information (its import is untyped: Any), so its class is Any.
    class Sender(sdnotify.SystemdNotifier):  # type: ignore[misc]
        """sdnotify's sender on our socket (its constructor would read os.environ instead)."""

        def __init__(self, sock: socket.socket) -> None:
            self.debug = True  # raise, so that Notifier.raw logs the failure
            self.socket = sock

    return Sender
