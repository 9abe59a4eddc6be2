"""Read a PROXY protocol header (v1 text or v2 binary) off a connection's first bytes: sans-IO.

A module of its own because it answers another question than sniff.py: not
where a connection goes, but whom it comes from. It is used only on
connections from a ``trusted_proxies`` network, before the preamble parsers
see a byte. The spec is HAProxy's ``doc/proxy-protocol.txt`` (sections 2.1
and 2.2). ``ProxyHeaderReader.feed(data)`` returns one of three things, as
sniff.py's parsers do:

- a ``ProxyHeader`` (frozen): the client's address, or None when the header
  says to keep the connection's own (v2 ``LOCAL``, v2 ``UNSPEC``, v1
  ``UNKNOWN``), and how many bytes the header took: every byte after it
  belongs to the preamble;
- the sentinel ``NEED_MORE``: nothing wrong yet, the header is not all in;
- it raises ``BadProxyHeader``: missing, malformed or oversized. Its reply
  is a clean close on either listener: the sender is a proxy, not a person.

The answer is the same however the bytes are split, and only a bounded
number of bytes is ever looked at (107 for v1, ``max_header`` for v2).
``proxy_header`` writes the header the other way, for backends that ask for
the client's address. This module opens no socket, imports no gevent and
never logs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Union

from kiaerrors import GatewayError
from sniff import MAX_PREAMBLE, NEED_MORE, NeedMore

__all__ = ["NEED_MORE", "BadProxyHeader", "ProxyHeader", "ProxyHeaderReader", "proxy_header", "read_proxy_header"]


class BadProxyHeader(GatewayError):
    """No valid PROXY header where a trusted proxy must send one: close cleanly, send nothing."""

    http_status = None
    tls_alert = None
    outcome = "bad_proxy_header"


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header says.

    ``source`` is the client's (ip, port) and ``destination`` the address it
    connected to at the proxy; both None when the connection's own addresses
    stay. ``length`` is the header's size in bytes.
    """

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


ProxyResult = Union[ProxyHeader, NeedMore]

# Section 2.1: "PROXY" and one space start every v1 line. The longest valid
# line, "PROXY UNKNOWN" with two full IPv6 addresses and ports, is 107 bytes
# with its CRLF; a line with no CRLF within them is invalid.
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107
# What may follow "PROXY ": checked as soon as it arrives, so a line that can
# never be valid is refused at once (section 2.1: "abort ... as soon as possible").
V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_IPV4_CHARS = frozenset(b"0123456789.")
_V1_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")  # '.' for "::ffff:1.2.3.4", as inet_ntop writes it

# Section 2.2: a 12-byte signature, then version and command, family and
# transport, and the big-endian length of what follows (addresses and TLVs).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
V2_VERSION = 0x2  # high nibble of byte 13; the only version there is
COMMAND_LOCAL, COMMAND_PROXY = 0x0, 0x1
FAMILY_UNSPEC = 0x00
FAMILY_TCP4, FAMILY_TCP6 = 0x11, 0x21
# UDP over IPv4/IPv6 and UNIX stream/datagram: valid in the spec, never a TCP
# client of this gateway. Refused rather than replaced by the proxy's own
# address, which would put every client behind one address for limits and
# allow-lists: the header comes from a misconfigured proxy.
FAMILIES_REFUSED = frozenset((0x12, 0x22, 0x31, 0x32))
_ADDRESS_BLOCK = {FAMILY_TCP4: (4, 12), FAMILY_TCP6: (16, 36)}  # family: (address size, block size)
TLV_HEADER = 3  # section 2.2: type (1 byte), then the value's length (2 bytes)


class ProxyHeaderReader:
    """Collect a PROXY v1 or v2 header fed in any pieces; report whom the connection is from.

    ``max_header`` bounds a v2 header with its TLVs (the gateway passes
    ``max_preamble``); a v1 line is bounded by the spec's 107 bytes.
    """

    def __init__(self, max_header: int = MAX_PREAMBLE) -> None:
        self.max_header = max_header
        self.buffer = bytearray()  # every byte fed; those past the header are the preamble's
        self.result: ProxyHeader | None = None

    def feed(self, data: bytes) -> ProxyResult:
        if self.result is not None:
            return self.result
        searched = len(self.buffer)  # bytes already searched for a v1 line end
        self.buffer += data
        head = bytes(self.buffer[: len(V2_SIGNATURE)])
        if head.startswith(V1_PREFIX):
            self.result = self._v1(searched)
        elif head == V2_SIGNATURE:
            self.result = self._v2()
        elif V1_PREFIX.startswith(head) or V2_SIGNATURE.startswith(head):
            return NEED_MORE  # still a prefix of one signature or the other (or nothing yet)
        else:
            raise BadProxyHeader("the connection does not start with a PROXY header")
        return NEED_MORE if self.result is None else self.result

    def _v1(self, searched: int) -> ProxyHeader | None:
        protocol = bytes(self.buffer[len(V1_PREFIX) : len(V1_PREFIX) + 8])
        if not any(p.startswith(protocol) or protocol.startswith(p) for p in V1_PROTOCOLS):
            raise BadProxyHeader("PROXY v1 line names no TCP4, TCP6 or UNKNOWN")
        end = self.buffer.find(b"\n", searched, V1_MAX_LINE)  # earlier bytes hold no LF
        if end < 0:
            if len(self.buffer) >= V1_MAX_LINE:
                raise BadProxyHeader(f"PROXY v1 line without CRLF in its first {V1_MAX_LINE} bytes")
            return None
        line = bytes(self.buffer[:end])
        if not line.endswith(b"\r") or line.count(b"\r") != 1:
            raise BadProxyHeader("PROXY v1 line not ended by CRLF, or with a CR inside")
        fields = line[:-1].split(b" ")
        if fields[1] == b"UNKNOWN":
            return ProxyHeader(None, None, end + 1)  # the rest of the line is to be ignored
        if len(fields) != 6:
            raise BadProxyHeader("PROXY v1 line is not 'PROXY TCP4|TCP6 source destination sport dport'")
        version = 4 if fields[1] == b"TCP4" else 6
        source = (_v1_address(fields[2], version), _v1_port(fields[4]))
        destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
        return ProxyHeader(source, destination, end + 1)

    def _v2(self) -> ProxyHeader | None:
        buf = self.buffer
        if len(buf) > 12 and (buf[12] >> 4 != V2_VERSION or buf[12] & 0xF not in (COMMAND_LOCAL, COMMAND_PROXY)):
            raise BadProxyHeader(f"PROXY v2 version/command byte 0x{buf[12]:02x}")
        if len(buf) > 13 and buf[13] not in _ADDRESS_BLOCK and buf[13] != FAMILY_UNSPEC:
            if buf[13] not in FAMILIES_REFUSED:
                raise BadProxyHeader(f"PROXY v2 family/transport byte 0x{buf[13]:02x}")
            if buf[12] & 0xF == COMMAND_PROXY:
                raise BadProxyHeader(f"PROXY v2 header for a connection that is not TCP (0x{buf[13]:02x})")
        if len(buf) < V2_FIXED:
            return None
        total = V2_FIXED + int.from_bytes(buf[14:16], "big")
        if total > self.max_header:
            raise BadProxyHeader(f"PROXY v2 header of {total} bytes, more than {self.max_header}")
        if len(buf) < total:
            return None
        family = buf[13]
        if buf[12] & 0xF == COMMAND_LOCAL or family not in _ADDRESS_BLOCK:
            # LOCAL (a health check by the proxy itself) or UNSPEC: the spec says
            # to use the connection's own addresses and ignore the block.
            return ProxyHeader(None, None, total)
        size, block = _ADDRESS_BLOCK[family]
        if total - V2_FIXED < block:
            raise BadProxyHeader(f"PROXY v2 address block of {total - V2_FIXED} bytes, {block} needed")
        at = V2_FIXED
        source_ip = ipaddress.ip_address(bytes(buf[at : at + size]))
        destination_ip = ipaddress.ip_address(bytes(buf[at + size : at + 2 * size]))
        ports = at + 2 * size
        source_port = int.from_bytes(buf[ports : ports + 2], "big")
        destination_port = int.from_bytes(buf[ports + 2 : ports + 4], "big")
        _check_tlvs(buf, at + block, total)
        return ProxyHeader((str(source_ip), source_port), (str(destination_ip), destination_port), total)


def _v1_address(text: bytes, version: int) -> str:
    """The canonical text of an address of the line's family; leading zeros refused (section 2.1)."""
    allowed = _V1_IPV4_CHARS if version == 4 else _V1_IPV6_CHARS
    if not text or not allowed.issuperset(text):
        raise BadProxyHeader(f"PROXY v1 source or destination is not an IPv{version} address")
    if version == 4 and any(len(part) > 1 and part.startswith(b"0") for part in text.split(b".")):
        raise BadProxyHeader("PROXY v1 IPv4 address with a leading zero")  # octal to some readers
    try:
        address = ipaddress.IPv4Address(text.decode()) if version == 4 else ipaddress.IPv6Address(text.decode())
    except ValueError:
        raise BadProxyHeader(f"PROXY v1 source or destination is not an IPv{version} address") from None
    return str(address)


def _v1_port(text: bytes) -> int:
    """0-65535 in decimal, no leading zero (section 2.1)."""
    if not (text.isdigit() and len(text) <= 5 and (text == b"0" or not text.startswith(b"0"))) or int(text) > 65535:
        raise BadProxyHeader("PROXY v1 port is not a number from 0 to 65535")
    return int(text)


def _check_tlvs(buf: bytearray, at: int, end: int) -> None:
    """Walk the TLVs after the addresses (section 2.2): each must fit in the header. Their values are ignored."""
    while at < end:
        if at + TLV_HEADER > end:
            raise BadProxyHeader("PROXY v2 TLV header runs past the header")
        at += TLV_HEADER + int.from_bytes(buf[at + 1 : at + 3], "big")
        if at > end:
            raise BadProxyHeader("PROXY v2 TLV value runs past the header")


def read_proxy_header(data: bytes, max_header: int = MAX_PREAMBLE) -> ProxyResult:
    """One-shot form of ``ProxyHeaderReader``: the answer for these bytes alone."""
    return ProxyHeaderReader(max_header).feed(data)


def proxy_header(version: str, client: tuple, local: tuple) -> bytes:
    """PROXY v1 or v2 header for a TCP connection from ``client`` to ``local``.

    Both are final addresses (kiaclients.client_address): an IPv4 client is
    TCP4 / AF_INET. The header holds one family; should the two differ (an IPv4
    client named by a proxy that it reached over IPv6), the IPv4 one is written
    in its IPv6 form, as HAProxy does. A link-local IPv6 address comes with its
    scope (``fe80::1%eth0``): the header has no place for it, and it names an
    interface of this host only.
    """
    client_ip, local_ip = client[0].partition("%")[0], local[0].partition("%")[0]
    v6 = ":" in client_ip
    if v6 != (":" in local_ip):
        v6 = True
        client_ip, local_ip = (ip if ":" in ip else "::ffff:" + ip for ip in (client_ip, local_ip))
    if version == "v1":
        return f"PROXY TCP{6 if v6 else 4} {client_ip} {local_ip} {client[1]} {local[1]}\r\n".encode("ascii")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    addresses = (
        socket.inet_pton(family, client_ip)
        + socket.inet_pton(family, local_ip)
        + struct.pack("!HH", client[1], local[1])
    )
    # version 2, command PROXY; TCP over IPv6 (0x21) or IPv4 (0x11)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21 if v6 else 0x11, len(addresses)) + addresses
