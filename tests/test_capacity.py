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
