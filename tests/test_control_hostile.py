"""A hostile client of the control socket: bad requests, slow or silent clients, floods and
random bytes. Whatever it sends, the daemon answers or hangs up, never exits, and its main loop
keeps turning: an `every: 200ms` job (`clock`) serves as the witness. "Kept its schedule" is
checked with a wide margin (no gap between two of its runs longer than STALL), so only a
stalled loop fails it, not a busy machine.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import signal
import socket
import threading
import time
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolkeeper.service import control

SPEC = """
    pool: {workers: 2, start_method: fork}
    jobs:
      clock:
        target: daemon_jobs:ok
        every: 200ms
      victim:
        target: daemon_jobs:ok
        cron: "0 0 1 1 *"
    """
STALL = 3.0  # seconds without a run of `clock`: the main loop stopped turning
ESC = "\x1b"
FLOOD = 48  # connections at once: three times control.MAX_CONNECTIONS


def start(daemon_factory):
    d = daemon_factory(SPEC)
    d.wait_log("ready")
    d.wait_for(lambda: clock_starts(d), what="clock's first run")
    return d


def clock_starts(d, since: float = 0.0) -> list[float]:
    return [r["started"] for r in d.runs() if r["job"] == "clock" and r["started"] >= since]


def assert_kept_its_schedule(d, since: float, until: float) -> None:
    """`clock` ran all through [since, until]: no gap between runs longer than STALL."""
    d.wait_for(lambda: clock_starts(d, until), what="a run of clock after the window")
    starts = [since, *clock_starts(d, since)]
    gaps = [b - a for a, b in pairwise(starts)]
    stalls = [round(g, 1) for g in gaps if g > STALL]
    assert not stalls, f"the main loop stalled: gaps of {stalls}s between runs of clock"


def exchange(path: str, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send `raw` as it is, then EOF; what the daemon sent back before it hung up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered a too-long request before we were done sending
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def answer(path: str, raw: bytes) -> dict:
    got = exchange(path, raw)
    assert got.endswith(b"\n") and got.count(b"\n") == 1, got
    reply = json.loads(got)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    return reply


def stop(d) -> None:
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


# -- finding 1: one bad request ended the daemon (exit 70) -----------------------------------

BAD_REQUESTS = [
    b'{"command":"pause","job":[1]}\n',
    b'{"command":[1]}\n',
    b"[" * 4000 + b"\n",  # inside the size limit; json recursed until RecursionError
    b'{"command":"pause","job":{"a":1}}\n',
    b'{"command":"run-now","job":null}\n',
    b'{"command":{"x":[]}}\n',
    b'{"command":"status","extra":1}\n',
    b'{"command":"pause","job":"' + b"a" * 1000 + b'"}\n',
    b'{"command":"' + b"\\ud800" * 10 + b'"}\n',  # lone surrogates
    b'{"command":"status","job":' + b"9" * 4000 + b"}\n",
    b'{"command":1e999}\n',
    b"\xff\xfe\x00garbage\n",  # not UTF-8
    b"[]\n",
    b"null\n",
    b"\n",
    b'{"command":"pause"}\n',  # no job
    b"{" * 2000 + b"}" * 2000 + b"\n",
    b'{"a":' * 500 + b"1" + b"}" * 500 + b"\n",
]


def test_malformed_requests_get_an_error_and_the_daemon_lives_on(daemon_factory):
    d = start(daemon_factory)
    path = f"{d.db}.sock"
    for raw in BAD_REQUESTS:
        reply = answer(path, raw)
        assert reply["ok"] is False and reply["exit"] in (64, 69), (raw[:60], reply)
        assert d.proc.poll() is None, f"{raw[:60]!r} ended the daemon:\n{d.log()}"
    assert control.request(path, {"command": "status"})["ok"] is True
    assert "Traceback" not in d.log() and "a bug" not in d.log()
    stop(d)


def test_what_a_client_sent_is_echoed_bounded_and_escaped(daemon_factory):
    d = start(daemon_factory)
    path = f"{d.db}.sock"
    for request in (
        {"command": ESC + "[2J" + "x" * 200},
        {"command": "pause", "job": ESC + "]0;pwned\x07" + "y" * 200},
    ):
        message = control.request(path, request)["message"]
        assert ESC not in message and "\x07" not in message, message
        assert "\\x1b" in message and len(message) < 300, message
    stop(d)


def test_a_handler_that_fails_is_logged_as_a_bug_and_answered(tmp_path, caplog):
    """The last line of defence, in-process: a request that passes the checks and still
    makes the answer raise costs that request, not the daemon."""

    def broken(request: dict) -> dict:
        raise ZeroDivisionError("division by zero")

    server = control.ControlServer(str(tmp_path / "c.sock"), logging.getLogger("test"))
    replies: list = []
    client = threading.Thread(
        target=lambda: replies.append(control.request(server.path, {"command": "status"}))
    )
    try:
        client.start()
        deadline = time.monotonic() + 10
        while client.is_alive() and time.monotonic() < deadline:
            server.serve(broken, time.monotonic())
            select.select(server.readers(), server.writers(), [], 0.05)
        client.join(1)
    finally:
        server.close()
    assert replies == [
        {
            "ok": False,
            "message": "internal error: ZeroDivisionError (a bug: please report it with the "
            "daemon's log, which has the traceback)",
            "exit": 70,
        }
    ]
    assert "internal error answering {'command': 'status'} (a bug)" in caplog.text
    assert "ZeroDivisionError" in caplog.text  # the traceback


# -- finding 3: a slow client held the main loop ------------------------------------------------


def test_a_slow_or_silent_client_does_not_stall_the_loop(daemon_factory):
    """One byte every 0.5s (each within the old per-read timeout), and a few clients that
    connect and send nothing: the loop keeps its schedule, each of them is hung up on with a
    reason, and the dribbler, who reconnects, keeps up the pressure for the whole window."""
    d = start(daemon_factory)
    path = f"{d.db}.sock"
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    hung_up: list[bytes] = []
    since = time.time()
    try:
        for sock in silent:
            sock.connect(path)
        dribbler = None
        while time.time() < since + 6.0:
            if dribbler is None:
                dribbler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                dribbler.connect(path)
            if select.select([dribbler], [], [], 0)[0]:  # it answered: read why, reconnect
                dribbler.settimeout(5)
                hung_up.append(dribbler.recv(4096))
                dribbler.close()
                dribbler = None
                continue
            try:
                dribbler.send(b"{")
            except OSError:
                pass  # hung up; its answer is read on the next round
            time.sleep(0.5)  # the client's pace, not a wait for the daemon
        until = time.time()
        assert d.proc.poll() is None, d.log()
        assert_kept_its_schedule(d, since, until)
        assert hung_up and all(b"no complete request within" in r for r in hung_up), hung_up
        for sock in silent:
            sock.settimeout(5)
            assert b"no complete request within" in sock.recv(4096)
    finally:
        for sock in silent:
            sock.close()
        if dribbler is not None:
            dribbler.close()
    assert control.request(path, {"command": "status"})["ok"] is True
    stop(d)


def test_a_flood_of_connections_is_refused_beyond_the_cap(daemon_factory):
    d = start(daemon_factory)
    path = f"{d.db}.sock"
    since = time.time()
    flood = []
    try:
        for _ in range(FLOOD):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.append(sock)
            sock.connect(path)  # blocking: waits while the backlog (8) is full
            sock.settimeout(10)
        # The backlog is served in order: the 16 first are open, a client is told why. (No
        # timeout: the connect must wait while the backlog is full, and the answer comes.)
        assert control.request(path, {"command": "status"}) == {
            "ok": False,
            "message": "too many connections (at most 16 at once); try again",
            "exit": 69,
        }
        answers = [sock.recv(4096) for sock in flood]  # every one: a refusal or the timeout
        assert_kept_its_schedule(d, since, time.time())
        assert sum(b"too many connections" in a for a in answers) >= FLOOD - 16
        assert all(b'"ok": false' in a for a in answers), answers
    finally:
        for sock in flood:
            sock.close()
    assert control.request(path, {"command": "status"})["ok"] is True
    stop(d)


def test_out_of_descriptors_the_daemon_pauses_accepting_and_recovers(daemon_factory):
    """The daemon's RLIMIT_NOFILE lowered to a few descriptors above what it holds, then a
    flood: accept() fails with EMFILE while the clients wait in the backlog. The daemon says
    so, stops listening for a moment instead of retrying every turn, keeps its schedule, and
    serves again once the descriptors are back."""
    d = start(daemon_factory)
    path = f"{d.db}.sock"
    highest = max(int(fd) for fd in os.listdir(f"/proc/{d.pid}/fd"))
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    flood = []
    since = time.time()
    try:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (highest + 4, hard))
        for _ in range(FLOOD):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:  # the backlog is full
                sock.close()
                continue
            flood.append(sock)
        d.wait_log("control socket: cannot accept a connection (Too many open files)")
        d.wait_for(lambda: len(clock_starts(d, since)) >= 15, what="fifteen runs of clock")
        assert_kept_its_schedule(d, since, time.time())
    finally:
        for sock in flood:
            sock.close()
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert d.proc.poll() is None, d.log()
    assert control.request(path, {"command": "status"}, timeout=10)["ok"] is True
    stop(d)


def test_a_client_that_never_reads_a_reply_or_leaves_mid_reply(daemon_factory):
    """`status` of a daemon with 2,500 jobs: a reply larger than a socket's buffer. Clients
    that never read it, and clients that leave halfway through it, cost the loop nothing:
    the daemon writes what fits, and hangs up on them at their deadline."""
    job = '      j{:04d}: {{target: daemon_jobs:ok, cron: "0 0 1 1 *"}}\n'
    d = daemon_factory(SPEC.rstrip() + "\n" + "".join(job.format(i) for i in range(2500)))
    d.wait_log("ready")
    d.wait_for(lambda: clock_starts(d), what="clock's first run")
    path = f"{d.db}.sock"
    whole = exchange(path, b'{"command":"status"}\n')
    assert len(whole) > 200_000 and json.loads(whole)["ok"] is True  # larger than a buffer
    unknown = control.request(path, {"command": "pause", "job": "nope"})["message"]
    assert unknown.endswith(", ... (+2,482 more))") and len(unknown) < 500, unknown
    since = time.time()
    deaf = []
    try:
        for _ in range(8):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deaf.append(sock)
            sock.connect(path)
            sock.sendall(b'{"command":"status"}\n')
        for sock in deaf[:2]:
            sock.recv(1000)
            sock.close()  # gone mid-reply
        d.wait_for(lambda: len(clock_starts(d, since)) >= 15, what="fifteen runs of clock")
        assert_kept_its_schedule(d, since, time.time())
        for sock in deaf[2:]:  # hung up on: EOF after what fitted
            sock.settimeout(10)
            got = b""
            while chunk := sock.recv(1 << 16):
                got += chunk
            assert 0 < len(got) <= len(whole)  # all of it only if it fit in the buffers
    finally:
        for sock in deaf:
            sock.close()
    assert control.request(path, {"command": "status"})["ok"] is True
    stop(d)


# -- the fuzz test --------------------------------------------------------------------------

KNOWN = ["command", "job", "reload", "status", "pause", "resume", "run-now", "victim", "nope"]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(KNOWN)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=30,
)
REQUESTS = (
    JSON.map(lambda value: json.dumps(value).encode() + b"\n")
    | st.binary(max_size=6000)
    | st.binary(max_size=200).map(lambda raw: raw + b"\n")
    | st.integers(1, 3000).map(lambda depth: b"[" * depth + b"{" * depth)
)


def test_fuzz_random_requests_never_end_the_daemon_nor_stall_it(daemon_factory):
    d = start(daemon_factory)
    path = f"{d.db}.sock"
    since = time.time()

    @settings(
        max_examples=3000,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(REQUESTS)
    def send(raw: bytes) -> None:
        got = exchange(path, raw)
        if raw:
            reply = json.loads(got)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), got
        assert d.proc.poll() is None, f"{raw[:80]!r} ended the daemon:\n{d.log()}"

    send()
    assert d.proc.poll() is None, d.log()
    assert control.request(path, {"command": "status"})["ok"] is True
    assert_kept_its_schedule(d, since, time.time())
    assert "Traceback" not in d.log() and "a bug" not in d.log(), d.log()
    stop(d)
