"""One connection's end, in process: a Gateway handling a real TCP connection, with no subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

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

    Nothing of the half-made relay may end it again later (its timer firing):
    no second log line, no connection counted closed twice. The next test
    forces the failure after an io watcher started.
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


# Run in a process of its own: libev aborts the whole process (epoll_ctl: EBADF) when the descriptor of a
# started io watcher is closed under it, which would take pytest down with it.
SECOND_START_FAILS = textwrap.dedent(
    """
    import os, socket, sys
    import gevent
    import kiaconfig, kiagateway, relay
    from kialog import Log

    class Forced(Exception):
        pass

    real_start, calls = relay._Direction.start, []

    def start(direction):
        calls.append(direction)
        if len(calls) == 2:  # the second direction, once the first one's watcher has started
            raise Forced()
        real_start(direction)

    relay._Direction.start = start
    backend = socket.create_server(("127.0.0.1", 0))
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, peer = listener.accept()
    accepted.setblocking(False)
    cfg = kiaconfig.validate(
        {
            "gateway": {"http_listen": [], "https_listen": [], "idle_timeout": 0.1},
            "http_backends": {"raw.example": f"127.0.0.1:{backend.getsockname()[1]}"},
        }
    )
    gateway = kiagateway.Gateway(cfg, Log("json", fd=os.open(os.devnull, os.O_WRONLY)))
    gateway.open = 1  # as accepting counts it
    client.sendall(sys.argv[1].encode())
    try:
        gateway.handle(accepted, peer, "http")
    except Forced:
        pass
    else:
        sys.exit("the forced failure did not reach the caller")
    gevent.sleep(0.3)  # the loop runs: libev would apply the started watcher to the closed descriptor here
    assert gateway.open == 0 and not gateway.relays, (gateway.open, gateway.relays)
    print("survived")
    """
)


def test_a_relay_that_fails_after_a_watcher_started_does_not_abort_the_process():
    """Relay() fails when the second direction starts: it must stop the first one's watcher before raising."""
    done = subprocess.run(
        [sys.executable, "-c", SECOND_START_FAILS, HEAD.decode()],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert (done.returncode, done.stdout) == (0, "survived\n"), done.stderr[-2000:]
