"""Read the domain out of a connection's first bytes: sans-IO, bytes in, result out.

Two incremental sniffers, one per listener: ``TlsSniffer`` walks TLS records
until the whole ClientHello is in and returns its SNI; ``HttpSniffer`` reads the
request head line by line and returns the Host. Each ``feed(data)`` returns one
of three things, never anything else:

- a ``Preamble`` (frozen): the domain, or ``None`` when the client named none;
- the sentinel ``NEED_MORE``: nothing wrong yet, the answer needs more bytes;
- it raises a ``GatewayError`` subclass (kiaerrors.py) that carries the reply
  the contract gives for it (``http_status`` on the HTTP listener,
  ``tls_alert`` on the TLS one). Routing and backend failures belong to the
  same family, so one function turns any of them into the reply.

Each byte is examined a bounded number of times however the input is split,
so a client trickling one byte per packet costs linear time. This module opens
no socket, imports no gevent and never logs.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import NamedTuple, Union

from kiaerrors import (
    BadClientHello,
    BadRequest,
    HeadTooLarge,
    HttpOnTlsPort,
    NotTls,
    TlsRecordOverflow,
    UnexpectedTlsMessage,
)

__all__ = [
    "NEED_MORE",
    "BadClientHello",
    "BadRequest",
    "HeadTooLarge",
    "HttpOnTlsPort",
    "HttpSniffer",
    "NeedMore",
    "NotTls",
    "Preamble",
    "TlsRecordOverflow",
    "TlsSniffer",
    "UnexpectedTlsMessage",
    "field_line",
    "normalize_domain",
    "parse_client_hello",
    "sniff_http",
    "sniff_tls",
    "split_host_port",
]

# The default bound on a preamble. Chromium's post-quantum ClientHello is about
# 1.8 KB and nginx's default large_client_header_buffers is 8 KB per line;
# 32 KiB leaves room for big cookies while keeping a slow client cheap.
MAX_PREAMBLE = 32768


class NeedMore:
    """The type of ``NEED_MORE``: the parsers of later bytes (httpstream.py, proxyproto.py) share it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


class Preamble(NamedTuple):
    """What the first bytes say: the normalised domain, or None if none was named. (A tuple: immutable, and
    built faster than a frozen dataclass, once per connection.)"""

    domain: str | None


SniffResult = Union[Preamble, NeedMore]


# --------------------------------------------------------------------------
# Domain names


_LABEL_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_LABEL = rb"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*")  # what the label loop accepts


def normalize_domain(name: str | bytes) -> str:
    """Lower-case, drop one trailing dot, and check DNS name syntax.

    Used by the config loader and both parsers so that a name compares equal
    wherever it came from. Accepts letters, digits, hyphen and underscore in
    labels of 1-63 characters, 253 in all (RFC 1035 section 2.3.4), and IPv6
    literals in brackets. Raises ValueError with the reason.
    """
    raw = name.encode("ascii", "replace") if isinstance(name, str) else bytes(name)
    if raw.startswith(b"[") and raw.endswith(b"]"):
        if b"%" in raw:  # ipaddress would take any bytes after '%' as a zone id
            raise ValueError(f"zone id in IPv6 literal: {raw!r}")
        try:
            address = ipaddress.IPv6Address(raw[1:-1].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"not an IPv6 literal: {raw!r}") from None
        return f"[{address.compressed}]"
    lowered = raw.lower()
    if lowered.endswith(b"."):
        lowered = lowered[:-1]
    if not lowered:
        raise ValueError("empty name")
    if len(lowered) > 253:
        raise ValueError("name longer than 253 characters")
    if not _NAME.fullmatch(lowered):  # checked in C; _why_not_a_name only explains
        raise ValueError(_why_not_a_name(lowered, raw))
    return lowered.decode("ascii")


# Names as clients send them (SNI, Host header) -> normalised, for the parsers: a gateway sees the same few names
# again and again, and a hit costs a dict lookup instead of the checks. Only valid names go in; cleared when full,
# so a client sending endless new names costs what it did without the caches.
_NAMES: dict[bytes, str] = {}
_HOSTS: dict[bytes, str] = {}
NAMES_CACHED = 4096


def _remember(cache: dict[bytes, str], raw: bytes, name: str) -> str:
    if len(cache) >= NAMES_CACHED:
        cache.clear()
    cache[raw] = name
    return name


def _why_not_a_name(lowered: bytes, raw: bytes) -> str:
    for label in lowered.split(b"."):
        if not label:
            return f"empty label in {raw!r}"
        if len(label) > 63:
            return f"label longer than 63 characters in {raw!r}"
        if not _LABEL_CHARS.issuperset(label):
            return f"invalid character in {raw!r}"
    return f"label starts or ends with '-' in {raw!r}"


def split_host_port(authority: bytes) -> bytes:
    """Return the host part of ``host[:port]`` or ``[v6][:port]``; ValueError if malformed."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(b":"):
            raise ValueError("junk after IPv6 literal")
        port = rest[1:]
    else:
        host, _, port = authority.partition(b":")
    if port and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"bad port {port!r}")
    return host


# --------------------------------------------------------------------------
# TLS: RFC 8446 section 5.1 (records), 4 (handshake), 4.1.2 (ClientHello);
# RFC 6066 section 3 (server_name).

TLS_CONTENT_HANDSHAKE = 22
TLS_HANDSHAKE_CLIENT_HELLO = 1
TLS_RECORD_HEADER = 5
TLS_MAX_FRAGMENT = 2**14  # RFC 8446 5.1: a TLSPlaintext fragment is at most 2^14 bytes
EXT_SERVER_NAME = 0
_EXTENSION_HEADER = struct.Struct("!HH").unpack_from  # extension_type, extension_data length
SNI_HOST_NAME = 0

_HTTP_METHOD_STARTS = tuple(
    m + b" " for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI")
)


class TlsSniffer:
    """Reassemble the ClientHello from records fed in any pieces; report its SNI."""

    def __init__(self, max_preamble: int = MAX_PREAMBLE) -> None:
        self.max_preamble = max_preamble
        self.buffer = bytearray()  # every byte fed, to be forwarded untouched
        self._record_at = 0  # offset of the next record header not yet walked
        self._handshake = bytearray()  # handshake bytes collected from records so far
        self._hello_length: int | None = None  # 4 + body length, once known
        self.result: Preamble | None = None

    def feed(self, data: bytes) -> SniffResult:
        if self.result is not None:
            return self.result
        if not self.buffer and len(data) > 9 and data[0] == TLS_CONTENT_HANDSHAKE and data[1] == 3:
            # The common case: one record holding exactly the ClientHello, all of it in the first read.
            length = (data[3] << 8) | data[4]
            if (
                data[5] == TLS_HANDSHAKE_CLIENT_HELLO
                and 4 + int.from_bytes(data[6:9], "big") == length
                and 0 < length <= TLS_MAX_FRAGMENT
                and TLS_RECORD_HEADER + length <= min(len(data), self.max_preamble)
            ):
                self.buffer += data
                self.result = Preamble(parse_client_hello(data[9 : TLS_RECORD_HEADER + length]))
                return self.result
        self.buffer += data
        if not self.buffer:
            return NEED_MORE
        first = self.buffer[0]
        if first & 0x80:
            return self._sslv2()
        if first != TLS_CONTENT_HANDSHAKE:
            return self._not_tls(first)
        while self._hello_length is None or len(self._handshake) < self._hello_length:
            if not self._next_record():
                if len(self.buffer) >= self.max_preamble:
                    raise HeadTooLarge(f"no complete ClientHello in {self.max_preamble} bytes")
                return NEED_MORE
        self.result = Preamble(parse_client_hello(bytes(self._handshake[4 : self._hello_length])))
        return self.result

    def _not_tls(self, first: int) -> SniffResult:
        if first in (20, 21, 23):  # change_cipher_spec, alert, application_data
            raise UnexpectedTlsMessage(f"TLS record type {first} before the ClientHello")
        head = bytes(self.buffer[:8])
        if any(head.startswith(method) for method in _HTTP_METHOD_STARTS):
            raise HttpOnTlsPort("plain HTTP sent to the TLS port")
        if any(method.startswith(head) for method in _HTTP_METHOD_STARTS):
            return NEED_MORE  # may still become an HTTP request line: worth a 400 that says so
        raise NotTls(f"not TLS: first byte 0x{first:02x}")

    def _sslv2(self) -> SniffResult:
        # SSL 2.0-compatible ClientHello (RFC 5246 appendix E.2): a 2-byte length
        # with the high bit set, then msg_type 1. It has no extensions, so no SNI.
        if len(self.buffer) < 3:
            return NEED_MORE
        if self.buffer[2] != TLS_HANDSHAKE_CLIENT_HELLO:
            raise NotTls("SSLv2 record that is not a ClientHello")
        self.result = Preamble(None)
        return self.result

    def _next_record(self) -> bool:
        """Move one whole record's payload into the handshake buffer; False if it is not all in."""
        at = self._record_at
        # Bytes past max_preamble are never looked at, so the answer cannot
        # depend on how much arrived in one read.
        header = self.buffer[at : min(at + TLS_RECORD_HEADER, self.max_preamble)]
        if len(header) >= 1 and header[0] != TLS_CONTENT_HANDSHAKE:
            raise UnexpectedTlsMessage(f"TLS record type {header[0]} inside the ClientHello")
        if len(header) >= 2 and header[1] != 3:
            raise BadClientHello(f"TLS record version major {header[1]}")
        if len(header) < TLS_RECORD_HEADER:
            return False
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise BadClientHello("empty handshake record")  # RFC 8446 5.1 forbids it
        if length > TLS_MAX_FRAGMENT:
            raise TlsRecordOverflow(f"TLS record of {length} bytes")
        end = at + TLS_RECORD_HEADER + length
        if end > self.max_preamble:
            raise HeadTooLarge(f"ClientHello records exceed {self.max_preamble} bytes")
        if len(self.buffer) < end:
            return False
        self._handshake += self.buffer[at + TLS_RECORD_HEADER : end]
        self._record_at = end
        if self._hello_length is None:
            # The type is the first handshake byte: judge it as soon as it is in,
            # even when a client sends it in a record of its own.
            if self._handshake[0] != TLS_HANDSHAKE_CLIENT_HELLO:
                raise UnexpectedTlsMessage(f"handshake type {self._handshake[0]} is not a ClientHello")
            if len(self._handshake) >= 4:
                self._hello_length = 4 + int.from_bytes(self._handshake[1:4], "big")
                if self._hello_length > self.max_preamble:
                    raise HeadTooLarge(f"ClientHello of {self._hello_length} bytes")
        return True


class _Reader:
    """Bounds-checked cursor over a ClientHello body: a lying length raises, never truncates."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise BadClientHello(f"{what}: length {n} runs past the ClientHello")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def integer(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str) -> bytes:
        return self.take(self.integer(length_bytes, what), what)

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def parse_client_hello(body: bytes) -> str | None:
    """The SNI of a ClientHello body, from TLS records or QUIC CRYPTO frames. A well-formed one is walked by
    offsets; anything else by ``_Reader``, whose checks say what is wrong."""
    n = len(body)
    if n > 38 and body[0] == 3 and body[34] <= 32:  # legacy_version 3.x; random; a session id of at most 32
        pos = 35 + body[34]
        if pos + 2 <= n:
            suites = (body[pos] << 8) | body[pos + 1]
            pos += 2 + suites
            if suites and not suites % 2 and pos < n and body[pos]:  # a compression method
                pos += 1 + body[pos]
                if pos + 2 <= n and pos + 2 + ((body[pos] << 8) | body[pos + 1]) == n:
                    return _extensions(body, pos + 2, n)
    return _parse_client_hello_checked(body)


def _parse_client_hello_checked(body: bytes) -> None:
    """A ClientHello the offset walk did not take: one without extensions (None), or what is wrong with it."""
    hello = _Reader(body)
    version = hello.integer(2, "legacy_version")
    if version >> 8 != 3:
        raise BadClientHello(f"ClientHello version 0x{version:04x}")
    hello.take(32, "random")
    if len(hello.vector(1, "legacy_session_id")) > 32:
        raise BadClientHello("session id longer than 32 bytes")
    suites = hello.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise BadClientHello("bad cipher_suites length")
    if not hello.vector(1, "legacy_compression_methods"):
        raise BadClientHello("no compression method")
    if hello.at_end():
        return None  # no extensions at all (TLS 1.0-style hello)
    hello.vector(2, "extensions")
    raise BadClientHello("bytes after the extensions")  # extensions up to the end took the offset walk above


def _extensions(extensions: bytes, pos: int, end: int) -> str | None:
    """Walk the extensions in ``extensions[pos:end]`` by offset (a hello carries 10-20); return the SNI."""
    seen = set()
    server_name = None
    while pos < end:
        if pos + 4 > end:
            raise BadClientHello("extension header runs past the ClientHello")
        kind, length = _EXTENSION_HEADER(extensions, pos)
        pos += 4
        if pos + length > end:
            raise BadClientHello(f"extension {kind}: length {length} runs past the ClientHello")
        if kind in seen:
            raise BadClientHello(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            server_name = _parse_server_name(extensions[pos : pos + length])
        pos += length
    return server_name


def _parse_server_name(data: bytes) -> str | None:
    """The host_name of a server_name extension: one entry, read by offsets; any other shape by ``_Reader``."""
    size = len(data)
    if size > 5 and data[2] == SNI_HOST_NAME and (data[0] << 8) | data[1] == size - 2 == ((data[3] << 8) | data[4]) + 3:
        name = data[5:]
        return _NAMES.get(name) or _sni_name(name)
    return _parse_server_names(data)


def _parse_server_names(data: bytes) -> str | None:
    outer = _Reader(data)
    names = _Reader(outer.vector(2, "server_name_list"))
    if not outer.at_end():
        raise BadClientHello("bytes after server_name_list")
    host_name = None
    while not names.at_end():
        name_type = names.integer(1, "server name type")
        name = names.vector(2, "server name")
        if name_type != SNI_HOST_NAME:
            continue  # unknown name types are skipped (RFC 6066 section 3)
        if host_name is not None:
            raise BadClientHello("two host_name entries in server_name")
        host_name = _NAMES.get(name) or _sni_name(name)
    return host_name


def _sni_name(name: bytes) -> str:
    try:
        host_name = normalize_domain(name)
    except ValueError as exc:
        raise BadClientHello(f"invalid SNI: {exc}") from None
    if host_name.startswith("[") or _is_ipv4(host_name):
        raise BadClientHello("IP literal in SNI")  # RFC 6066 section 3 forbids it
    return _remember(_NAMES, name, host_name)


def _is_ipv4(name: str) -> bool:
    if not name.rpartition(".")[2].isdigit():
        return False  # a name whose last label is not a number is no IPv4 literal
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------
# HTTP/1.x request head: RFC 9112 sections 2-3 and 5, RFC 9110 section 7.2.

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VCHAR = frozenset(range(0x21, 0x7F))
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_FIELD_VALUE_BAD = frozenset(range(0x20)) - {0x09}  # CTLs but HTAB
_HOST_VALUE_BAD_BYTES = bytes(sorted(_FIELD_VALUE_BAD | {0x7F}))
# A whole valid head in one regex: what the line-by-line parser below accepts
# (token method, one space, vchar target, one space, version, CRLF; fields of
# token ":" value without NUL, CR or LF). Anything else takes the slow path,
# which says what is wrong.
QUICK_HEAD = 2048  # heads up to this size take the regex; past it the regex costs more than the line parser
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
HEAD = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) (HTTP/1\.[01])\r\n((?:" + TOKEN + rb":[^\x00\r\n]*\r\n)*)\r\n")
HOST_FIELD = re.compile(rb"^host:([^\r]*)\r$", re.IGNORECASE | re.MULTILINE)
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986 section 3.1
# The fields that frame a message (RFC 9112 section 6) or ask for another protocol
# (RFC 9110 section 7.8; HTTP2-Settings goes with an upgrade to h2c, RFC 7540
# section 3.2), and their underscore spellings: CGI-style backends map
# "Content_Length" to the same variable as "Content-Length".
FRAMING_NAMES = frozenset(
    (b"content-length", b"transfer-encoding", b"upgrade", b"http2-settings", b"content_length", b"transfer_encoding")
)
FRAMING_FIELD = re.compile(
    rb"^(content[-_]length|transfer[-_]encoding|upgrade|http2-settings):([^\r]*)\r$", re.IGNORECASE | re.MULTILINE
)


class HttpSniffer:
    """Read a request head fed in any pieces; report the host it names."""

    def __init__(self, max_preamble: int = MAX_PREAMBLE, framing: bool = False) -> None:
        self.max_preamble = max_preamble
        self.framing = framing  # also collect the framing fields (httpstream.py); the first-request path skips it
        self.buffer = bytearray()  # every byte fed, to be forwarded untouched
        self.head_end = 0  # once decided: the offset just past the head's empty line
        self.method = b""
        self.framing_fields: list[tuple[bytes, bytes]] = []  # (lower-case name, raw value) of FRAMING_NAMES fields
        self._line_start = 0  # offset of the first line not yet parsed
        self._checked = 0  # bytes of the request line already checked as a prefix
        self._part = 0  # which part of the request line the prefix check is in
        self._part_start = 0
        self._version: bytes | None = None
        self._target_host: bytes | None = None  # host from an absolute-form target
        self._hosts: list = []
        self.result: Preamble | None = None

    def feed(self, data: bytes) -> SniffResult:
        if self.result is not None:
            return self.result
        end = data.find(b"\r\n\r\n", 0, QUICK_HEAD) if not self.buffer else -1
        if end > 0:  # the common case: a short head whole in the first read, checked in C
            head = HEAD.fullmatch(data, 0, end + 4)
            if head is not None and head.end() <= self.max_preamble:
                self.buffer += data
                self.method, target, self._version, fields = head.groups()
                self._target(target)
                self._hosts = [value.strip(b" \t") for value in HOST_FIELD.findall(fields)]
                if self.framing:
                    self.framing_fields = [(k.lower(), v) for k, v in FRAMING_FIELD.findall(fields)]
                self.head_end = head.end()
                self.result = Preamble(self._domain())
                return self.result
        search_from = max(self._line_start, len(self.buffer))  # earlier bytes hold no LF
        self.buffer += data
        if self._version is None:
            self._check_request_line_prefix()
        while True:
            end = self.buffer.find(b"\n", search_from)
            if end < 0:
                break
            if end + 1 > self.max_preamble:
                raise HeadTooLarge(f"request head exceeds {self.max_preamble} bytes")
            line = bytes(self.buffer[self._line_start : end + 1])
            self._line_start = search_from = end + 1
            if line.count(b"\r") != 1 or not line.endswith(b"\r\n"):
                raise BadRequest("bare CR or LF in the request head")
            if self._version is None:
                self._request_line(line[:-2])
            elif line == b"\r\n":
                self.head_end = end + 1
                self.result = Preamble(self._domain())
                return self.result
            else:
                self._header_line(line[:-2])
        if len(self.buffer) >= self.max_preamble:
            raise HeadTooLarge(f"request head exceeds {self.max_preamble} bytes")
        return NEED_MORE

    @property
    def version(self) -> bytes | None:
        """The request's HTTP version, once the request line is in."""
        return self._version

    def _check_request_line_prefix(self) -> None:
        """Refuse at once a first line that no further bytes could make valid.

        Only the bytes added since the last call are checked, so a request line
        trickled one byte at a time still costs linear time. It runs before the
        line is parsed whole and stops at the line end and at max_preamble, so
        the answer is the same however the bytes were split.
        """
        buf = self.buffer
        if buf[:1] == b"\x16":
            raise BadRequest("TLS handshake sent to the plain HTTP port")
        stop = min(len(buf), self.max_preamble)
        line_end = buf.find(b"\n", self._checked, stop)
        if line_end >= 0:
            stop = line_end
        while self._checked < stop:
            pos = self._checked
            if self._part == 2:  # version: short, so re-check it whole
                version = bytes(buf[self._part_start : stop])
                if version.endswith(b"\r"):
                    version = version[:-1]
                if not any(v.startswith(version) for v in _VERSIONS):
                    raise BadRequest("unsupported HTTP version (want HTTP/1.0 or HTTP/1.1)")
                self._checked = stop
                return
            space = buf.find(b" ", pos, stop)
            chunk = buf[pos : space if space >= 0 else stop]
            allowed, what = (_TCHAR, "method") if self._part == 0 else (_VCHAR, "target")
            if not allowed.issuperset(chunk) or space == self._part_start:
                raise BadRequest(f"invalid request {what}")
            if space < 0:
                self._checked = stop
                return
            self._part += 1
            self._checked = self._part_start = space + 1

    def _request_line(self, line: bytes) -> None:
        # _check_request_line_prefix has already read this whole line: a method
        # of tchars, one space, a target of vchars, one space, and a prefix of
        # a version. Only the version can still be short ("HTTP/1.").
        self.method, target, version = line.split(b" ")
        if version not in _VERSIONS:
            raise BadRequest("unsupported HTTP version (want HTTP/1.0 or HTTP/1.1)")
        self._version = version
        self._target(target)

    def _target(self, target: bytes) -> None:
        """Take the host of an absolute-form target (``http://host/...``); refuse other schemes.

        A ``ws://`` or ``ftp://`` target is not a request this gateway routes: the
        backend might take its host for the one to serve, whatever Host says.
        CONNECT's authority-form target (``host:port``, any case of the method: some
        backends ignore it) is where a forward proxy tunnels to: its host is
        taken too, so Host must agree with it.
        """
        if self.method.upper() == b"CONNECT":
            if b"/" in target or b"@" in target:
                raise BadRequest("CONNECT target other than host:port")
            self._target_host = self._host(target, "request target")
            return
        scheme, sep, rest = target.partition(b"://")
        if sep and _SCHEME.fullmatch(scheme):
            if scheme.lower() not in (b"http", b"https"):
                raise BadRequest("request target with a scheme other than http or https")
            authority = rest
            for stop in b"/?#":
                authority = authority.split(bytes((stop,)), 1)[0]
            if b"@" in authority:
                raise BadRequest("userinfo in the request target")
            self._target_host = self._host(authority, "request target")
            if not self._target_host:
                raise BadRequest("empty host in the request target")

    def _header_line(self, line: bytes) -> None:
        name, value = field_line(line)
        if name == b"host":
            self._hosts.append(value.strip(b" \t"))
        elif self.framing and name in FRAMING_NAMES:
            self.framing_fields.append((name, value))

    def _host(self, authority: bytes, where: str) -> bytes:
        if len(authority.translate(None, _HOST_VALUE_BAD_BYTES)) != len(authority):
            raise BadRequest(f"control byte in the {where} host")
        try:
            host = split_host_port(authority)
        except ValueError as exc:
            raise BadRequest(f"invalid host in the {where}: {exc}") from None
        if not host and authority:
            raise BadRequest(f"a port but no host in the {where}")  # "Host: :80" is not an empty Host
        return host

    def _domain(self) -> str | None:
        if self._target_host is None and len(self._hosts) == 1:  # the common case: one Host, an origin-form target
            host = self._hosts[0]
            return _HOSTS.get(host) or _cached_host(host, self._host(host, "Host header"))
        if len(self._hosts) > 1:
            raise BadRequest("more than one Host header")
        if not self._hosts and self._version == b"HTTP/1.1":
            raise BadRequest("missing Host header (required in HTTP/1.1)")
        header_host = self._host(self._hosts[0], "Host header") if self._hosts else None
        host = self._target_host if self._target_host is not None else header_host
        domain = _normalize_or_400(host) if host else None
        if self._target_host is not None and header_host and _normalize_or_400(header_host) != domain:
            raise BadRequest("Host header disagrees with the request target")
        return domain


def _cached_host(raw: bytes, host: bytes) -> str | None:
    return _remember(_HOSTS, raw, _normalize_or_400(host)) if host else None


def field_line(line: bytes) -> tuple[bytes, bytes]:
    """Check one field line (CRLF cut off) of a head or a trailer section: (lower-case name, raw value).

    RFC 9112 section 5: no obs-fold, no whitespace before the colon, no NUL.
    """
    if line[:1] in (b" ", b"\t"):
        raise BadRequest("obsolete line folding in the request head")
    name, colon, value = line.partition(b":")
    if not colon:
        raise BadRequest("header line without a colon")
    if not name or not _TCHAR.issuperset(name):
        raise BadRequest("invalid header name (whitespace before the colon?)")
    if b"\x00" in value:
        raise BadRequest("NUL in a header value")
    return name.lower(), value


def _normalize_or_400(host: bytes) -> str:
    try:
        return normalize_domain(host)
    except ValueError as exc:
        raise BadRequest(f"invalid host: {exc}") from None


def sniff_tls(data: bytes, max_preamble: int = MAX_PREAMBLE) -> SniffResult:
    """One-shot form of ``TlsSniffer``: the answer for these bytes alone."""
    return TlsSniffer(max_preamble).feed(data)


def sniff_http(data: bytes, max_preamble: int = MAX_PREAMBLE) -> SniffResult:
    """One-shot form of ``HttpSniffer``: the answer for these bytes alone."""
    return HttpSniffer(max_preamble).feed(data)
