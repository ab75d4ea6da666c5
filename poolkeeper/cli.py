"""Command line: `poolkeeper COMMAND ...`. Each command is a small function returning an exit code."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from poolkeeper import __version__, exitcodes
from poolkeeper.printable import printable

if TYPE_CHECKING:  # typing only: `run` must not import these on its way to READY=1
    from collections.abc import Callable

    from poolkeeper.config.loader import ConfigError
    from poolkeeper.config.settings import Config
    from poolkeeper.pool.supervisor import WorkerPool
    from poolkeeper.service.notify import Notifier


def _cmd_check(args: argparse.Namespace) -> int:
    return check_file(args.config, out=sys.stdout, err=sys.stderr)


def check_file(path: str, out: TextIO, err: TextIO) -> int:
    """`poolkeeper check FILE`: 'FILE: ok, N jobs' and 0, or every problem and 78 (66 when the
    file cannot be read). Never a traceback: an internal bug is one line and 70."""
    from poolkeeper.config.loader import ConfigError, load_config
    from poolkeeper.config.rules import exception_line

    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=err)
        return exc.exit_code
    except Exception as exc:  # a bug of ours; the fuzz tests keep this unreachable
        problem = printable(f"{path}: internal error: {exception_line(exc)}")
        print(f"{problem}; please report this bug", file=err)
        return exitcodes.SOFTWARE
    count = len(config.jobs)
    print(f"{printable(path)}: ok, {count} job{'' if count == 1 else 's'}", file=out)
    return exitcodes.OK


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from poolkeeper.config.schema import json_schema

    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return exitcodes.OK


def _cmd_unit(args: argparse.Namespace) -> int:
    from poolkeeper.service import unit

    if args.offline:
        sys.stdout.write(unit.OFFLINE)
        return exitcodes.OK
    sys.stdout.write(unit.unit_text(args.instance))
    if args.instance is not None:  # the template serves every instance: say how to use it
        print(
            "# install as /etc/systemd/system/poolkeeper@.service, the config as "
            f"/etc/poolkeeper/{args.instance}.yaml, then: "
            f"systemctl enable --now poolkeeper@{args.instance}",
            file=sys.stderr,
        )
    return exitcodes.OK


def default_config_path() -> str:
    """$CONFIGURATION_DIRECTORY/poolkeeper.yaml under systemd, else /etc/poolkeeper/poolkeeper.yaml."""
    base = os.environ.get("CONFIGURATION_DIRECTORY", "/etc/poolkeeper").split(":")[0]
    return os.path.join(base, "poolkeeper.yaml")


def _print_config_errors(exc: ConfigError) -> None:
    for issue in exc.issues:
        print(issue, file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    import signal

    from poolkeeper.config import validation_cache
    from poolkeeper.signals import held_during_start

    signal.pthread_sigmask(signal.SIG_BLOCK, held_during_start())

    path = args.config or default_config_path()
    if _host_id_refused(args, None):
        return exitcodes.USAGE
    cache = None if args.no_config_cache else validation_cache.cache_dir()
    cached, why = validation_cache.lookup(path, cache) if cache else (None, "")
    if cached is not None:
        if _host_id_refused(args, cached):
            return exitcodes.USAGE
        return _run_cached(args, path, _host_id_applied(args, cached), why)
    return _run_validated(args, path, cache, why)


def _run_validated(args: argparse.Namespace, path: str, cache: str | None, why: str) -> int:
    """Validate the config in full (and cache the result), then run it."""
    from poolkeeper.config import validation_cache
    from poolkeeper.config.hints import pool_hints
    from poolkeeper.pool.prestart import start_forkserver
    from poolkeeper.service import logs
    from poolkeeper.service.notify import Notifier

    target = logs.setup(args.log_target, args.log_level.upper())
    log = logs.get_logger()
    notifier = Notifier()
    if cache is not None:
        log.info("config %s: validating (%s)", path, why)
    hints = pool_hints(path)
    prestarted = hints is not None and start_forkserver(*hints)
    inputs = validation_cache.Inputs()
    from poolkeeper.config.loader import ConfigError, load_config

    try:
        config = load_config(path, inputs=inputs)
    except ConfigError as exc:
        if prestarted:
            from poolkeeper.pool.helper_processes import stop_prestarted

            stop_prestarted()
        _print_config_errors(exc)
        from poolkeeper.daemon.status import first_of

        summary = first_of([str(issue) for issue in exc.issues]) if exc.issues else str(exc)
        # ERRNO= makes `systemctl status` show "Error: 22 (Invalid argument)" (or 2, ENOENT).
        errno_value = errno.ENOENT if exc.exit_code == exitcodes.NOINPUT else errno.EINVAL
        notifier.fatal(f"config error: {summary}", errno=errno_value)
        return exc.exit_code
    if cache is not None:
        problem = validation_cache.store(config, inputs, cache)
        if problem:
            log.info("config %s: validated; not cached: %s", path, problem)
    if _host_id_refused(args, config):
        if prestarted:
            from poolkeeper.pool.helper_processes import stop_prestarted

            stop_prestarted()
        return exitcodes.USAGE
    return _run_daemon(_host_id_applied(args, config), target, notifier, host_id=args.host_id)


def _run_cached(args: argparse.Namespace, path: str, config: Config, why: str) -> int:
    """Start from a cached validation. READY=1 waits for the workers, so they are asked for
    as soon as possible: this process imports what the forkserver preloads for poolkeeper,
    forks it (ready at once, it only has the job modules left to import) and starts the
    pool; setting up logging and importing the daemon then overlap the workers' start."""
    from poolkeeper.pool import helper_processes
    from poolkeeper.pool.prestart import start_forkserver
    from poolkeeper.pool.supervisor import pool_for
    from poolkeeper.service import logs

    level = args.log_level.upper()
    if config.pool.start_method == "forkserver":
        helper_processes.import_own_preload()
    start_forkserver(config.pool.start_method, config.pool.preload, config.pythonpath)
    pool = pool_for(config, logs.resolve_target(args.log_target), level)
    pool.start()
    target = logs.setup(args.log_target, level)
    logs.get_logger().info("config %s: %s; not validated again", path, why)
    from poolkeeper.service.notify import Notifier

    return _run_daemon(config, target, Notifier(), pool, host_id=args.host_id)


def _host_id_refused(args: argparse.Namespace, config: Config | None) -> bool:
    """`run --host-id NAME` cannot be applied: NAME is no host id, or the spec (once read)
    has no fleet: section. True after saying so in one line on stderr."""
    from poolkeeper.config.settings import host_id_ok

    name = args.host_id
    if name is None:
        return False
    if not host_id_ok(name):
        problem = f"'{name}' is not a host id: use letters, digits and . _ - (1 to 64 characters)"
    elif config is not None and config.fleet is None:
        problem = f"{config.path} has no fleet: section, so there is no host id to set"
    else:
        return False
    print(f"poolkeeper run: --host-id: {printable(problem)}", file=sys.stderr)
    return True


def _host_id_applied(args: argparse.Namespace, config: Config) -> Config:
    return config if args.host_id is None else config.with_host_id(args.host_id)


def _run_daemon(
    config: Config,
    target: str,
    notifier: Notifier,
    pool: WorkerPool | None = None,
    *,
    host_id: str | None = None,
) -> int:
    from poolkeeper.daemon.mainloop import Daemon

    daemon = Daemon(config, log_target=target, notifier=notifier, pool=pool, host_id=host_id)
    code = daemon.run()
    _exit_without_teardown(code)
    return code  # not reached


def _exit_without_teardown(code: int) -> None:
    """Leave at once after a drain: every worker is joined and the state DB is closed, so
    tearing the interpreter down (modules, pydantic's schemas) would only add ~50 ms to
    every `systemctl stop`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _load_for_reading(path: str | None) -> Config:
    """The config, for commands that read state: targets are not imported."""
    from poolkeeper.config.loader import load_config

    return load_config(path or default_config_path(), import_targets=False)


def _with_config(
    func: Callable[[argparse.Namespace, Config], int],
) -> Callable[[argparse.Namespace], int]:
    """Run a reading command; a bad config is reported like `check` does, exit 78/66."""

    def wrapper(args: argparse.Namespace) -> int:
        from poolkeeper.config.loader import ConfigError

        try:
            config = _load_for_reading(args.config)
        except ConfigError as exc:
            _print_config_errors(exc)
            return exc.exit_code
        return func(args, config)

    return wrapper


# `-n` beyond these is capped (and said): more would only fill the terminal and the memory.
MAX_HISTORY = 100_000
MAX_NEXT = 1000


def _count(text: str) -> int:
    """argparse type of -n: a whole number, at least 1 (argparse makes an error exit 64)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {shown!r}")
    return value


def _capped(n: int, most: int) -> int:
    if n > most:
        print(f"poolkeeper: -n {n} is more than {most}; showing at most {most}", file=sys.stderr)
    return min(n, most)


def _state_unreadable(exc: Exception) -> int:
    """One line for a state DB that `history`/`status` cannot read, and EX_IOERR: not an
    empty table, which would pass for 'no runs'."""
    print(f"poolkeeper: {printable(exc)}", file=sys.stderr)
    return exitcodes.IOERR


def _history_filters(args: argparse.Namespace) -> tuple[float | None, str | None] | None:
    """--since and --outcome as (epoch seconds, outcome), or None after one line on stderr.
    Checked here, not by argparse: a usage error is one line, not argparse's usage dump."""
    from poolkeeper.outcomes import RUNNING, Outcome

    since = None
    if args.since is not None:
        from poolkeeper.config.durations import parse_duration

        try:
            since = time.time() - parse_duration(args.since)
        except ValueError as exc:
            print(f"poolkeeper: --since: {printable(exc)}", file=sys.stderr)
            return None
    known = [*Outcome, RUNNING]
    if args.outcome is not None and args.outcome not in known:
        shown = printable(args.outcome[:40])
        names = ", ".join(known)
        print(f"poolkeeper: --outcome: unknown outcome '{shown}' (known: {names})", file=sys.stderr)
        return None
    return since, args.outcome


@_with_config
def _cmd_history(args: argparse.Namespace, config: Config) -> int:
    from poolkeeper.report import open_readonly, print_history
    from poolkeeper.state.store import StateUnreadable

    if args.job and args.job not in config.jobs:
        print(
            f"poolkeeper: no job named '{printable(args.job)}' in {printable(config.path)}",
            file=sys.stderr,
        )
        return exitcodes.USAGE
    filters = _history_filters(args)
    if filters is None:
        return exitcodes.USAGE
    since, outcome = filters
    limit = _capped(args.n, MAX_HISTORY)
    try:
        store = open_readonly(config)
        try:
            records = store.history(args.job, limit=limit, since=since, outcome=outcome)
        finally:
            store.close()
    except StateUnreadable as exc:
        return _state_unreadable(exc)
    if args.json:
        from poolkeeper.reportjson import dump, run_document

        dump([run_document(r) for r in records], sys.stdout)
    else:
        print_history(records, sys.stdout)
    return exitcodes.OK


@_with_config
def _cmd_status(args: argparse.Namespace, config: Config) -> int:
    from poolkeeper.report import open_readonly, print_status
    from poolkeeper.state.store import StateUnreadable

    live = _ask_quietly(args.socket, config, {"command": "status"})
    try:
        store = open_readonly(config)
        try:  # reads the DB before it prints anything
            fleet = _fleet_view(config, live)
            if args.json:
                from poolkeeper.reportjson import dump, status_document

                document = status_document(config, store.last_outcomes(), live, time.time())
                if fleet is not None:
                    from poolkeeper.fleet.report import fleet_document

                    document["fleet"] = fleet_document(fleet)
                dump(document, sys.stdout)
            else:
                print_status(config, store, sys.stdout, live=live)
                if fleet is not None:
                    from poolkeeper.fleet.report import print_fleet

                    print_fleet(fleet, sys.stdout, time.time())
        finally:
            store.close()
    except StateUnreadable as exc:
        return _state_unreadable(exc)
    return exitcodes.OK


def _fleet_view(config: Config, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fleet's hosts for `status` (fleet mode only: psycopg is imported then)."""
    if config.fleet is None:
        return None
    from poolkeeper.fleet.report import fleet_view

    return fleet_view(config, live)


@_with_config
def _cmd_top(args: argparse.Namespace, config: Config) -> int:
    from poolkeeper.config.durations import parse_duration
    from poolkeeper.state import identity
    from poolkeeper.state.store import StateUnreadable

    try:
        interval = parse_duration(args.interval)
    except ValueError as exc:
        print(f"poolkeeper: --interval: {printable(exc)}", file=sys.stderr)
        return exitcodes.USAGE
    if interval < 0.1:
        print("poolkeeper: --interval: at least 100ms", file=sys.stderr)
        return exitcodes.USAGE
    from poolkeeper import top  # rich comes with it: only this command pays for it

    try:
        return top.run(config, args.socket or identity.socket_path(config), interval)
    except StateUnreadable as exc:
        return _state_unreadable(exc)


def _ask_quietly(
    socket_path: str | None, config: Config, payload: dict[str, Any]
) -> dict[str, Any] | None:
    """The running daemon's answer, or None if there is no daemon to ask."""
    from poolkeeper.service import control
    from poolkeeper.state import identity

    # The config is loaded already: no need to read its state.path again (socket_of_config).
    path = socket_path or identity.socket_path(config)
    try:
        reply = None if path is None else control.request(path, payload, timeout=5.0)
    except control.NotListening:
        return None
    except control.ControlError as exc:  # a daemon is there: say why its answer is not used
        _unusable_answer(str(exc))
        return None
    if reply is not None and reply.get("ok") is not True:
        _unusable_answer(f"the daemon says: {reply.get('message')}")
        return None
    return reply


def _unusable_answer(why: str) -> None:
    print(
        f"poolkeeper: {printable(why)}; showing the jobs of the file and the state DB instead",
        file=sys.stderr,
    )


def _cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload; with --wait, report its verdict (the unit's
    ExecReload=, which makes `systemctl reload` fail on a rejected file)."""
    return _ask_daemon(args, {"command": "reload"}, wait=args.wait)


def _cmd_by_hand(args: argparse.Namespace) -> int:
    """pause, resume, run-now: one job, in the running daemon."""
    return _ask_daemon(args, {"command": args.command, "job": args.job})


def _cmd_metrics(args: argparse.Namespace) -> int:
    """print the running daemon's metrics, Prometheus text format (on with the spec's
    `metrics:` section; docs/monitoring.md)"""
    return _ask_daemon(args, {"command": "metrics"})


def _ask_daemon(args: argparse.Namespace, payload: dict[str, Any], *, wait: bool = True) -> int:
    """Send one request over the control socket (poolkeeper.service.control) and report the reply."""
    from poolkeeper.config.yamlload import LoadError
    from poolkeeper.service import control

    config = args.config or default_config_path()
    try:
        path = args.socket or control.socket_of_config(config)
    except OSError as exc:  # as the commands that load the config say it
        reason = printable(exc.strerror or exc)
        print(f"{printable(config)}: cannot read the file: {reason}", file=sys.stderr)
        return exitcodes.NOINPUT
    except LoadError as exc:
        print(exc.issue, file=sys.stderr)
        return exitcodes.CONFIG
    try:
        if path is None:
            raise control.ControlError(
                "this config keeps no state file (state.path ':memory:'), so its daemon has "
                "no control socket; send it SIGHUP to reload"
            )
        reply = control.request(path, payload, wait=wait)
    except control.ControlError as exc:
        print(f"poolkeeper: {printable(exc)}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    if reply is None:
        print(f"poolkeeper: {payload['command']} requested ({printable(path)})")
        return exitcodes.OK
    for problem in reply.get("problems") or ():
        print(printable(problem), file=sys.stderr)
    ok = reply.get("ok") is True
    message = printable(reply.get("message", ""), newlines=True)  # it may echo a job name
    print(message, file=sys.stdout if ok else sys.stderr)
    if ok:
        return exitcodes.OK
    code = reply.get("exit")
    return code if isinstance(code, int) and code > 0 else exitcodes.UNAVAILABLE


@_with_config
def _cmd_next(args: argparse.Namespace, config: Config) -> int:
    from poolkeeper.report import print_next

    job = config.jobs.get(args.job)
    if job is None:
        known = ", ".join(config.jobs) or "none"
        print(f"poolkeeper: no job named '{printable(args.job)}' (jobs: {known})", file=sys.stderr)
        return exitcodes.USAGE
    n = _capped(args.n, MAX_NEXT)
    if args.json:
        from poolkeeper.report import fire_times
        from poolkeeper.reportjson import dump, next_document

        dump(next_document(job, fire_times(job, n, time.time())), sys.stdout)
    else:
        print_next(job, n, sys.stdout)
    return exitcodes.OK


def build_parser(*, only_run: bool = False) -> argparse.ArgumentParser:
    """The command line. only_run: just the `run` command (~8 ms less on the daemon's way to
    READY=1: every subparser costs argparse a help formatter and gettext lookups)."""
    parser = argparse.ArgumentParser(
        prog="poolkeeper",
        description="A systemd-native job daemon: runs the Python jobs of a YAML spec in a "
        "supervised process pool.",
    )
    parser.add_argument("--version", action="version", version=f"poolkeeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground (the unit's ExecStart)")
    p.add_argument(
        "config",
        metavar="CONFIG",
        nargs="?",
        help="path to the YAML job spec (default: $CONFIGURATION_DIRECTORY/poolkeeper.yaml "
        "or /etc/poolkeeper/poolkeeper.yaml)",
    )
    p.add_argument(
        "--log-target",
        choices=("auto", "journal", "stderr"),
        default="auto",
        help="auto: the journal when stderr is connected to journald, else stderr",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
    )
    p.add_argument(
        "--no-config-cache",
        action="store_true",
        help="validate the config in full even if its inputs are unchanged since the last "
        "start (see docs/config.md, 'Start-up and the validation cache')",
    )
    p.add_argument(
        "--host-id",
        metavar="NAME",
        help="this host's id in the fleet (overrides fleet.host_id; the spec needs a fleet: "
        "section)",
    )
    p.set_defaults(func=_cmd_run)
    if not only_run:
        _add_other_commands(sub)
    return parser


def _add_other_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    p = sub.add_parser("check", help="validate a job spec; exit 0 if valid, 78 if not")
    p.add_argument("config", metavar="CONFIG", help="path to the YAML job spec")
    p.set_defaults(func=_cmd_check)

    config_help = "the YAML job spec (default: the daemon's, see `run --help`)"
    p = sub.add_parser(
        "status",
        help="jobs, next fire, what each is doing, last outcome (from the running daemon "
        "when it answers, else from the file and the state DB)",
    )
    _add_socket_options(p, config_help)
    _add_json_option(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "top",
        help="a live view of the running daemon: its jobs, workers, runs/s (q quits; one "
        "plain snapshot when stdout is not a terminal)",
    )
    p.add_argument(
        "--interval", default="1s", metavar="DURATION", help="between refreshes (default 1s)"
    )
    _add_socket_options(p, config_help)
    p.set_defaults(func=_cmd_top)

    p = sub.add_parser("history", help="recent runs, newest first (from the state DB)")
    p.add_argument("job", metavar="JOB", nargs="?", help="only this job's runs")
    p.add_argument(
        "-n", type=_count, default=50, help=f"how many runs (default 50, at most {MAX_HISTORY})"
    )
    p.add_argument(
        "--since",
        metavar="DURATION",
        help="only runs started within DURATION before now (e.g. 30m, 1h, 2d)",
    )
    p.add_argument(
        "--outcome",
        metavar="OUTCOME",
        help="only runs of this outcome (succeeded, failed, timeout, lost, killed, running)",
    )
    p.add_argument("--config", "-c", metavar="CONFIG", help=config_help)
    _add_unit_option(p)
    _add_json_option(p)
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("next", help="upcoming fire times of a job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-n", type=_count, default=5, help=f"how many (default 5, at most {MAX_NEXT})")
    p.add_argument("--config", "-c", metavar="CONFIG", help=config_help)
    _add_unit_option(p)
    _add_json_option(p)
    p.set_defaults(func=_cmd_next)

    p = sub.add_parser(
        "reload",
        help="make the running daemon re-read its config (a bad file changes nothing)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the outcome: print it (the errors of a rejected file) and exit 0, or "
        "78 if the file was rejected (the unit's ExecReload=)",
    )
    _add_socket_options(p, config_help)
    p.set_defaults(func=_cmd_reload)

    for name, what in (
        ("pause", "no new runs of JOB until `resume` (loop replicas are stopped)"),
        ("resume", "undo `pause`"),
        ("run-now", "start a run of JOB now, outside its schedule"),
    ):
        p = sub.add_parser(name, help=f"{what} (in the running daemon)")
        p.add_argument("job", metavar="JOB")
        _add_socket_options(p, config_help)
        p.set_defaults(func=_cmd_by_hand)

    p = sub.add_parser("metrics", help=_cmd_metrics.__doc__)
    _add_socket_options(p, config_help)
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser(
        "unit", help="print a systemd unit for this installation (its real ExecStart path)"
    )
    p.add_argument(
        "--instance",
        metavar="NAME",
        help="print the template poolkeeper@.service (poolkeeper@NAME runs "
        "/etc/poolkeeper/NAME.yaml)",
    )
    p.add_argument(
        "--offline", action="store_true", help="print the hardening drop-in for offline jobs"
    )
    p.set_defaults(func=_cmd_unit)

    p = sub.add_parser("schema", help="print the JSON Schema of the job spec")
    p.set_defaults(func=_cmd_schema)


def _add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON document instead of the table (fields: docs/json.md, a stable interface)",
    )


def _add_unit_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--unit",
        "-u",
        metavar="UNIT",
        help="the daemon of this system unit (e.g. poolkeeper, poolkeeper@demo): its config, "
        "state database and control socket, as systemd knows them",
    )


def _add_socket_options(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument("--config", "-c", metavar="CONFIG", help=config_help)
    _add_unit_option(p)
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's control socket (default: $RUNTIME_DIRECTORY/control.sock, else "
        "next to the config's state database)",
    )


def _adopt_unit(args: argparse.Namespace) -> str | None:
    """--unit: act as the unit's own processes would (its state and runtime directories, and
    the config its ExecStart= runs, unless -c names another). Returns why not, or None."""
    from poolkeeper.service.unit import locate

    try:
        found = locate(args.unit)
    except LookupError as exc:
        return str(exc)
    if found.state_directory:
        os.environ["STATE_DIRECTORY"] = found.state_directory
    if found.runtime_directory:
        os.environ["RUNTIME_DIRECTORY"] = found.runtime_directory
    if args.config is None and "run" in found.argv:
        run_args = found.argv[found.argv.index("run") + 1 :]
        args.config = build_parser(only_run=True).parse_known_args(["run", *run_args])[0].config
    return None


def ensure_stdio() -> None:
    """Started with fd 0, 1 or 2 closed (`poolkeeper run spec >&-`): put /dev/null there
    first thing. Else the next open() (the state DB, the control socket, a log file) would
    get that number, and whatever is printed or logged would be written into it; Python also
    leaves sys.stdout or sys.stderr None then, and every print or log record would fail."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed: open() returns the lowest free descriptor, this one
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # cannot happen (0..fd-1 are open by now); never leak it
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            stream = open(fd, mode, buffering=1, closefd=False, errors="backslashreplace")
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)


def main(argv: list[str] | None = None) -> int:
    ensure_stdio()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only_run=argv[:1] == ["run"])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; sysexits says 64
        return exitcodes.USAGE if exc.code not in (0, None) else exitcodes.OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    if getattr(args, "unit", None):
        problem = _adopt_unit(args)
        if problem is not None:
            print(f"poolkeeper: {printable(problem)}", file=sys.stderr)
            return exitcodes.UNAVAILABLE
    func: Callable[[argparse.Namespace], int] = args.func  # set by every subparser
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return exitcodes.OK
    except Exception as exc:  # a bug of ours: one line for the user, the details in the log
        logging.getLogger("poolkeeper").debug("internal error", exc_info=True)
        print(
            f"poolkeeper: internal error: {type(exc).__name__}: {printable(exc)} "
            f"(please report it{_traceback_hint(args)})",
            file=sys.stderr,
        )
        return exitcodes.SOFTWARE


def _traceback_hint(args: argparse.Namespace) -> str:
    """How to see the traceback of an internal error: only `run` has --log-level (and sets up
    the log that the traceback goes to); the other commands log nowhere, so they offer nothing."""
    if not hasattr(args, "log_level"):
        return ""
    return "; rerun with --log-level debug for the traceback"
