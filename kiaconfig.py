"""Load and validate servers.toml into frozen route tables and settings.

Its own module because validation is a job of its own: a pure ``validate``
over the parsed mapping, shared by start-up, ``--check`` and SIGHUP reload, so
a file that one of them accepts the others accept too. Every error names the
file, the table and the key. What the host has to say (the serving user, file
modes, the metrics extra) is kiapreflight.py's, what ``--check`` and
``--route`` print is kiareport.py's. It reads only the file, opens no socket
and starts nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
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
    quic_addresses: tuple[Address, ...] | None = None  # where the QUIC listener sends this route's flows, if not there

    def __post_init__(self) -> None:
        # Not a field (so not in comparisons or asdict): ``allow`` as integers, which
        # the gateway matches a client against for each connection in a fraction of
        # the time ipaddress objects take (measured: 7.6 µs per check down to about 1).
        object.__setattr__(self, "allow_masks", None if self.allow is None else network_masks(self.allow))

    @property
    def address(self) -> Address:
        """The first address: the only one of a route that is not a pool."""
        return self.addresses[0]

    @property
    def udp_addresses(self) -> tuple[Address, ...]:
        """Where QUIC flows of this route go: ``quic_address``, else the same hosts and ports over UDP."""
        return self.addresses if self.quic_addresses is None else self.quic_addresses

    def __str__(self) -> str:
        return ", ".join(map(str, self.addresses))


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A client network written as a CIDR ("10.0.0.0/8", "2001:db8::/32"; a bare IP is one host).

    An IPv4-mapped network (``::ffff:10.0.0.0/104``) is the IPv4 network it means
    (``10.0.0.0/8``): the gateway sees an IPv4 client as its IPv4 address on
    every listener. Host bits set are a typo, refused with the network meant:
    a list of who may do something should never widen or narrow silently.
    """
    try:
        network = ipaddress.ip_network(text)
    except ValueError as exc:
        hint = ""
        if "host bits set" in str(exc):
            hint = f" (did you mean {str(ipaddress.ip_network(text, strict=False))!r}?)"
        raise ValueError(f"{text!r} is not a network: {exc}{hint}") from None
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
    # Check every request of an HTTP keep-alive connection, not just the first. Left out of the file, it is
    # true while an [http_backends] route has an allow-list (validate() decides; Config.gateway_keys tells).
    http_strict_host: bool = False
    quic_listen: tuple[Address, ...] = ()  # UDP: QUIC routed by the SNI of its Initial packets (kiaquic.py)
    quic_idle_timeout: float = 60.0  # seconds without a datagram either way: the flow is forgotten
    max_quic_flows: int = 10000  # beyond it a new flow is refused (CONNECTION_REFUSED)


DEFAULT_LISTEN = {"http_listen": ["0.0.0.0:80"], "https_listen": ["0.0.0.0:443"]}


@dataclass(frozen=True)
class Config:
    source: str
    http_routes: RouteTable
    https_routes: RouteTable
    settings: Settings
    warnings: tuple[str, ...] = ()
    from_command_line: frozenset[str] = frozenset()  # settings given as options: errors name the option
    gateway_keys: frozenset[str] = frozenset()  # the [gateway] keys the file writes: a default told from a value


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
    gateway = data.get("gateway", {})
    settings = _settings(gateway, source, errors)
    if errors:
        raise ConfigError(errors)
    written = frozenset(gateway)  # a table, or _settings would have said so
    settings = _strict_for_allow_lists(
        settings, written, http, "http_backends" if "http_backends" in data else "backends", source, warnings
    )
    for name, table, listen in (
        ("http", http, settings.http_listen),
        ("https", https, settings.https_listen),
    ):
        if listen and not len(table):
            warnings.append(f"{source}: the {name} listener has no routes: every connection will be refused")
    return Config(source, http, https, settings, tuple(warnings), gateway_keys=written)


NAMED_AT_MOST = 5  # routes a warning names; a table of thousands would drown the line


def allow_listed(table: RouteTable) -> list[str]:
    """The patterns of the routes that have an allow-list, in lookup order."""
    return [pattern for pattern, backend in table.rows() if backend.allow is not None]


def _strict_for_allow_lists(
    settings: Settings, written: frozenset[str], http: RouteTable, name: str, source: str, warnings: list[str]
) -> Settings:
    """Strict keep-alive routing on while an HTTP route has an allow-list, unless the file says false (warned).

    Without it a client outside a list sends its first request to a route it
    may use, then, on the same connection, requests for the listed route: they
    reach the backend unchecked (a shared backend serves both names). So the
    default follows the allow-lists; ``http_strict_host = false`` written keeps
    the 0.2 behaviour, and start-up, ``--check`` and reload warn, naming them.
    """
    listed = allow_listed(http)
    if not listed:
        return settings
    if "http_strict_host" not in written:
        return dataclasses.replace(settings, http_strict_host=True)
    if not settings.http_strict_host:
        names = ", ".join(repr(pattern) for pattern in listed[:NAMED_AT_MOST])
        if len(listed) > NAMED_AT_MOST:
            names += f" and {len(listed) - NAMED_AT_MOST} more"
        warnings.append(
            f"{source}: [gateway] http_strict_host = false, yet [{name}] {names} "
            f"{'has an allow-list' if len(listed) == 1 else 'have allow-lists'}: a client outside a list can "
            "reach such a route with a later request on a keep-alive connection opened for another route "
            "(remove the line to check every request, as the default does while an allow-list is there)"
        )
    return settings


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


BACKEND_KEYS = ("address", "proxy_protocol", "allow", "quic_address")


def _backend(value: Any, where: str, errors: list[str]) -> Backend | None:
    proxy_protocol = allow = quic = None
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
        if "quic_address" in value:
            quic = _addresses(value["quic_address"], f"{where} quic_address", errors)
        if "address" not in value:
            errors.append(f"{where}: missing 'address'")
            return None
        value = value["address"]
    addresses = _addresses(value, where, errors)
    if len(errors) > count:
        return None
    return Backend(addresses, proxy_protocol, allow, quic)


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
            networks.append(parse_network(item))
        except ValueError as exc:
            errors.append(f"{where}[{index}]: {exc}")
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
        networks.append(parse_network(item))
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
    "quic_listen": _listen,
    "quic_idle_timeout": _positive,
    "max_quic_flows": _int_range(1, 1 << 20),
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


def resolve_workers(workers: int | str) -> int:
    """``"auto"`` becomes the number of CPUs this process may run on."""
    if workers == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1
    return int(workers)
