"""One connection's end, in process: a Gateway handling a real TCP connection, with no subprocess."""

from __future__ import annotations

import json
import os
import socket

import gevent
import pytest
from conftest import TIMEOUT
from test_relay import HEAD

import kiaconfig
import kiagateway
import relay
from kialog import Log


class Forced(Exception):
    """The failure forced on the relay's start."""


def test_a_relay_that_fails_to_start_ends_its_connection_once(monkeypatch):
    """Relay() fails after its idle timer started: done() must still run once.

    The timer fires later and ends the half-made relay; that second ending must
    neither log again nor count the connection closed twice. (The failure is
    forced before any io watcher starts: an io watcher left started on a socket
    the handler then closes makes libev abort the process, which relay.py must
    prevent by undoing its start.)
    """
    backend = socket.create_server(("127.0.0.1", 0))
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    accepted, peer = listener.accept()
    accepted.setblocking(False)

    def start(direction) -> None:
        raise Forced()

    monkeypatch.setattr(relay._Direction, "start", start)
    cfg = kiaconfig.validate(
        {
            "gateway": {"http_listen": [], "https_listen": [], "idle_timeout": 0.1},
            "http_backends": {"raw.example": f"127.0.0.1:{backend.getsockname()[1]}"},
        }
    )
    read_end, write_end = os.pipe()
    gateway = kiagateway.Gateway(cfg, Log("json", fd=write_end))
    gateway.open = 1  # as accepting counts it
    try:
        client.sendall(HEAD)
        with pytest.raises(Forced):
            gateway.handle(accepted, peer, "http")
        assert gateway.open == 0
        gevent.sleep(0.5)  # the idle timer (0.1 s) that did start has fired by now
        assert gateway.open == 0
        assert not gateway.relays
        gateway.log.flush()
        os.close(write_end)
        with os.fdopen(read_end) as logged:
            lines = [json.loads(line) for line in logged.read().splitlines()]
        assert [line["outcome"] for line in lines if line["message"] == "connection"] == ["error"]
    finally:
        for sock in (backend, listener, client):
            sock.close()
