"""Client policy: whose PROXY header is believed, who may use a route, how many connections a client may hold.

Its own module because these rules judge the client, not the bytes it sends
or the backend it reaches, and they share one way of reading an address
(``client_address``): an IPv4-mapped IPv6 address (a dual-stack socket's IPv4
client, or one a PROXY header names so) is its IPv4 address everywhere, and a
link-local address's scope is not part of it. Both network lists
(``trusted_proxies`` and the routes' ``allow``) are matched by
``in_networks``. It never logs and opens no socket.
"""

from __future__ import annotations

import socket

from kiaconfig import Settings, network_masks
from kiaerrors import ClientLimit

_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96 (RFC 4291 section 2.5.5.2): an IPv4 address in IPv6

Masks = tuple[tuple[int, int, int], ...]  # (IP version, network, netmask) as integers: kiaconfig.network_masks


def client_address(address: tuple) -> tuple:
    """The address as the gateway uses it: an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``) as ``(a.b.c.d, port)``.

    A dual-stack listener sees an IPv4 client so, and a PROXY header may name
    one so: it is the IPv4 client everywhere (logs, allow-lists, per-client
    limits, the PROXY header sent on), so that one client gets one answer on
    every listener. Applied once where the client address becomes final (after
    accept, after a trusted PROXY header), not in each of those. Any other
    address is returned as it is.
    """
    host = address[0]
    if host.startswith("::ffff:"):  # every mapped address's text begins so (inet_ntop, ipaddress)
        packed = socket.inet_pton(socket.AF_INET6, host)
        if packed[:12] == _V4_MAPPED:
            return socket.inet_ntop(socket.AF_INET, packed[12:]), address[1]
    return address


def in_networks(host: str, masks: Masks) -> bool:
    """Is the address ``host`` (final: ``client_address``) in one of the networks?

    An IPv4 client matches IPv4 networks only, ``::/0`` none of them. A
    link-local address's scope (``fe80::1%eth0``) is not part of it.
    """
    if ":" in host:
        version, number = 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
    else:
        version, number = 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    return any(net_version == version and number & mask == network for net_version, network, mask in masks)


def client_key(host: str) -> str:
    """The client as the per-client limit counts it: an IPv4 address, or an IPv6 address's /64.

    ``host`` is final (``client_address``): an IPv4 client has one key on every
    listener. An IPv6 host is usually given a whole /64 (RFC 7421) and may take
    any address in it for each connection, so the /64 is what one client holds.
    """
    if ":" not in host:
        return host
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # a link-local scope is not part of it
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class Clients:
    """The client policy of one process: its settings, and the connections each client holds open."""

    def __init__(self, settings: Settings) -> None:
        self._open: dict[str, int] = {}  # open connections by client key, with max_connections_per_client
        self._lingering: set[str] = set()  # clients with a refusal for their limit lingering
        self.reload(settings)

    def reload(self, settings: Settings) -> None:
        self.trusted_masks = network_masks(settings.trusted_proxies)
        self.limit = settings.max_connections_per_client

    def is_trusted(self, host: str) -> bool:
        """Is ``host`` a trusted proxy, whose connections must start with a PROXY header?"""
        return bool(self.trusted_masks) and in_networks(host, self.trusted_masks)

    def admit(self, host: str) -> str | None:
        """Count a connection from ``host`` against max_connections_per_client; ClientLimit if it is at it.

        Returns the key to ``release`` once the connection ends (None: no limit,
        nothing counted). Call it once the client address is final: right after
        accept, or after a trusted proxy's PROXY header named the client.
        """
        if not self.limit:
            return None
        key = client_key(host)
        count = self._open.get(key, 0)
        if count >= self.limit:
            raise ClientLimit(f"{count} connections open from {key} (max_connections_per_client = {self.limit})")
        self._open[key] = count + 1
        return key

    def release(self, key: str) -> None:
        """One connection fewer from ``key``; a client with none left leaves the table, so it never grows."""
        count = self._open[key] - 1
        if count:
            self._open[key] = count
        else:
            del self._open[key]

    def may_linger(self, host: str) -> bool:
        """May this client's refusal for its limit linger (see kiasocket.answer)? One per client at a time.

        Lingering keeps the reply from being reset away, but holds a
        max_connections slot up to LINGER_SECONDS: a client opening idle
        connections faster than max_connections a second would fill them all. So
        a client holds at most its limit plus one slot. The slot is not given back
        early instead: refusals lingering off the count would be bounded by
        nothing, and each holds a descriptor that check_nofile's budget does not
        have. A True answer must be followed by ``lingered``.
        """
        key = client_key(host)
        if key in self._lingering:
            return False
        self._lingering.add(key)
        return True

    def lingered(self, host: str) -> None:
        self._lingering.discard(client_key(host))
