"""Read the SNI out of a QUIC client's Initial packets: sans-IO, datagrams in, result out.

The QUIC listener's counterpart of sniff.py's ``TlsSniffer``. A client's first
flight is one or more datagrams holding Initial packets, which are encrypted
with keys anyone can derive from the first Initial's Destination Connection ID
(RFC 9001 section 5.2; RFC 9369 for QUIC version 2). ``InitialSniffer.feed``
takes one datagram at a time, removes header protection, decrypts the Initial
packets of the flow, reassembles their CRYPTO frames by offset in any order
and, once the ClientHello is whole, hands it to sniff.py's parser. It returns:

- a ``Preamble``: the SNI, or None when the client named none;
- ``NEED_MORE``: the ClientHello needs more datagrams;
- or raises: ``NotInitial`` when a flow's first datagram cannot start one (it
  is dropped and gets nothing: garbage, a short datagram, another version),
  ``ClientClosed`` when the client closed in its Initial, or a ``GatewayError``
  (kiaerrors.py) whose ``quic_close_code`` goes back in ``close_packet``.

The datagrams fed are held as they came (``datagrams``), coalesced packets and
all, to be forwarded untouched once the flow is routed; nothing is decrypted
after the ClientHello. Only what routing needs is checked (the keys, the
frames an Initial may carry, the CRYPTO stream, the ClientHello): the backend
judges the rest, reserved bits included. This module opens no socket, imports no gevent and
never logs. AES comes from the ``cryptography`` package, imported here only:
the core install runs without it, and a QUIC listener then refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiaerrors import HeadTooLarge, QuicProtocolViolation, UnexpectedTlsMessage
from sniff import MAX_PREAMBLE, NEED_MORE, Preamble, SniffResult, parse_client_hello

__all__ = [
    "MIN_INITIAL_DATAGRAM",
    "VERSION_1",
    "VERSION_2",
    "ClientClosed",
    "InitialSniffer",
    "NotInitial",
]

VERSION_1 = 0x00000001
VERSION_2 = 0x6B3343CF  # RFC 9369
MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 section 14.1: a client's datagram with an Initial is padded to this
MIN_FIRST_DCID = 8  # RFC 9000 section 7.2: a client's first Destination Connection ID is at least 8 bytes
MAX_CID = 20

# Per version: the initial salt, the label prefix of the keys, and the long-header type of an Initial.
_VERSIONS = {
    VERSION_1: (bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"), b"quic ", 0),
    VERSION_2: (bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"), b"quicv2 ", 1),
}
_RETRY_TYPE = {VERSION_1: 3, VERSION_2: 0}  # the one long-header type with no Length field

# Frame types an Initial packet may carry (RFC 9000 section 12.4).
_PADDING, _PING, _ACK, _ACK_ECN, _CRYPTO, _CONNECTION_CLOSE = 0x00, 0x01, 0x02, 0x03, 0x06, 0x1C
_HANDSHAKE_CLIENT_HELLO = 1


class NotInitial(Exception):
    """The datagram cannot start a QUIC flow: it is dropped without an answer."""


class ClientClosed(Exception):
    """The client sent CONNECTION_CLOSE in its Initial: the flow ends without an answer."""


# --------------------------------------------------------------------------
# Keys (RFC 9001 section 5): HKDF over SHA-256, from the standard library.


def _hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes((counter,)), hashlib.sha256)
        out += block
        counter += 1
    return out[:length]


class _Keys:
    """One side's Initial keys: the AEAD, its IV, and the header-protection cipher."""

    __slots__ = ("aead", "hp", "iv")

    def __init__(self, initial_secret: bytes, side: bytes, prefix: bytes) -> None:
        secret = _hkdf_expand_label(initial_secret, side, 32)
        self.aead = AESGCM(_hkdf_expand_label(secret, prefix + b"key", 16))
        self.iv = _hkdf_expand_label(secret, prefix + b"iv", 12)
        hp = _hkdf_expand_label(secret, prefix + b"hp", 16)
        self.hp = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()

    def mask(self, sample: bytes) -> bytes:
        return self.hp.update(sample)

    def nonce(self, packet_number: int) -> bytes:
        return (int.from_bytes(self.iv, "big") ^ packet_number).to_bytes(12, "big")


def initial_keys(version: int, dcid: bytes) -> tuple[_Keys, _Keys]:
    """The client's and the server's Initial keys for a first Destination Connection ID."""
    salt, prefix, _ = _VERSIONS[version]
    initial_secret = hmac.digest(salt, dcid, hashlib.sha256)  # HKDF-Extract
    return _Keys(initial_secret, b"client in", prefix), _Keys(initial_secret, b"server in", prefix)


# --------------------------------------------------------------------------
# Wire primitives


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A variable-length integer (RFC 9000 section 16) at ``pos``: its value and the position after it."""
    if pos >= len(data):
        raise IndexError("varint past the end")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > len(data):
        raise IndexError("varint past the end")
    value = first & 0x3F
    for byte in data[pos + 1 : pos + size]:
        value = (value << 8) | byte
    return value, pos + size


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return struct.pack("!H", 0x4000 | value)
    if value < 0x40000000:
        return struct.pack("!I", 0x80000000 | value)
    return struct.pack("!Q", 0xC000000000000000 | value)


def _decode_packet_number(truncated: int, bits: int, expected: int) -> int:
    """RFC 9000 appendix A.3."""
    window = 1 << bits
    half = window // 2
    candidate = (expected & ~(window - 1)) | truncated
    if candidate <= expected - half and candidate < (1 << 62) - window:
        return candidate + window
    if candidate > expected + half and candidate >= window:
        return candidate - window
    return candidate


class _LongHeader:
    """The parts of a long-header packet this module reads, in the clear."""

    __slots__ = ("dcid", "end", "pn_offset", "scid", "start", "type", "version")

    def __init__(self, datagram: bytes, pos: int) -> None:
        """Parse the packet at ``pos``; IndexError or ValueError if it does not parse."""
        self.start = pos
        first = datagram[pos]
        if not first & 0x80:
            raise ValueError("short header")
        self.version = int.from_bytes(datagram[pos + 1 : pos + 5], "big")
        if self.version not in _VERSIONS:
            raise ValueError(f"version 0x{self.version:08x}")
        self.type = (first >> 4) & 0x03
        at = pos + 5
        self.dcid, at = _cid(datagram, at)
        self.scid, at = _cid(datagram, at)
        if self.type == _RETRY_TYPE[self.version]:
            raise ValueError("a Retry")
        if self.type == _VERSIONS[self.version][2]:  # an Initial carries a token
            token_length, at = _varint(datagram, at)
            at += token_length
        length, at = _varint(datagram, at)
        self.pn_offset = at
        self.end = at + length
        if self.end > len(datagram) or length < 20:  # a packet number and a header-protection sample at least
            raise ValueError("packet length runs past the datagram")


def _cid(datagram: bytes, at: int) -> tuple[bytes, int]:
    length = datagram[at]
    if length > MAX_CID:
        raise ValueError("connection ID longer than 20 bytes")
    end = at + 1 + length
    if end > len(datagram):
        raise ValueError("connection ID past the datagram")
    return datagram[at + 1 : end], end


# --------------------------------------------------------------------------
# The sniffer


class InitialSniffer:
    """One client's datagrams until the ClientHello carried by its Initial packets is whole; its SNI."""

    def __init__(self, max_preamble: int = MAX_PREAMBLE) -> None:
        self.max_preamble = max_preamble
        self.datagrams: list[bytes] = []  # every datagram fed, in order, to be forwarded untouched
        self.held = 0  # their bytes
        self.version: int | None = None
        self.dcid = b""  # the client's first Destination Connection ID: the keys come from it
        self.scid = b""  # the client's own connection ID: where an answer goes
        self._client: _Keys | None = None
        self._server: _Keys | None = None
        self._largest_pn = -1
        self._stream = bytearray()  # the CRYPTO stream, holes zero-filled
        self._have: list[list[int]] = []  # its filled ranges [start, end), sorted and merged
        self.result: Preamble | None = None

    def feed(self, datagram: bytes) -> SniffResult:
        """Take the next datagram of the client's address."""
        if self.result is not None:
            return self.result
        if self.version is None:
            self._first(datagram)
        elif self.held + len(datagram) > self.max_preamble:
            raise HeadTooLarge(f"no complete ClientHello in {self.max_preamble} bytes of datagrams")
        else:
            self.datagrams.append(datagram)
            self.held += len(datagram)
            self._packets(datagram)
        return NEED_MORE if self.result is None else self.result

    def _first(self, datagram: bytes) -> None:
        if len(datagram) < MIN_INITIAL_DATAGRAM:
            raise NotInitial(f"a first datagram of {len(datagram)} bytes, under {MIN_INITIAL_DATAGRAM}")
        try:
            header = _LongHeader(datagram, 0)
        except (IndexError, ValueError) as exc:
            raise NotInitial(f"no QUIC Initial: {exc}") from None
        if header.type != _VERSIONS[header.version][2]:
            raise NotInitial("the first packet is not an Initial")
        if len(header.dcid) < MIN_FIRST_DCID:
            raise NotInitial(f"a first Destination Connection ID of {len(header.dcid)} bytes")
        self.version, self.dcid, self.scid = header.version, header.dcid, header.scid
        self._client, self._server = initial_keys(header.version, header.dcid)
        payload = self._open(datagram, header)
        if payload is None:
            self.version = None
            raise NotInitial("the first Initial does not decrypt")
        self.datagrams.append(datagram)
        self.held = len(datagram)
        self._frames(payload)
        self._packets(datagram, header.end)

    def _packets(self, datagram: bytes, pos: int = 0) -> None:
        """Every Initial of this flow in the datagram from ``pos`` until the ClientHello is whole; other packets are
        passed over as they are."""
        while pos < len(datagram) and self.result is None:
            try:
                header = _LongHeader(datagram, pos)
            except (IndexError, ValueError):
                return  # a short header, a Retry or padding: the rest of the datagram is not ours to read
            if (
                header.version == self.version
                and header.type == _VERSIONS[self.version][2]
                and header.dcid == self.dcid
            ):
                payload = self._open(datagram, header)
                if payload is not None:
                    self._frames(payload)
            pos = header.end

    def _open(self, datagram: bytes, header: _LongHeader) -> bytes | None:
        """Remove header protection and decrypt one Initial; None if it does not authenticate."""
        keys = self._client
        start, pn_offset = header.start, header.pn_offset
        mask = keys.mask(datagram[pn_offset + 4 : pn_offset + 20])
        first = datagram[start] ^ (mask[0] & 0x0F)
        pn_length = (first & 0x03) + 1
        truncated = int.from_bytes(datagram[pn_offset : pn_offset + pn_length], "big") ^ int.from_bytes(
            mask[1 : 1 + pn_length], "big"
        )
        header_bytes = bytes((first,)) + datagram[start + 1 : pn_offset] + truncated.to_bytes(pn_length, "big")
        packet_number = _decode_packet_number(truncated, 8 * pn_length, self._largest_pn + 1)
        try:
            payload = keys.aead.decrypt(
                keys.nonce(packet_number), datagram[pn_offset + pn_length : header.end], header_bytes
            )
        except InvalidTag:
            return None
        self._largest_pn = max(self._largest_pn, packet_number)
        return payload

    def _frames(self, payload: bytes) -> None:
        pos, end = 0, len(payload)
        try:
            while pos < end:
                kind = payload[pos]
                pos += 1
                if kind in (_PADDING, _PING):
                    continue
                if kind == _CRYPTO:
                    offset, pos = _varint(payload, pos)
                    length, pos = _varint(payload, pos)
                    if pos + length > end:
                        raise IndexError("CRYPTO data past the packet")
                    self._crypto(offset, payload[pos : pos + length])
                    pos += length
                elif kind in (_ACK, _ACK_ECN):
                    pos = _ack(payload, pos, kind == _ACK_ECN)
                elif kind == _CONNECTION_CLOSE:
                    raise ClientClosed("the client closed in its Initial")
                else:
                    raise QuicProtocolViolation(f"frame type 0x{kind:02x} in an Initial packet")
        except IndexError as exc:
            raise QuicProtocolViolation(f"a frame runs past its packet: {exc}") from None
        self._client_hello()  # judged after each packet: how packets share datagrams changes no answer

    def _crypto(self, offset: int, data: bytes) -> None:
        """Place CRYPTO data at its offset; data that disagrees with bytes already in is a violation."""
        end = offset + len(data)
        if end > self.max_preamble:
            raise HeadTooLarge(f"ClientHello data past {self.max_preamble} bytes")
        if not data:
            return
        for start, stop in self._have:
            low, high = max(start, offset), min(stop, end)
            if low < high and self._stream[low:high] != data[low - offset : high - offset]:
                raise QuicProtocolViolation("CRYPTO data that differs from what came at the same offset before")
        if len(self._stream) < end:
            self._stream.extend(bytes(end - len(self._stream)))
        self._stream[offset:end] = data
        merged: list[list[int]] = []
        for start, stop in sorted([*self._have, [offset, end]]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self._have = merged

    def _client_hello(self) -> None:
        whole = self._have[0][1] if self._have and self._have[0][0] == 0 else 0
        if whole < 4:
            return
        if self._stream[0] != _HANDSHAKE_CLIENT_HELLO:
            raise UnexpectedTlsMessage(f"handshake type {self._stream[0]} is not a ClientHello")
        length = 4 + int.from_bytes(self._stream[1:4], "big")
        if length > self.max_preamble:
            raise HeadTooLarge(f"ClientHello of {length} bytes")
        if whole >= length:
            self.result = Preamble(parse_client_hello(bytes(self._stream[4:length])))

    def close_packet(self, code: int, reason: bytes = b"") -> bytes:
        """An Initial packet from the server with CONNECTION_CLOSE ``code``, protected with the server's Initial keys.

        What a QUIC server that refused the handshake would send (RFC 9000
        section 10.2.3): the client fails at once instead of after its timeout.
        """
        frame = b"\x1c" + encode_varint(code) + b"\x00" + encode_varint(len(reason)) + reason
        return seal_initial(self._server, self.version, self.scid, self.dcid, 0, frame)


def seal_initial(
    keys: _Keys, version: int, dcid: bytes, scid: bytes, packet_number: int, payload: bytes, token: bytes = b""
) -> bytes:
    """One protected Initial packet with a two-byte packet number: the server's answer (no token), and tests'."""
    payload += bytes(max(0, 2 - len(payload)))  # a header-protection sample needs 4 + 16 bytes from the packet number
    first = 0xC1 | (_VERSIONS[version][2] << 4)
    header = (
        bytes((first,))
        + version.to_bytes(4, "big")
        + bytes((len(dcid),))
        + dcid
        + bytes((len(scid),))
        + scid
        + encode_varint(len(token))
        + token
        + struct.pack("!HH", 0x4000 | (2 + len(payload) + 16), packet_number & 0xFFFF)
    )
    sealed = keys.aead.encrypt(keys.nonce(packet_number), payload, header)
    mask = keys.mask(sealed[2:18])
    protected = bytes((header[-2] ^ mask[1], header[-1] ^ mask[2]))
    return bytes((first ^ (mask[0] & 0x0F),)) + header[1:-2] + protected + sealed


def _ack(payload: bytes, pos: int, ecn: bool) -> int:
    """Skip an ACK frame's fields (RFC 9000 section 19.3)."""
    _, pos = _varint(payload, pos)  # largest acknowledged
    _, pos = _varint(payload, pos)  # delay
    ranges, pos = _varint(payload, pos)
    _, pos = _varint(payload, pos)  # first range
    for _ in range(2 * ranges + (3 if ecn else 0)):  # gap and length per range; ECT0, ECT1, CE counts
        _, pos = _varint(payload, pos)
    return pos
