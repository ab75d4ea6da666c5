"""Command line: `poolkeeper COMMAND ...`. Each command is a small function returning an exit code."""

from __future__ import annotations

import argparse
import sys

from poolkeeper import __version__, exitcodes


def _cmd_check(args: argparse.Namespace) -> int:
    from poolkeeper.check import check_file

    return check_file(args.config, out=sys.stdout, err=sys.stderr)


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from poolkeeper.schema import json_schema

    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return exitcodes.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolkeeper",
        description="A systemd-native job daemon: runs the Python jobs of a YAML spec in a "
        "supervised process pool.",
    )
    parser.add_argument("--version", action="version", version=f"poolkeeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", help="validate a job spec; exit 0 if valid, 78 if not")
    p.add_argument("config", metavar="CONFIG", help="path to the YAML job spec")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("schema", help="print the JSON Schema of the job spec")
    p.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; sysexits says 64
        return exitcodes.USAGE if exc.code not in (0, None) else exitcodes.OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return exitcodes.OK
