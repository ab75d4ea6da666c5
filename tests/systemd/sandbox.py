"""A real systemd 252 as PID 1 of a throw-away container, driven from the test process.

`Sandbox.boot()` runs boot.sh (overlay root over `/`, private /dev, /run, /tmp, its own PID,
mount, UTS, IPC and cgroup namespaces and cgroup) and waits until `systemctl is-system-running`
says running/degraded. Tests then talk to that systemd with `nsenter -t PID -a ...`.
See docs/testing.md for how it works and how to debug it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import procs

BOOT_SCRIPT = Path(__file__).with_name("boot.sh")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = "/lib/systemd/systemd"
NAME = "poolkeeper-sandbox"
# The environment of every command run inside: nothing of pytest's (NOTIFY_SOCKET, ...).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}

# What an earlier install of poolkeeper on the host left, hidden from the sandbox (boot.sh
# removes them from its overlay) so that every session starts as on a fresh machine: a host's
# /var/lib/poolkeeper/poolkeeper.db showed through, and the daemons of the tests saw jobs that
# were not theirs. (/run is a tmpfs of the sandbox's own already; private/: DynamicUser=.)
HOST_LEFTOVERS = (
    "/etc/poolkeeper",
    "/var/lib/poolkeeper", "/var/lib/private/poolkeeper",
    "/var/cache/poolkeeper", "/var/cache/private/poolkeeper",
    "/var/log/poolkeeper", "/var/log/private/poolkeeper",
)  # fmt: skip

T = TypeVar("T")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot boot on this machine (the reason is the message)."""


class SandboxCommandError(subprocess.CalledProcessError):
    """A command inside the sandbox failed; unlike CalledProcessError it shows the output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class SandboxTimeout(AssertionError):
    """`wait_for` gave up: a failed expectation, reported as a test failure."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy (returned); else raise SandboxTimeout."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise SandboxTimeout(
                f"timed out after {timeout:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


# -- host-side cgroup plumbing ---------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Where the host's cgroup2 (unified) hierarchy is mounted: /sys/fs/cgroup on a pure v2
    host, /sys/fs/cgroup/unified on a hybrid one."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup2":
                return Path(fields[4])
    return None


def own_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def cgroup_pids(root: Path) -> list[int]:
    """Host pids in `root` and every cgroup below it."""
    pids: list[int] = []
    for procs_file in root.rglob("cgroup.procs"):
        try:
            pids += [int(p) for p in procs_file.read_text().split()]
        except OSError:
            pass
    return pids


def remove_cgroup_tree(root: Path) -> None:
    """rmdir bottom-up: systemd leaves init.scope, system.slice... behind when it exits."""
    if not root.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda e: -len(e[0])):
        os.rmdir(dirpath)


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in_namespace(ns: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and pid_namespace(int(p)) == ns]


def _host_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def default_binds() -> list[str]:
    """Host paths the tests' units need at the same path inside: the project (ExecStart is its
    virtualenv's poolkeeper) and the interpreter the virtualenv points to."""
    paths = {
        str(PROJECT_ROOT),
        sys.prefix,
        sys.base_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    return sorted(paths)


def scratch_dir(binds: Iterable[str]) -> str:
    """Where boot.sh mounts its scratch tmpfs (overlay upper and work dirs) in its private
    mount namespace: a directory that hides none of the paths to bind (CI may clone the
    project under /tmp)."""
    for candidate in ("/tmp", "/mnt", "/srv", "/media", "/opt"):
        if os.path.isdir(candidate) and not any(
            b == candidate or b.startswith(candidate + "/") for b in binds
        ):
            return candidate
    raise SandboxUnavailable(f"no scratch directory outside {sorted(binds)}")


# -- the sandbox -------------------------------------------------------------------------------


class Sandbox:
    """A booted systemd. `pid` is the host pid of its PID 1; `unshare_pid` its host parent."""

    def __init__(self, proc: subprocess.Popen, pid: int, cgroup: Path, console: Any) -> None:
        self._proc = proc
        self.unshare_pid = proc.pid
        self.pid = pid
        self.cgroup = cgroup  # host path of the sandbox's cgroup (its /sys/fs/cgroup)
        # Holding the namespace open pins its inode number: no later namespace can reuse it while
        # poweroff() looks for leftover processes by it.
        self._pid_ns_fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.pid_namespace = pid_namespace(pid) or ""
        self._console = console

    # -- boot / poweroff -------------------------------------------------------------------

    @classmethod
    def boot(cls, *, binds: Iterable[str] | None = None, timeout: float = 20.0) -> Sandbox:
        """Boot or raise SandboxUnavailable with the reason (and systemd's console output)."""
        cgroup_root = _preflight()
        parent_cgroup = cgroup_root / own_cgroup().lstrip("/")
        _remove_stale_cgroups(parent_cgroup)
        cgroup = parent_cgroup / f"{NAME}-{os.getpid()}"
        try:
            cgroup.mkdir()
        except OSError as exc:  # e.g. a read-only /sys/fs/cgroup in an unprivileged container
            raise SandboxUnavailable(f"cannot create the sandbox's cgroup {cgroup}: {exc}") from exc
        console = tempfile.TemporaryFile()  # O_TMPFILE: leaves no name in the host's /tmp
        bind_list = default_binds() if binds is None else list(binds)
        env = {
            "PATH": INSIDE_ENV["PATH"],
            "SANDBOX_CGROUP": str(cgroup),
            "SANDBOX_BINDS": ":".join(bind_list),
            "SANDBOX_SCRATCH": scratch_dir(bind_list),
            "SANDBOX_FRESH": ":".join(HOST_LEFTOVERS),
            "SANDBOX_NAME": NAME,
        }
        # A session of its own: a Ctrl-C meant for pytest must not reach systemd (SIGINT to
        # PID 1 starts ctrl-alt-del.target). --pdeathsig: if pytest is killed, unshare dies
        # too, and its --kill-child takes systemd and the whole PID namespace along.
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "SIGKILL", "bash", str(BOOT_SCRIPT), "outer"],
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sandbox = None
        try:
            pid = _wait_for_pid1(proc, timeout)
            # unshare itself had to sit in the new cgroup to root the cgroup namespace there; move
            # it back so the container's root cgroup holds only its own processes.
            (parent_cgroup / "cgroup.procs").write_text(str(proc.pid))
            sandbox = cls(proc, pid, cgroup, console)
            sandbox._wait_until_running(timeout)
            return sandbox
        except BaseException as exc:
            reason = str(exc)
            if sandbox is not None:
                sandbox._dump_state_into(console)
                os.close(sandbox._pid_ns_fd)
            _kill(proc)
            _clear_cgroup(cgroup)
            output = _read_console(console)
            console.close()
            if isinstance(exc, SandboxUnavailable | SandboxTimeout | subprocess.SubprocessError):
                raise SandboxUnavailable(f"{reason}\n--- console ---\n{output}") from exc
            raise

    def _wait_until_running(self, timeout: float) -> None:
        def state() -> str:
            if self._proc.poll() is not None:
                raise SandboxUnavailable(f"systemd exited with status {self._proc.returncode}")
            result = self.systemctl("is-system-running", check=False)
            return result.stdout.strip()

        wait_for(lambda: state() in ("running", "degraded"), timeout, "running/degraded")

    def _dump_state_into(self, console: Any) -> None:
        """On a failed boot, append what systemd knows to the console output we report."""
        for argv in (("systemctl", "list-units", "--failed"), ("journalctl", "-b", "-n", "60")):
            try:
                result = self.run(*argv, check=False, timeout=5)
                console.write(f"\n$ {' '.join(argv)}\n{result.stdout}{result.stderr}".encode())
            except subprocess.SubprocessError:
                pass

    def poweroff(self, timeout: float = 15.0) -> None:
        """Clean stop; then make sure no process of the sandbox and none of its cgroups remain."""
        if self._proc.poll() is None:
            try:
                self.systemctl("start", "--no-block", "poweroff.target", check=False, timeout=5)
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(self._proc)
        try:
            _clear_cgroup(self.cgroup, self.pid_namespace)
        finally:
            os.close(self._pid_ns_fd)
            self._console.close()

    @property
    def console(self) -> str:
        """What systemd printed on its console (stdout/stderr) so far."""
        return _read_console(self._console)

    # -- commands inside -------------------------------------------------------------------

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in all of the sandbox's namespaces (its root, pids, cgroup view)."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            env=INSIDE_ENV,
            cwd="/",
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise SandboxCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "systemctl", "--no-pager", "--no-ask-password", *args, check=check, timeout=timeout
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` as a dict (all properties when none are named)."""
        args = [a for p in props for a in ("-p", p)]
        out = self.systemctl("show", unit, *args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """`journalctl -o json ARGS` entries, oldest first (journald may lag: use wait_for)."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def install_unit(self, name: str, text: str) -> None:
        self.write_file(f"/etc/systemd/system/{name}", text)
        self.systemctl("daemon-reload")

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write `path` of the sandbox's root (its overlay: the host never sees it)."""
        target = self.host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        target.chmod(mode)

    def host_path(self, path: str) -> Path:
        """The host's way into a path of the sandbox: through /proc/PID/root."""
        if not path.startswith("/"):
            raise ValueError(f"absolute path expected, got {path!r}")
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def cgroup_procs(self, unit_or_cgroup: str) -> list[int]:
        """Pids (as the sandbox sees them) in a unit's cgroup and below. Give a cgroup path
        ("/system.slice/x.service", from show(unit, "ControlGroup")) to look at a stopped unit,
        whose ControlGroup property is empty."""
        cgroup = unit_or_cgroup
        if not cgroup.startswith("/"):
            cgroup = self.show(unit_or_cgroup, "ControlGroup").get("ControlGroup", "")
            if not cgroup:
                return []
        # Read from inside: cgroup.procs shows pids in the reader's PID namespace.
        result = self.run(
            "find",
            f"/sys/fs/cgroup{cgroup}",
            "-name",
            "cgroup.procs",
            "-exec",
            "cat",
            "{}",
            "+",
            check=False,
        )
        return sorted(int(p) for p in result.stdout.split())

    def alive(self, pid: int) -> bool:
        """Whether `pid` (a pid of the sandbox's namespace) still runs (zombies count as gone)."""
        try:
            status = self.host_path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return "\nState:\tZ" not in status

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        return wait_for(predicate, timeout, what)


# -- boot helpers --------------------------------------------------------------------------------


def _preflight() -> Path:
    if sys.platform != "linux":
        raise SandboxUnavailable("needs Linux")
    if os.geteuid() != 0:
        raise SandboxUnavailable("needs root (mounts and namespaces)")
    for tool in ("unshare", "nsenter", "pivot_root", "findmnt", "setpriv"):
        if shutil.which(tool) is None:
            raise SandboxUnavailable(f"{tool} not found (util-linux)")
    if not os.access(SYSTEMD, os.X_OK):
        raise SandboxUnavailable(f"{SYSTEMD} not found (apt-get install systemd)")
    root = cgroup2_mount()
    if root is None:
        raise SandboxUnavailable("no cgroup2 hierarchy mounted on the host")
    return root


def _remove_stale_cgroups(parent: Path) -> None:
    """Cgroups left by sandboxes of test runs that were killed (named after their pytest pid).
    A live run's sandbox is left alone."""
    for cgroup in parent.glob(f"{NAME}-*"):
        owner = cgroup.name.rsplit("-", 1)[-1]
        if owner.isdigit() and int(owner) != os.getpid() and Path(f"/proc/{owner}").exists():
            continue
        _clear_cgroup(cgroup)


def _clear_cgroup(cgroup: Path, pid_ns: str | None = None) -> None:
    """SIGKILL whatever is left in the sandbox's cgroup (and PID namespace), wait until it is
    gone, remove the cgroups. PID 1's exit kills its namespace: this checks rather than trusts."""

    def left() -> list[int]:
        return cgroup_pids(cgroup) + (processes_in_namespace(pid_ns) if pid_ns else [])

    for pid in left():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not left(), 5, f"the processes of {cgroup} to be gone")
    remove_cgroup_tree(cgroup)


def _wait_for_pid1(proc: subprocess.Popen, timeout: float) -> int:
    """Host pid of systemd: the child unshare forks, once it has exec'ed systemd."""

    def pid1() -> int | None:
        if proc.poll() is not None:
            raise SandboxUnavailable(f"boot.sh exited with status {proc.returncode}")
        for child in _host_children(proc.pid):
            if _comm(child) == "systemd":
                return child
        return None

    return wait_for(pid1, timeout, "systemd to start as PID 1 of the sandbox", interval=0.01)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL unshare; --kill-child takes systemd, and with it the PID namespace, along."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _read_console(console: Any) -> str:
    if console.closed:
        return ""
    console.flush()
    console.seek(0)
    return console.read().decode("utf-8", "replace")[-20000:]


# -- the host must come out untouched ------------------------------------------------------------


class HostGuard:
    """Markers and a listing of the host's /etc, /run and /tmp, taken before the sandbox boots.

    /run and /etc/systemd are compared in full (type, size, mtime of every entry): the sandbox's
    systemd writes exactly there. The rest of /etc and /tmp are shared with other processes of
    the machine, so for them only the top-level names are compared (/tmp: none may disappear,
    which is what recipe B's systemd-tmpfiles-setup did), plus a marker file in each directory
    whose content must survive a sandbox that overwrites it.
    """

    DIRS = ("/etc", "/run", "/tmp")
    FULL = ("/run", "/etc/systemd")

    def __init__(self) -> None:
        self.token = f"{NAME}-marker-{os.getpid()}-{time.time_ns()}"
        self.markers = {d: Path(d) / f".{NAME}-marker-{os.getpid()}" for d in self.DIRS}
        for marker in self.markers.values():
            marker.write_text(self.token)
        self.before = self.snapshot(before=True)

    def _foreign_marker(self, name: str) -> bool:
        """Another test session's marker (two sessions may run at once: each has its own
        sandbox, and each creates and removes its markers while the other one watches)."""
        return name.startswith(f".{NAME}-marker-") and name != self.markers["/etc"].name

    def _names(self, directory: str, *, older_only: bool) -> list[str]:
        """Top-level names, less other sessions' markers. With `older_only` (the snapshot
        before the boot), also less entries this test session made itself: tests and
        multiprocessing create and remove /tmp entries while the sandbox runs, and only what
        existed before the session must survive it."""
        names = []
        for n in os.listdir(directory):
            # pymp-*: multiprocessing's scratch dirs, which other Python processes on the
            # machine create and remove at will.
            if self._foreign_marker(n) or n.startswith("pymp-"):
                continue
            if older_only:
                try:
                    if os.lstat(os.path.join(directory, n)).st_ctime >= procs.SESSION_STARTED:
                        continue
                except OSError:
                    continue
            names.append(n)
        return sorted(names)

    def snapshot(self, *, before: bool = False) -> dict[str, object]:
        state: dict[str, object] = {}
        for root in self.FULL:
            for dirpath, dirs, files in os.walk(root):
                for name in dirs + files:
                    path = os.path.join(dirpath, name)
                    if self._foreign_marker(name):
                        continue
                    try:
                        st = os.lstat(path)
                    except OSError:
                        continue
                    state[path] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
        state["/etc/*"] = self._names("/etc", older_only=False)
        state["/tmp/*"] = self._names("/tmp", older_only=before)
        return state

    def changes(self) -> list[str]:
        """What differs from before the boot, one readable line per difference."""
        after = self.snapshot()
        found = []
        for path in sorted(set(self.before) | set(after)):
            old, new = self.before.get(path), after.get(path)
            if path == "/tmp/*":
                gone = set(old or []) - set(new or [])  # type: ignore[arg-type]
                if gone:
                    found.append(f"/tmp lost {sorted(gone)}")
            elif old != new:
                found.append(f"{path}: {old} -> {new}")
        for marker in self.markers.values():
            try:
                content = marker.read_text()
            except OSError as exc:
                content = f"<{exc}>"
            if content != self.token:
                found.append(f"{marker}: marker now {content!r}")
        return found

    def remove_markers(self) -> None:
        for marker in self.markers.values():
            marker.unlink(missing_ok=True)
