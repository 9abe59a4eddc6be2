"""quicsniff.py: the SNI out of QUIC Initial packets, from real clients' captures and from packets built to order."""

from __future__ import annotations

import time

import pytest
from hellos import real_hello
from quicpackets import DCID, SCID, ack, capture, crypto, datagram, hello_message, initial, padded_initial

import kiaerrors
import quicsniff
from kiaerrors import BadClientHello, HeadTooLarge, QuicProtocolViolation, UnexpectedTlsMessage
from quicsniff import NEED_MORE, ClientClosed, InitialSniffer, NotInitial
from sniff import Preamble

HELLO = hello_message(real_hello("quic.example"))
LONG_V1 = b"\x00\x00\x00\x01\x08" + DCID + b"\x00"  # after a long header's first byte: version 1, DCID, no SCID


def test_hello_fixture_is_one_client_hello_message():
    assert HELLO[0] == 1 and int.from_bytes(HELLO[1:4], "big") == len(HELLO) - 4


# --------------------------------------------------------------------------
# Real clients


@pytest.mark.parametrize("name", ["aioquic-v1", "aioquic-v2"])
def test_aioquic_first_datagram_names_its_server(name):
    [first] = capture(name)
    sniffer = InitialSniffer()
    assert sniffer.feed(first) == Preamble("pq.example")
    assert sniffer.datagrams == [first] and sniffer.held == len(first)
    assert sniffer.version == (quicsniff.VERSION_2 if name.endswith("v2") else quicsniff.VERSION_1)


def test_chromium_post_quantum_hello_spans_two_datagrams_out_of_order_inside():
    first, second = capture("chromium-pq")
    sniffer = InitialSniffer()
    assert sniffer.feed(first) is NEED_MORE
    assert sniffer.feed(second) == Preamble("pq.example")
    assert sniffer.datagrams == [first, second]
    assert sniffer.feed(b"later") == Preamble("pq.example")  # decided: later datagrams are not held
    assert sniffer.datagrams == [first, second]


def test_chromium_datagrams_in_the_other_order():
    first, second = capture("chromium-pq")
    sniffer = InitialSniffer()
    assert sniffer.feed(second) is NEED_MORE
    assert sniffer.feed(first) == Preamble("pq.example")


def test_max_preamble_bounds_the_datagrams_held():
    first, second = capture("chromium-pq")
    sniffer = InitialSniffer(max_preamble=len(first) + len(second) - 1)
    assert sniffer.feed(first) is NEED_MORE
    with pytest.raises(HeadTooLarge):
        sniffer.feed(second)


@pytest.mark.parametrize("version", [quicsniff.VERSION_1, quicsniff.VERSION_2])
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (kiaerrors.NoRoute("x"), 0x100 + 112),
        (kiaerrors.Forbidden("x"), 0x100 + 49),
        (kiaerrors.BackendUnreachable("x"), 0x100 + 80),
        (kiaerrors.ClientLimit("x"), 0x2),
        (QuicProtocolViolation("x"), 0xA),
        (BadClientHello("x"), 0x100 + 50),
    ],
)
def test_a_real_client_reads_the_close_it_is_refused_with(version, error, code):
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection, QuicConnectionState

    config = QuicConfiguration(is_client=True, server_name="refused.example")
    config.supported_versions = [version]
    client = QuicConnection(configuration=config)
    client.connect(("127.0.0.1", 443), now=time.time())
    sniffer = InitialSniffer()
    for data, _ in client.datagrams_to_send(now=time.time()):
        sniffer.feed(data)
    assert kiaerrors.quic_close_code(error) == code
    client.receive_datagram(sniffer.close_packet(code, error.outcome.encode()), ("127.0.0.1", 443), now=time.time())
    assert client._state == QuicConnectionState.DRAINING  # it gave up at once, not after its timeout
    client.handle_timer(now=client.get_timer())
    terminated = [event for event in iter(client.next_event, None) if isinstance(event, events.ConnectionTerminated)]
    assert [(event.error_code, event.reason_phrase) for event in terminated] == [(code, error.outcome)]


def test_no_close_code_where_the_contract_gives_none():
    assert kiaerrors.quic_close_code(kiaerrors.PreambleTimeout("x")) is None


# --------------------------------------------------------------------------
# Built packets: frames, order, coalescing


def test_frames_an_initial_may_carry_around_the_crypto_data():
    frames = b"\x01" + ack(3, ((0, 1),)) + crypto(0, HELLO) + ack(2, ecn=(1, 2, 3)) + b"\x00" * 40
    assert InitialSniffer().feed(padded_initial(frames)) == Preamble("quic.example")


def test_crypto_frames_in_any_order_across_packets_and_datagrams():
    cut1, cut2 = 100, 400
    sniffer = InitialSniffer()
    first = datagram(initial(crypto(cut2, HELLO[cut2:]), 0), initial(crypto(cut1, HELLO[cut1:cut2]), 1))
    assert sniffer.feed(first) is NEED_MORE
    retransmitted = crypto(cut1, HELLO[cut1:cut2])  # the same bytes again are fine
    assert sniffer.feed(datagram(initial(retransmitted + crypto(0, HELLO[:cut1]), 2))) == Preamble("quic.example")


def test_a_token_after_a_retry_is_stepped_over():
    assert InitialSniffer().feed(padded_initial(crypto(0, HELLO), token=b"t" * 40)) == Preamble("quic.example")


def test_packets_not_of_the_flow_are_held_and_passed_over():
    sniffer = InitialSniffer()
    assert sniffer.feed(padded_initial(crypto(0, HELLO[:50]))) is NEED_MORE
    other_flow = initial(crypto(50, b"x" * (len(HELLO) - 50)), 1, dcid=b"another-dcid")
    zero_rtt = b"\xd1" + LONG_V1 + b"\x1e" + bytes(30)  # a 0-RTT packet: no token field, 30 bytes
    undecryptable = initial(crypto(50, HELLO[50:]), 3, keys_from=b"wrong keys")
    short_header = b"\x40" + DCID + b"\x00" * 30
    cut_in_cid = b"\xc0\x00\x00\x00\x01\x14abc"
    others = [other_flow, zero_rtt, undecryptable, short_header, b"\xc0\x00\x00", cut_in_cid]
    for data in others:
        assert sniffer.feed(data) is NEED_MORE
    assert sniffer.datagrams[1:] == others
    assert sniffer.feed(datagram(initial(crypto(50, HELLO[50:]), 4))) == Preamble("quic.example")


def test_packets_coalesced_after_the_first_initial_are_read_too():
    first = datagram(initial(crypto(0, HELLO[:10]), 0), initial(crypto(10, HELLO[10:]), 1))
    assert InitialSniffer().feed(first) == Preamble("quic.example")


def test_version_2_coalesced_with_a_version_1_packet_reads_its_own_only():
    v2 = quicsniff.VERSION_2
    first = datagram(initial(crypto(0, HELLO[:10]), 0, version=v2), initial(crypto(10, HELLO[10:]), 1))
    sniffer = InitialSniffer()
    assert sniffer.feed(first) is NEED_MORE
    assert sniffer.feed(initial(crypto(10, HELLO[10:]), 2, version=v2)) == Preamble("quic.example")


def test_packet_numbers_past_the_two_byte_window():
    sniffer = InitialSniffer()
    assert sniffer.feed(padded_initial(crypto(0, HELLO[:10]), 0xFFF0)) is NEED_MORE
    assert sniffer.feed(initial(crypto(10, HELLO[10:20]), 0x10002)) is NEED_MORE  # truncated 0x0002: one window up
    assert sniffer.feed(initial(crypto(20, HELLO[20:30]), 0xFFF5)) is NEED_MORE  # truncated 0xfff5: one window down
    assert sniffer.feed(initial(crypto(30, HELLO[30:]), 0x10003)) == Preamble("quic.example")


def test_an_empty_crypto_frame_changes_nothing():
    sniffer = InitialSniffer()
    assert sniffer.feed(padded_initial(crypto(5, b""))) is NEED_MORE
    assert sniffer.feed(initial(crypto(0, HELLO), 1)) == Preamble("quic.example")


def test_a_hello_without_sni():
    assert InitialSniffer().feed(padded_initial(crypto(0, hello_message(real_hello(None))))) == Preamble(None)


# --------------------------------------------------------------------------
# What cannot start a flow: dropped, no answer


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (padded_initial(crypto(0, HELLO))[:1199], "under 1200"),
        (b"\x40" + bytes(1299), "short header"),
        (b"\xc0\x00\x00\x00\x02" + bytes(1295), "version 0x00000002"),
        (b"\xe1" + LONG_V1 + b"\x44\xa0" + bytes(1184), "not an Initial"),  # a Handshake packet
        (b"\xf0" + LONG_V1 + bytes(1200), "a Retry"),
        (padded_initial(crypto(0, HELLO), dcid=b"1234567"), "of 7 bytes"),
        (b"\xc0\x00\x00\x00\x01\x15" + bytes(1294), "longer than 20"),
        (initial(crypto(0, b"x" * 1500))[:1300], "runs past the datagram"),
        (b"\xc0" + LONG_V1 + b"\x80\x10\x00\x00" + bytes(1200), "varint past the end"),  # a token too long
        (datagram(initial(crypto(0, HELLO), keys_from=b"other keys")), "does not decrypt"),
    ],
)
def test_a_first_datagram_that_cannot_start_a_flow(data, why):
    sniffer = InitialSniffer()
    with pytest.raises(NotInitial, match=why):
        sniffer.feed(data)
    assert sniffer.datagrams == [] and sniffer.version is None


# --------------------------------------------------------------------------
# What decrypts but cannot become a valid ClientHello: refused with its code


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        (b"\x08\x00\x00", QuicProtocolViolation),  # a STREAM frame
        (b"\x06\x00\x40", QuicProtocolViolation),  # a CRYPTO frame's length cut short
        (b"\x06\x00\x10abc", QuicProtocolViolation),  # CRYPTO data past the packet
        (b"\x02\x00\x00\x05", QuicProtocolViolation),  # an ACK with 5 ranges and none there
        (crypto(0, b"\x02\x00\x00\x01x"), UnexpectedTlsMessage),  # a ServerHello
        (crypto(0, b"\x01\xff\xff\xff"), HeadTooLarge),
        (crypto(40000, b"x"), HeadTooLarge),
        (crypto(0, b"\x01\x00\x00\x04\x09\x09\x09\x09"), BadClientHello),
        (crypto(0, HELLO[:50]) + crypto(10, b"y" * 10), QuicProtocolViolation),  # disagrees with what came before
    ],
)
def test_an_initial_that_cannot_become_a_valid_client_hello(frames, error):
    with pytest.raises(error):
        InitialSniffer().feed(datagram(initial(frames)))  # zeros after the packet: its payload ends with the frames


def test_a_client_closing_in_its_initial():
    with pytest.raises(ClientClosed):
        InitialSniffer().feed(padded_initial(b"\x1c\x0a\x00\x00"))


def test_varints_of_every_size_round_trip():
    for value in (0, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1):
        encoded = quicsniff.encode_varint(value)
        assert len(encoded) in (1, 2, 4, 8)
        frames = crypto(0, HELLO) + b"\x02" + encoded + b"\x00\x00\x00"  # an ACK whose largest is ``value``
        assert InitialSniffer().feed(padded_initial(frames)) == Preamble("quic.example")


def test_seal_initial_uses_the_rfc_9001_keys():
    # RFC 9001 appendix A.1: the client's Initial keys for DCID 0x8394c8f03e515708.
    client, server = quicsniff.initial_keys(quicsniff.VERSION_1, DCID)
    assert client.iv == bytes.fromhex("fa044b2f42a3fd3b46fb255c")
    assert server.iv == bytes.fromhex("0ac1493ca1905853b0bba03e")
    assert client.mask(bytes(16)) != server.mask(bytes(16))
    assert SCID != DCID
