"""A real HTTP/3 server and client (aioquic), each run as a process of its own by the QUIC tests.

    python h3peer.py serve NAME CERT KEY [--retry]  # prints its UDP port, then answers every GET with
                                                    # "NAME PATH" (or SIZE bytes for /bytes/SIZE)
    python h3peer.py get HOST PORT SNI PATH CAFILE [--port-change]

``get`` prints one JSON line: the status, the body's length and sha256 and its
first bytes, or the error code a CONNECTION_CLOSE carried, and the seconds it
took. ``--port-change`` sends the request from a new UDP port once the
handshake is done, as a client behind a rebinding NAT would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated

TIMEOUT = 10.0
CHUNK = 65536


class H3Server(QuicConnectionProtocol):
    name = b"?"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3: H3Connection | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                path = dict(h3_event.headers).get(b":path", b"/")
                if path.startswith(b"/bytes/"):
                    size = int(path[len(b"/bytes/") :])
                    body = (hashlib.sha256(b"seed").digest() * (size // 32 + 1))[:size]
                else:
                    body = self.name + b" " + path
                self.h3.send_headers(h3_event.stream_id, [(b":status", b"200")])
                self.h3.send_data(h3_event.stream_id, body, end_stream=True)
        self.transmit()


async def run_server(name: str, cert: str, key: str, retry: bool) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(cert, key)
    H3Server.name = name.encode()
    server = await serve("127.0.0.1", 0, configuration=config, create_protocol=H3Server, retry=retry)
    port = server._transport.get_extra_info("sockname")[1]
    print(port, flush=True)
    await asyncio.Future()


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.status: int | None = None
        self.body = bytearray()
        self.done = asyncio.get_event_loop().create_future()

    def quic_event_received(self, event) -> None:
        if isinstance(event, ConnectionTerminated) and not self.done.done():
            self.done.set_result({"error_code": event.error_code, "reason": event.reason_phrase})
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.status = int(dict(h3_event.headers)[b":status"])
            elif isinstance(h3_event, DataReceived):
                self.body += h3_event.data
                if h3_event.stream_ended and not self.done.done():
                    self.done.set_result({"status": self.status})

    def get(self, authority: str, path: str) -> None:
        stream = self._quic.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode())]
        self.h3.send_headers(stream, [*headers, (b":path", path.encode())], end_stream=True)
        self.transmit()


async def run_get(host: str, port: int, sni: str, path: str, cafile: str, port_change: bool) -> dict:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sni)
    config.load_verify_locations(cafile)
    started = time.monotonic()
    try:
        async with connect(host, port, configuration=config, create_protocol=H3Client, wait_connected=False) as client:
            client.transmit()  # the first flight: connect() left it unsent
            handshake = asyncio.ensure_future(client.wait_connected())
            await asyncio.wait([handshake, client.done], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if client.done.done():
                handshake.cancel()
                return {**client.done.result(), "seconds": time.monotonic() - started}
            if not handshake.done():
                handshake.cancel()
                raise asyncio.TimeoutError
            await handshake
            if port_change:  # a new local port: the gateway sees a new client address for the same connection
                old = client._transport
                family = old.get_extra_info("socket").family  # aioquic's is dual-stack IPv6
                fresh = socket.socket(family, socket.SOCK_DGRAM)
                if family == socket.AF_INET6:
                    fresh.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                fresh.bind(("::" if family == socket.AF_INET6 else "127.0.0.1", 0))
                loop = asyncio.get_event_loop()
                transport, _ = await loop.create_datagram_endpoint(lambda: client, sock=fresh)
                old.close()
                client._transport = transport
            client.get(sni, path)
            result = await asyncio.wait_for(client.done, TIMEOUT)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return {"error": type(exc).__name__, "seconds": time.monotonic() - started}
    body = bytes(client.body)
    return {
        **result,
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "head": body[:64].decode("ascii", "replace"),
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    if sys.argv[1] == "serve":
        asyncio.run(run_server(*sys.argv[2:5], "--retry" in sys.argv))
    else:
        host, port, sni, path, cafile = sys.argv[2:7]
        result = asyncio.run(run_get(host, int(port), sni, path, cafile, "--port-change" in sys.argv))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
