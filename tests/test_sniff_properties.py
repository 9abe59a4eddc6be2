"""Property tests for sniff.py's two parsers (hypothesis).

What must hold however a client splits its bytes, whatever it sends: the answer
does not depend on the split or on bytes after the preamble, a strict prefix of
a preamble always asks for more, and nothing but a ``GatewayError`` escapes.
"""

from __future__ import annotations

from pathlib import Path

from hellos import outcome, real_hello, split_at
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kiaerrors
import sniff
from sniff import NEED_MORE, HttpSniffer, Preamble, TlsSniffer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CORPUS = [p.read_bytes() for p in sorted((Path(__file__).parent / "data" / "clienthello").glob("*.bin"))]
TLS_RECORD_CORPUS = [data for data in CORPUS if data[0] == sniff.TLS_CONTENT_HANDSHAKE]

# --------------------------------------------------------------------------
# Strategies

LABEL = st.from_regex(r"\A[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?\Z")
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda name: not _is_ipv4(name))


def _is_ipv4(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


@st.composite
def tls_preambles(draw) -> tuple[bytes, Preamble]:
    """A valid ClientHello: one of the real-client corpus, or a fresh Python one for a drawn name."""
    if draw(st.booleans()):
        data = draw(st.sampled_from(TLS_RECORD_CORPUS))
        return data, sniff.sniff_tls(data)
    name = draw(DOMAIN)
    trailing_dot = draw(st.booleans())
    data = real_hello(name + ("." if trailing_dot else ""))
    size = draw(st.sampled_from([None, 1, 3, 50, 300]))
    if size:  # re-cut the one record into several
        payload = data[5:]
        data = b"".join(
            data[:3] + len(payload[i : i + size]).to_bytes(2, "big") + payload[i : i + size]
            for i in range(0, len(payload), size)
        )
    return data, Preamble(name.lower())


TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1)
FIELD_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


@st.composite
def http_preambles(draw) -> tuple[bytes, Preamble]:
    """A valid request head and the domain it names."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT"]) | TOKEN)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    name = draw(DOMAIN)
    port = draw(st.sampled_from(["", ":80", ":8080", ":"]))
    host = draw(st.sampled_from([name, name.upper(), name + "."])) + port
    path = draw(st.from_regex(r"\A/[a-zA-Z0-9/._~%?=&-]{0,30}\Z"))
    target = draw(st.sampled_from([path, f"http://{host}{path}"]))
    headers = draw(st.lists(st.tuples(TOKEN.filter(lambda t: t.lower() != "host"), FIELD_VALUE), max_size=5))
    lines = [f"{k}: {v}" for k, v in headers]
    lines.insert(draw(st.integers(0, len(lines))), f"Host: {host}")
    head = f"{method} {target} {version}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n"
    return head.encode("ascii"), Preamble(name.lower())


PARSERS = [(TlsSniffer, tls_preambles()), (HttpSniffer, http_preambles())]


def cuts_for(data: bytes):
    return st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12)


def is_documented(result) -> bool:
    if result is NEED_MORE:
        return True
    if type(result) is Preamble:
        return result.domain is None or sniff.normalize_domain(result.domain) == result.domain
    return isinstance(result, type) and issubclass(result, kiaerrors.GatewayError)


# --------------------------------------------------------------------------
# Valid preambles: any split, any prefix, any trailer


@FAST
@given(st.data())
def test_tls_any_split_gives_the_whole_answer(data):
    hello, expected = data.draw(tls_preambles())
    cuts = data.draw(cuts_for(hello))
    assert outcome(TlsSniffer(), split_at(hello, cuts)) == expected


@FAST
@given(st.data())
def test_http_any_split_gives_the_whole_answer(data):
    head, expected = data.draw(http_preambles())
    cuts = data.draw(cuts_for(head))
    assert outcome(HttpSniffer(), [head]) == expected
    assert outcome(HttpSniffer(), split_at(head, cuts)) == expected


@FAST
@given(st.data())
def test_every_strict_prefix_needs_more(data):
    sniffer_class, preambles = data.draw(st.sampled_from(PARSERS))
    preamble, _ = data.draw(preambles)
    end = data.draw(st.integers(0, len(preamble) - 1))
    assert sniffer_class().feed(preamble[:end]) is NEED_MORE


@FAST
@given(st.data(), st.binary(max_size=200))
def test_bytes_after_the_preamble_change_nothing(data, trailer):
    sniffer_class, preambles = data.draw(st.sampled_from(PARSERS))
    preamble, expected = data.draw(preambles)
    cuts = data.draw(cuts_for(preamble + trailer))
    assert outcome(sniffer_class(), [preamble + trailer]) == expected
    assert outcome(sniffer_class(), split_at(preamble + trailer, cuts)) == expected


@FAST
@given(st.data())
def test_exactly_max_preamble_fits_and_one_less_does_not(data):
    sniffer_class, preambles = data.draw(st.sampled_from(PARSERS))
    preamble, expected = data.draw(preambles)
    assert outcome(sniffer_class(len(preamble)), [preamble]) == expected
    assert outcome(sniffer_class(len(preamble) - 1), [preamble]) is kiaerrors.HeadTooLarge


# --------------------------------------------------------------------------
# Any bytes at all


ANY_TLS_BYTES = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + b),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01\x01\x00\x01\x00\x00\xfc\x03\x03" + b),
)
ANY_HTTP_BYTES = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b"GET / HTTP/1.1\r\nHost: " + b),
    st.lists(st.sampled_from([b"GET ", b"/ ", b"HTTP/1.1", b"\r\n", b"Host: ", b"a.example", b":", b" ", b"\n"])).map(
        b"".join
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(ANY_TLS_BYTES.map(lambda b: (TlsSniffer, b)), ANY_HTTP_BYTES.map(lambda b: (HttpSniffer, b))),
    st.data(),
)
def test_any_bytes_give_a_documented_answer_however_split(case, data):
    sniffer_class, raw = case
    limit = data.draw(st.sampled_from([sniff.MAX_PREAMBLE, 16, max(1, len(raw) - 3)]))
    whole = outcome(sniffer_class(limit), [raw])  # any other exception fails the test
    assert is_documented(whole)
    cuts = data.draw(cuts_for(raw))
    assert outcome(sniffer_class(limit), split_at(raw, cuts)) == whole


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_one_mutated_byte_never_raises_anything_else(data):
    sniffer_class, preambles = data.draw(st.sampled_from(PARSERS))
    preamble, _ = data.draw(preambles)
    at = data.draw(st.integers(0, len(preamble) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = preamble[:at] + bytes([value]) + preamble[at + 1 :]
    whole = outcome(sniffer_class(), [mutated])
    assert is_documented(whole)
    assert outcome(sniffer_class(), split_at(mutated, data.draw(cuts_for(mutated)))) == whole
