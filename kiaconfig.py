"""Load and validate servers.toml into frozen route tables and settings.

Its own module because validation is a job of its own: a pure ``validate``
over the parsed mapping, shared by start-up, ``--check`` and SIGHUP reload, so
a file that one of them accepts the others accept too. Every error names the
file, the table and the key. It opens no socket and starts nothing.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sniff import MAX_PREAMBLE, normalize_domain

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

PROXY_PROTOCOLS = ("v1", "v2")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Address:
    """A ``host:port`` pair; ``ip`` is set when the host is an IP literal (no resolver needed)."""

    host: str
    port: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Backend:
    address: Address
    proxy_protocol: str | None = None

    def __str__(self) -> str:
        return str(self.address)


@dataclass(frozen=True)
class RouteTable:
    """Exact names, then the longest ``*.`` suffix, then ``"*"``."""

    exact: Mapping[str, Backend] = field(default_factory=dict)
    wildcard: Mapping[str, Backend] = field(default_factory=dict)  # keyed by the suffix after "*."
    default: Backend | None = None

    def lookup(self, domain: str | None) -> Backend | None:
        """Backend for a normalised domain (None: the client named none)."""
        if domain is not None:
            backend = self.exact.get(domain)
            if backend is not None:
                return backend
            if self.wildcard:
                dot = domain.find(".")
                while dot >= 0:  # longest suffix first; "*.a.b" never matches "a.b" itself
                    backend = self.wildcard.get(domain[dot + 1 :])
                    if backend is not None:
                        return backend
                    dot = domain.find(".", dot + 1)
        return self.default

    def __len__(self) -> int:
        return len(self.exact) + len(self.wildcard) + (self.default is not None)

    def rows(self) -> list[tuple[str, Backend]]:
        """(pattern, backend) in lookup order, for ``--check``."""
        rows = sorted(self.exact.items())
        rows += sorted((f"*.{suffix}", backend) for suffix, backend in self.wildcard.items())
        if self.default is not None:
            rows.append(("*", self.default))
        return rows


@dataclass(frozen=True)
class Settings:
    http_listen: tuple[Address, ...] = ()
    https_listen: tuple[Address, ...] = ()
    preamble_timeout: float = 5.0
    connect_timeout: float = 3.0
    idle_timeout: float = 300.0
    max_preamble: int = MAX_PREAMBLE
    max_connections: int = 10000
    workers: int | str = 1
    user: str = ""
    log_format: str = "text"
    drain_timeout: float = 30.0  # seconds open connections get after SIGTERM/SIGINT before they are reset


DEFAULT_LISTEN = {"http_listen": ["0.0.0.0:80"], "https_listen": ["0.0.0.0:443"]}


@dataclass(frozen=True)
class Config:
    source: str
    http_routes: RouteTable
    https_routes: RouteTable
    settings: Settings
    warnings: tuple[str, ...] = ()


class ConfigError(Exception):
    """The file cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def parse_address(text: Any, *, listen: bool = False) -> Address:
    """``host:port``, ``[v6]:port`` or ``ip:port``; ValueError says what is wrong.

    A listen address must be an IP literal and may use port 0 (any free port).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string 'host:port', got {type(text).__name__}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} has no port (write '[addr]:port')")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port (write 'host:port')")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, '[{host}]:{port}'")
    if not (port.isdigit() and (listen or int(port) > 0) and int(port) < 65536):
        raise ValueError(f"{text!r} has a bad port {port!r} (1-65535)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if listen or text.startswith("["):
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        try:
            host = normalize_domain(host)
        except ValueError as exc:
            raise ValueError(f"{text!r}: bad host name ({exc})") from None
        ip = None
    else:
        host = str(ip)
    return Address(host, int(port), ip)


def load(path: str) -> Config:
    """Read and validate a config file; raises ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return validate(data, path)


def validate(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Turn a parsed TOML mapping into a Config, or raise ConfigError listing every problem."""
    errors: list[str] = []
    warnings: list[str] = []
    known = ("http_backends", "https_backends", "gateway", "backends")
    for table in data:
        if table not in known:
            errors.append(f"{source}: unknown table [{table}]{_did_you_mean(table, known)}")
    if "backends" in data:
        if "http_backends" in data or "https_backends" in data:
            errors.append(f"{source}: [backends] (v0.1.0) cannot be combined with [http_backends]/[https_backends]")
        else:
            warnings.append(
                f"{source}: [backends] is deprecated (v0.1.0 format); it now applies to both listeners. "
                "Split it into [http_backends] and [https_backends]."
            )
    legacy = data.get("backends", {})
    http = _routes(
        data.get("http_backends", legacy),
        "http_backends" if "http_backends" in data else "backends",
        source,
        errors,
    )
    https = _routes(
        data.get("https_backends", legacy),
        "https_backends" if "https_backends" in data else "backends",
        source,
        errors,
    )
    settings = _settings(data.get("gateway", {}), source, errors)
    if errors:
        raise ConfigError(errors)
    for name, table, listen in (
        ("http", http, settings.http_listen),
        ("https", https, settings.https_listen),
    ):
        if listen and not len(table):
            warnings.append(f"{source}: the {name} listener has no routes: every connection will be refused")
    return Config(source, http, https, settings, tuple(warnings))


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _routes(table: Any, name: str, source: str, errors: list[str]) -> RouteTable:
    if not isinstance(table, dict):
        errors.append(f'{source}: [{name}] must be a table of "domain" = "host:port"')
        return RouteTable()
    exact: dict[str, Backend] = {}
    wildcard: dict[str, Backend] = {}
    default = None
    seen: dict[str, str] = {}
    for key, value in table.items():
        where = f"{source}: [{name}] {key!r}"
        backend = _backend(value, where, errors)
        if key == "*":
            default = backend
            continue
        pattern, target = (key[2:], wildcard) if key.startswith("*.") else (key, exact)
        try:
            normal = normalize_domain(pattern)
        except ValueError as exc:
            errors.append(f"{where}: not a valid domain ({exc})")
            continue
        label = ("*." if target is wildcard else "") + normal
        if label in seen:
            errors.append(f"{where}: same domain as {seen[label]!r}")
            continue
        seen[label] = key
        if backend is not None:
            target[normal] = backend
    return RouteTable(exact, wildcard, default)


def _backend(value: Any, where: str, errors: list[str]) -> Backend | None:
    proxy_protocol = None
    if isinstance(value, dict):
        for key in value:
            if key not in ("address", "proxy_protocol"):
                errors.append(f"{where}: unknown key {key!r}{_did_you_mean(key, ('address', 'proxy_protocol'))}")
        proxy_protocol = value.get("proxy_protocol")
        if proxy_protocol is not None and proxy_protocol not in PROXY_PROTOCOLS:
            errors.append(
                f"{where}: proxy_protocol must be one of {', '.join(PROXY_PROTOCOLS)}, got {proxy_protocol!r}"
            )
        if "address" not in value:
            errors.append(f"{where}: missing 'address'")
            return None
        value = value["address"]
    try:
        return Backend(parse_address(value), proxy_protocol)
    except ValueError as exc:
        errors.append(f"{where}: {exc}")
        return None


def _settings(table: Any, source: str, errors: list[str]) -> Settings:
    if not isinstance(table, dict):
        errors.append(f"{source}: [gateway] must be a table")
        return Settings()
    values: dict[str, Any] = {}
    fields = Settings.__dataclass_fields__
    for key, value in {**DEFAULT_LISTEN, **table}.items():
        where = f"{source}: [gateway] {key}"
        if key not in fields:
            errors.append(f"{source}: [gateway] unknown key {key!r}{_did_you_mean(key, fields)}")
            continue
        try:
            values[key] = _CHECKS[key](value)
        except ValueError as exc:
            errors.append(f"{where}: {exc}, got {value!r}")
    return Settings(**values)


def _listen(value: Any) -> tuple[Address, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of 'ip:port' strings")
    return tuple(parse_address(item, listen=True) for item in value)


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise ValueError("must be a positive number of seconds")
    return float(value)


def _int_range(low: int, high: int):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return value

    return check


def _workers(value: Any) -> int | str:
    if value == "auto":
        return value
    return _int_range(1, 1024)(value)


def _choice(choices: tuple[str, ...]):
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


_CHECKS = {
    "http_listen": _listen,
    "https_listen": _listen,
    "preamble_timeout": _positive,
    "connect_timeout": _positive,
    "idle_timeout": _positive,
    "max_preamble": _int_range(512, 1 << 20),
    "max_connections": _int_range(1, 1 << 20),
    "workers": _workers,
    "user": _string,
    "log_format": _choice(LOG_FORMATS),
    "drain_timeout": _positive,
}


def resolve_workers(workers: int | str) -> int:
    """``"auto"`` becomes the number of CPUs this process may run on."""
    if workers == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1
    return int(workers)
