"""Property tests for quicsniff.py (hypothesis).

What must hold however a client cuts its ClientHello into CRYPTO frames, packs
the frames into packets and the packets into datagrams, in whatever order they
arrive: the answer is the SNI once the last piece is in and NEED_MORE before,
every datagram fed is held as it came, and nothing but the module's own
refusals escapes from any bytes.
"""

from __future__ import annotations

import pytest
from hellos import real_hello
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quicpackets import capture, crypto, datagram, hello_message, initial

import kiaerrors
import quicsniff
from quicsniff import NEED_MORE, ClientClosed, InitialSniffer, NotInitial
from sniff import Preamble

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HELLOS = {name: hello_message(real_hello(name)) for name in ("a.example", "quic.example.org")}
LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@st.composite
def flights(draw) -> tuple[list[bytes], int, str]:
    """A ClientHello cut into CRYPTO frames, packed into packets and datagrams, shuffled; the index of the
    datagram fed that completes it; its SNI."""
    name = draw(st.sampled_from(sorted(HELLOS)))
    hello = HELLOS[name]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(hello) - 1), max_size=8))))
    pieces = list(zip([0, *cuts], [*cuts, len(hello)]))
    sent = draw(st.permutations(range(len(pieces))))
    sent += draw(st.lists(st.sampled_from(range(len(pieces))), max_size=3))  # retransmitted: the same bytes again
    version = draw(st.sampled_from([quicsniff.VERSION_1, quicsniff.VERSION_2]))
    packets, carried, at = [], [], 0
    while at < len(sent):
        take = sent[at : at + draw(st.integers(1, 3))]
        extra = draw(st.sampled_from([b"", b"\x01", b"\x00" * 5, b"\x02\x00\x00\x00\x00"]))  # PING, PADDING, ACK
        frames = b"".join(crypto(pieces[i][0], hello[pieces[i][0] : pieces[i][1]]) for i in take)
        packets.append(initial(extra + frames, len(packets), version=version))
        carried.append(set(take))
        at += len(take)
    datagrams, holds, at = [], [], 0
    while at < len(packets):
        take = draw(st.integers(1, 3))
        datagrams.append(datagram(*packets[at : at + take]))  # each padded to 1,200 bytes: any may come first
        holds.append(set().union(*carried[at : at + take]))
        at += take
    order = draw(st.permutations(range(len(datagrams))))
    fed_holds = [holds[index] for index in order]
    complete = max(min(position for position, held in enumerate(fed_holds) if piece in held) for piece in sent)
    return [datagrams[index] for index in order], complete, name


@FAST
@given(flights())
def test_any_cut_any_order_gives_the_sni_once_the_last_piece_is_in(flight):
    datagrams, complete, name = flight
    sniffer = InitialSniffer()
    for index, data in enumerate(datagrams):
        result = sniffer.feed(data)
        assert result == (Preamble(name) if index >= complete else NEED_MORE)
    assert sniffer.datagrams == datagrams[: complete + 1]


FIRSTS = [capture(name)[0] for name in ("aioquic-v1", "aioquic-v2", "chromium-pq")]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIRSTS), st.data())
def test_a_changed_byte_is_dropped_or_refused_never_a_crash(first, data):
    at = data.draw(st.integers(0, len(first) - 1))
    changed = bytearray(first)
    changed[at] ^= data.draw(st.integers(1, 255))
    try:
        result = InitialSniffer().feed(bytes(changed))
    except (NotInitial, ClientClosed, kiaerrors.GatewayError):
        return
    assert result in (NEED_MORE, Preamble("pq.example"))  # a byte the header protection or padding does not check


@FAST
@given(st.binary(min_size=1200, max_size=1400))
def test_random_bytes_never_start_a_flow(first):
    with pytest.raises(NotInitial):  # whatever the header says, random bytes do not authenticate
        InitialSniffer().feed(first)
