"""Follow every request of an HTTP/1.x connection, for its whole life: sans-IO, bytes in, events out.

``sniff.HttpSniffer`` reads the first request head; ``RequestStream`` goes on
after it, for the strict keep-alive mode (``http_strict_host``). Every head is
checked by ``HttpSniffer``'s code, with the same syntax and smuggling rules as
the first: a plain head by its regexes (the sniffer itself runs once per Host
value), any other by a fresh sniffer. The body after it is framed as RFC 9112
section 6 says, by Content-Length or chunked, with nothing ambiguous let through.

Feed the client's bytes in any pieces with ``feed``; ``next_event`` then
returns one of three things, never anything else:

- a ``Request`` (a named tuple): a head is whole and checked: its domain, where it
  starts and ends in the stream, how its body is framed;
- the sentinel ``NEED_MORE``: nothing wrong so far, the next answer needs bytes;
- it raises ``BadRequest`` (framing that could be read two ways, obs-fold, a
  bad chunk) or ``HeadTooLarge``.

``checked`` is the stream offset below which every byte belongs to a request
already returned (its head, or body bytes counted): what a gateway may pass on.
Body bytes are counted, never scanned: ``body_left`` says how many body bytes
come next, and a caller that passes them on unread (spliced) calls ``skip(n)``
instead of ``feed``. Each byte is examined a bounded number of times however the
input is split. This module opens no socket and never logs.

Where backends are known to disagree, it is stricter than RFC 9112:

- Transfer-Encoding must be exactly ``chunked``: one field, one coding, lower
  case. "gzip, chunked" is valid HTTP but no client sends it in a request, and
  a backend that does not take it would read the body as requests (the TE.TE
  obfuscations: ``xchunked``, ``chunked, identity``, ``Chunked``...).
- The value of either field comes after at most one space, with no other
  whitespace (a tab is OWS to RFC 9110 but not to every backend).
- One Content-Length of at most 18 digits. A repeated field or a list, even of
  equal values ("5, 5", which RFC 9110 section 8.6 lets a recipient accept) is
  refused, and so is a length that could overflow a 64-bit backend.
- Both fields at once, Transfer-Encoding in an HTTP/1.0 request (RFC 9112
  section 6.1), and the underscore spellings (``Content_Length``) are refused.
- A chunk size is 1 to 15 hex digits (below 2**60), then extensions as RFC 9112
  section 7.1.1 writes them, then CRLF: no "0x", no sign, no spaces alone.
- Trailer fields are checked like head fields; Host, Content-Length and
  Transfer-Encoding are refused there (a backend that merges trailers into the
  head would route or frame by them).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from kiaerrors import BadRequest, HeadTooLarge
from sniff import (
    FRAMING_FIELD,
    FRAMING_NAMES,
    HOST_FIELD,
    MAX_PREAMBLE,
    NEED_MORE,
    QUICK_HEAD,
    TOKEN,
    HttpSniffer,
    NeedMore,
    field_line,
)
from sniff import HEAD as HEAD_RE

__all__ = ["NEED_MORE", "NOT_PLAIN", "Request", "RequestStream"]

MAX_LENGTH_DIGITS = 18  # 10**18 - 1 < 2**63: no backend's signed 64-bit length overflows
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions; nginx and Netty bound theirs too
COMPACT_AT = 65536  # drop parsed bytes from the buffer once this many pile up: one read's worth

_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'  # RFC 9110 section 5.6.4
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*"
    + TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*)\r\n"
)
# What _quick takes without framing, in one pass: origin-form target, any method but CONNECT, one Host
# (its raw value captured), no field of FRAMING_NAMES. A sub-language of sniff's HEAD.
_NOT_PLAIN_FIELD = rb"(?i:host|content[-_]length|transfer[-_]encoding|upgrade|http2-settings):"
_PLAIN_FIELD = rb"(?!" + _NOT_PLAIN_FIELD + rb")" + TOKEN + rb":[^\x00\r\n]*\r\n"
_PLAIN_HEAD = re.compile(
    rb"(?!(?i:connect) )"
    + TOKEN
    + rb" /[\x21-\x7e]* HTTP/1\.[01]\r\n(?:"
    + _PLAIN_FIELD
    + rb")*(?i:host):([^\x00\r\n]*)\r\n(?:"
    + _PLAIN_FIELD
    + rb")*\r\n"
)
# Refused in trailers: a backend that merges trailers into the head would route or frame by them.
_NOT_IN_TRAILERS = FRAMING_NAMES - {b"upgrade", b"http2-settings"} | {b"host"}

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_END, _TRAILER = range(5)


class _NotPlain:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_PLAIN"


NOT_PLAIN = _NotPlain()  # plain_head's answer when the bytes need feed and next_event


class Request(NamedTuple):
    """One checked request head (a tuple: made once per request, it must be cheap)."""

    domain: str | None  # normalised, as HttpSniffer gives it; None: HTTP/1.0 without a Host
    start: int  # stream offset of the request line's first byte
    end: int  # stream offset just past the head's empty line
    body: int | None  # Content-Length (0: no body); None: chunked
    upgrade: str  # "connect" (CONNECT), "websocket" (Upgrade: websocket alone), "other" (any other Upgrade) or ""


class RequestStream:
    """Follow request framing through a connection's bytes fed in any pieces."""

    def __init__(self, max_head: int = MAX_PREAMBLE) -> None:
        self.max_head = max_head  # bound on each head, and on each request's trailer section
        self.body_left = 0  # body bytes that come next (a Content-Length body, or a chunk's data)
        self.requests = 0  # heads returned so far
        self._buf: bytes | bytearray = b""  # bytes fed and not yet dropped: the last read, or a buffer of several
        self._base = 0  # stream offset of _buf[0]
        self._pos = 0  # _buf index of the first byte not yet accepted
        self._looked = 0  # _buf index up to which the current head or line has been searched
        self._state = _HEAD
        self._after_body = _HEAD
        self._sniffer: HttpSniffer | None = None
        self._trailer_bytes = 0
        self._memo: tuple[bytes, str | None] = (b"\0", None)  # (raw Host value, its domain) of the last quick head
        # (head, its domain) of the last head plain_head took: a keep-alive client repeats its head, byte for byte
        self._plain: tuple[bytes | None, str | None] = (None, None)
        self._plain_max = min(QUICK_HEAD, max_head)  # _head takes the quick path up to both

    @property
    def checked(self) -> int:
        """Stream offset up to which every byte belongs to a request already returned."""
        return self._base + self._pos

    def feed(self, data: bytes) -> None:
        """Add the next bytes of the stream; body bytes with nothing unparsed before them are just counted."""
        buf = self._buf
        pos = self._pos
        if pos == len(buf):  # all accepted: keep the read itself, no copy (the usual keep-alive case)
            self._base += pos
            self._looked -= pos
            self._pos = 0
            if self._state == _BODY:
                take = min(self.body_left, len(data))
                self._base += take
                self._body_done(take)
                data = data[take:]
            self._buf = data
            return
        if type(buf) is not bytearray or pos >= COMPACT_AT:  # a head or line waits for more: buffer from it on
            self._base += pos
            self._looked -= pos
            self._pos = 0
            self._buf = buf = bytearray(buf[pos:])
        buf += data

    def begin(self, sniffer: HttpSniffer) -> Request:
        """Take the first request from the sniffer that routed it: its head is checked once, not twice.

        ``sniffer`` was made with ``framing=True`` and has decided; every byte it
        was fed is fed here, and the head is accepted with the sniffer's answer,
        which is the one ``next_event`` would give (the same code decides). Its
        body is framed as every later one; ambiguous framing raises BadRequest.
        """
        if self.requests or self._buf or sniffer.result is None or not sniffer.framing:
            raise ValueError("begin() takes a decided framing sniffer, before anything else")
        self.feed(bytes(sniffer.buffer))
        return self._accept(
            sniffer.head_end, sniffer.result.domain, sniffer.method, sniffer.version, sniffer.framing_fields
        )

    def plain_head(self, data: bytes) -> str | _NotPlain | None:
        """The usual keep-alive read, in one call: ``data`` is one whole GET-like head, checked and accepted.

        Returns its domain when every byte fed before is accepted, a head comes
        next, and ``data`` is exactly one head that ``_quick`` would take with
        no framing field and the Host value of the last head it took: the same
        answer, offsets and state as ``feed(data)`` and two ``next_event``
        calls, for half their cost (a repeat of the last head taken here: a
        tenth). Anything else returns ``NOT_PLAIN`` and takes nothing: the
        caller feeds ``data`` the general way.
        """
        if self._pos != len(self._buf) or self._state != _HEAD:
            return NOT_PLAIN
        if data == self._plain[0]:
            domain = self._plain[1]
        else:
            if len(data) > self._plain_max:
                return NOT_PLAIN
            head = _PLAIN_HEAD.fullmatch(data)
            if head is None or head.group(1) != self._memo[0]:
                return NOT_PLAIN
            domain = self._memo[1]
            self._plain = (data, domain)
        self._base += self._pos
        self._buf = data
        self._pos = self._looked = len(data)
        self.requests += 1
        return domain

    def skip(self, n: int) -> None:
        """``n`` bytes of the body that comes next were passed on without ``feed``."""
        if self._state != _BODY or not 0 < n <= self.body_left or self._pos != len(self._buf):
            raise ValueError(f"skip({n}): not within the body that comes next")
        self._base += self._pos + n
        self._buf = b""
        self._pos = self._looked = 0
        self._body_done(n)

    def _body_done(self, n: int) -> None:
        self.body_left -= n
        if not self.body_left:
            self._state = self._after_body

    def next_event(self) -> Request | NeedMore:
        """The next request head, NEED_MORE, or an error for what could not be framed."""
        if self._pos == len(self._buf):  # every byte fed is accepted: whatever the state, more are needed
            return NEED_MORE
        while True:
            state = self._state
            if state == _HEAD:
                return self._head()
            if state == _BODY:
                take = min(len(self._buf) - self._pos, self.body_left)
                if not take:
                    return NEED_MORE
                self._pos += take
                self._body_done(take)
            elif state == _CHUNK_END:
                crlf = self._buf[self._pos : self._pos + 2]
                if crlf != b"\r\n"[: len(crlf)]:
                    raise BadRequest("chunk data not followed by CRLF")
                if len(crlf) < 2:
                    return NEED_MORE
                self._pos += 2
                self._state = _CHUNK_SIZE
            else:
                line = self._line(MAX_CHUNK_LINE if state == _CHUNK_SIZE else self.max_head - self._trailer_bytes)
                if line is None:
                    return NEED_MORE
                if state == _CHUNK_SIZE:
                    self._chunk_size(line)
                else:
                    self._trailer(line)

    def _head(self) -> Request | NeedMore:
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            return NEED_MORE
        sniffer = self._sniffer
        if sniffer is None:
            end = buf.find(b"\r\n\r\n", pos, pos + QUICK_HEAD)
            if end >= 0 and end + 4 - pos <= self.max_head:
                request = self._quick(pos, end + 4)
                if request is not None:
                    return request
            sniffer = self._sniffer = HttpSniffer(self.max_head, framing=True)
            self._looked = pos
        # Hand the sniffer the head and no more: it keeps what it is fed.
        limit = min(len(buf), pos + self.max_head)
        end = buf.find(b"\r\n\r\n", max(pos, self._looked - 3), limit)
        stop = end + 4 if end >= 0 else limit
        result = sniffer.feed(bytes(buf[self._looked : stop]))
        self._looked = stop
        if result is NEED_MORE:
            return NEED_MORE
        self._sniffer = None
        return self._accept(
            pos + sniffer.head_end, result.domain, sniffer.method, sniffer.version, sniffer.framing_fields
        )

    def _quick(self, pos: int, stop: int) -> Request | None:
        """A whole, plain head (origin-form target, one Host) checked in C; None sends it the long way.

        The answer is the sniffer's: the same regexes as its quick path, and the
        domain a sniffer gave for the same Host value, which is all it depends on
        when the target is a path. Keep-alive requests repeat their Host, so the
        sniffer runs once per connection and name.
        """
        head = HEAD_RE.fullmatch(self._buf, pos, stop)
        if head is None:
            return None
        method, target, version, fields = head.groups()
        if target[:1] != b"/" or method.upper() == b"CONNECT":  # CONNECT's target is a host: the sniffer checks it
            return None
        hosts = HOST_FIELD.findall(fields)
        if len(hosts) != 1:
            return None
        framing = []
        if FRAMING_FIELD.search(fields) is not None:  # rare in keep-alive traffic: GETs carry no body
            framing = [(name.lower(), value) for name, value in FRAMING_FIELD.findall(fields)]
        if hosts[0] != self._memo[0]:
            result = HttpSniffer(self.max_head).feed(bytes(self._buf[pos:stop]))
            self._memo = (hosts[0], result.domain)
        if framing:
            return self._accept(stop, self._memo[1], method, version, framing)
        self._pos = self._looked = stop  # the usual GET: no body, no new protocol (_accept, inlined)
        self.requests += 1
        return Request(self._memo[1], self._base + pos, self._base + stop, 0, "")

    def _accept(self, stop: int, domain: str | None, method: bytes, version: bytes | None, fields: list) -> Request:
        """The head from _pos to ``stop`` is checked: frame its body, move past it, say so."""
        body = _framing(fields, version) if fields else 0
        pos = self._pos
        self._pos = self._looked = stop
        self.requests += 1
        if body is None:
            self._state = _CHUNK_SIZE
        elif body:
            self._state, self._after_body, self.body_left = _BODY, _HEAD, body
        upgrade = ""
        if method.upper() == b"CONNECT":
            upgrade = "connect"
        elif fields:
            upgrade = _protocols(fields)
        return Request(domain, self._base + pos, self._base + stop, body, upgrade)

    def _line(self, bound: int) -> bytes | None:
        """The next CRLF line, at most ``bound`` bytes; None if it is not all in yet."""
        buf, pos = self._buf, self._pos
        lf = buf.find(b"\n", max(pos, self._looked), pos + bound)
        if lf < 0:
            if len(buf) - pos >= bound:
                if self._state == _CHUNK_SIZE:
                    raise BadRequest(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                raise HeadTooLarge(f"trailer section exceeds {self.max_head} bytes")
            self._looked = len(buf)
            return None
        self._looked = lf + 1
        return bytes(buf[pos : lf + 1])  # accepted (the position moved past it) only once it is checked

    def _chunk_size(self, line: bytes) -> None:
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise BadRequest("bad chunk-size line (hex digits, extensions, CRLF)")
        size = int(match.group(1), 16)
        self._pos += len(line)
        if size:
            self._state, self._after_body, self.body_left = _BODY, _CHUNK_END, size
        else:
            self._state, self._trailer_bytes = _TRAILER, 0

    def _trailer(self, line: bytes) -> None:
        self._trailer_bytes += len(line)
        if line == b"\r\n":
            self._state = _HEAD
        else:
            if line.count(b"\r") != 1 or not line.endswith(b"\r\n"):
                raise BadRequest("bare CR or LF in the trailer section")
            name, _ = field_line(line[:-2])
            if name in _NOT_IN_TRAILERS:
                raise BadRequest(f"{name.decode()} field in the trailer section")
        self._pos += len(line)


def _framing(fields: list[tuple[bytes, bytes]], version: bytes | None) -> int | None:
    """The body's length (0: none), or None for chunked; BadRequest for any framing two parsers could read apart."""
    lengths, codings = [], []
    for name, value in fields:
        if b"_" in name:
            raise BadRequest(f"{name.decode()} field: an underscore where framing needs a hyphen")
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
    if codings:
        if lengths:
            raise BadRequest("both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)")
        if version != b"HTTP/1.1":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)")
        if len(codings) > 1 or _one_space_off(codings[0]) != b"chunked":
            raise BadRequest("Transfer-Encoding other than one plain chunked")
        return None
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise BadRequest("more than one Content-Length")
    length = _one_space_off(lengths[0])
    if not (length.isdigit() and len(length) <= MAX_LENGTH_DIGITS):
        raise BadRequest("Content-Length that is not 1 to 18 digits")
    return int(length)


def _protocols(fields: list[tuple[bytes, bytes]]) -> str:
    """What the Upgrade fields ask for: "websocket" alone, "other", or "" (none); BadRequest for h2c.

    After a 101 to h2c every HTTP/2 stream names its own host, which the
    gateway never reads (h2c smuggling): the request is refused, whatever
    the backend would answer. HTTP2-Settings goes only with such an upgrade.
    """
    names = set()
    for name, value in fields:
        if name == b"http2-settings":
            raise BadRequest("HTTP2-Settings field: an upgrade to h2c is not routed by Host")
        if name == b"upgrade":
            names.update(token.strip(b" \t").split(b"/")[0].lower() for token in value.split(b","))
    if b"h2c" in names:
        raise BadRequest("Upgrade to h2c: its HTTP/2 streams are not routed by Host")
    if not names:
        return ""
    return "websocket" if names == {b"websocket"} else "other"


def _one_space_off(value: bytes) -> bytes:
    """A framing value as clients write it, after at most one space; a tab or more spaces are left on.

    RFC 9110 allows any OWS, but a backend that does not strip a tab would not
    see "chunked" and would take the body for the next request.
    """
    return value[1:] if value[:1] == b" " else value
