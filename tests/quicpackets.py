"""Client Initial packets for the QUIC sniffer's tests: the real captures, and a builder for any frames.

The builder seals with quicsniff.py's own ``seal_initial``, which the tests
check against a real QUIC stack (aioquic opens what it seals), so a packet made
here is one a client could send.
"""

from __future__ import annotations

from pathlib import Path

import quicsniff
from quicsniff import encode_varint

CAPTURES = Path(__file__).resolve().parent / "data" / "quic-initial"
DCID = bytes.fromhex("8394c8f03e515708")  # RFC 9001 appendix A's
SCID = bytes.fromhex("c0ffee00")


def capture(name: str) -> list[bytes]:
    """A real client's first datagrams, in the order it sent them."""
    return [path.read_bytes() for path in sorted(CAPTURES.glob(f"{name}-*.bin"))]


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + encode_varint(offset) + encode_varint(len(data)) + data


def ack(largest: int = 0, ranges: tuple[tuple[int, int], ...] = (), ecn: tuple[int, int, int] | None = None) -> bytes:
    frame = b"\x03" if ecn else b"\x02"
    frame += encode_varint(largest) + encode_varint(0) + encode_varint(len(ranges)) + encode_varint(0)
    for gap, length in ranges:
        frame += encode_varint(gap) + encode_varint(length)
    for count in ecn or ():
        frame += encode_varint(count)
    return frame


def initial(
    frames: bytes,
    packet_number: int = 0,
    *,
    version: int = quicsniff.VERSION_1,
    dcid: bytes = DCID,
    scid: bytes = SCID,
    token: bytes = b"",
    keys_from: bytes | None = None,
) -> bytes:
    """One client Initial packet with these frames, sealed with the client keys of ``keys_from`` (default ``dcid``)."""
    client, _ = quicsniff.initial_keys(version, keys_from or dcid)
    return quicsniff.seal_initial(client, version, dcid, scid, packet_number, frames, token)


def datagram(*packets: bytes, pad_to: int = quicsniff.MIN_INITIAL_DATAGRAM) -> bytes:
    """Packets coalesced into one datagram, zero bytes after them up to ``pad_to``."""
    joined = b"".join(packets)
    return joined + bytes(max(0, pad_to - len(joined)))


def padded_initial(frames: bytes, packet_number: int = 0, **options: object) -> bytes:
    """A first datagram: one Initial padded inside (PADDING frames) to 1,200 bytes, as clients send it."""
    short = initial(frames, packet_number, **options)
    return initial(frames + bytes(max(0, quicsniff.MIN_INITIAL_DATAGRAM - len(short))), packet_number, **options)


def hello_message(hello_record: bytes) -> bytes:
    """The handshake message inside a ClientHello's TLS record(s): what QUIC carries in CRYPTO frames."""
    message, pos = b"", 0
    while pos < len(hello_record):
        length = int.from_bytes(hello_record[pos + 3 : pos + 5], "big")
        message += hello_record[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return message
