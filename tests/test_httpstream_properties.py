"""Property tests for httpstream.py (hypothesis): any split gives the same decisions.

Whatever a client sends and however its bytes are cut into reads: the same
requests at the same offsets, the same error, the same ``checked``; a valid
stream is followed to its end with the domains it names; its prefixes never
fail; and body bytes passed on unread (``skip``) count as if fed.
"""

from __future__ import annotations

from hellos import split_at
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_httpstream import run
from test_sniff_properties import DOMAIN

from httpstream import NEED_MORE, RequestStream
from sniff import BadRequest, HeadTooLarge, HttpSniffer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HIDDEN = [b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", b"0\r\n\r\n", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n"]
BODY = st.lists(st.binary(max_size=40) | st.sampled_from(HIDDEN), max_size=4).map(b"".join)


@st.composite
def requests(draw) -> tuple[bytes, str]:
    """One valid request: GET, a Content-Length body or a chunked one, and the domain it names."""
    name = draw(DOMAIN).lower()
    kind = draw(st.sampled_from(["get", "length", "chunked"]))
    head = f"{draw(st.sampled_from(['GET', 'POST', 'PUT']))} /p HTTP/1.1\r\nHost: {name}\r\n"
    if kind == "get":
        return (head + "\r\n").encode(), name
    if kind == "length":
        body = draw(BODY)
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body, name
    data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
    for chunk in draw(st.lists(BODY.filter(bool), max_size=3)):
        ext = draw(st.sampled_from([b"", b";a", b' ; a="b c"', b";x=1;y"]))
        data += b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk)
    trailers = draw(st.lists(st.sampled_from([b"X-Sum: 1\r\n", b"Expires: never\r\n"]), max_size=2))
    return data + b"0\r\n" + b"".join(trailers) + b"\r\n", name


STREAMS = st.lists(requests(), min_size=1, max_size=5)


def cuts_for(data: bytes):
    return st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12)


@FAST
@given(st.data())
def test_valid_stream_any_split(data):
    reqs = data.draw(STREAMS)
    stream = b"".join(r for r, _ in reqs)
    found, final, checked = run(split_at(stream, data.draw(cuts_for(stream))))
    assert (final, checked) == (NEED_MORE, len(stream))
    assert [r.domain for r in found] == [name for _, name in reqs]
    starts = [0]
    for r, _ in reqs[:-1]:
        starts.append(starts[-1] + len(r))
    assert [r.start for r in found] == starts


@FAST
@given(st.data())
def test_every_prefix_of_a_valid_stream_is_followed_without_error(data):
    reqs = data.draw(STREAMS)
    stream = b"".join(r for r, _ in reqs)
    end = data.draw(st.integers(0, len(stream)))
    found, final, checked = run([stream[:end]])
    assert final is NEED_MORE and checked <= end
    assert [r.domain for r in found] == [name for _, name in reqs][: len(found)]


def mutated(stream: bytes, edits) -> bytes:
    out = bytearray(stream)
    for at, byte, insert in edits:
        at %= len(out) + 1
        if insert or at == len(out):
            out[at:at] = bytes([byte])
        else:
            out[at] = byte
    return bytes(out)


@FAST
@given(st.data())
def test_any_bytes_any_split_same_decisions(data):
    if data.draw(st.booleans()):
        stream = data.draw(st.binary(max_size=300))
    else:
        stream = b"".join(r for r, _ in data.draw(STREAMS))
        edits = data.draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.booleans()), max_size=4))
        stream = mutated(stream, edits)
    limit = data.draw(st.sampled_from([512, 1024, 32768]))
    whole = run([stream], limit)
    assert whole[1] in (NEED_MORE, BadRequest, HeadTooLarge)
    assert whole[2] <= len(stream)
    assert run(split_at(stream, data.draw(cuts_for(stream))), limit) == whole


@FAST
@given(st.data())
def test_skipping_body_bytes_is_feeding_them(data):
    """What the relay does when it splices a body: the decisions are those of feeding every byte."""
    reqs = data.draw(STREAMS)
    stream = b"".join(r for r, _ in reqs)
    expected = run([stream])
    parser = RequestStream()
    found, at = [], 0
    step = data.draw(st.integers(1, 50))
    while at < len(stream):
        if parser.body_left and parser.checked == at:  # nothing held back: pass body bytes on unread
            n = min(parser.body_left, step)
            parser.skip(n)
        else:
            n = min(step, len(stream) - at)
            parser.feed(stream[at : at + n])
        at += n
        while (event := parser.next_event()) is not NEED_MORE:
            found.append(event)
    assert (found, NEED_MORE, parser.checked) == expected


FIELDS = st.sampled_from(
    [
        "Accept: */*\r\n",
        "Cookie: a=b; c=d\r\n",
        "User-Agent: x\r\n",
        "X-Host: other.test\r\n",
        "Hostname: other.test\r\n",
        "Host: other.test\r\n",
        "HOST: a.test\r\n",
        "Content-Length: 0\r\n",
        "Content-Length: 3\r\n",
        "content_length: 0\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Upgrade: websocket\r\n",
        "Upgrade-Insecure-Requests: 1\r\n",
        "Connection: keep-alive\r\n",
        "X-Empty:\r\n",
    ]
)


@st.composite
def heads(draw) -> bytes:
    """A GET-like head, with the fields a client or an attacker might add around one or more Host fields."""
    usual = draw(st.booleans())  # half of them as a keep-alive client repeats them: plain_head's case
    method = "GET" if usual else draw(st.sampled_from(["HEAD", "POST", "CONNECT", "connect", "OPTIONS"]))
    target = "/" if usual else draw(st.sampled_from(["/p?q=1", "*", "http://a.test/", "a.test:80"]))
    version = "HTTP/1.1" if usual else "HTTP/1.0"
    host = draw(st.sampled_from(["Host: a.test\r\n", "Host: b.test\r\n", "host:a.test\r\n", "Host: A.test \r\n", ""]))
    fields = st.sampled_from(["Accept: */*\r\n", "Cookie: a=b\r\n", "X-Empty:\r\n"]) if usual else FIELDS
    before, after = draw(st.lists(fields, max_size=2)), draw(st.lists(fields, max_size=2))
    return f"{method} {target} {version}\r\n{''.join(before)}{host}{''.join(after)}\r\n".encode()


@FAST
@given(st.data())
def test_plain_head_decides_as_feeding_does(data):
    """The strict relay offers each read to plain_head first: the decisions are those of feed and next_event."""
    pool = data.draw(st.lists(heads(), min_size=1, max_size=3))
    pieces = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=8))  # reads repeat as clients repeat heads
    if data.draw(st.integers(0, 3)) == 0:
        edits = data.draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.booleans()), max_size=2))
        at = data.draw(st.integers(0, len(pieces) - 1))
        pieces[at] = mutated(pieces[at], edits)
    limit = data.draw(st.sampled_from([80, 512, 32768]))
    assert run(pieces, limit, plain=True) == run(pieces, limit)


def run_from_sniffer(pieces: list[bytes], limit: int):
    """As the gateway does in strict mode: a framing sniffer reads the first head, begin() takes it over."""
    sniffer, parser, found = HttpSniffer(limit, framing=True), RequestStream(limit), []
    try:
        fed = 0
        while sniffer.feed(pieces[fed]) is NEED_MORE:
            fed += 1
            if fed == len(pieces):
                return None  # the sniffer never decided: no connection gets this far
        found.append(parser.begin(sniffer))
        for piece in [b"", *pieces[fed + 1 :]]:  # first what the sniffer read past the head: fed by begin()
            parser.feed(piece)
            while (event := parser.next_event()) is not NEED_MORE:
                found.append(event)
    except (BadRequest, HeadTooLarge) as exc:
        if not found:
            return None  # the sniffer refused the first head: the gateway answers before any relay
        return found, type(exc), parser.checked
    return found, NEED_MORE, parser.checked


@FAST
@given(st.data())
def test_begin_after_the_sniffer_decides_as_feeding_does(data):
    """The first head is checked once, by the sniffer that routes it: what follows is framed as if all were fed."""
    if data.draw(st.booleans()):
        stream = b"".join(r for r, _ in data.draw(STREAMS))
    else:
        stream = b"".join(data.draw(st.lists(heads(), min_size=1, max_size=3)))
    if data.draw(st.booleans()):
        edits = data.draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.booleans()), max_size=3))
        stream = mutated(stream, edits)
    limit = data.draw(st.sampled_from([80, 512, 32768]))
    got = run_from_sniffer(split_at(stream, data.draw(cuts_for(stream))), limit)
    if got is not None:
        assert got == run([stream], limit)
