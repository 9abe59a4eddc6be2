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
from conftest import TIMEOUT, exchange, routes_toml
from test_relaying import HEAD

import kiaconfig
import kiaconnection
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

    monkeypatch.setattr(relay.Direction, "start", start)
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
            kiaconnection.Connection(gateway, accepted, peer, "http").start()
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
    import kiaconfig, kiaconnection, kiagateway, relay
    from kialog import Log

    class Forced(Exception):
        pass

    real_start, calls = relay.Direction.start, []

    def start(direction):
        calls.append(direction)
        if len(calls) == 2:  # the second direction, once the first one's watcher has started
            raise Forced()
        real_start(direction)

    relay.Direction.start = start
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
        kiaconnection.Connection(gateway, accepted, peer, "http").start()
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


# Run the gateway with the cyclic garbage collector off, and say at exit how much garbage it had left for it.
COUNT_CYCLIC_GARBAGE = """
import atexit, gc, json, os, sys
import kiacli
gc.disable()
line = lambda: json.dumps({"message": "cyclic garbage", "objects": gc.collect()}) + "\\n"
atexit.register(lambda: os.write(2, line().encode()))
sys.exit(kiacli.main())
"""


@pytest.mark.parametrize("strict", [False, True], ids=["strict_off", "strict_on"])
def test_finished_connections_leave_nothing_to_the_garbage_collector(start_gateway, backends, strict):
    """Each connection's objects, its sockets among them, are freed as it ends, not by the cyclic collector.

    A reference cycle per connection (the relay holding the connection's callback, the
    connection holding the relay) left about ten objects each to the collector, whose
    passes then cost every connection CPU time, more the more connections are open.
    """
    toml = routes_toml(backends, f"http_strict_host = {'true' if strict else 'false'}\nlog_connections = false")
    get = b"GET /whoami HTTP/1.1\r\nHost: %s\r\n\r\n"

    def garbage_after(rounds: int) -> int:
        gw = start_gateway(toml, command=[sys.executable, "-c", COUNT_CYCLIC_GARBAGE])
        for _ in range(rounds):
            assert exchange(gw.http, get % b"a.example").endswith(b"alpha http a.example")
            assert exchange(gw.http, get % b"a.example" + get % b"a.example").count(b"200 OK") == 2
            other = exchange(gw.http, get % b"a.example" + get % b"b.example")  # strict: a 421 after the first
            assert other.count(b"200 OK") == (1 if strict else 2)
            assert exchange(gw.http, get % b"nowhere.test").startswith(b"HTTP/1.1 421 ")  # no route
            assert exchange(gw.http, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")
            assert exchange(gw.https, b"\x16\x03\x01\x00\x01\x00").startswith(b"\x15\x03")  # an alert
        assert gw.stop() == 0
        return gw.wait_for(lambda line: line.get("message") == "cyclic garbage")["objects"]

    assert garbage_after(40) - garbage_after(0) < 40  # 240 connections: under one object per 6
