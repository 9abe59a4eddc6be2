"""Unit tests for httpstream.py: request framing through a keep-alive connection.

Every input goes through ``stream()``, which feeds it whole, one byte at a time
and in two pieces at every cut, and insists all agree on the requests, the error
and how far the bytes were checked: each case is also a case of reassembly.

The request smuggling cases are cited where they are tested:
- PortSwigger Web Security Academy, "HTTP request smuggling"
  (portswigger.net/web-security/request-smuggling): CL.TE, TE.CL and the TE.TE
  obfuscations of Transfer-Encoding;
- RFC 9112 section 6.3 (message body length), its list item by item, and
  section 6.1 (Transfer-Encoding in HTTP/1.0), section 7.1 (chunked).
"""

from __future__ import annotations

import pytest
from hellos import bytewise

import httpstream
from httpstream import NEED_MORE, NOT_PLAIN, Request, RequestStream
from sniff import BadRequest, HeadTooLarge, HttpSniffer


def run(pieces, max_head: int = httpstream.MAX_PREAMBLE, plain: bool = False):
    """(requests, NEED_MORE or the error class, checked) after feeding ``pieces`` in order.

    With ``plain``, each piece is first offered to ``plain_head``, as the strict relay does with each read.
    """
    parser = RequestStream(max_head)
    requests = []
    try:
        for piece in pieces:
            if plain:
                start = parser.checked
                domain = parser.plain_head(piece)
                if domain is not NOT_PLAIN:
                    requests.append(Request(domain, start, parser.checked, 0, ""))
                    continue
            parser.feed(piece)
            while True:
                event = parser.next_event()
                if event is NEED_MORE:
                    break
                requests.append(event)
    except (BadRequest, HeadTooLarge) as exc:
        assert isinstance(exc.reason, str)
        return requests, type(exc), parser.checked
    return requests, NEED_MORE, parser.checked


def stream(data: bytes, max_head: int = httpstream.MAX_PREAMBLE, cuts: bool = True):
    whole = run([data], max_head)
    for plain in (False, True):
        assert run(bytewise(data), max_head, plain) == whole
        if cuts:
            for cut in range(1, len(data)):
                assert run([data[:cut], data[cut:]], max_head, plain) == whole, cut
    return whole


def get(host: str = "a.test", extra: str = "") -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def post(body: bytes, host: str = "a.test", fields: str = "") -> bytes:
    return f"POST /up HTTP/1.1\r\nHost: {host}\r\n{fields}Content-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(chunks: list[bytes], host: str = "a.test", trailers: str = "") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return (
        f"POST /up HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + body
        + b"0\r\n"
        + trailers.encode()
        + b"\r\n"
    )


def domains(requests: list[Request]) -> list:
    return [r.domain for r in requests]


# --------------------------------------------------------------------------
# Framing that is followed


def test_pipelined_requests_each_with_its_offsets():
    first, second, third = get("a.test"), post(b"hello", "b.test"), get("c.test")
    data = first + second + third
    requests, final, checked = stream(data)
    assert final is NEED_MORE and checked == len(data)
    assert requests == [
        Request("a.test", 0, len(first), 0, ""),
        Request("b.test", len(first), len(first) + len(second) - 5, 5, ""),
        Request("c.test", len(first + second), len(data), 0, ""),
    ]


def test_a_body_that_looks_like_a_request_is_body():
    hidden = get("other.test")
    data = post(hidden) + get("a.test")
    requests, final, checked = stream(data)
    assert domains(requests) == ["a.test", "a.test"] and final is NEED_MORE and checked == len(data)


def test_chunked_body_with_extensions_and_trailers():
    hidden = get("other.test")
    data = (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        + b'%x ; a = "q\\"d" ;b\r\n%s\r\n' % (len(hidden), hidden)
        + b"000\r\nX-Sum: 1\r\nX-Other:  two \r\n\r\n"
        + get("b.test")
    )
    requests, final, checked = stream(data)
    assert domains(requests) == ["a.test", "b.test"] and final is NEED_MORE and checked == len(data)
    assert requests[0].body is None


def test_partial_head_is_not_checked_yet():
    data = get("a.test") + b"GET / HTTP/1.1\r\nHost: b.te"
    requests, final, checked = stream(data)
    assert domains(requests) == ["a.test"] and final is NEED_MORE and checked == len(get("a.test"))


def test_body_bytes_are_checked_as_they_come_and_can_be_skipped():
    head = post(b"")[: -len(b"\r\n")] + b"\r\n"
    data = post(b"x" * 100)
    parser = RequestStream()
    parser.feed(data[:60])
    event = parser.next_event()
    assert event.body == 100 and parser.next_event() is NEED_MORE
    assert parser.checked == 60 and parser.body_left == len(data) - 60
    parser.skip(parser.body_left - 1)  # spliced past the parser
    parser.feed(b"x" + get("b.test"))
    assert parser.next_event().domain == "b.test"
    assert parser.checked == len(data) + len(get("b.test"))
    assert head  # the head alone ends with its empty line


def test_skip_outside_a_body_is_a_programming_error():
    parser = RequestStream()
    with pytest.raises(ValueError, match="skip"):
        parser.skip(1)
    parser.feed(post(b"abc")[:-1])
    parser.next_event()  # the head; two body bytes not yet counted
    with pytest.raises(ValueError, match="skip"):
        parser.skip(1)
    parser.next_event()
    with pytest.raises(ValueError, match="skip"):
        parser.skip(2)  # one byte of body is left
    parser.skip(1)
    assert parser.next_event() is NEED_MORE and parser.checked == len(post(b"abc"))


def test_upgrade_and_connect_are_flagged():
    upgrade = get("a.test", "Connection: Upgrade\r\nUpgrade: WebSocket\r\n")
    connect = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"
    other = get("a.test", "Upgrade: websocket, foo/2\r\n")
    requests, final, _ = stream(upgrade + connect + other + get())
    assert [r.upgrade for r in requests] == ["websocket", "connect", "other", ""] and final is NEED_MORE


@pytest.mark.parametrize(
    "fields", ["Upgrade: h2c\r\n", "Upgrade: websocket, H2C/1\r\n", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"]
)
def test_an_upgrade_to_h2c_is_refused(fields):
    requests, final, _ = stream(get() + get("a.test", fields))
    assert len(requests) == 1 and final is BadRequest


def test_http10_without_host_and_large_batches():
    one = b"GET / HTTP/1.0\r\n\r\n"
    data = one * 5000  # past COMPACT_AT: the buffer is trimmed as it goes
    requests, final, checked = run([data])
    assert len(requests) == 5000 and requests[-1].domain is None and checked == len(data)
    assert run([data[i : i + 7000] for i in range(0, len(data), 7000)]) == (requests, final, checked)


def test_body_counted_in_feed_leaves_the_rest_for_parsing():
    parser = RequestStream()
    parser.feed(post(b"ab"))
    assert parser.next_event().body == 2
    parser.feed(b"")  # nothing new: nothing changes
    assert parser.next_event() is NEED_MORE
    parser.feed(get("b.test"))
    assert parser.next_event().domain == "b.test"


# --------------------------------------------------------------------------
# Framing attacks: 400 before the request is passed on (checked stops at its start)


SMUGGLING = [
    # PortSwigger CL.TE and TE.CL: both fields, either order (RFC 9112 section 6.3 item 3)
    ("CL.TE", "Content-Length: 13\r\nTransfer-Encoding: chunked\r\n"),
    ("TE.CL", "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
    # PortSwigger TE.TE obfuscations
    ("TE.TE xchunked", "Transfer-Encoding: xchunked\r\n"),
    ("TE.TE space before colon", "Transfer-Encoding : chunked\r\n"),
    ("TE.TE chunked then x", "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
    ("TE.TE tab", "Transfer-Encoding:\tchunked\r\n"),
    ("TE.TE leading space line", " Transfer-Encoding: chunked\r\n"),
    ("TE.TE obs-fold", "X: X\r\n Transfer-Encoding: chunked\r\n"),
    ("TE.TE bare LF", "X: X\nTransfer-Encoding: chunked\r\n"),
    ("TE.TE name then LF", "Transfer-Encoding\n: chunked\r\n"),
    ("TE list chunked, identity", "Transfer-Encoding: chunked, identity\r\n"),
    ("TE list identity, chunked", "Transfer-Encoding: identity, chunked\r\n"),
    ("TE case", "Transfer-Encoding: Chunked\r\n"),
    ("TE two spaces", "Transfer-Encoding:  chunked\r\n"),
    ("TE trailing space", "Transfer-Encoding: chunked \r\n"),
    ("TE twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
    ("TE underscore", "Transfer_Encoding: chunked\r\n"),
    # RFC 9112 section 6.3 item 4: TE in a request whose final coding is not chunked
    ("TE gzip", "Transfer-Encoding: gzip\r\n"),
    # RFC 9112 section 6.3 item 5: invalid Content-Length
    ("CL two values", "Content-Length: 3\r\nContent-Length: 4\r\n"),
    ("CL equal repeat", "Content-Length: 3\r\nContent-Length: 3\r\n"),  # our choice: refused too
    ("CL list", "Content-Length: 3, 3\r\n"),
    ("CL sign", "Content-Length: +3\r\n"),
    ("CL negative", "Content-Length: -1\r\n"),
    ("CL hex", "Content-Length: 0x3\r\n"),
    ("CL empty", "Content-Length:\r\n"),
    ("CL overflow", "Content-Length: 18446744073709551619\r\n"),
    ("CL tab", "Content-Length:\t3\r\n"),
    ("CL underscore", "Content_Length: 3\r\n"),
]


@pytest.mark.parametrize(("case", "fields"), SMUGGLING, ids=[case for case, _ in SMUGGLING])
def test_smuggling_framing_is_refused_before_the_request(case, fields):
    first = get("a.test")
    attack = f"POST / HTTP/1.1\r\nHost: a.test\r\n{fields}\r\n".encode() + b"0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"
    requests, final, checked = stream(first + attack, cuts=False)
    assert final is BadRequest, case
    assert domains(requests) == ["a.test"] and checked == len(first)


def test_transfer_encoding_in_http10_is_refused():
    data = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert stream(data) == ([], BadRequest, 0)


def test_longest_content_length_is_taken():
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 000000000000000001\r\n\r\nx" + get()
    requests, final, _ = stream(data, cuts=False)
    assert [r.body for r in requests] == [1, 0] and final is NEED_MORE


CHUNK_LINES = [  # (body, where the refused unit starts in it)
    (b"0x5\r\nhello\r\n", 0),  # hex with 0x
    (b"-5\r\nhello\r\n", 0),  # negative
    (b" 5\r\nhello\r\n", 0),  # leading space
    (b"5 \r\nhello\r\n", 0),  # trailing space with no extension
    (b"\r\nhello\r\n", 0),  # no size at all
    (b"5\nhello\r\n", 0),  # bare LF
    (b"5;\r\nhello\r\n", 0),  # empty extension name
    (b'5;a="x\r\nhello\r\n', 0),  # unterminated quoted extension value
    (b"1000000000000000\r\n", 0),  # 16 hex digits: over the limit (overflow)
    (b"ffffffffffffffffffff\r\n", 0),  # 64-bit overflow
    (b"3\r\nabc\r\n5\r\nhelloX\r\n", 16),  # chunk data not followed by CRLF
    (b"5\r\nhello\rX", 8),  # chunk data followed by CR and junk
]


@pytest.mark.parametrize(("body", "bad_at"), CHUNK_LINES)
def test_bad_chunks_are_refused(body, bad_at):
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    requests, final, checked = stream(head + body + b"0\r\n\r\n")
    assert final is BadRequest and len(requests) == 1
    assert checked == len(head) + bad_at


def test_chunk_size_line_too_long():
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    line = b"5;" + b"a" * httpstream.MAX_CHUNK_LINE + b"\r\n"
    assert run([head + line])[1] is BadRequest
    assert run([head, line[:-10], line[-10:]])[1] is BadRequest
    fits = b"5;" + b"a" * (httpstream.MAX_CHUNK_LINE - 4) + b"\r\nhello\r\n0\r\n\r\n"
    assert run([head + fits])[1] is NEED_MORE


TRAILERS = [
    "Host: b.test\r\n",
    "Content-Length: 5\r\n",
    "Transfer-Encoding: chunked\r\n",
    "Transfer_Encoding: chunked\r\n",
    "X: a\r\n b\r\n",  # obs-fold
    "X : a\r\n",
    "X: a\nY: b\r\n",
    "X: a\rb\r\n",
    "X\r\n",
]


@pytest.mark.parametrize("trailer", TRAILERS)
def test_bad_trailers_are_refused(trailer):
    requests, final, _ = stream(chunked([b"abc"], trailers=trailer) + get("b.test"))
    assert final is BadRequest and domains(requests) == ["a.test"]


def test_trailer_section_is_bounded():
    data = chunked([b"abc"], trailers="X: " + "y" * 600 + "\r\n")
    assert run([data], max_head=512)[1] is HeadTooLarge
    assert run(bytewise(data), max_head=512)[1] is HeadTooLarge
    assert run([data], max_head=1024)[1] is NEED_MORE


def test_later_heads_keep_the_first_heads_rules():
    for bad in (
        b"GET / HTTP/1.1\r\n\r\n",  # no Host in HTTP/1.1
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a test\r\n\r\n",  # the quick path asks the sniffer about a new Host
        b"GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n",
    ):
        assert stream(get() + bad, cuts=False) == ([Request("a.test", 0, len(get()), 0, "")], BadRequest, len(get()))


def test_later_head_too_large():
    data = get() + b"GET / HTTP/1.1\r\nX: " + b"y" * 600 + b"\r\n\r\n"
    assert stream(data, max_head=512, cuts=False)[1:] == (HeadTooLarge, len(get()))


@pytest.mark.parametrize("line", [b"CONNECT b.test:80", b"connect b.test:80", b"CONNECT /a.test"])
def test_a_later_connect_target_must_agree_with_host(line):
    requests, final, _ = stream(get() + line + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert len(requests) == 1 and final is BadRequest


# --------------------------------------------------------------------------
# plain_head: the strict relay's shortcut for a read that is one whole plain head


def test_plain_head_takes_repeated_heads_with_the_general_paths_answers():
    first, other = get("a.test", "X-Seq: 1\r\n"), get("b.test")
    pieces = [first, first, other, first, get("a.test", "Cookie: c=1\r\n"), other, other, post(b"x"), first]
    parser = RequestStream()
    taken = []
    for piece in pieces:
        domain = parser.plain_head(piece)
        taken.append(domain)
        if domain is NOT_PLAIN:
            parser.feed(piece)
            while parser.next_event() is not NEED_MORE:
                pass
    # A Host other than the last one, or a body, goes the general way; a head with the last Host is
    # taken, and so is a repeat of the last head taken, with its own domain after another Host came between.
    assert taken == [NOT_PLAIN, "a.test", NOT_PLAIN, "a.test", NOT_PLAIN, NOT_PLAIN, "b.test", NOT_PLAIN, "a.test"]
    assert run(pieces, plain=True) == run(pieces) == (run([b"".join(pieces)])[0], NEED_MORE, len(b"".join(pieces)))


@pytest.mark.parametrize(
    "head",
    [
        get("a.test", "Content-Length: 0\r\n"),
        get("a.test", "content_length: 0\r\n"),
        get("a.test", "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
        get("a.test", "TRANSFER_ENCODING: chunked\r\n"),
        get("a.test", "Upgrade: websocket\r\n"),
        get("a.test", "HTTP2-Settings: AAMAAABkAAQAAP__\r\n"),
        get("a.test", "Host: a.test\r\n"),  # a second Host
        get("a.test", "host: b.test\r\n"),
        get("A.TEST"),  # the same name, another raw value: the sniffer normalises it
        b"GET / HTTP/1.1\r\nHost:a.test\r\n\r\n",
        b"CONNECT /x HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"connect / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX: \x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\n\r\n",
        get("a.test") + get("a.test"),  # pipelined: two heads in one read
        get("a.test")[:-1],
        get("a.test", "X: " + "y" * 2100 + "\r\n"),  # past QUICK_HEAD
    ],
)
def test_plain_head_leaves_every_other_read_to_the_general_path(head):
    parser = RequestStream()
    parser.feed(get("a.test"))
    assert isinstance(parser.next_event(), Request)
    assert parser.plain_head(head) is NOT_PLAIN
    assert parser.checked == len(get("a.test"))  # nothing taken
    assert run([get("a.test"), head], plain=True) == run([get("a.test"), head])


def test_plain_head_is_only_for_a_parser_waiting_for_a_head():
    assert repr(NOT_PLAIN) == "NOT_PLAIN"
    parser = RequestStream(max_head=512)
    parser.feed(post(b"0123456789", "a.test"))
    assert isinstance(parser.next_event(), Request)
    assert parser.plain_head(get("a.test")) is NOT_PLAIN  # inside the body: body bytes
    parser.feed(b"0123456789" + get("a.test")[:5])
    assert parser.next_event() is NEED_MORE
    assert parser.plain_head(get("a.test")) is NOT_PLAIN  # a head is half in
    assert RequestStream(max_head=30).plain_head(get("a.test")) is NOT_PLAIN  # longer than max_head


# --------------------------------------------------------------------------
# begin: the first request, taken from the sniffer that routed it


def test_begin_takes_the_sniffers_first_head_and_frames_what_follows():
    data = post(b"hello", "a.test") + get("b.test")
    sniffer = HttpSniffer(framing=True)
    assert sniffer.feed(data).domain == "a.test"
    parser = RequestStream()
    assert parser.begin(sniffer) == Request("a.test", 0, len(post(b"hello", "a.test")) - 5, 5, "")
    assert parser.next_event() == Request("b.test", len(post(b"hello", "a.test")), len(data), 0, "")
    assert parser.checked == len(data)


def test_begin_needs_a_decided_framing_sniffer_and_a_fresh_stream():
    undecided, plain = HttpSniffer(framing=True), HttpSniffer()
    undecided.feed(get()[:5])
    plain.feed(get())
    for sniffer in (undecided, plain):
        with pytest.raises(ValueError):
            RequestStream().begin(sniffer)
    used = RequestStream()
    used.feed(get())
    decided = HttpSniffer(framing=True)
    decided.feed(get())
    with pytest.raises(ValueError):
        used.begin(decided)


def test_begin_refuses_ambiguous_framing_in_the_first_request():
    sniffer = HttpSniffer(framing=True)
    sniffer.feed(get("a.test", "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n"))
    with pytest.raises(BadRequest):
        RequestStream().begin(sniffer)
