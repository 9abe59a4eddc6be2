"""Property tests for proxyproto.py (hypothesis).

What must hold however a proxy's bytes are split, whatever they are: the answer
does not depend on the split or on the preamble after the header, a strict
prefix of a header always asks for more, what a header says is what was
encoded, and nothing but ``BadProxyHeader`` escapes.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from hellos import outcome, split_at
from hypothesis import given, settings
from hypothesis import strategies as st

import proxyproto
from proxyproto import NEED_MORE, BadProxyHeader, ProxyHeader, ProxyHeaderReader

FAST = settings(max_examples=200, deadline=None)
SIG = b"\r\n\r\n\x00\r\nQUIT\n"

IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
TLVS = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
    lambda tlvs: b"".join(bytes((kind,)) + struct.pack("!H", len(value)) + value for kind, value in tlvs)
)


@st.composite
def headers(draw) -> tuple[bytes, ProxyHeader]:
    """A valid v1 or v2 header naming a drawn client and destination, and what it says."""
    v6 = draw(st.booleans())
    source = (draw(IPV6 if v6 else IPV4), draw(PORT))
    destination = (draw(IPV6 if v6 else IPV4), draw(PORT))
    kind = draw(st.sampled_from(["v1", "v2", "v2-tlv", "v2-local", "v1-unknown"]))
    if kind == "v1-unknown":
        data = b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" 1.2.3.4 5.6.7.8 1 2", b" whatever"])) + b"\r\n"
        return data, ProxyHeader(None, None, len(data))
    data = proxyproto.proxy_header(kind[:2], source, destination)
    if kind == "v2-tlv":
        tlvs = draw(TLVS)
        data = data[:14] + struct.pack("!H", len(data) - 16 + len(tlvs)) + data[16:] + tlvs
    if kind == "v2-local":
        data = SIG + b"\x20" + data[13:]
        return data, ProxyHeader(None, None, len(data))
    return data, ProxyHeader(source, destination, len(data))


def cuts_for(data: bytes):
    return st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12)


def is_documented(result) -> bool:
    if result is NEED_MORE or result is BadProxyHeader:
        return True
    if type(result) is not ProxyHeader or result.length < 15:
        return False
    for address in (result.source, result.destination):
        if address is not None:  # canonical text, a real port
            assert str(ipaddress.ip_address(address[0])) == address[0] and 0 <= address[1] <= 65535
    return True


@FAST
@given(st.data(), st.binary(max_size=100))
def test_any_split_and_any_trailer_give_what_was_encoded(data, trailer):
    header, expected = data.draw(headers())
    assert outcome(ProxyHeaderReader(), [header + trailer]) == expected
    cuts = data.draw(cuts_for(header + trailer))
    assert outcome(ProxyHeaderReader(), split_at(header + trailer, cuts)) == expected


@FAST
@given(st.data())
def test_every_strict_prefix_needs_more(data):
    header, _ = data.draw(headers())
    end = data.draw(st.integers(0, len(header) - 1))
    assert ProxyHeaderReader().feed(header[:end]) is NEED_MORE


@FAST
@given(st.data())
def test_a_v2_header_of_exactly_max_header_fits_and_one_byte_more_does_not(data):
    header, expected = data.draw(headers().filter(lambda h: h[0].startswith(SIG)))
    assert outcome(ProxyHeaderReader(len(header)), [header]) == expected
    assert outcome(ProxyHeaderReader(len(header) - 1), [header]) is BadProxyHeader


ANY_BYTES = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=150).map(lambda b: b"PROXY " + b),
    st.binary(max_size=150).map(lambda b: SIG + b),
    st.lists(st.sampled_from([b"PROXY", b" ", b"TCP4", b"TCP6", b"UNKNOWN", b"1.2.3.4", b"::1", b"80", b"\r\n"])).map(
        b"".join
    ),
)


@settings(max_examples=400, deadline=None)
@given(ANY_BYTES, st.data())
def test_any_bytes_give_a_documented_answer_however_split(raw, data):
    limit = data.draw(st.sampled_from([32768, 16, max(1, len(raw) - 3)]))
    whole = outcome(ProxyHeaderReader(limit), [raw])  # any other exception fails the test
    assert is_documented(whole)
    assert outcome(ProxyHeaderReader(limit), split_at(raw, data.draw(cuts_for(raw)))) == whole


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_one_mutated_byte_never_raises_anything_else(data):
    header, _ = data.draw(headers())
    at = data.draw(st.integers(0, len(header) - 1))
    mutated = header[:at] + bytes([data.draw(st.integers(0, 255))]) + header[at + 1 :]
    whole = outcome(ProxyHeaderReader(), [mutated])
    assert is_documented(whole)
    assert outcome(ProxyHeaderReader(), split_at(mutated, data.draw(cuts_for(mutated)))) == whole


@FAST
@given(st.sampled_from([socket.AF_INET, socket.AF_INET6]), st.data())
def test_a_v1_address_is_taken_only_in_its_canonical_family(family, data):
    """A v1 line whose addresses are not of its family is refused, never read as the other."""
    address = data.draw(IPV6 if family == socket.AF_INET else IPV4)
    word = b"TCP4" if family == socket.AF_INET else b"TCP6"
    line = b"PROXY " + word + b" " + address.encode() + b" " + address.encode() + b" 1 2\r\n"
    assert outcome(ProxyHeaderReader(), [line]) is BadProxyHeader
