"""Load and validate servers.toml into frozen route tables and settings.

Its own module because validation is a job of its own: a pure ``validate``
over the parsed mapping, shared by start-up, ``--check`` and SIGHUP reload, so
a file that one of them accepts the others accept too. Every error names the
file, the table and the key. ``check_serving`` adds what start-up would refuse
beyond the file's syntax (the user, overlapping listeners, a file the serving
user could not read again), so ``--check`` catches it too. It opens no socket
and starts nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import os
import pwd
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import idna

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
    """One route entry: one address, or a pool tried round-robin; ``allow``: the client networks it serves.

    ``allow`` is None when every client may use it; ``allow_masks`` holds the
    same networks as integers, for the check made on each connection.
    Per-worker state (where round-robin goes next) lives in the gateway, keyed
    by the entry's identity: this stays frozen, so a reload swaps whole tables.
    """

    addresses: tuple[Address, ...]
    proxy_protocol: str | None = None
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None

    def __post_init__(self) -> None:
        # Not a field (so not in comparisons or asdict): ``allow`` as integers, which
        # the gateway matches a client against for each connection in a fraction of
        # the time ipaddress objects take (measured: 7.6 µs per check down to about 1).
        object.__setattr__(self, "allow_masks", None if self.allow is None else network_masks(self.allow))

    @property
    def address(self) -> Address:
        """The first address: the only one of a route that is not a pool."""
        return self.addresses[0]

    def __str__(self) -> str:
        return ", ".join(map(str, self.addresses))


def _unmapped(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (``::ffff:10.0.0.0/104``) as the IPv4 network it means (``10.0.0.0/8``).

    The gateway sees an IPv4 client as its IPv4 address on every listener, so a
    client network is matched in its IPv4 form.
    """
    if network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped is not None:
        return ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return network


def network_masks(
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> tuple[tuple[int, int, int], ...]:
    """(IP version, network address, netmask) as integers, per network."""
    return tuple((n.version, int(n.network_address), int(n.netmask)) for n in networks)


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

    def match(self, domain: str) -> tuple[str, Backend] | None:
        """(pattern, backend) that ``lookup`` picks for a normalised domain, for ``--route`` to say why.

        The same rule as ``lookup``, kept beside it; lookup itself stays lean for the data path.
        """
        if domain in self.exact:
            return domain, self.exact[domain]
        dot = domain.find(".")
        while dot >= 0:
            if domain[dot + 1 :] in self.wildcard:
                return f"*{domain[dot:]}", self.wildcard[domain[dot + 1 :]]
            dot = domain.find(".", dot + 1)
        return ("*", self.default) if self.default is not None else None

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
    log_connections: bool = True  # false: no line per connection (journald's rate limit drops lines past a burst)
    drain_timeout: float = 30.0  # seconds open connections get after SIGTERM/SIGINT before they are reset
    backend_cooldown: float = 10.0  # seconds a pool address that failed to connect is skipped; 0: never skipped
    max_connections_per_client: int = 0  # open connections per client address and worker; 0: no limit
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # must send a PROXY header
    metrics_listen: str = ""  # "ip:port" serving /metrics and /healthz; "" for none (a string: --check --json shows it)
    watch_config: bool = False  # reload when the file or a symlink leading to it changes, as on SIGHUP
    http_strict_host: bool = False  # check every request of an HTTP keep-alive connection, not just the first


DEFAULT_LISTEN = {"http_listen": ["0.0.0.0:80"], "https_listen": ["0.0.0.0:443"]}


@dataclass(frozen=True)
class Config:
    source: str
    http_routes: RouteTable
    https_routes: RouteTable
    settings: Settings
    warnings: tuple[str, ...] = ()
    from_command_line: frozenset[str] = frozenset()  # settings given as options: errors name the option


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
            host = normalize_domain(to_ascii(host))
        except ValueError as exc:
            raise ValueError(f"{text!r}: bad host name ({exc})") from None
        ip = None
    else:
        host = str(ip)
    return Address(host, int(port), ip)


def to_ascii(name: str) -> str:
    """A domain as clients send it: Unicode labels become A-labels (``xn--``), by IDNA 2008 with UTS 46 mapping.

    Clients always send A-labels, so only names from the config need this (the
    parsers in sniff.py never do). ASCII labels pass through untouched for
    normalize_domain to judge: it allows ``_``, which IDNA refuses. Raises
    ValueError (idna's errors are UnicodeErrors) saying what is wrong.
    """
    if name.isascii():
        return name
    mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)  # case, width, dots like "。"
    return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii") for label in mapped.split("."))


def unicode_form(name: str) -> str | None:
    """The Unicode form of a name with ``xn--`` labels, for people to read; None if it has none (or a bad one)."""
    if "xn--" not in name:
        return None
    try:
        return ".".join(idna.ulabel(label) if label.startswith("xn--") else label for label in name.split("."))
    except ValueError:
        return None


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
    interned: dict[Backend, Backend] = {}  # routes share a few backends: one object each pickles and unpickles fast
    for key, value in table.items():
        where = f"{source}: [{name}] {key!r}"
        backend = _backend(value, where, errors)
        if backend is not None:
            backend = interned.setdefault(backend, backend)
        if key == "*":
            default = backend
            continue
        pattern, target = (key[2:], wildcard) if key.startswith("*.") else (key, exact)
        try:
            pattern = to_ascii(pattern)
        except ValueError as exc:  # idna's errors are UnicodeErrors, so ValueErrors
            errors.append(f"{where}: not a valid internationalized domain name ({exc})")
            continue
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


BACKEND_KEYS = ("address", "proxy_protocol", "allow")


def _backend(value: Any, where: str, errors: list[str]) -> Backend | None:
    proxy_protocol = allow = None
    count = len(errors)
    if isinstance(value, dict):
        for key in value:
            if key not in BACKEND_KEYS:
                errors.append(f"{where}: unknown key {key!r}{_did_you_mean(key, BACKEND_KEYS)}")
        proxy_protocol = value.get("proxy_protocol")
        if proxy_protocol is not None and proxy_protocol not in PROXY_PROTOCOLS:
            errors.append(
                f"{where}: proxy_protocol must be one of {', '.join(PROXY_PROTOCOLS)}, got {proxy_protocol!r}"
            )
        if "allow" in value:
            allow = _allow(value["allow"], f"{where} allow", errors)
        if "address" not in value:
            errors.append(f"{where}: missing 'address'")
            return None
        value = value["address"]
    addresses = _addresses(value, where, errors)
    if len(errors) > count:
        return None
    return Backend(addresses, proxy_protocol, allow)


def _addresses(value: Any, where: str, errors: list[str]) -> tuple[Address, ...]:
    """One address, or a pool: a non-empty list of distinct ones, each error naming its index."""
    if not isinstance(value, list):
        try:
            return (parse_address(value),)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            return ()
    if not value:
        errors.append(f"{where}: the address list is empty: give at least one 'host:port'")
    addresses: list[Address] = []
    for index, item in enumerate(value):
        try:
            address = parse_address(item)
        except ValueError as exc:
            errors.append(f"{where} address[{index}]: {exc}")
            continue
        if address in addresses:
            errors.append(f"{where} address[{index}]: {address} is already in the list")
            continue
        addresses.append(address)
    return tuple(addresses)


def _allow(value: Any, where: str, errors: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Client networks as CIDRs ("10.0.0.0/8", "2001:db8::/32"; a bare IP is one host)."""
    if not isinstance(value, list) or not value:
        errors.append(
            f'{where}: must be a non-empty list of networks like "10.0.0.0/8" '
            "(an empty list would refuse every client: remove the route instead)"
        )
        return ()
    networks = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            errors.append(f'{where}[{index}]: expected a string like "10.0.0.0/8", got {type(item).__name__}')
            continue
        try:
            networks.append(_unmapped(ipaddress.ip_network(item)))
        except ValueError as exc:
            hint = ""
            if "host bits set" in str(exc):
                hint = f" (did you mean {str(ipaddress.ip_network(item, strict=False))!r}?)"
            errors.append(f"{where}[{index}]: {item!r} is not a network: {exc}{hint}")
    return tuple(networks)


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


def _seconds_or_off(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
        raise ValueError("must be a number of seconds, or 0 for off")
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


def _optional_listen(value: Any) -> str:
    """One listen address in its canonical text, or "" for none."""
    if value == "":
        return ""
    return str(parse_address(value, listen=True))


def _choice(choices: tuple[str, ...]):
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs, IPv4 or IPv6; a bare address is one host. Host bits set (``10.0.0.1/8``) are an error.

    A typo in a list of who may name any client address should stop the start,
    not widen or narrow the list silently.
    """
    if not isinstance(value, list):
        raise ValueError('must be a list of networks like "10.0.0.0/8" or "2001:db8::/32"')
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f'must be a list of networks like "10.0.0.0/8", and {item!r} is no string')
        try:
            networks.append(_unmapped(ipaddress.ip_network(item)))
        except ValueError:
            try:
                hint = f" (did you mean {str(ipaddress.ip_network(item, strict=False))!r}?)"
            except ValueError:
                hint = ""
            raise ValueError(f"{item!r} is not a network{hint}") from None
    return tuple(networks)


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
    "log_connections": _boolean,
    "drain_timeout": _positive,
    "backend_cooldown": _seconds_or_off,
    "max_connections_per_client": _int_range(0, 1 << 20),
    "trusted_proxies": _networks,
    "metrics_listen": _optional_listen,
    "watch_config": _boolean,
    "http_strict_host": _boolean,
}


def override(cfg: Config, values: Mapping[str, Any]) -> Config:
    """``cfg`` with command-line values (already checked) over its [gateway] table, remembered as such."""
    if not values:
        return cfg
    return dataclasses.replace(
        cfg,
        settings=dataclasses.replace(cfg.settings, **values),
        from_command_line=cfg.from_command_line | frozenset(values),
    )


def plain_route(pattern: str, backend: Backend) -> dict[str, Any]:
    """One route as JSON values for scripts; every key is there even when it holds nothing yet.

    ``addresses`` is a list and ``allow`` is None (no allow-list: every client)
    so that scripts need not change when pools and allow-lists come.
    """
    return {
        "addresses": [str(backend.address)],
        "proxy_protocol": backend.proxy_protocol,
        "allow": None,
        "unicode": unicode_form(pattern),
    }


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
        "http_backends": {pattern: plain_route(pattern, b) for pattern, b in cfg.http_routes.rows()},
        "https_backends": {pattern: plain_route(pattern, b) for pattern, b in cfg.https_routes.rows()},
        "gateway": settings,
    }


def _name(cfg: Config, key: str) -> str:
    """A setting as the operator wrote it: ``--user`` on the command line, ``[gateway] user`` in the file."""
    return "--" + key.replace("_", "-") if key in cfg.from_command_line else f"[gateway] {key}"


def _where(cfg: Config, key: str) -> str:
    return f"command line: {_name(cfg, key)}" if key in cfg.from_command_line else f"{cfg.source}: {_name(cfg, key)}"


def check_serving(cfg: Config, sockets_given: bool = False) -> list[str]:
    """What start-up would refuse beyond the file's syntax, one line per problem; [] if it would start.

    Start-up, ``--check`` and reload all call it, so ``--check`` refuses what
    start-up refuses, except what depends on the moment (a port another process
    holds, a missing privilege, the sockets systemd passes: ``sockets_given``,
    when the listen lists are ignored and may be empty). It reads the user
    database and the file's mode, and changes nothing.
    """
    s = cfg.settings
    errors = []
    if not s.http_listen and not s.https_listen and not sockets_given:
        errors.append(
            f"{cfg.source}: [gateway] http_listen and https_listen are both empty: nothing to listen on"
            " (only a gateway started by systemd socket activation, which passes the sockets, may leave them so)"
        )
    errors += _overlapping_listeners(cfg)
    if s.user:
        try:
            entry = pwd.getpwnam(s.user)
        except KeyError:
            errors.append(f"{_where(cfg, 'user')}: no such user {s.user!r}")
        else:
            problem = _unreadable_by(cfg.source, entry)
            if problem:
                errors.append(f"{_where(cfg, 'user')}: {problem}")
    if s.metrics_listen:
        errors += _metrics_problems(cfg)
    return errors


METRICS_EXTRA = "metrics_listen needs the metrics extra: pip install 'kiagateway[metrics]'"


def _metrics_problems(cfg: Config) -> list[str]:
    """metrics_listen overlapping a traffic listener, or set without prometheus_client (it renders the text)."""
    errors = []
    address = parse_address(cfg.settings.metrics_listen, listen=True)
    for key in ("http_listen", "https_listen"):
        for other in getattr(cfg.settings, key):
            if listeners_overlap(address, other):
                errors.append(
                    f"{_where(cfg, 'metrics_listen')}: {address} overlaps {other} of {_name(cfg, key)}: "
                    "the metrics need a port of their own"
                )
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        errors.append(f"{cfg.source}: {METRICS_EXTRA}")
    return errors


def listeners_overlap(a: Address, b: Address) -> bool:
    """True when both cannot be bound: the same port and family, and the same IP or a wildcard one.

    IPv6 listeners are bound with IPV6_V6ONLY, so "[::]:80" leaves "0.0.0.0:80"
    free; port 0 takes a free port each time.
    """
    if a.port != b.port or a.port == 0 or a.ip is None or b.ip is None or a.ip.version != b.ip.version:
        return False
    return a.ip == b.ip or a.ip.is_unspecified or b.ip.is_unspecified


def _overlapping_listeners(cfg: Config) -> list[str]:
    """One error per listen address that overlaps one listed before it, in either list.

    Binding would fail with "address in use" against the gateway's own listener,
    a message that sends the operator looking for another process.
    """
    errors = []
    seen: list[tuple[str, Address]] = []
    for key in ("http_listen", "https_listen"):
        for address in getattr(cfg.settings, key):
            for other_key, other in seen:
                if listeners_overlap(address, other):
                    if address == other and key == other_key:
                        errors.append(f"{_where(cfg, key)}: {address} is listed twice")
                    else:
                        errors.append(
                            f"{_where(cfg, key)}: {address} overlaps {other} of {_name(cfg, other_key)}: "
                            "one port serves one listener, on one address or on all of them"
                        )
                    break
            seen.append((key, address))
    return errors


READ, SEARCH = 4, 1  # the "other" permission bits: read a file, search (enter) a directory


def may_access(mode: int, owner: int, group: int, uid: int, gids: frozenset[int], want: int) -> bool:
    """Would ``uid`` with groups ``gids`` get ``want`` (READ or SEARCH) on a file of this mode and owner?

    The kernel's rule, for a user other than the one asking: the owner gets the
    owner bits only, a member of the group the group bits only, anyone else the
    other bits; root gets everything. ACLs are not read.
    """
    if uid == 0:
        return True
    if uid == owner:
        return bool(mode >> 6 & want)
    if group in gids:
        return bool(mode >> 3 & want)
    return bool(mode & want)


def _unreadable_by(path: str, entry: pwd.struct_passwd) -> str | None:
    """Why ``entry``'s user could not read ``path`` again to reload it, with the fix; None if it could.

    The user keeps only its own group: the gateway drops every supplementary
    group with its privileges. Every directory on the way must be searchable,
    both on the path as written and on the path its symlinks lead to.
    """
    user, gids = entry.pw_name, frozenset((entry.pw_gid,))
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    prefix = f"user {user} could not read {path} again"
    suffix = "so every reload (SIGHUP) would fail"
    real = os.path.realpath(path)
    directories = set(_ancestors(os.path.abspath(path))) | set(_ancestors(real))
    for directory in sorted(directories):  # a parent sorts before its children: the first one in the way
        try:
            st = os.stat(directory)
        except OSError:  # the file was just read; a directory gone since is start-up's to report
            continue
        if not may_access(st.st_mode, st.st_uid, st.st_gid, entry.pw_uid, gids, SEARCH):
            return (
                f"{prefix} (directory {directory} mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)}), "
                f"{suffix}: make it searchable by user {user}, e.g. chmod o+x {directory}"
            )
    try:
        st = os.stat(real)
    except OSError:
        return None
    if may_access(st.st_mode, st.st_uid, st.st_gid, entry.pw_uid, gids, READ):
        return None
    return (
        f"{prefix} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)}), {suffix}: "
        f"make it readable by user {user}, e.g. chgrp {group} {path} && chmod 640 {path}"
    )


def _ancestors(path: str) -> list[str]:
    """Every directory above an absolute path, up to "/"."""
    parents = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return parents
        parents.append(parent)
        path = parent


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def resolve_workers(workers: int | str) -> int:
    """``"auto"`` becomes the number of CPUs this process may run on."""
    if workers == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1
    return int(workers)
