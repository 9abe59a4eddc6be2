"""Capacity: max_connections, and a reload that changes it while the gateway is full."""

from __future__ import annotations

import signal
import socket

import pytest
from conftest import TIMEOUT, routes_toml


def test_reload_that_raises_max_connections_resumes_accepting(start_gateway, backends):
    request = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\n\r\n"  # keep-alive: the connection stays open
    gw = start_gateway(routes_toml(backends, extra_gateway="max_connections = 2"))
    held = [socket.create_connection(gw.http, timeout=TIMEOUT) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        third = socket.create_connection(gw.http, timeout=TIMEOUT)  # the kernel's backlog holds it
        held.append(third)
        third.sendall(request)
        third.settimeout(0.5)
        with pytest.raises(socket.timeout):
            third.recv(1)  # not accepted: the gateway is full
        gw.config.write_text(routes_toml(backends, extra_gateway="max_connections = 10"))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for(lambda line: line.get("message") == "config reloaded")
        third.settimeout(TIMEOUT)
        assert third.recv(65536).startswith(b"HTTP/1.1 200")  # served while the first two stay open
    finally:
        for sock in held:
            sock.close()


def test_accepting_resumes_as_soon_as_a_descriptor_is_freed(start_gateway, backends):
    """Out of descriptors, accept backs off up to a second at a time; a close must not wait for it."""
    import time

    gw = start_gateway(routes_toml(backends, extra_gateway="preamble_timeout = 60.0"), max_fds=48)
    http = f"{gw.http[0]}:{gw.http[1]}"
    flood = []
    try:
        for _ in range(60):  # silent: each holds a descriptor of the gateway until preamble_timeout
            flood.append(socket.create_connection(gw.http, timeout=TIMEOUT))
        # Back-off of 0.01 s doubling: from the 8th failure on, accepting waits a whole second.
        gw.wait_for(lambda _line: _accept_failures(gw.seen, http) >= 9, timeout=TIMEOUT)
    finally:
        for sock in flood:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # a reset: the gateway's reads fail at once and it closes their descriptors
    started = time.monotonic()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < 0.5  # not the back-off's second


def _accept_failures(lines: list[dict], address: str) -> int:
    return sum(
        line.get("message") == "accept failed, pausing this listener" and line.get("address") == address
        for line in lines
    )
