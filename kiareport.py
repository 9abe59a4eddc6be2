"""What ``--check`` and ``--route`` print, for people and for scripts, written from one row per route.

Its own module because the two outputs must not disagree: the text and the
JSON of a route are both written from its ``RouteRow`` (every address of a
pool, the allow-list as written networks), and the row is built in one place.
It reads a checked ``Config`` and writes text; it validates nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TextIO

from kiaconfig import Backend, Config, Settings, unicode_form


@dataclass(frozen=True)
class RouteRow:
    """One route as ``--check`` and ``--route`` show it: the text and the JSON are both written from it.

    Built in one place (``route_row``) so that the two outputs cannot disagree
    on what a route holds: every address of a pool, the allow-list as written
    networks (normalised, ``"10.0.0.0/8"``).
    """

    match: str  # exact, wildcard or default
    pattern: str  # the name lookup compares: the A-label, "*.suffix" or "*"
    unicode: str | None  # the Unicode form of an xn-- pattern, for people
    addresses: tuple[str, ...]
    proxy_protocol: str | None
    allow: tuple[str, ...] | None  # None: every client
    quic_addresses: tuple[str, ...] | None = None  # the QUIC listener's, when not the same as ``addresses``

    def plain(self) -> dict[str, Any]:
        """The row as JSON values for scripts; every key is there even when it holds nothing."""
        return {
            "addresses": list(self.addresses),
            "proxy_protocol": self.proxy_protocol,
            "allow": None if self.allow is None else list(self.allow),
            "unicode": self.unicode,
            "quic_addresses": None if self.quic_addresses is None else list(self.quic_addresses),
        }


def route_row(pattern: str, backend: Backend) -> RouteRow:
    """The row of one route entry of a table (``RouteTable.rows`` or ``match`` give the pair)."""
    return RouteRow(
        match="default" if pattern == "*" else "wildcard" if pattern.startswith("*.") else "exact",
        pattern=pattern,
        unicode=unicode_form(pattern),
        addresses=tuple(map(str, backend.addresses)),
        proxy_protocol=backend.proxy_protocol,
        allow=None if backend.allow is None else tuple(map(str, backend.allow)),
        quic_addresses=None if backend.quic_addresses is None else tuple(map(str, backend.quic_addresses)),
    )


def plain_config(cfg: Config) -> dict[str, Any]:
    """The checked config as JSON values, for ``--check --json``: routes keyed by their A-label, every setting.

    Settings are the effective ones, command-line options included; addresses become strings.
    """
    settings = {}
    for item in dataclasses.fields(Settings):
        value = getattr(cfg.settings, item.name)
        settings[item.name] = [str(v) for v in value] if isinstance(value, tuple) else value
    return {
        "ok": True,
        "source": cfg.source,
        "http_backends": {pattern: route_row(pattern, b).plain() for pattern, b in cfg.http_routes.rows()},
        "https_backends": {pattern: route_row(pattern, b).plain() for pattern, b in cfg.https_routes.rows()},
        "gateway": settings,
    }


def print_routes(cfg: Config, out: TextIO) -> None:
    """The route table as lookup sees it; a name with ``xn--`` labels shows its Unicode form beside it."""
    s = cfg.settings
    out.write(f"{cfg.source}: OK\n")
    if s.trusted_proxies:
        out.write(f"trusted proxies (a PROXY header required): {', '.join(map(str, s.trusted_proxies))}\n")
    for name, table, listen in (
        ("http", cfg.http_routes, s.http_listen),
        ("https", cfg.https_routes, s.https_listen),
    ):
        where = ", ".join(map(str, listen)) or "off"
        out.write(f"{name} listener: {where}; {len(table)} route{'s' if len(table) != 1 else ''}\n")
        if name == "https" and s.quic_listen:
            out.write(f"  quic listener (UDP, the same routes): {', '.join(map(str, s.quic_listen))}\n")
        if name == "http" and s.http_strict_host:
            why = "" if "http_strict_host" in cfg.gateway_keys else " (the default while a route has an allow-list)"
            out.write(f"  strict keep-alive routing: every request's Host is checked{why}\n")
        rows = [route_row(pattern, backend) for pattern, backend in table.rows()]
        shown = [f"{row.pattern} ({row.unicode})" if row.unicode else row.pattern for row in rows]
        width = max(map(len, shown), default=0)
        for pattern, row in zip(shown, rows):
            notes = route_notes(row)
            extra = f"  ({'; '.join(notes)})" if notes else ""
            out.write(f"  {pattern.ljust(width)}  ->  {', '.join(row.addresses)}{extra}\n")


def route_notes(row: RouteRow) -> list[str]:
    """What a route holds beyond its addresses, for people: the pool, the PROXY header, the allow-list."""
    notes = []
    if len(row.addresses) > 1:
        notes.append(f"pool of {len(row.addresses)}, round-robin")
    if row.proxy_protocol:
        notes.append(f"proxy_protocol {row.proxy_protocol}")
    if row.allow is not None:
        notes.append(f"allow {', '.join(row.allow)}")
    if row.quic_addresses is not None:
        notes.append(f"QUIC to {', '.join(row.quic_addresses)}")
    return notes


def route_lookup(cfg: Config, name: str) -> dict[str, RouteRow | str]:
    """Per listener, the row of the entry a client naming ``name`` gets, or why none: "none" or "off".

    "none": the listener routes no such name (the client is refused); "off":
    the listener has no listen address. Both ``--route`` outputs are written from it.
    """
    found: dict[str, RouteRow | str] = {}
    listeners = [
        ("http", cfg.http_routes, cfg.settings.http_listen),
        ("https", cfg.https_routes, cfg.settings.https_listen),
    ]
    if cfg.settings.quic_listen:  # shown only where it is on: QUIC is off by default
        listeners.append(("quic", cfg.https_routes, cfg.settings.quic_listen))
    for listener, table, listen in listeners:
        match = table.match(name) if listen else None
        found[listener] = route_row(*match) if match else "none" if listen else "off"
    return found


def route_report(cfg: Config, name: str) -> dict[str, object]:
    """What a client naming ``name`` gets on each listener, as JSON values for ``--route --json``.

    ``match`` is exact, wildcard or default (``pattern`` says which entry), none
    (the client is refused), or off (the listener has no listen address).
    """
    found = route_lookup(cfg, name)
    report: dict[str, object] = {
        "ok": True,
        "source": cfg.source,
        "name": name,
        "unicode": unicode_form(name),
        "routed": any(isinstance(row, RouteRow) for row in found.values()),
    }
    for listener, row in found.items():
        if isinstance(row, RouteRow):
            report[listener] = {"match": row.match, "pattern": row.pattern, **row.plain()}
        else:
            report[listener] = {
                "match": row,
                "pattern": None,
                "addresses": [],
                "proxy_protocol": None,
                "allow": None,
                "unicode": None,
                "quic_addresses": None,
            }
    return report


def print_route(cfg: Config, name: str, out: TextIO) -> None:
    """``--route`` for people: the name, then a line per listener in print_routes' style."""
    unicode = unicode_form(name)
    out.write(f"{name} ({unicode})\n" if unicode else f"{name}\n")
    for listener, row in route_lookup(cfg, name).items():
        if row == "off":
            out.write(f"  {listener:<5}  off (no listen address)\n")
        elif row == "none":
            out.write(f"  {listener:<5}  no route\n")
        else:
            why = "; ".join([f"{row.match} {row.pattern}", *route_notes(row)])
            out.write(f"  {listener:<5}  ->  {', '.join(row.addresses)}  ({why})\n")
