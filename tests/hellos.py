"""ClientHellos for the sniffer tests: real ones from ssl.MemoryBIO, and a builder for bad ones.

``real_hello`` runs the first flight of a real OpenSSL handshake into memory (no
socket) and returns the bytes a client would send. The builder functions
assemble a hello layer by layer (RFC 8446 sections 5.1, 4 and 4.1.2; RFC 6066
section 3) and let a test lie about any one length field.

Also holds the byte-feeding helpers both test files use, so the tests need no
conftest.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

import kiaerrors
import sniff


def real_hello(
    server_hostname: str | None = "example.com",
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> bytes:
    """The bytes of the ClientHello Python's ssl module sends for these settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# --------------------------------------------------------------------------
# Builder: each function returns bytes; ``length=`` overrides the length field.


def vector(data: bytes, length_bytes: int, length: int | None = None) -> bytes:
    """A TLS vector: its length in ``length_bytes`` big-endian bytes, then the data."""
    return (len(data) if length is None else length).to_bytes(length_bytes, "big") + data


def server_name_data(*names: bytes, name_type: int = 0, list_length: int | None = None) -> bytes:
    """The server_name extension's body: a ServerNameList of ``names``."""
    entries = b"".join(bytes([name_type]) + vector(name, 2) for name in names)
    return vector(entries, 2, list_length)


def extension(kind: int, data: bytes, length: int | None = None) -> bytes:
    return kind.to_bytes(2, "big") + vector(data, 2, length)


def sni(*names: bytes) -> bytes:
    """A whole server_name extension naming ``names`` as host_name entries."""
    return extension(sniff.EXT_SERVER_NAME, server_name_data(*names))


# supported_versions (43) offering TLS 1.3, as every modern client sends it.
SUPPORTED_VERSIONS = extension(43, vector(b"\x03\x04", 1))


def hello_body(
    extensions: Iterable[bytes] | None = (),
    *,
    version: int = 0x0303,
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    session_id_length: int | None = None,
    suites_length: int | None = None,
    compression_length: int | None = None,
    extensions_length: int | None = None,
) -> bytes:
    """A ClientHello body; ``extensions=None`` leaves the extensions block out entirely."""
    body = (
        version.to_bytes(2, "big")
        + bytes(range(32))  # random
        + vector(session_id, 1, session_id_length)
        + vector(suites, 2, suites_length)
        + vector(compression, 1, compression_length)
    )
    if extensions is not None:
        body += vector(b"".join(extensions), 2, extensions_length)
    return body


def handshake(body: bytes, msg_type: int = sniff.TLS_HANDSHAKE_CLIENT_HELLO, length: int | None = None) -> bytes:
    return bytes([msg_type]) + vector(body, 3, length)


def record(
    payload: bytes,
    *,
    content_type: int = sniff.TLS_CONTENT_HANDSHAKE,
    version: bytes = b"\x03\x01",
    length: int | None = None,
) -> bytes:
    return bytes([content_type]) + version + vector(payload, 2, length)


def records(payload: bytes, size: int) -> bytes:
    """``payload`` cut into handshake records of at most ``size`` bytes each."""
    return b"".join(record(payload[i : i + size]) for i in range(0, len(payload), size))


def hello(*names: bytes, **body_options) -> bytes:
    """A whole one-record ClientHello naming ``names`` in its SNI (none: no server_name)."""
    extensions = [sni(*names)] if names else []
    extensions.append(SUPPORTED_VERSIONS)
    return record(handshake(hello_body(extensions, **body_options)))


# --------------------------------------------------------------------------
# Feeding helpers


def outcome(sniffer, pieces: Iterable[bytes]):
    """Feed ``pieces`` in order; return the first decided result, NEED_MORE, or the error class."""
    result = sniff.NEED_MORE
    try:
        for piece in pieces:
            result = sniffer.feed(piece)
            if result is not sniff.NEED_MORE:
                return result
    except kiaerrors.GatewayError as exc:
        return type(exc)
    return result


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]
