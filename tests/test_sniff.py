"""Unit tests for sniff.py: every accepted shape, every rejection and its reply.

In the manner of h11's tests, every input goes through ``tls()`` / ``http()``,
which feed it whole and then one byte at a time and insist both agree, so each
case below is also a case of the incremental reassembly.
"""

from __future__ import annotations

import json
import random
import ssl
from pathlib import Path

import pytest
from hellos import (
    SUPPORTED_VERSIONS,
    bytewise,
    extension,
    handshake,
    hello,
    hello_body,
    outcome,
    real_hello,
    record,
    records,
    server_name_data,
    sni,
    split_at,
    vector,
)

import sniff
from sniff import (
    NEED_MORE,
    BadClientHello,
    BadRequest,
    HeadTooLarge,
    HttpOnTlsPort,
    HttpSniffer,
    NotTls,
    Preamble,
    TlsRecordOverflow,
    TlsSniffer,
    UnexpectedTlsMessage,
    normalize_domain,
    split_host_port,
)


def tls(data: bytes, max_preamble: int = sniff.MAX_PREAMBLE):
    """The outcome of ``data`` on the TLS listener; whole and byte-by-byte must agree."""
    whole = outcome(TlsSniffer(max_preamble), [data])
    assert outcome(TlsSniffer(max_preamble), bytewise(data)) == whole
    return whole


def http(data: bytes, max_preamble: int = sniff.MAX_PREAMBLE):
    """The outcome of ``data`` on the HTTP listener; whole and byte-by-byte must agree."""
    whole = outcome(HttpSniffer(max_preamble), [data])
    assert outcome(HttpSniffer(max_preamble), bytewise(data)) == whole
    return whole


EXAMPLE = Preamble("example.com")


def test_need_more_is_a_distinct_sentinel():
    assert repr(NEED_MORE) == "NEED_MORE"
    assert NEED_MORE is not None
    assert not isinstance(NEED_MORE, Preamble)


def test_preamble_is_frozen():
    with pytest.raises(AttributeError):
        EXAMPLE.domain = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------
# normalize_domain and split_host_port


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.com", "example.com"),
        (b"example.com", "example.com"),
        ("EXAMPLE.Com", "example.com"),
        ("example.com.", "example.com"),
        ("a", "a"),
        ("_acme-challenge.example.com", "_acme-challenge.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.2.3.4", "1.2.3.4"),  # a valid name syntactically; SNI refuses it separately
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3) + "." + "a" * 61, ".".join(["a" * 63] * 3) + "." + "a" * 61),  # 253
        ("[::1]", "[::1]"),
        ("[0:0:0:0:0:0:0:1]", "[::1]"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
    ],
)
def test_normalize_domain_accepts(name, expected):
    assert normalize_domain(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a..b",
        ".a",
        "a.b..",
        "-a.com",
        "a-.com",
        "a b.com",
        "a/b",
        "a@b",
        "a:80",
        "a\x00b",
        "a\tb",
        "bücher.example",  # IDNs arrive as A-labels (xn--) on the wire
        b"a\xffb",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 3) + "." + "a" * 62,  # 254
        "[::1",
        "[]",
        "[1.2.3.4]",
        "[example.com]",
        "[::1]]",
        "[\xff]",
        b"[\xff]",
        "[::1%eth0]",  # a zone id is meaningless in a Host or SNI
        '[::1%a"b c]',
    ],
)
def test_normalize_domain_refuses(name):
    with pytest.raises(ValueError):
        normalize_domain(name)


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        (b"example.com", b"example.com"),
        (b"example.com:80", b"example.com"),
        (b"example.com:", b"example.com"),  # RFC 3986: an empty port is allowed
        (b"example.com:65535", b"example.com"),
        (b"example.com:0", b"example.com"),
        (b"[::1]", b"[::1]"),
        (b"[::1]:8080", b"[::1]"),
        (b"[::1]:", b"[::1]"),
        (b"", b""),
        (b":80", b""),
    ],
)
def test_split_host_port(authority, host):
    assert split_host_port(authority) == host


@pytest.mark.parametrize(
    "authority",
    [
        b"example.com:65536",
        b"example.com:123456",
        b"example.com:-1",
        b"example.com:+80",
        b"example.com:8 0",
        b"example.com:http",
        b"a:b:c",
        b"::1",
        b"[::1",
        b"[::1]x",
        b"[::1]80",
        b"example.com:\xd9\xa1",  # a non-ASCII digit
    ],
)
def test_split_host_port_refuses(authority):
    with pytest.raises(ValueError):
        split_host_port(authority)


# --------------------------------------------------------------------------
# TLS: hellos that parse


@pytest.mark.parametrize(
    "version",
    [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
)
def test_real_hello(version):
    data = real_hello("example.com", minimum=version, maximum=version)
    assert tls(data) == EXAMPLE


def test_real_hello_without_sni():
    assert tls(real_hello(None)) == Preamble(None)


def test_real_hello_normalises_the_name():
    assert tls(real_hello("WWW.Example.COM")) == Preamble("www.example.com")


def test_real_hello_with_alpn_and_every_strict_prefix_needs_more():
    data = real_hello("example.com", alpn=["h2", "http/1.1"])
    for end in range(len(data)):
        assert TlsSniffer().feed(data[:end]) is NEED_MORE
    assert sniff.sniff_tls(data) == EXAMPLE


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ((b"example.com",), "example.com"),
        ((b"Example.COM.",), "example.com"),
        ((b"_sip.example.com",), "_sip.example.com"),
        ((), None),
    ],
)
def test_built_hello(names, expected):
    assert tls(hello(*names)) == Preamble(expected)


def test_hello_without_extensions_has_no_sni():
    # A TLS 1.0-style hello ends after the compression methods.
    assert tls(record(handshake(hello_body(None)))) == Preamble(None)


def test_empty_extensions_block():
    assert tls(record(handshake(hello_body([])))) == Preamble(None)


def test_unknown_name_types_are_skipped():
    data = server_name_data(b"ignored", name_type=7)[2:] + server_name_data(b"example.com")[2:]
    ext = extension(0, vector(data, 2))
    assert tls(record(handshake(hello_body([ext])))) == EXAMPLE
    only_unknown = extension(0, server_name_data(b"ignored", name_type=7))
    assert tls(record(handshake(hello_body([only_unknown])))) == Preamble(None)


def test_empty_server_name_list():
    # RFC 6066: a server's reply carries an empty server_name; a client's may too.
    assert tls(record(handshake(hello_body([extension(0, vector(b"", 2))])))) == Preamble(None)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 100, 511])
def test_hello_spread_over_records(size):
    data = records(handshake(real_hello_body()), size)
    assert tls(data) == EXAMPLE


def real_hello_body() -> bytes:
    data = real_hello("example.com")
    return data[9:]  # strip the record header and the handshake header


def test_record_of_exactly_two_to_the_fourteen():
    payload = handshake(hello_body([sni(b"example.com"), extension(21, bytes(2**14 - 200))]))
    payload += bytes(2**14 - len(payload))  # further handshake bytes after the hello
    assert len(payload) == sniff.TLS_MAX_FRAGMENT
    assert tls(record(payload)) == EXAMPLE


def test_bytes_after_the_hello_are_not_read():
    data = real_hello("example.com")
    for trailer in (b"\x17\x03\x03\x00\x01x", b"\x00" * 10, b"GET / HTTP/1.1\r\n"):
        assert tls(data + trailer) == EXAMPLE
    # More handshake bytes in the same record as the hello are not read either.
    payload = handshake(hello_body([sni(b"example.com")])) + b"\x0f\x00\x00\x01x"
    assert tls(record(payload)) == EXAMPLE


def test_sniffer_keeps_every_byte_and_repeats_its_answer():
    data = real_hello("example.com") + b"early data"
    sniffer = TlsSniffer()
    pieces = split_at(data, [1, 5, 6, 100])
    results = [sniffer.feed(piece) for piece in pieces]
    assert results[-1] == EXAMPLE
    assert sniffer.buffer == data
    assert sniffer.feed(b"more") == EXAMPLE


def test_empty_feed_needs_more():
    assert TlsSniffer().feed(b"") is NEED_MORE
    assert sniff.sniff_tls(b"") is NEED_MORE


@pytest.mark.parametrize("tail", [b"", b"\x00", b"\x16\x03\x01"])
def test_sslv2_hello_has_no_sni(tail):
    # RFC 5246 E.2: length 0x8000 | n, msg_type 1, version, then spec lengths.
    v2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + bytes(21) + bytes(16) + tail
    assert tls(v2) == Preamble(None)
    assert TlsSniffer().feed(v2[:2]) is NEED_MORE


def test_sslv2_record_that_is_not_a_hello():
    assert tls(b"\x80\x2e\x02\x00\x00") is NotTls


# --------------------------------------------------------------------------
# TLS: not TLS at all


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET ",
        b"HEAD /",
        b"OPTIONS * HTTP/1.1\r\n",
        b"CONNECT a:443 HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"DELETE /x",
    ],
)
def test_http_on_the_tls_port(data):
    assert tls(data) is HttpOnTlsPort


@pytest.mark.parametrize("data", [b"G", b"GE", b"GET", b"OPTIONS", b"CONNEC"])
def test_maybe_http_needs_more(data):
    assert tls(data) is NEED_MORE


@pytest.mark.parametrize("data", [b"\x00", b"\x01\x02\x03", b"GEX", b"get /", b"SSH-2.0-OpenSSH\r\n", b"\x7f"])
def test_not_tls(data):
    assert tls(data) is NotTls


# --------------------------------------------------------------------------
# TLS: record layer


@pytest.mark.parametrize("content_type", [20, 21, 23])
def test_non_handshake_record_first(content_type):
    assert tls(record(b"\x01", content_type=content_type)) is UnexpectedTlsMessage


@pytest.mark.parametrize("content_type", [20, 21, 23, 24, 0, 0x80])
def test_non_handshake_record_inside_the_hello(content_type):
    payload = handshake(real_hello_body())
    data = record(payload[:10]) + record(payload[10:], content_type=content_type)
    assert tls(data) is UnexpectedTlsMessage


@pytest.mark.parametrize("version", [b"\x02\x00", b"\x00\x03", b"\xff\x01"])
def test_record_version(version):
    assert tls(record(handshake(hello_body()), version=version)) is BadClientHello
    payload = handshake(real_hello_body())
    assert tls(record(payload[:10]) + record(payload[10:], version=version)) is BadClientHello


@pytest.mark.parametrize("version", [b"\x03\x00", b"\x03\x01", b"\x03\x03", b"\x03\x04", b"\x03\xff"])
def test_record_minor_version_is_not_checked(version):
    assert tls(record(handshake(real_hello_body()), version=version)) == EXAMPLE


def test_empty_record():
    assert tls(record(b"")) is BadClientHello
    payload = handshake(real_hello_body())
    assert tls(record(payload[:10]) + record(b"") + record(payload[10:])) is BadClientHello


def test_record_larger_than_two_to_the_fourteen():
    assert tls(b"\x16\x03\x01" + (2**14 + 1).to_bytes(2, "big")) is TlsRecordOverflow
    assert tls(b"\x16\x03\x01\xff\xff") is TlsRecordOverflow
    assert tls(b"\x16\x03\x01" + (2**14).to_bytes(2, "big")) is NEED_MORE


def test_record_length_that_lies_short():
    # The record ends after the handshake header: the body's first byte (the
    # legacy_version's 0x03) is then read as the next record's content type.
    body = hello_body([sni(b"example.com")])
    data = record(handshake(body), length=4) + body
    assert tls(data) is UnexpectedTlsMessage


def test_record_length_that_lies_long():
    data = record(handshake(hello_body([sni(b"example.com")])))
    lying = data[:3] + (len(data) - 5 + 50).to_bytes(2, "big") + data[5:]
    assert tls(lying) is NEED_MORE
    assert tls(lying, max_preamble=len(data) + 49) is HeadTooLarge
    assert tls(lying + bytes(50), max_preamble=len(data) + 50) == EXAMPLE


# --------------------------------------------------------------------------
# TLS: handshake layer


@pytest.mark.parametrize("msg_type", [0, 2, 4, 11, 20, 255])
def test_handshake_that_is_not_a_client_hello(msg_type):
    assert tls(record(handshake(hello_body(), msg_type=msg_type))) is UnexpectedTlsMessage


@pytest.mark.parametrize("msg_type", [0, 2, 11])
def test_handshake_type_is_judged_from_its_first_byte(msg_type):
    # Regression: with the type alone in a one-byte record, the sniffer waited
    # for three more handshake bytes before refusing it.
    assert tls(record(bytes([msg_type]))) is UnexpectedTlsMessage
    assert tls(records(handshake(hello_body(), msg_type=msg_type), 1)[:6]) is UnexpectedTlsMessage
    assert tls(record(b"\x01")) is NEED_MORE


def test_handshake_length_that_lies_long():
    padding = extension(21, bytes(6))
    body = hello_body([sni(b"example.com")], extensions_length=len(sni(b"example.com")) + len(padding))
    data = record(handshake(body, length=len(body) + len(padding)))
    assert tls(data) is NEED_MORE  # waits for the next record
    assert tls(data + record(padding)) == EXAMPLE
    assert tls(data + record(bytes(10))) is BadClientHello
    assert tls(data + record(b"x", content_type=23)) is UnexpectedTlsMessage


def test_handshake_length_that_lies_short():
    body = hello_body([sni(b"example.com")])
    assert tls(record(handshake(body, length=len(body) - 1))) is BadClientHello


def test_handshake_body_empty():
    assert tls(record(handshake(b""))) is BadClientHello


# --------------------------------------------------------------------------
# TLS: ClientHello fields


def client_hello(**options):
    return tls(record(handshake(hello_body([sni(b"example.com"), SUPPORTED_VERSIONS], **options))))


@pytest.mark.parametrize("version", [0x0200, 0x0002, 0x0403, 0xFEFD])
def test_legacy_version(version):
    assert client_hello(version=version) is BadClientHello


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0303, 0x0304])
def test_legacy_version_accepted(version):
    assert client_hello(version=version) == EXAMPLE


def test_body_shorter_than_random():
    assert tls(record(handshake(b"\x03\x03" + bytes(31)))) is BadClientHello


@pytest.mark.parametrize(
    "options",
    [
        {"session_id_length": 33},  # > 32 and runs into the suites
        {"session_id_length": 255},  # runs past the whole hello
        {"session_id": bytes(33)},  # an honest length, but more than 32 bytes
        {"session_id_length": 31},  # lies short: the rest is misread
        {"suites_length": 0x1000},
        {"suites_length": 3},
        {"suites_length": 0},
        {"suites": b""},
        {"suites": b"\x13\x01\x13"},
        {"compression_length": 200},
        {"compression": b""},
        {"compression_length": 0},
        {"extensions_length": 0xFFFF},
        {"extensions_length": 3},  # lies short: bytes after the extensions
    ],
)
def test_lying_lengths_in_the_hello(options):
    assert client_hello(**options) is BadClientHello


def test_session_id_of_32_bytes_and_none():
    assert client_hello(session_id=bytes(32)) == EXAMPLE
    assert client_hello(session_id=b"") == EXAMPLE


def test_bytes_after_the_extensions():
    body = hello_body([sni(b"example.com")]) + b"\x00"
    assert tls(record(handshake(body))) is BadClientHello


@pytest.mark.parametrize(
    "extensions",
    [
        [extension(21, b"abc", length=10)],  # extension data runs past the block
        [sni(b"example.com"), b"\x00"],  # one byte where an extension type should be
        [sni(b"example.com"), b"\x00\x15\x00"],  # a type and half a length
        [extension(0, server_name_data(b"example.com", list_length=100))],  # list runs past
        [extension(0, server_name_data(b"example.com", list_length=5))],  # list lies short
        [extension(0, server_name_data(b"example.com") + b"\x00")],  # bytes after the list
        [extension(0, b"\x00")],  # half a list length
        [extension(0, vector(b"\x00\x00\x20example.com", 2))],  # name runs past the list
        [extension(0, vector(b"\x00\x00", 2))],  # half a name length
        [extension(0, vector(b"\x00", 2))],  # a name type and nothing else
    ],
)
def test_lying_lengths_in_the_extensions(extensions):
    assert tls(record(handshake(hello_body(extensions)))) is BadClientHello


@pytest.mark.parametrize(
    "extensions",
    [
        [SUPPORTED_VERSIONS, SUPPORTED_VERSIONS],
        [sni(b"example.com"), sni(b"example.com")],
        [sni(b"a.example"), extension(21, b""), sni(b"b.example")],
    ],
)
def test_duplicate_extensions(extensions):
    assert tls(record(handshake(hello_body(extensions)))) is BadClientHello


@pytest.mark.parametrize("names", [(b"a.example", b"b.example"), (b"example.com", b"example.com")])
def test_two_host_names(names):
    assert tls(hello(*names)) is BadClientHello


@pytest.mark.parametrize("name", [b"[::1]", b"[2001:db8::1]", b"127.0.0.1", b"10.0.0.1.", b"::1"])
def test_ip_literal_sni(name):
    # RFC 6066 section 3: "Literal IPv4 and IPv6 addresses are not permitted".
    assert tls(hello(name)) is BadClientHello


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b".",
        b"exa mple.com",
        b"example.com\x00",
        b"a\x00.evil.example",
        b"example.com:443",
        b"a@b.example",
        b"a/b",
        b"-a.example",
        b"a..example",
        b"b\xc3\xbccher.example",
        b"a" * 64 + b".example",
        b"\r\nHost: evil",
    ],
)
def test_invalid_sni(name):
    assert tls(hello(name)) is BadClientHello


def test_too_large_for_max_preamble():
    data = real_hello("example.com")
    assert tls(data, max_preamble=len(data)) == EXAMPLE
    assert tls(data, max_preamble=len(data) - 1) is HeadTooLarge
    # Refused as soon as the record header announces too much, not at the end.
    assert TlsSniffer(len(data) - 1).feed(data[:4]) is NEED_MORE
    with pytest.raises(HeadTooLarge):
        TlsSniffer(len(data) - 1).feed(data[:5])


def test_bytes_past_max_preamble_are_not_looked_at():
    # Regression: a hello over the limit passed when it arrived in one read, and a
    # record header straddling the limit was judged on the bytes beyond it.
    payload = handshake(hello_body([sni(b"example.com")]))
    first = record(payload[:-1])
    limit = len(first) + 2  # the second record's header straddles the limit
    assert len(payload) <= limit
    assert tls(first + record(payload[-1:]), max_preamble=limit + 4) == EXAMPLE
    assert tls(first + record(payload[-1:]), max_preamble=limit) is HeadTooLarge
    for second_header, beyond in [
        (b"\x16\x03\x03\x00\x00", BadClientHello),
        (b"\x16\x03\x03\xff\xff", TlsRecordOverflow),
        (b"\x16\x03\x03\x00\x02", HeadTooLarge),
    ]:
        assert tls(first + second_header + b"xx", max_preamble=limit) is HeadTooLarge
        assert tls(first + second_header + b"xx", max_preamble=limit + 3) is beyond
    assert tls(first + b"\x17\x03", max_preamble=limit) is UnexpectedTlsMessage


def test_handshake_length_beyond_max_preamble_is_refused_early():
    body = hello_body([sni(b"example.com")])
    payload = handshake(body, length=100_000)
    data = record(payload)
    sniffer = TlsSniffer(1000)
    with pytest.raises(HeadTooLarge):
        sniffer.feed(data)


def test_many_small_records_past_max_preamble():
    data = records(handshake(real_hello_body()), 1)  # 6 bytes per handshake byte
    assert tls(data, max_preamble=len(data)) == EXAMPLE
    assert tls(data, max_preamble=len(data) - 1) is HeadTooLarge
    assert tls(data[:-6] + b"\x16\x03", max_preamble=len(data) - 4) is HeadTooLarge


# --------------------------------------------------------------------------
# HTTP: heads that parse


def head(*lines: bytes, request: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join([request, *lines]) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (head(b"Host: example.com"), "example.com"),
        (head(b"host: Example.COM."), "example.com"),
        (head(b"HOST:example.com:8080"), "example.com"),
        (head(b"Host: \t example.com \t"), "example.com"),
        (head(b"Host: [::1]:8080"), "[::1]"),
        (head(b"Host: 127.0.0.1"), "127.0.0.1"),
        (head(b"Accept: */*", b"Host: example.com", b"X-Empty:"), "example.com"),
        (head(b"Host:"), None),  # RFC 9110 7.2: empty when the target has no authority
        (head(request=b"GET / HTTP/1.0"), None),
        (head(b"Host: example.com", request=b"GET / HTTP/1.0"), "example.com"),
        (head(b"Host: example.com", request=b"GET http://example.com/x HTTP/1.1"), "example.com"),
        (head(b"Host: EXAMPLE.com:80", request=b"GET HTTP://Example.com:80?q HTTP/1.1"), "example.com"),
        (head(b"Host: example.com", request=b"GET https://example.com#f HTTP/1.1"), "example.com"),
        (head(b"Host:", request=b"GET http://example.com/ HTTP/1.1"), "example.com"),
        (head(request=b"GET http://example.com/ HTTP/1.0"), "example.com"),
        (head(b"Host: example.com", request=b"GET /?next=ftp://other.example/ HTTP/1.1"), "example.com"),
        (head(b"Host: example.com", request=b"GET /a://b HTTP/1.1"), "example.com"),
        (head(b"Host: example.com:443", request=b"CONNECT example.com:443 HTTP/1.1"), "example.com"),
        (head(b"Host: Example.com", request=b"connect EXAMPLE.com:80 HTTP/1.1"), "example.com"),
        (head(request=b"CONNECT [::1]:443 HTTP/1.0"), "[::1]"),
        (head(b"Host:", request=b"CONNECT example.com:443 HTTP/1.1"), "example.com"),
        (head(b"Host: example.com", request=b"OPTIONS * HTTP/1.1"), "example.com"),
        # Routing compares hosts only: a port that differs is the backend's business.
        (head(b"Host: example.com:80", request=b"GET http://example.com:81/ HTTP/1.1"), "example.com"),
        (head(b"Host: example.com", b"X-Ctl: a\x01b\x7f"), "example.com"),  # only the Host line is held to it
        (head(b"Host: example.com", request=b"M-SEARCH!#$%&'*+.^_`|~ /%20?a=b HTTP/1.1"), "example.com"),
    ],
)
def test_http_heads(data, expected):
    assert http(data) == Preamble(expected)


def test_http_body_bytes_are_kept_and_not_read():
    data = head(b"Host: example.com") + b"\x00\nbody with \r bare CR"
    sniffer = HttpSniffer()
    assert outcome(sniffer, split_at(data, [3, 20, 30])) == EXAMPLE
    assert sniffer.feed(b"") == EXAMPLE
    assert http(data) == EXAMPLE
    assert sniff.sniff_http(data) == EXAMPLE


def test_http_sniffer_keeps_every_byte_and_repeats_its_answer():
    data = head(b"Host: example.com") + b"body"
    sniffer = HttpSniffer()
    assert sniffer.feed(data) == EXAMPLE
    assert sniffer.buffer == data
    assert sniffer.feed(b"more") == EXAMPLE


def test_http_every_strict_prefix_needs_more():
    data = head(b"User-Agent: x", b"Host: example.com")
    for end in range(len(data)):
        assert HttpSniffer().feed(data[:end]) is NEED_MORE
    assert HttpSniffer().feed(b"") is NEED_MORE


# --------------------------------------------------------------------------
# HTTP: rejections, each a 400 unless noted


@pytest.mark.parametrize(
    "data",
    [
        # bare LF / CR
        b"GET / HTTP/1.1\nHost: example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\n",
        b"GET / HTTP/1.1\r\nHost: exa\rmple.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\r\nHost: example.com\r\n\r\n",
        # obs-fold
        head(b"Host: example.com", b" evil.example"),
        head(b"X: a", b"\tHost: evil.example"),
        head(b"Host:", b" example.com"),
        # whitespace before the colon, and other bad names
        head(b"Host : example.com"),
        head(b"Host\t: example.com"),
        head(b"Host: example.com", b"X y: z"),
        head(b"Host: example.com", b": z"),
        head(b"Host: example.com", b"no colon"),
        head(b"Host: example.com", b"X\x00: z"),
        # NUL in any value
        head(b"Host: example.com", b"X: a\x00b"),
        # Host
        head(b"Host: example.com", b"Host: example.com"),
        head(b"Host: a.example", b"host: b.example"),
        head(),
        head(b"X-Host: example.com"),
        head(b"Host: a.example", request=b"GET http://b.example/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http://user@example.com/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http://evil.example@example.com/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http://:pw@example.com/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http:///x HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http://:80/x HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http://bad_host!/x HTTP/1.1"),
        head(b"Host: example.com", request=b"GET http://example.com:99999/ HTTP/1.1"),
        # CONNECT's authority-form target is routed like an absolute-form one
        head(b"Host: a.example", request=b"CONNECT b.example:80 HTTP/1.1"),
        head(b"Host: a.example", request=b"Connect b.example:80 HTTP/1.1"),
        head(b"Host: a.example", request=b"CONNECT http://a.example/ HTTP/1.1"),
        head(b"Host: a.example", request=b"CONNECT /a.example HTTP/1.1"),
        head(b"Host: a.example", request=b"CONNECT u@a.example:80 HTTP/1.1"),
        head(b"Host: a.example", request=b"CONNECT :80 HTTP/1.1"),
        head(b"Host: a.example", request=b"CONNECT a.example:99999 HTTP/1.1"),
        # absolute-form with a scheme this gateway does not route
        head(b"Host: example.com", request=b"GET ftp://other.example/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET ws://example.com/chat HTTP/1.1"),
        head(b"Host: example.com", request=b"GET WSS://example.com/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET git+ssh://example.com/ HTTP/1.1"),
        head(b"Host: example.com", request=b"GET httpx://example.com/ HTTP/1.1"),
        head(b"Host: example.com", b"X-Pad: " + b"x" * 3000, request=b"GET ws://a/ HTTP/1.1"),  # line parser
        head(b"Host: exa\x00mple.com"),
        head(b"Host: example.com\x00"),
        head(b"Host: \x01example.com"),
        head(b"Host: example.com\x1f"),
        head(b"Host: exam\x7fple.com"),
        head(b"Host: exam ple.com"),
        head(b"Host: exam\tple.com"),
        head(b"Host: user@example.com"),
        head(b"Host: example.com:99999"),
        head(b"Host: example.com:http"),
        head(b"Host: [::1"),
        head(b"Host: [::1]x"),
        head(b"Host: [::1%eth0]"),
        head(b"Host: :80"),  # a port with no host is not an empty Host
        head(b"Host: :"),
        head(b"Host: []:80"),
        head(b"Host: bad_host!"),
        head(b"Host: a..example"),
        head(b"Host: " + b"a" * 64 + b".example"),
        # request line
        head(b"Host: example.com", request=b"GET / HTTP/2.0"),
        head(b"Host: example.com", request=b"GET / HTTP/1.2"),
        head(b"Host: example.com", request=b"GET / http/1.1"),
        head(b"Host: example.com", request=b"GET / HTTP/1.1 "),
        head(b"Host: example.com", request=b"GET /"),
        head(b"Host: example.com", request=b"GET  / HTTP/1.1"),
        head(b"Host: example.com", request=b" GET / HTTP/1.1"),
        head(b"Host: example.com", request=b"G(T / HTTP/1.1"),
        head(b"Host: example.com", request=b"GET /\x7f HTTP/1.1"),
        head(b"Host: example.com", request=b"GET /\x80 HTTP/1.1"),
        head(b"Host: example.com", request=b"GET /\x00 HTTP/1.1"),
        head(b"Host: example.com", request=b"GET /\t HTTP/1.1"),
        head(b"Host: example.com", request=b""),
        head(b"Host: example.com", request=b"GET / "),
        head(b"Host: example.com", request=b"GET / HTTP/1."),
        head(b"Host: example.com", request=b"GET / H"),
    ],
)
def test_http_rejections(data):
    assert http(data) is BadRequest


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01",  # TLS on the HTTP port
        b"\x16",
        b"\x00",
        b" ",
        b"GET  ",
        b"GET /\x00",
        b"GET /\r",
        b"GET / X",
        b"G T\x00",
        b"GET / HX",
        b"GET / HTTP/2",
        b"GET / HTTP/1.2",
        b"GET / HTTP/1.1 ",
        b"GET / HTTP/1.1\rX",
        b"GET / HTTP/1.1\r\r",
        b"GET\t/",
        b"\r",
        b"\xff",
    ],
)
def test_request_line_that_can_never_be_valid_is_refused_at_once(data):
    # No line end yet: refused from the bytes so far, not after a timeout.
    assert http(data) is BadRequest


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"G",
        b"GET",
        b"GET ",
        b"GET /",
        b"GET /path?q=1 ",
        b"GET / HTTP/1.",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com",
        b"GET / HTTP/1.1\r\nHost: example.com\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r",
        b"GET / HTTP/1.1\r\n bad fold later",  # header lines are judged when whole
    ],
)
def test_http_prefixes_need_more(data):
    assert http(data) is NEED_MORE


def test_prefix_check_resumes_across_feeds():
    sniffer = HttpSniffer()
    for piece in (b"GE", b"T /in", b"dex HT", b"TP/1", b".1\r"):
        assert sniffer.feed(piece) is NEED_MORE
    with pytest.raises(BadRequest):
        HttpSniffer().feed(b"GET /index HTTP/1.1\rX")
    assert sniffer.feed(b"\nHost: example.com\r\n\r\n") == EXAMPLE


def test_431_as_soon_as_the_head_passes_max_preamble():
    data = head(b"Host: example.com", b"Cookie: " + b"c" * 100)
    assert http(data, max_preamble=len(data)) == EXAMPLE
    assert http(data, max_preamble=len(data) - 1) is HeadTooLarge
    for limit in (20, 40, len(data) - 3):
        sniffer = HttpSniffer(limit)
        for i in range(limit - 1):
            assert sniffer.feed(data[i : i + 1]) is NEED_MORE
        with pytest.raises(HeadTooLarge):
            sniffer.feed(data[limit - 1 : limit])


def test_431_for_a_long_request_line_and_a_long_header_line():
    assert http(b"GET /" + b"a" * 100, max_preamble=64) is HeadTooLarge
    assert http(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n", max_preamble=64) is HeadTooLarge
    assert http(head(b"Host: example.com", b"X: " + b"x" * 100), max_preamble=64) is HeadTooLarge


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        # Regression: whole, the NUL past the limit gave 400; byte by byte, 431.
        (b"GETXXXXXXXXXX\x00", 10, HeadTooLarge),
        # Regression: whole, a line ending past the limit gave 431 before its bad
        # byte inside the limit was seen; byte by byte, 400.
        (b"GET /\x00" + b"a" * 100 + b" HTTP/1.1\r\n", 64, BadRequest),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 14, HeadTooLarge),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 15, HeadTooLarge),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 14, BadRequest),
    ],
)
def test_bytes_past_max_preamble_do_not_change_the_answer(data, limit, expected):
    assert http(data, max_preamble=limit) is expected
    for cut in range(len(data)):
        assert outcome(HttpSniffer(limit), [data[:cut], data[cut:]]) is expected


def test_431_counts_the_whole_head_not_one_line():
    lines = [b"X-%d: %s" % (i, b"v" * 20) for i in range(10)]
    data = head(b"Host: example.com", *lines)
    assert http(data, max_preamble=len(data) - 1) is HeadTooLarge


# --------------------------------------------------------------------------
# One-shot helpers


def test_one_shot_helpers():
    with pytest.raises(HeadTooLarge):
        sniff.sniff_tls(real_hello("example.com"), max_preamble=64)
    assert sniff.sniff_http(b"GET / HTTP/1.1\r\n") is NEED_MORE
    with pytest.raises(BadRequest):
        sniff.sniff_http(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")


# --------------------------------------------------------------------------
# The real-client corpus: tests/data/clienthello/, made by capture_clienthellos.py

CORPUS = Path(__file__).parent / "data" / "clienthello"
CORPUS_CASES = sorted(CORPUS.glob("*.bin"))


def corpus_case(path: Path) -> tuple[bytes, Preamble]:
    meta = json.loads(path.with_suffix(".json").read_text())
    return path.read_bytes(), Preamble(meta["sni"])


def test_corpus_has_real_clients():
    clients = {json.loads(p.with_suffix(".json").read_text())["client"] for p in CORPUS_CASES}
    assert len(clients - {"hand-made"}) >= 8


@pytest.mark.parametrize("path", CORPUS_CASES, ids=[p.stem for p in CORPUS_CASES])
def test_corpus(path):
    data, expected = corpus_case(path)
    assert sniff.sniff_tls(data) == expected
    assert outcome(TlsSniffer(), bytewise(data)) == expected
    rng = random.Random(path.stem)
    for _ in range(20):
        cuts = rng.sample(range(1, len(data)), rng.randint(1, min(10, len(data) - 1)))
        assert outcome(TlsSniffer(), split_at(data, cuts)) == expected
    if data[0] == sniff.TLS_CONTENT_HANDSHAKE:  # an SSLv2 hello is decided by its first 3 bytes
        assert sniff.sniff_tls(data[:-1]) is NEED_MORE  # the hello is read to its last byte


@pytest.mark.parametrize("quick", [True, False])
def test_framing_fields_and_head_end_for_the_request_stream(quick):
    """httpstream.py asks the sniffer for the framing fields, raw, and where the head ends: both paths agree."""
    head = (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length:  5\r\nX: y\r\n"
        b"Transfer-Encoding: chunked\r\nUpgrade: websocket\r\nContent_Length: 1\r\n\r\n"
    )
    sniffer = HttpSniffer(framing=True)
    pieces = [head + b"hello"] if quick else [*bytewise(head), b"hello"]
    assert outcome(sniffer, pieces) == Preamble("a.test")
    assert sniffer.head_end == len(head)
    assert sniffer.method == b"POST"
    assert sniffer.version == b"HTTP/1.1"
    assert sniffer.framing_fields == [
        (b"content-length", b"  5"),
        (b"transfer-encoding", b" chunked"),
        (b"upgrade", b" websocket"),
        (b"content_length", b" 1"),
    ]
    plain = HttpSniffer()  # the first-request path does not collect them
    assert outcome(plain, pieces) == Preamble("a.test")
    assert plain.framing_fields == []


# --------------------------------------------------------------------------
# The fast paths: a ClientHello whole in its first record, names seen before


def test_a_long_session_id_cut_short_is_refused_like_any_short_hello():
    body = b"\x03\x03" + bytes(32) + b"\x20" + bytes(8)  # a 32-byte session id of which 8 bytes came
    assert tls(record(handshake(body))) is BadClientHello
    with pytest.raises(BadClientHello, match="legacy_session_id"):
        TlsSniffer().feed(record(handshake(body)))


def test_a_hello_with_bytes_after_its_extensions_is_refused():
    body = hello_body([sni(b"example.com")]) + b"\x00"
    assert tls(record(handshake(body))) is BadClientHello
    with pytest.raises(BadClientHello, match="bytes after the extensions"):
        TlsSniffer().feed(record(handshake(body)))


@pytest.mark.parametrize("listener", ["tls", "http"])
def test_the_names_cache_stays_within_its_bound_and_answers_as_without_it(monkeypatch, listener):
    monkeypatch.setattr(sniff, "NAMES_CACHED", 3)
    monkeypatch.setattr(sniff, "_NAMES", {})
    monkeypatch.setattr(sniff, "_HOSTS", {})
    cache = sniff._NAMES if listener == "tls" else sniff._HOSTS
    for _ in range(2):  # the second round meets the names in the cache, or cleared from it
        for i in range(7):
            name = f"Host-{i}.Example"
            if listener == "tls":
                assert tls(real_hello(name)) == Preamble(name.lower())
            else:
                assert http(f"GET / HTTP/1.1\r\nHost: {name}:8080\r\n\r\n".encode()) == Preamble(name.lower())
            assert len(cache) <= 3
