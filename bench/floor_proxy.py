"""The least a Python gateway on gevent can do per connection: a yardstick, not a gateway.

It reads kiagateway's TOML for its first HTTP and HTTPS listeners and sends
every connection of each to the first backend of that listener's table,
unparsed: accept, one recv, connect, send, then copy both ways with two io
watchers until both sides are done. No routing, no checks, no timeouts, no
log line. What ``conn_profile.py`` measures for it is what CPython 3 and
gevent's event loop cost per connection before any of a gateway's own work:

    python bench/conn_profile.py --ours head='kiagateway {config}' \\
        --ours floor='python bench/floor_proxy.py {config}'
"""

from __future__ import annotations

import socket
import sys

import gevent

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


_serving: list = []  # the listeners and their watchers, kept for the process's life


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def serve(listen: str, backend: tuple[str, int]) -> None:
    loop = gevent.get_hub().loop
    family = socket.AF_INET6 if ":" in backend[0] else socket.AF_INET
    listener = socket.create_server(_address(listen), backlog=1024)
    listener.setblocking(False)

    def accepted() -> None:
        try:
            fd, _ = listener._accept()
        except BlockingIOError:
            return
        client = socket.socket(listener.family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        reader = loop.io(fd, 1)

        def first_bytes() -> None:
            try:
                data = client.recv(16384)
            except BlockingIOError:
                reader.start(first_bytes)
                return
            reader.stop()
            relay(client, reader, data)

        first_bytes()

    def relay(client: socket.socket, client_reader: object, data: bytes) -> None:
        upstream = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.connect_ex(backend)
        upstream_reader = loop.io(upstream.fileno(), 1)
        open_sides = [2]

        def pump(src: socket.socket, dst: socket.socket, watcher: object) -> None:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                dst.sendall(chunk)  # small messages here: a full send buffer is not this yardstick's concern
                return
            watcher.stop()
            open_sides[0] -= 1
            if open_sides[0]:
                dst.shutdown(socket.SHUT_WR)
                return
            client_reader.close()
            upstream_reader.close()
            client.close()
            upstream.close()

        def start() -> None:
            client_reader.start(pump, client, upstream, client_reader)
            upstream_reader.start(pump, upstream, client, upstream_reader)

        try:
            upstream.send(data)
        except BlockingIOError:  # still connecting
            writable = loop.io(upstream.fileno(), 2)

            def connected() -> None:
                writable.close()
                upstream.send(data)
                start()

            writable.start(connected)
            return
        start()

    watcher = loop.io(listener.fileno(), 1)
    watcher.start(accepted)
    _serving.append((listener, watcher))


def main() -> None:
    if sys.argv[1] == "--version":
        print("floor_proxy: the yardstick, no gateway")
        return
    with open(sys.argv[1], "rb") as file:
        config = tomllib.load(file)
    gateway = config.get("gateway", {})
    for listener, table in (("http_listen", "http_backends"), ("https_listen", "https_backends")):
        addresses, backends = gateway.get(listener) or [], config.get(table) or {}
        if addresses and backends:
            backend = next(iter(backends.values()))
            serve(addresses[0], _address(backend if isinstance(backend, str) else backend["address"]))
    gevent.wait()


if __name__ == "__main__":
    main()
