"""kiagateway's data path: accept, then each connection's stages until the relay takes over.

It reads only the first bytes of each connection, never decrypts TLS and
never rewrites HTTP: the bytes it read are forwarded as they came, then the
relay (relay.py, kiastrict.py in strict mode) moves the rest both ways. The
stages are ``Connection.run``'s: sniff, route, allow, connect, PROXY header,
relay, or refuse with the contract's answer (kiaerrors.py). The rest lives
beside it: backends and pools in kiabackends.py, client policy in
kiaclients.py, socket steps in kiasocket.py. The command line is kiacli.py,
which hands ``Gateway`` to kiaprocess.py to run.
"""

from __future__ import annotations

import errno
import itertools
import socket
import time

import gevent
import gevent.event
import gevent.server

import httpstream
import kiaconfig
import kiaerrors
import kiametrics
import kiastrict
import proxyproto
import relay
import sniff
from kiabackends import Backends
from kiaclients import Clients, client_address, in_networks
from kiaconfig import Address, Backend, Config
from kiaerrors import GatewayError
from kialog import Log, format_address
from kiasocket import READ, TimedOut, answer, reset_on_close, sendall, wait

__version__ = "0.3.0"

READ_SIZE = 16384  # one recv while reading the preamble; most heads and hellos fit whole
IDLE_GREENLETS = 64  # connection greenlets kept parked for reuse
NAMES_KEPT = 16  # per strict connection, names known to route to its entry: a client sending many costs lookups only
CUT_WAIT = 5.0  # seconds connections reset at the end of the drain get to close and log; they need a moment


# ---------------------------------------------------------------------------
# Accepting: the listeners' StreamServers.


class _AcceptPaused(Exception):
    """Raised from accept when the process is out of descriptors: gevent backs off and retries."""


class _Server(gevent.server.StreamServer):
    """StreamServer that asks the gateway before each accept and hands it each client as a plain socket."""

    def __init__(self, listener: socket.socket, name: str, gateway: Gateway) -> None:
        super().__init__(listener, gateway.dispatch)  # called by do_handle below, with the listener's name
        self.name = name
        self.family = listener.family  # read once: the property builds an enum each time
        self.gateway = gateway
        self.full = gateway.full  # asked before each accept; True pauses accepting until ``resume`` is called

    def resume(self) -> None:
        if self.started:
            self.start_accepting()

    def do_read(self) -> tuple[socket.socket, tuple] | None:
        """Accept one client as a plain non-blocking socket: the gateway waits on it itself."""
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None  # the client left before we accepted it
            self.gateway.accept_failed(self.address, exc)
            raise _AcceptPaused() from exc
        client = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.gateway.accepted()  # counted here, before the next accept asks full()
        return client, address

    def do_handle(self, client: socket.socket, address: tuple) -> None:
        self.gateway.dispatch(client, address, self.name)

    def do_close(self, *args: object) -> None:
        """The gateway closes each client itself, or hands it to a relay that does."""


# ---------------------------------------------------------------------------
# The gateway: a greenlet per connection until the backend is connected, then
# a callback-driven relay (relay.py) that holds no greenlet.


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
        self.servers: list[_Server] = []
        self.open = 0  # connections accepted and not yet closed, relays included
        self.paused = False  # accepting stopped at max_connections
        self.starved = False  # an accept failed (out of descriptors): gevent retries after up to 1 s, a close at once
        self.drained = gevent.event.Event()
        self._ids = itertools.count(1)
        self.id_prefix = id_prefix
        self._idle: list = []  # connection greenlets parked between connections
        self.relays: set[relay.Relay] = set()  # open relays, reset if still open when the drain ends
        self.handling: set = set()  # greenlets reading a preamble, connecting or answering
        self.metrics: kiametrics.Stats | None = None  # set by the life cycle when metrics_listen is set

    def serve(self, listeners: list[tuple[str, socket.socket]]) -> None:
        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, _AcceptPaused)  # logged once by accept_failed, not as a traceback
        for name, sock in listeners:
            server = _Server(sock, name, self)
            server.start()
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

    def dispatch(self, client: socket.socket, address: tuple, listener: str) -> None:
        """Give the new connection a greenlet: a parked one if there is one, else a new one."""
        if self._idle:
            gevent.get_hub().loop.run_callback(self._idle.pop().switch, (client, address, listener))
        else:
            gevent.spawn_raw(self._serve_connections, (client, address, listener))

    def _serve_connections(self, connection: tuple) -> None:
        """Body of a connection greenlet: handle one connection, then park for the next.

        A greenlet used again saves creating one and, on Python 3.11+, mapping and
        unmapping its frame stack (with its page faults): measured here, about a
        quarter of the CPU a short connection costs.
        """
        hub = gevent.get_hub()
        while True:
            self.handle(*connection)
            if len(self._idle) >= IDLE_GREENLETS:
                return
            self._idle.append(gevent.getcurrent())
            connection = hub.switch()

    def handle(self, client: socket.socket, address: tuple, listener: str) -> None:
        greenlet = gevent.getcurrent()
        self.handling.add(greenlet)
        try:
            Connection(self, client, address, listener).run()
        finally:
            self.handling.discard(greenlet)

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
                greenlet.throw(_Drained)
        for open_relay in list(self.relays):
            open_relay.abort("drain_timeout")

    def closed(self) -> None:
        """One connection fewer: resume accepting if that frees a slot, wake a waiting stop."""
        self.open -= 1
        if self.paused:
            self._resume_if_room()
        elif self.starved:  # a descriptor is free now: accept again without waiting for gevent's back-off
            self.starved = False
            for server in self.servers:
                server.resume()
        if not self.open:
            self.drained.set()


# ---------------------------------------------------------------------------
# One connection's stages.


class Connection:
    """One client connection, from accept until the relay takes over or it is refused; then its log line."""

    __slots__ = (
        "backend",
        "backend_sock",
        "client",
        "counted",
        "domain",
        "ended",
        "gateway",
        "header",
        "id",
        "listener",
        "peer",
        "proxied_to",
        "proxy",
        "reason",
        "relay",
        "result",
        "settings",
        "sniffer",
        "started",
        "tried",
        "used",
    )

    def __init__(self, gateway: Gateway, client: socket.socket, address: tuple, listener: str) -> None:
        self.gateway = gateway
        self.settings = gateway.config.settings  # one connection, one set of settings, whatever a reload does
        self.id = gateway.next_id()
        self.client = client
        self.listener = listener
        self.peer = client_address(address)  # the client: a trusted proxy's PROXY header replaces it
        self.proxy: tuple | None = None  # the trusted proxy's own address, when the connection came from one
        self.proxied_to: tuple | None = None  # where a trusted proxy's client connected to, from its PROXY header
        self.started = time.monotonic()
        if listener == "http":  # in strict mode the sniffer also collects the first request's framing
            self.sniffer = sniff.HttpSniffer(self.settings.max_preamble, framing=self.settings.http_strict_host)
        else:
            self.sniffer = sniff.TlsSniffer(self.settings.max_preamble)
        self.domain: str | None = None
        self.backend: Backend | None = None
        self.backend_sock: socket.socket | None = None
        self.header = b""  # the PROXY header sent to the backend, if its route asks for one
        self.used: Address | None = None  # the backend address tried last: the one that serves
        self.tried: list[Address] | None = None  # every address tried, when a pool tried more than one
        self.counted: str | None = None  # the key the client policy counted this connection under
        self.reason: str | None = None
        self.result = relay.RelayResult()
        self.relay: relay.Relay | None = None
        self.ended = False
        if gateway.metrics is not None:
            gateway.metrics.opened(listener)

    def run(self) -> None:
        """Sniff, route, allow, connect, PROXY header, relay; or refuse. One way out for what does not reach the
        relay: its sockets closed and its line logged."""
        try:
            first = self.read_proxy_header() if self.gateway.clients.is_trusted(self.peer[0]) else sniff.NEED_MORE
            self.counted = self.gateway.clients.admit(self.peer[0])  # the client address is final now
            preamble = self.read(self.sniffer, first)
            metrics = self.gateway.metrics
            connecting = metrics.preamble_read(self.listener, self.started) if metrics is not None else 0.0
            self.domain = preamble.domain
            strict = self.frame_first_request()
            table = self.gateway.routes[self.listener]  # read once: a reload during the connect changes no entry
            self.backend = self.route(table)
            self.header = self.proxy_header()
            self.backend_sock = self.connect(self.domain, self.settings.connect_timeout)
            if metrics is not None:
                metrics.connected(self.listener, connecting)
            self.send_first_bytes(strict)
        except GatewayError as exc:
            self.refuse(exc)
        except _ClientGone as exc:
            self.result.outcome = exc.outcome
        except _Drained:  # thrown in by Gateway._cut: the drain is over
            self.result.outcome = "drain_timeout"
            self.cut()
        except OSError as exc:  # the backend broke before the relay began
            self.result.outcome = "backend_reset"
            self.reason = str(exc)
        except BaseException:
            self.result.outcome = "error"
            raise
        else:
            try:
                self.start_relay(strict, table)
            except BaseException:
                self.result.outcome = "error"
                raise
        finally:
            if self.relay is None:
                self.close()

    def read(
        self, sniffer: sniff.HttpSniffer | sniff.TlsSniffer | proxyproto.ProxyHeaderReader, result: object
    ) -> sniff.Preamble | proxyproto.ProxyHeader:
        """Feed ``sniffer`` until it decides, under one deadline counted from accept.

        The deadline's timer is started only if a read would block: most preambles
        are whole in the first read. ``result`` is the answer to the bytes fed
        already (those after a PROXY header), if any.
        """
        client, deadline = self.client, None
        try:
            while result is sniff.NEED_MORE:
                try:
                    data = client.recv(READ_SIZE)
                except BlockingIOError:
                    if deadline is None:
                        left = self.settings.preamble_timeout - (time.monotonic() - self.started)
                        deadline = gevent.Timeout(max(0.0, left))
                        deadline.start()
                    wait(client, READ)
                    continue
                except OSError:
                    raise _ClientGone("client_reset") from None
                if not data:
                    raise _ClientGone("client_closed")
                result = sniffer.feed(data)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise kiaerrors.PreambleTimeout(
                f"no complete {'request head' if self.listener == 'http' else 'ClientHello'} "
                f"within {self.settings.preamble_timeout:g}s"
            ) from None
        finally:
            if deadline is not None:
                deadline.close()
        return result

    def read_proxy_header(self) -> object:
        """Read a trusted proxy's PROXY header; its source becomes ``peer``, the client for all that follows.

        Returns the sniffer's answer to the bytes after the header, which are the
        preamble's. The header shares the preamble's deadline, counted from accept.
        Whatever keeps it from coming whole, a late, cut short or bad header, is
        refused with a clean close: the peer is a proxy, and no answer would mean
        anything to it.
        """
        self.proxy = self.peer  # logged as proxy=, whatever its header says: a too-broad list shows
        reader = proxyproto.ProxyHeaderReader(self.settings.max_preamble)
        try:
            header = self.read(reader, sniff.NEED_MORE)
        except kiaerrors.PreambleTimeout:
            raise proxyproto.BadProxyHeader(
                f"no complete PROXY header from a trusted proxy within {self.settings.preamble_timeout:g}s"
            ) from None
        except _ClientGone as exc:
            if exc.outcome == "client_closed" and reader.buffer:
                raise proxyproto.BadProxyHeader("the trusted proxy closed in the middle of a PROXY header") from None
            raise
        if header.source is not None:  # final: a mapped IPv4 client is its IPv4 address from here on
            self.peer = client_address(header.source)
            self.proxied_to = client_address(header.destination)
        rest = bytes(reader.buffer[header.length :])
        return self.sniffer.feed(rest) if rest else sniff.NEED_MORE

    def frame_first_request(self) -> tuple | None:
        """Strict mode: frame the first request as every later one will be (ambiguous framing is a 400 now).

        Returns what the strict relay starts from, None when it is not strict:
        only the first head goes with the connect, what follows is checked by the relay.
        """
        if self.listener != "http" or not self.settings.http_strict_host:
            return None
        parser = httpstream.RequestStream(self.settings.max_preamble)
        first = parser.begin(self.sniffer)
        return parser, first, bytes(self.sniffer.buffer[first.end :])

    def route(self, table: kiaconfig.RouteTable) -> Backend:
        """The route entry for the domain; NoRoute if none, Forbidden if its allow-list leaves the client out."""
        backend = table.lookup(self.domain)
        if backend is None:
            name = self.domain or ("no SNI" if self.listener == "https" else "no Host")
            raise kiaerrors.NoRoute(f"no route for {name}")
        if backend.allow is not None and not in_networks(self.peer[0], backend.allow_masks):
            raise kiaerrors.Forbidden(f"client {self.peer[0]} is outside the allow-list of {self.domain}'s route")
        return backend

    def connect(self, domain: str | None, timeout: float) -> socket.socket:
        """Connect to the route's backend; ``used`` and ``tried`` say where, for the log line, however it ends."""
        attempts: list[Address] = []
        try:
            return self.gateway.backends.connect(self.backend, domain, timeout, attempts)
        finally:
            self.used = attempts[-1] if attempts else None
            self.tried = attempts if len(attempts) > 1 else None

    def proxy_header(self) -> bytes:
        """The PROXY header the route's backend asks for (b"": none), made before connecting to it."""
        if not self.backend.proxy_protocol:
            return b""
        try:
            local = client_address(self.client.getsockname()) if self.proxied_to is None else self.proxied_to
        except OSError:
            raise _ClientGone("client_reset") from None
        return proxyproto.proxy_header(self.backend.proxy_protocol, self.peer, local)

    def send_first_bytes(self, strict: tuple | None) -> None:
        """Forward what the client sent so far (in strict mode, the first head only), after the PROXY header."""
        buffered = bytes(self.sniffer.buffer)
        if strict is not None:
            buffered = buffered[: strict[1].end]
        timeout = self.settings.connect_timeout
        try:
            sendall(self.backend_sock, self.header + buffered, timeout)
        except TimedOut:
            raise kiaerrors.BackendTimeout(f"backend {self.backend} took no data for {timeout:g}s") from None
        self.result.bytes_up = len(buffered)  # the client's bytes: the PROXY header is ours

    def start_relay(self, strict: tuple | None, table: kiaconfig.RouteTable) -> None:
        """Hand both sockets over to the relay, which calls ``done`` when it ends."""
        idle_timeout = self.settings.idle_timeout
        if strict is None:
            self.relay = relay.Relay(self.client, self.backend_sock, idle_timeout, self.done, self.result)
        else:
            parser, first, leftover = strict
            self.relay = kiastrict.StrictRelay(
                self.client,
                self.backend_sock,
                idle_timeout,
                self.done,
                self.result,
                parser=parser,
                first=first,
                leftover=leftover,
                allows=_SameEntry(self.gateway, table, self.domain),
                refuse=self.refuse_later,
                connect=self.connect_again,
            )
        self.gateway.relays.add(self.relay)
        # The relay owns the sockets now, and this object lives as long as it, for the log line: let go of what
        # only the stages needed (the sniffer holds the whole preamble), so an idle connection costs no more.
        self.sniffer = self.client = self.backend_sock = None

    def refuse(self, error: GatewayError) -> None:
        """Answer a refused client: its reply, or a clean close; one refusal per client at its limit lingers."""
        self.result.outcome = error.outcome
        self.reason = error.reason
        reply = kiaerrors.reply(error, self.listener, self.sniffer.buffer)
        if not reply and not error.clean_close:
            return  # nothing to say: the close is all it gets
        linger = True
        clients = self.gateway.clients
        if isinstance(error, kiaerrors.ClientLimit):
            linger = clients.may_linger(self.peer[0])
        try:
            answer(self.client, reply, linger)
        except _Drained:  # the drain ended while the reply was on its way: cut it
            reset_on_close(self.client)
        finally:
            if linger and isinstance(error, kiaerrors.ClientLimit):
                clients.lingered(self.peer[0])

    def cut(self) -> None:
        """Make the coming close a reset: the gateway cuts this stream."""
        reset_on_close(self.client)
        if self.backend_sock is not None:
            reset_on_close(self.backend_sock)

    def close(self) -> None:
        """The connection ends before any relay: close its sockets and log it."""
        self.client.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
        self.done(self.result)

    def connect_again(self, domain: str | None) -> socket.socket:
        """Strict mode: a new connection to the connection's entry for a later Upgrade or CONNECT, the PROXY
        header sent.

        The first connect's path (pool order, cooldown, ``connect_timeout``, names
        resolved now), so the log line names the addresses of the connect that serves.
        """
        timeout = self.gateway.config.settings.connect_timeout
        sock = self.connect(domain, timeout)
        try:
            sendall(sock, self.header, timeout)
        except TimedOut:
            sock.close()
            raise kiaerrors.BackendTimeout(f"backend {self.backend} took no data for {timeout:g}s") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def refuse_later(self, error: GatewayError, rest: bytes) -> bytes:
        """A later request of a strict connection is refused: keep why for the log line; the reply's bytes."""
        self.reason = error.reason
        return kiaerrors.reply(error, "http", rest)

    def done(self, result: relay.RelayResult) -> None:
        """Count the connection closed and log it, once: a relay that failed to start may call again."""
        if self.ended:
            return
        self.ended = True
        gateway = self.gateway
        if self.relay is not None:
            gateway.relays.discard(self.relay)
            self.relay = None  # the relay holds self.done: without this cycle its objects are freed now, not by the GC
        gateway.closed()
        if self.counted is not None:
            gateway.clients.release(self.counted)
        if gateway.metrics is not None:
            gateway.metrics.finished(self.listener, result.outcome, result.bytes_up, result.bytes_down)
        fields = {"id": self.id, "listener": self.listener, "client": format_address(self.peer)}
        if self.proxy is not None:
            fields["proxy"] = format_address(self.proxy)
        fields |= {
            "domain": self.domain,
            "backend": str(self.used) if self.used else None,
            "outcome": result.outcome,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if self.reason:
            fields["reason"] = self.reason
        if self.tried:
            fields["tried"] = [str(address) for address in self.tried]
        if gateway.config.settings.log_connections:
            gateway.log.connection(fields)


class _SameEntry:
    """Strict mode: does a later request's name route to the route entry of the connection's first request?

    An entry is its pattern and its backend, looked up in the table in force when
    the request arrives: two entries with the same address are still two, and a
    reload that keeps the entry keeps the connection's later requests.
    """

    __slots__ = ("entry", "gateway", "names", "table")

    def __init__(self, gateway: Gateway, table: kiaconfig.RouteTable, domain: str | None) -> None:
        """``table`` is the one the first request's backend was looked up in, however long the connect took."""
        self.gateway = gateway
        self.table = table
        self.entry = _route_entry(self.table, domain)
        self.names = {domain}  # names known to route to the entry under self.table

    def __call__(self, domain: str | None) -> bool:
        table = self.gateway.routes["http"]
        if table is self.table and domain in self.names:
            return True
        if table is not self.table:
            self.table, self.names = table, set()
        same = _route_entry(table, domain) == self.entry
        if same and len(self.names) < NAMES_KEPT:
            self.names.add(domain)
        return same


def _route_entry(table: kiaconfig.RouteTable, domain: str | None) -> tuple[str, Backend] | None:
    if domain is None:
        return ("*", table.default) if table.default is not None else None
    return table.match(domain)


class _Drained(BaseException):
    """Thrown into a connection's greenlet when the drain is over; a BaseException so no handler takes it for I/O."""


class _ClientGone(Exception):
    """The client closed or reset before the preamble was in: nothing to answer."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


if __name__ == "__main__":  # python -m kiagateway: hand over to the command line, which imports this module itself
    import runpy

    runpy.run_module("kiacli", run_name="__main__")
