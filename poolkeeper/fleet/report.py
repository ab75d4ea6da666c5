"""`poolkeeper status` in fleet mode: every host of the fleet (id, incarnation, version, spec
hash, lease, capacity, busy), from the running daemon's answer, or from the database when no
daemon answers here; and a warning when live hosts run different specs."""

from __future__ import annotations

from typing import Any, TextIO

from poolkeeper.config.settings import Config
from poolkeeper.printable import printable


def fleet_view(config: Config, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fleet's hosts: the daemon's view when it answered, else read from the database
    (None, with `error`, when that cannot be read either). None outside fleet mode."""
    if config.fleet is None:
        return None
    if live is not None and isinstance(live.get("fleet"), dict):
        view = dict(live["fleet"])
    else:
        view = {"host_id": None, "incarnation": None, "lease": config.fleet.lease}
        view["hosts"], view["error"] = _read_hosts(config.fleet.database)
    hosts = [h for h in view.get("hosts") or [] if isinstance(h, dict)]
    specs = {str(h.get("spec_hash")) for h in hosts if h.get("live")}
    view["hosts"] = hosts
    view["specs_differ"] = len(specs) > 1
    return view


def fleet_document(view: dict[str, Any]) -> dict[str, Any]:
    """`status --json`'s `fleet` (docs/json.md): times as RFC 3339."""
    from poolkeeper.reportjson import rfc3339

    hosts = [
        {**h, "started": rfc3339(h.get("started")), "lease_until": rfc3339(h.get("lease_until"))}
        for h in view["hosts"]
    ]
    return {
        "host_id": view.get("host_id"),
        "incarnation": view.get("incarnation"),
        "lease": view.get("lease"),
        "specs_differ": view["specs_differ"],
        "hosts": hosts,
    }


def _read_hosts(url: str) -> tuple[list[dict[str, Any]], str | None]:
    import psycopg

    from poolkeeper.fleet import db

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET default_transaction_read_only = on")
            return [h._asdict() for h in db.hosts(conn)], None
    except psycopg.Error as exc:
        return [], " ".join(str(exc).split()) or type(exc).__name__


def print_fleet(view: dict[str, Any], out: TextIO, now: float) -> None:
    from poolkeeper.report import table

    hosts = view["hosts"]
    live = sum(1 for h in hosts if h.get("live"))
    me = view.get("host_id")
    here = f", this is {printable(str(me))}" if me else ""
    out.write(f"fleet: {live} live host{'s' if live != 1 else ''}{here}\n")
    if view.get("error"):
        out.write(f"fleet: database not readable: {printable(str(view['error']))}\n")
    if view["specs_differ"]:
        out.write("fleet: WARNING: live hosts run different specs (SPEC differs below)\n")
    rows: list[tuple[str, ...]] = [("HOST", "INCARNATION", "VERSION", "SPEC", "WORKERS", "BUSY", "LEASE", "STATE")]
    for h in hosts:
        left = (h.get("lease_until") or 0.0) - now
        rows.append(
            (
                printable(str(h.get("host_id"))),
                str(h.get("incarnation"))[:8],
                printable(str(h.get("version"))),
                str(h.get("spec_hash"))[:12],
                str(h.get("capacity")),
                str(h.get("busy")),
                f"{left:.0f}s left" if h.get("live") else "ended",
                "live" if h.get("live") else "gone",
            )
        )
    table(rows, out)
