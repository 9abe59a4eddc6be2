"""The end of the drain: what is still open after drain_timeout is reset and logged, then exit 0."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from conftest import TIMEOUT, read_all
from test_errors import blackhole  # noqa: F401 - a fixture
from test_relaying import HEAD, RawBackend, recv_exactly

import kiaconfig


def read_until_cut(sock: socket.socket) -> type[BaseException] | None:
    """Read until the stream ends: the exception type that ended it, or None for a clean EOF."""
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(65536):
            pass
    except OSError as exc:
        return type(exc)
    return None


def test_drain_timeout_resets_what_is_still_open_and_exits_0(start_gateway, blackhole):  # noqa: F811
    backend_cut = threading.Event()

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # a close-delimited download that never ends by itself
            try:
                conn.sendall(b"." * 100)
            except (ConnectionResetError, BrokenPipeError):
                backend_cut.set()
                return
            time.sleep(0.05)

    be = RawBackend(backend)
    gw = start_gateway(
        '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n'
        "drain_timeout = 1.0\npreamble_timeout = 60.0\nconnect_timeout = 60.0\n"
        f'[http_backends]\n"raw.example" = "{be.address}"\n"slow.example" = "{blackhole}"\n'
    )
    try:
        download = socket.create_connection(gw.http, timeout=TIMEOUT)
        download.sendall(HEAD)
        assert recv_exactly(download, 100) == b"." * 100
        reading = socket.create_connection(gw.http, timeout=TIMEOUT)
        reading.sendall(b"GET / HTTP/1.1\r\nHost: a.exa")  # mid-preamble
        connecting = socket.create_connection(gw.http, timeout=TIMEOUT)
        connecting.sendall(b"GET / HTTP/1.1\r\nHost: slow.example\r\n\r\n")  # its backend never answers
        # Accepts are in order: once a later client is answered, the three above are in the gateway.
        with socket.create_connection(gw.http, timeout=TIMEOUT) as probe:
            probe.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
            assert read_all(probe).startswith(b"HTTP/1.1 421")
        gw.wait_for(lambda line: line.get("outcome") == "no_route")

        gw.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert read_until_cut(download) is ConnectionResetError  # not a clean EOF
        assert 0.5 < time.monotonic() - started < 5
        assert read_until_cut(reading) is ConnectionResetError
        assert read_until_cut(connecting) is ConnectionResetError
        assert backend_cut.wait(TIMEOUT)
        assert gw.proc.wait(TIMEOUT) == 0
        for sock in (download, reading, connecting):
            sock.close()
        be.check()
    finally:
        be.close()
    gw.stop()
    lines = [line for line in gw.seen if line.get("message") == "connection" and line["outcome"] == "drain_timeout"]
    assert sorted(line["domain"] or "-" for line in lines) == ["-", "raw.example", "slow.example"]
    download_line = next(line for line in lines if line["domain"] == "raw.example")
    assert download_line["bytes_down"] >= 100
    assert gw.seen[-1]["message"] == "stopped"


def test_drain_timeout_is_a_positive_number_of_seconds():
    assert kiaconfig.validate({"gateway": {"drain_timeout": 2.5}}).settings.drain_timeout == 2.5
    assert kiaconfig.validate({}).settings.drain_timeout == 30.0
    with pytest.raises(kiaconfig.ConfigError, match="drain_timeout"):
        kiaconfig.validate({"gateway": {"drain_timeout": 0}})
