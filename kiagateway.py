"""kiagateway's data path: the listeners, accept, reload and drain around each connection's stages.

It reads only the first bytes of each connection, never decrypts TLS and
never rewrites HTTP: the bytes it read are forwarded as they came, then the
relay (relay.py, kiastrict.py in strict mode) moves the rest both ways. The
stages are ``Connection.run``'s (kiaconnection.py): sniff, route, allow,
connect, PROXY header, relay, or refuse with the contract's answer
(kiaerrors.py). The rest lives beside it: backends and pools in
kiabackends.py, client policy in kiaclients.py, socket steps in kiasocket.py.
The command line is kiacli.py, which hands ``Gateway`` to kiaprocess.py to run.
"""

from __future__ import annotations

import _socket
import errno
import itertools
import socket
import sys
from typing import Callable

import gevent
import gevent.event

import kiametrics
import relay
from kiabackends import Backends
from kiaclients import Clients
from kiaconfig import Config
from kiaconnection import Connection, Drained
from kialog import Log, format_address
from kiasocket import READ, arm_if_queued_before, arm_listener

__version__ = "0.3.0"

IDLE_GREENLETS = 64  # connection greenlets kept parked for reuse
_LINUX = sys.platform.startswith("linux")
ACCEPT_RETRY = (0.01, 1.0)  # seconds before accepting again after a failed accept: first, and at most (doubling)
ACCEPT_BATCH = 16  # accepts per readiness of a listener: under load one loop turn takes several
CUT_WAIT = 5.0  # seconds connections reset at the end of the drain get to close and log; they need a moment


# ---------------------------------------------------------------------------
# Accepting: one io watcher per listening socket.


class _Listener:
    """Accepts clients on one listening socket, from the event loop, and hands each to the gateway in the hub.

    One accept per readiness: a second would mostly say EAGAIN, a syscall for
    nothing, and the loop calls again at once while more clients wait. It asks
    the gateway before each accept (``full``: max_connections) and stops until
    ``resume``; an accept that fails (out of descriptors) stops it too, until a
    connection closes or a back-off timer ends, whichever comes first.
    """

    def __init__(self, sock: socket.socket, name: str, gateway: Gateway) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.name = name
        self.family = sock.family  # read once: the property builds an enum each time
        self.address = sock.getsockname()
        self.gateway = gateway
        self.loop = gevent.get_hub().loop
        self.watcher = self.loop.io(sock.fileno(), READ)
        self.backoff: object | None = None  # the timer of a retry after a failed accept
        self.delay = ACCEPT_RETRY[0]
        self.closed = False
        self.unsure = gateway.armed  # whether the next accepted socket may predate the arming of this listener

    def resume(self) -> None:
        if self.closed:
            return
        if self.backoff is not None:
            self.backoff.close()
            self.backoff = None
        self.watcher.start(self.accept)

    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.accept_one():
                return

    def accept_one(self) -> bool:
        gateway = self.gateway
        if gateway.full():
            self.watcher.stop()
            return False
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return True  # the client left before we accepted it
            gateway.accept_failed(self.address, exc)
            self.watcher.stop()
            self.backoff = self.loop.timer(self.delay)
            self.backoff.start(self.resume)
            self.delay = min(self.delay * 2, ACCEPT_RETRY[1])
            return False
        self.delay = ACCEPT_RETRY[0]
        client = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)  # no Python-level wrapper to build
        client.setblocking(False)
        if not gateway.armed:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif self.unsure:
            self.unsure = not arm_if_queued_before(client)
        gateway.accepted()
        # Started once this loop turn's other events are handled: a connection of the same client whose close
        # came in the same turn is released first, so a client at its limit that closes one and opens the next
        # is not refused.
        self.loop.run_callback(Connection(gateway, client, address, self.name).start)
        return True

    def close(self) -> None:
        """Stop accepting and close the listening socket (a process it was handed to keeps its own)."""
        self.closed = True
        self.watcher.close()
        if self.backoff is not None:
            self.backoff.close()
        self.socket.close()


# ---------------------------------------------------------------------------
# The gateway: each connection's stages in the hub, a greenlet only where one must
# wait (kiaconnection.py), then a callback-driven relay (relay.py) that holds none.


class Gateway:
    """Serves the listeners; ``reload`` swaps the route table without dropping a connection.

    ``id_prefix`` makes connection ids unique across processes and upgrades;
    the life cycle (kiaprocess.py) decides it, as it sets up the process.
    """

    def __init__(self, cfg: Config, log: Log, id_prefix: str = "") -> None:
        self.config = cfg
        self.log = log
        self.routes = {"http": cfg.http_routes, "https": cfg.https_routes}
        self.backends = Backends(cfg.settings.backend_cooldown)
        self.clients = Clients(cfg.settings)
        self.servers: list = []  # _Listener, and kiaquic.QuicListener for each UDP socket
        self.quic: list = []  # the QUIC listeners: their flows are cut at the end of the drain
        self.open = 0  # connections accepted and not yet closed, relays included
        self.paused = False  # accepting stopped at max_connections
        self.starved = False  # an accept failed (out of descriptors): retried after up to 1 s, or at the next close
        self.drained = gevent.event.Event()
        self._ids = itertools.count(1)
        self.id_prefix = id_prefix
        self._idle: list = []  # connection greenlets parked between connections
        self.relays: set[relay.Relay] = set()  # open relays, reset if still open when the drain ends
        self.handling: set = set()  # greenlets reading a preamble, connecting or answering
        self.waiting: set[Connection] = set()  # connections whose preamble the hub waits for
        self.loop = gevent.get_hub().loop
        self.metrics: kiametrics.Stats | None = None  # set by the life cycle when metrics_listen is set
        # Linux: a listener's TCP_NODELAY and SO_LINGER pass to the sockets it accepts, so each client comes with
        # no delay and armed to reset if the process is killed (relay.py); elsewhere each client gets its own.
        self.armed = _LINUX

    def serve(self, listeners: list[tuple[str, socket.socket]]) -> None:
        for name, sock in listeners:
            if name == "quic":
                import kiaquic  # only here: it needs the cryptography package, which the quic extra brings

                server = kiaquic.QuicListener(sock, self)
                self.quic.append(server)
            else:
                if self.armed:
                    arm_listener(sock)
                server = _Listener(sock, name, self)
            server.resume()
            self.servers.append(server)

    def next_id(self) -> str:
        return self.id_prefix + str(next(self._ids))

    def full(self) -> bool:
        if self.open >= self.config.settings.max_connections:
            self.paused = True
        return self.paused

    def accepted(self) -> None:
        self.open += 1
        if self.open == 1:
            self.drained.clear()

    def accept_failed(self, address: tuple, exc: OSError) -> None:
        """Out of descriptors (or another accept error): log it; the next close resumes accepting at once."""
        self.log.error("accept failed, pausing this listener", address=format_address(address), cause=str(exc))
        self.starved = True

    def spawn(self, step: Callable[[object], None], arg: object) -> None:
        """Run ``step(arg)``, a connection's stages that may wait, in a greenlet: a parked one if there is one."""
        if self._idle:
            gevent.get_hub().loop.run_callback(self._idle.pop().switch, (step, arg))
        else:
            gevent.spawn_raw(self._serve_connections, (step, arg))

    def _serve_connections(self, work: tuple) -> None:
        """Body of a connection greenlet: run one connection's stages, then park for the next.

        A greenlet used again saves creating one and, on Python 3.11+, mapping and
        unmapping its frame stack (with its page faults): measured here, about a
        quarter of the CPU a short connection costs.
        """
        hub = gevent.get_hub()
        greenlet = gevent.getcurrent()
        while True:
            self.handling.add(greenlet)
            try:
                work[0](work[1])
            finally:
                self.handling.discard(greenlet)
            if len(self._idle) >= IDLE_GREENLETS:
                return
            self._idle.append(greenlet)
            work = hub.switch()

    def reload(self, cfg: Config) -> None:
        self.config = cfg
        self.routes = {"http": cfg.http_routes, "https": cfg.https_routes}
        self.backends.reload(cfg.settings.backend_cooldown)
        self.clients.reload(cfg.settings)
        self._resume_if_room()  # a raised max_connections takes effect now, not at the next close

    def _resume_if_room(self) -> None:
        if self.paused and self.open < self.config.settings.max_connections:
            self.paused = False
            for server in self.servers:
                server.resume()

    def stop(self, grace: float, **fields: object) -> None:
        """Stop accepting, give open connections ``grace`` seconds, then reset what is left.

        A stream still open at the end is cut with a reset, not a FIN, so neither
        peer takes it for complete, and each gets its connection line.
        """
        for server in self.servers:
            server.close()
        self.log.info("stopping: no new connections", open=self.open, **fields)
        if self.open and not self.drained.wait(timeout=grace):
            self.log.warning("drain timeout over, resetting open connections", open=self.open, **fields)
            gevent.get_hub().loop.run_callback(self._cut)
            if not self.drained.wait(timeout=CUT_WAIT):
                self.log.error("connections still open after the reset", open=self.open, **fields)
        self.log.flush()

    def _cut(self) -> None:
        """Reset every open connection, logged as drain_timeout. Runs in the hub, so nothing starts meanwhile.

        A greenlet thrown into runs until it closes its connection and parks, then
        the hub carries on here: no relay can begin after the loop below.
        """
        for greenlet in list(self.handling):
            if greenlet in self.handling:  # still inside handle(): it waits on I/O there
                greenlet.throw(Drained)
        for connection in list(self.waiting):
            connection.drained()
        for open_relay in list(self.relays):
            open_relay.abort("drain_timeout")
        for listener in self.quic:
            listener.cut()

    def closed(self) -> None:
        """One connection fewer: resume accepting if that frees a slot, wake a waiting stop."""
        self.open -= 1
        if self.paused:
            self._resume_if_room()
        elif self.starved:  # a descriptor is free now: accept again without waiting for the back-off
            self.starved = False
            for server in self.servers:
                server.resume()
        if not self.open:
            self.drained.set()


if __name__ == "__main__":  # python -m kiagateway: hand over to the command line, which imports this module itself
    import runpy

    runpy.run_module("kiacli", run_name="__main__")
