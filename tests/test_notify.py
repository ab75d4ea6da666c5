"""poolkeeper.service.notify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from poolkeeper.service import notify
from poolkeeper.service.notify import Notifier

BACKENDS = ["systemd", "sdnotify", "socket"]


class Receiver:
    """The systemd side: a bound datagram socket whose address goes into NOTIFY_SOCKET."""

    def __init__(self, env_value: str) -> None:
        self.env_value = env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(notify._socket_address(env_value))

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def nothing(self, timeout: float = 0.05) -> bool:
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        return False

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}


@pytest.fixture
def receiver(tmp_path) -> Iterator[Receiver]:
    r = Receiver(str(tmp_path / "notify.sock"))
    yield r
    r.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    r = Receiver(f"@poolkeeper-test-{uuid.uuid4().hex}")
    yield r
    r.sock.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- exact bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.watchdog_ping(), b"WATCHDOG=1"),
        (lambda n: n.extend_timeout(2.5), b"EXTEND_TIMEOUT_USEC=2500000"),
        (lambda n: n.fatal("config rejected", errno=22), b"STATUS=config rejected\nERRNO=22"),
        (lambda n: n.fatal("lost the lock"), b"STATUS=lost the lock"),
        (lambda n: n.status("3 jobs, 2/4 workers busy"), b"STATUS=3 jobs, 2/4 workers busy"),
        (lambda n: n.send(MAINPID=42, STATUS="x"), b"MAINPID=42\nSTATUS=x"),
        (lambda n: n.raw("BARRIER=1"), b"BARRIER=1"),
    ],
    ids=[
        "ready",
        "stopping",
        "watchdog",
        "extend",
        "fatal+errno",
        "fatal",
        "status",
        "send",
        "raw",
    ],
)
def test_each_message_has_exact_bytes(receiver, backend, call, expected):
    call(Notifier(backend=backend, env=receiver.env()))
    assert receiver.recv() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_reloading_carries_clock_monotonic_usec(receiver, backend):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(backend=backend, env=receiver.env()).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = receiver.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC" and before <= int(value) <= after


@pytest.mark.parametrize("backend", BACKENDS)
def test_abstract_socket_address(abstract_receiver, backend):
    Notifier(backend=backend, env=abstract_receiver.env()).ready()
    assert abstract_receiver.recv() == b"READY=1"


# -- encoding ------------------------------------------------------------------------------


def test_auto_prefers_python_systemd():
    assert Notifier(env={}).backend == "systemd"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        Notifier(backend="dbus", env={})


def test_python_systemd_path_sends_valid_utf8(receiver):
    Notifier(backend="systemd", env=receiver.env()).status("café ✓")
    data = receiver.recv()
    assert data == "STATUS=café ✓".encode()
    assert data.decode("utf-8") == "STATUS=café ✓"


def test_python_systemd_path_works_after_the_environment_was_scrubbed(receiver, monkeypatch):
    # The daemon removes NOTIFY_SOCKET from os.environ before starting workers, and libsystemd
    # reads the environment on every call: the captured address must still be used...
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.env_value)
    notifier = Notifier(backend="systemd")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notifier.send(READY=1, STATUS="café ✓")
    assert receiver.recv() == "READY=1\nSTATUS=café ✓".encode()
    # ...and the environment left as the daemon made it.
    assert "NOTIFY_SOCKET" not in os.environ


def test_python_systemd_path_keeps_a_different_environment_value(receiver, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/other.sock")
    Notifier(backend="systemd", env=receiver.env()).ready()
    assert receiver.recv() == b"READY=1"
    assert os.environ["NOTIFY_SOCKET"] == "/nonexistent/other.sock"


def test_sdnotify_path_escapes_non_ascii(receiver):
    # sdnotify encodes latin-1: 'é' would be invalid UTF-8 and systemd would drop the status;
    # '✓' would make sdnotify lose the whole message. Escaped, it is plain ASCII.
    Notifier(backend="sdnotify", env=receiver.env()).status("café ✓")
    data = receiver.recv()
    assert data == b"STATUS=caf\\xe9 \\u2713"
    data.decode("ascii")


def test_socket_path_sends_utf8(receiver):
    Notifier(backend="socket", env=receiver.env()).status("café ✓")
    assert receiver.recv() == "STATUS=café ✓".encode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_newline_cannot_inject_a_field(receiver, backend):
    Notifier(backend=backend, env=receiver.env()).status("job failed\nREADY=1")
    assert receiver.recv() == b"STATUS=job failed READY=1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_text_is_replaced_not_raised(receiver, backend):
    n = Notifier(backend=backend, env=receiver.env())
    assert n.status("bad \udcff byte") is True
    assert receiver.recv() == b"STATUS=bad ? byte"
    assert n.raw("X=\udcff") is False  # a raw message is sent as is: it fails, quietly


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_status_is_truncated_below_4096_bytes(receiver, backend):
    Notifier(backend=backend, env=receiver.env()).fatal("✓" * 5000, errno=5)
    data = receiver.recv()
    assert len(data) < 4096
    assert data.startswith(b"STATUS=") and data.endswith(b"\nERRNO=5")
    data.decode("utf-8")  # not cut inside a character


# -- throttling ----------------------------------------------------------------------------


def test_status_is_throttled_and_deduplicated(receiver):
    clock = FakeClock()
    n = Notifier(backend="socket", env=receiver.env(), clock=clock, min_interval=0.25)
    assert n.status("a") is True
    assert receiver.recv() == b"STATUS=a"

    clock.now += 0.1
    assert n.status("b") is False  # too soon: kept for later
    assert n.status("c") is False  # the latest wins
    assert receiver.nothing()

    n.flush_status()
    assert receiver.recv() == b"STATUS=c"
    n.flush_status()  # nothing pending any more
    assert receiver.nothing()

    clock.now += 1.0
    assert n.status("c") is False  # unchanged text is never re-sent
    assert n.status("c", force=True) is True
    assert receiver.recv() == b"STATUS=c"

    assert n.status("d", force=True) is True  # force ignores the interval too
    assert receiver.recv() == b"STATUS=d"


def test_status_sent_after_the_interval(receiver):
    clock = FakeClock()
    n = Notifier(backend="socket", env=receiver.env(), clock=clock, min_interval=0.25)
    n.status("a")
    clock.now += 0.25
    assert n.status("b") is True
    assert [receiver.recv(), receiver.recv()] == [b"STATUS=a", b"STATUS=b"]


def test_going_back_to_the_shown_text_cancels_the_pending_one(receiver):
    clock = FakeClock()
    n = Notifier(backend="socket", env=receiver.env(), clock=clock)
    n.status("idle")
    n.status("busy")  # throttled
    n.status("idle")  # what systemd already shows
    n.flush_status()
    assert receiver.recv() == b"STATUS=idle"
    assert receiver.nothing()


def test_fatal_counts_as_the_shown_status(receiver):
    clock = FakeClock()
    n = Notifier(backend="socket", env=receiver.env(), clock=clock)
    n.fatal("dying")
    assert n.status("dying") is False
    assert receiver.recv() == b"STATUS=dying"
    assert receiver.nothing()


# -- disabled, errors, forks ---------------------------------------------------------------


def test_no_op_without_notify_socket(receiver):
    n = Notifier(env={"WATCHDOG_USEC": "2000000"})
    assert n.enabled is False
    assert n.status("x") is False
    assert n.send(READY=1) is False
    n.ready(), n.reloading(), n.stopping(), n.extend_timeout(1), n.watchdog_ping()
    n.fatal("x", errno=1), n.flush_status()
    assert receiver.nothing()


def test_environment_is_captured_at_construction(receiver, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier(backend="socket")
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
        monkeypatch.delenv(name)
    assert n.enabled and n.watchdog_interval() == 3.0
    n.ready()
    assert receiver.recv() == b"READY=1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_errors_never_raise(tmp_path, caplog, backend):
    n = Notifier(backend=backend, env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.DEBUG, logger="poolkeeper.service.notify"):
        assert n.send(READY=1) is False
        n.status("x"), n.watchdog_ping()
    assert n.enabled
    assert any("failed" in r.getMessage() for r in caplog.records)


def test_a_send_after_the_socket_came_back_reconnects(tmp_path):
    path = tmp_path / "notify.sock"
    n = Notifier(backend="socket", env={"NOTIFY_SOCKET": str(path)})
    assert n.send(READY=1) is False
    r = Receiver(str(path))
    try:
        assert n.send(READY=1) is True
        assert r.recv() == b"READY=1"
    finally:
        r.sock.close()


def test_oversized_raw_message_is_not_sent(receiver):
    n = Notifier(backend="socket", env=receiver.env())
    assert n.raw("X=" + "a" * 5000) is False
    assert receiver.nothing()


def test_a_forked_copy_stays_silent(receiver):
    n = Notifier(backend="socket", env=receiver.env())
    pid = os.fork()
    if pid == 0:  # a worker forked from the daemon: NotifyAccess=main would drop it anyway
        code = 1 if n.send(READY=1) else 0
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert receiver.nothing()


# -- watchdog ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "4000000"}, 4.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "OURS"}, 4.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "OTHER"}, None),
        ({"WATCHDOG_USEC": "500"}, 0.0005),
        ({}, None),
        ({"WATCHDOG_PID": "OURS"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
    ids=["pid-unset", "pid-ours", "pid-other", "usec", "unset", "pid-only", "zero", "garbage"],
)
def test_watchdog_interval(receiver, env, expected):
    pids = {"OURS": str(os.getpid()), "OTHER": str(os.getpid() + 1)}
    env = {k: pids.get(v, v) for k, v in env.items()}
    n = Notifier(backend="socket", env=receiver.env(**env))
    assert n.watchdog_interval() == expected


def test_watchdog_ping(receiver):
    n = Notifier(backend="socket", env=receiver.env(WATCHDOG_USEC="2000000"))
    n.watchdog_ping()
    assert receiver.recv() == b"WATCHDOG=1"
