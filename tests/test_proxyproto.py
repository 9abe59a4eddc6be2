"""Unit tests for proxyproto.py: PROXY v1 and v2 headers, valid and not, fed whole and byte by byte.

Every case is checked whole, one byte at a time and split at every offset: a
trusted proxy's header may come in any number of TCP segments.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hellos import bytewise, outcome

import kiaerrors
from proxyproto import (
    NEED_MORE,
    V2_SIGNATURE,
    BadProxyHeader,
    ProxyHeader,
    ProxyHeaderReader,
    proxy_header,
    read_proxy_header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"


def v2(command: int = 0x21, family: int = 0x11, block: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header; ``length`` overrides the length field to lie about the block."""
    return SIG + bytes((command, family)) + struct.pack("!H", len(block) if length is None else length) + block


def ipv4_block(src: str = "192.0.2.1", dst: str = "198.51.100.2", sport: int = 40000, dport: int = 443) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def ipv6_block(src: str = "2001:db8::1", dst: str = "2001:db8::2", sport: int = 40000, dport: int = 443) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value) if length is None else length) + value


def answers(data: bytes, max_header: int = 32768) -> set:
    """The outcome whole, byte by byte, and split at every offset: a set of one element when all agree."""
    seen = {outcome(ProxyHeaderReader(max_header), [data]), outcome(ProxyHeaderReader(max_header), bytewise(data))}
    for cut in range(1, len(data)):
        seen.add(outcome(ProxyHeaderReader(max_header), [data[:cut], data[cut:]]))
    return seen


V4 = ProxyHeader(("192.0.2.1", 40000), ("198.51.100.2", 443), 0)


@pytest.mark.parametrize(
    "header, source, destination",
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n", ("192.0.2.1", 40000), ("198.51.100.2", 443)),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
        (b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 2\r\n", ("2001:db8::1", 1), ("::1", 2)),
        (  # as inet_ntop writes IPv4-mapped addresses; kept in ipaddress's text, never unmapped
            b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:10.0.0.1 5 6\r\n",
            (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 5),
            (str(ipaddress.IPv6Address("::ffff:10.0.0.1")), 6),
        ),
        (b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n", None, None),
        (b"PROXY UNKNOWN\r\n", None, None),
        (b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n", None, None),
        (b"PROXY UNKNOWN anything at all \x00\xff\r\n", None, None),  # the rest of an UNKNOWN line is ignored
        (v2(block=ipv4_block()), ("192.0.2.1", 40000), ("198.51.100.2", 443)),
        (v2(family=0x21, block=ipv6_block()), ("2001:db8::1", 40000), ("2001:db8::2", 443)),
        (v2(block=ipv4_block() + tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0x20, b"\x01" * 40)), V4.source, None),
        (v2(command=0x20, family=0x11, block=ipv4_block()), None, None),  # LOCAL: the block is ignored
        (v2(command=0x20, family=0x00), None, None),  # LOCAL as HAProxy's health checks send it
        (v2(command=0x20, family=0x12, block=b"\xff" * 3), None, None),  # LOCAL ignores family and block
        (v2(command=0x21, family=0x00, block=b"junk"), None, None),  # PROXY over UNSPEC: keep the connection's
    ],
)
def test_valid_headers(header, source, destination):
    result = read_proxy_header(header + REQUEST)
    if header.startswith(b"PROXY TCP6 ffff"):
        source, destination = ("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535)
    assert result.source == source
    if destination is not None or source is None:
        assert result.destination == destination
    assert result.length == len(header)  # what follows is the preamble's
    assert answers(header + REQUEST) == {result}
    reader = ProxyHeaderReader()
    first = reader.feed(header)
    assert first == result
    assert reader.feed(b"more") is first  # decided once, for good


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",  # missing: the first bytes are the preamble
        b"\x16\x03\x01\x02\x00",  # a ClientHello
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # case matters
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # exactly one space
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY \r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # lying: wrong family
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8.9 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero: octal to some readers
        b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # no scope
        b"PROXY TCP6 ::1::2 ::1 1 2\r\n",
        b"PROXY TCP6 :: ::g 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa3\r\n",  # an Arabic-Indic digit is no ASCII digit
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
        b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",  # oversized: no CRLF in the first 107 bytes
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 80,
        SIG + b"\x11\x11\x00\x0c" + ipv4_block(),  # version 1
        SIG + b"\x22\x11\x00\x0c" + ipv4_block(),  # command 2
        v2(family=0x13, block=ipv4_block()),  # transport 3
        v2(family=0x41, block=ipv4_block()),  # family 4
        v2(command=0x20, family=0x41),  # an invalid family is refused even in LOCAL
        v2(family=0x12, block=ipv4_block()),  # UDP
        v2(family=0x22, block=ipv6_block()),
        v2(family=0x31, block=bytes(216)),  # UNIX
        v2(family=0x32, block=bytes(216)),
        v2(block=ipv4_block()[:11]),  # lying: a block too short for its family
        v2(family=0x21, block=ipv4_block()),
        v2(block=ipv4_block() + b"\x01\x00"),  # a TLV header cut short
        v2(block=ipv4_block() + tlv(0x01, b"h2", length=3)),  # a TLV longer than the header
        v2(block=ipv4_block(), length=60000),  # oversized
        SIG[:5] + b"X",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[:6] + b"\x00",
    ],
)
def test_bad_headers_are_refused_however_split(data):
    assert answers(data) == {BadProxyHeader}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"P",
        b"PROXY",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r",
        b"PROXY UNKNOWN " + b"x" * 91,  # 106 bytes: one more may still be the CR
        SIG[:1],
        SIG,
        v2(block=ipv4_block())[:15],
        v2(block=ipv4_block())[:-1],  # a header longer than what was sent: waits, then times out
        v2(block=ipv4_block(), length=100),
    ],
)
def test_prefixes_need_more(data):
    assert read_proxy_header(data) is NEED_MORE
    reader = ProxyHeaderReader()
    assert all(reader.feed(piece) is NEED_MORE for piece in bytewise(data))


def test_v2_header_bounded_by_max_header():
    header = v2(block=ipv4_block() + tlv(0xE0, b"x" * 100))
    assert read_proxy_header(header, max_header=len(header)).length == len(header)
    assert answers(header, max_header=len(header) - 1) == {BadProxyHeader}
    with pytest.raises(BadProxyHeader):  # refused from the length field alone, before the rest comes
        read_proxy_header(header[:16], max_header=len(header) - 1)


def test_v1_longest_line_fits():
    line = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
    assert len(line) == 107
    assert read_proxy_header(line).length == 107
    assert answers(b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n") == {BadProxyHeader}


def test_bad_header_is_a_clean_close_on_both_listeners():
    error = BadProxyHeader("x")
    assert error.outcome == "bad_proxy_header"
    assert kiaerrors.reply(error, "http") == b""
    assert kiaerrors.reply(error, "https") == b""


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    "client, local", [(("192.0.2.1", 40000), ("198.51.100.2", 443)), (("2001:db8::1", 1), ("2001:db8::2", 65535))]
)
def test_reads_what_the_gateway_sends(version, client, local):
    """The outgoing header and the incoming parser agree: a chain of gateways keeps the client."""
    header = proxy_header(version, client, local)
    assert read_proxy_header(header) == ProxyHeader(client, local, len(header))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_ipv4_client_behind_an_ipv6_destination_is_written_in_its_ipv6_form(version):
    """One header holds one family: an IPv4 client that reached the proxy over IPv6 goes as ::ffff:a.b.c.d, as
    HAProxy writes it."""
    header = proxy_header(version, ("10.1.1.1", 5), ("2001:db8::1", 80))
    assert header.startswith(b"PROXY TCP6 ::ffff:10.1.1.1 2001:db8::1 5 80\r\n" if version == "v1" else V2_SIGNATURE)
    read = read_proxy_header(header)
    assert (ipaddress.ip_address(read.source[0]), read.source[1]) == (ipaddress.ip_address("::ffff:10.1.1.1"), 5)
    assert (read.destination, read.length) == (("2001:db8::1", 80), len(header))
