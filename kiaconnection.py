"""One connection's stages, from accept until the relay takes over or it is refused; then its log line.

Its own module because the stages (sniff, route, allow, connect, PROXY
header, relay, refuse) are the data path's largest part and change for
reasons of their own; kiagateway.py accepts, reloads and drains around them.
The gateway is handed in, not imported: it imports this module.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent

import httpstream
import kiaconfig
import kiaerrors
import kiastrict
import proxyproto
import relay
import sniff
from kiaclients import client_address, in_networks
from kiaconfig import Address, Backend
from kiaerrors import GatewayError
from kialog import format_address
from kiasocket import READ, TimedOut, answer, reset_on_close, sendall, wait

READ_SIZE = 16384  # one recv while reading the preamble; most heads and hellos fit whole
NAMES_KEPT = 16  # per strict connection, names known to route to its entry: a client sending many costs lookups only

# ``gateway`` below is kiagateway.py's Gateway, typed Any: that module imports this one.


# The stages a connection has reached, where a greenlet takes over from ``Connection.start``.
ARRIVED = 0  # accepted: the client address may still come from a trusted proxy's PROXY header
ADMITTED = 1  # the client is final and counted: the preamble is read next
ROUTED = 2  # the backend is chosen: connect next
CONNECTING = 3  # a connect in progress: the first bytes wait for it


class Connection:
    """One client connection, from accept until the relay takes over or it is refused; then its log line.

    It is also the relay's result (``bytes_up``, ``bytes_down``, ``outcome``):
    one object per connection lives on with the relay, and what only the stages
    needed is let go of at the hand-over.
    """

    __slots__ = (
        "backend",
        "backend_sock",
        "bytes_down",
        "bytes_up",
        "client",
        "connecting",
        "counted",
        "domain",
        "ended",
        "gateway",
        "header",
        "id",
        "listener",
        "outcome",
        "peer",
        "proxied_to",
        "proxy",
        "reason",
        "relay",
        "reset",
        "settings",
        "sniffer",
        "started",
        "strict",
        "table",
        "tried",
        "unsent",
        "used",
        "waiter",
    )

    def __init__(self, gateway: Any, client: socket.socket, address: tuple, listener: str) -> None:
        self.gateway = gateway
        self.settings = settings = gateway.config.settings  # one connection, one set of settings, whatever a reload
        self.id = gateway.next_id()
        self.client = client
        self.listener = listener
        self.peer = client_address(address)  # the client: a trusted proxy's PROXY header replaces it
        self.proxy: tuple | None = None  # the trusted proxy's own address, when the connection came from one
        self.proxied_to: tuple | None = None  # where a trusted proxy's client connected to, from its PROXY header
        self.started = time.monotonic()
        if listener == "http":  # in strict mode the sniffer also collects the first request's framing
            self.sniffer = sniff.HttpSniffer(settings.max_preamble, framing=settings.http_strict_host)
        else:
            self.sniffer = sniff.TlsSniffer(settings.max_preamble)
        self.domain: str | None = None
        self.backend: Backend | None = None
        self.backend_sock: socket.socket | None = None
        self.header = b""  # the PROXY header sent to the backend, if its route asks for one
        self.strict: tuple | None = None  # strict mode: what the strict relay starts from (frame_first_request)
        self.table: kiaconfig.RouteTable | None = None  # the route table the backend was looked up in
        self.unsent = b""  # first bytes for the backend not sent yet
        self.waiter: tuple | None = None  # the io watcher and timer while the preamble comes in, in the hub
        self.connecting = 0.0  # when the connect began, for the metrics
        self.used: Address | None = None  # the backend address tried last: the one that serves
        self.tried: list[Address] | None = None  # every address tried, when a pool tried more than one
        self.counted: str | None = None  # the key the client policy counted this connection under
        self.reason: str | None = None
        self.bytes_up = 0  # the relay's result: client -> backend...
        self.bytes_down = 0  # ...backend -> client
        self.outcome = "ok"
        self.relay: relay.Relay | None = None
        self.ended = False
        self.reset = False  # cut by the gateway: its close is a reset
        if gateway.metrics is not None:
            gateway.metrics.opened(listener)

    def start(self) -> None:
        """At accept, in the hub: the stages as far as they go without a greenlet; one (``run``) for the rest.

        Most connections need none: the preamble comes in with the accept or
        soon after (``on_preamble`` waits for it with an io watcher, not a
        greenlet), and a local backend takes the first bytes at once. A trusted
        proxy's header, a pool or a name to resolve, a connect in progress and
        every refusal's reply are ``run``'s, from the stage reached.
        """
        gateway = self.gateway
        if gateway.clients.is_trusted(self.peer[0]):
            gateway.spawn(self.run, ARRIVED)
            return
        try:
            self.counted = gateway.clients.admit(self.peer[0])
        except GatewayError as exc:
            gateway.spawn(self.refuse_and_close, exc)  # the reply may have to wait for the client
            return
        except BaseException:
            self.outcome = "error"
            self.close()
            raise
        self.on_preamble()

    def on_preamble(self) -> None:
        """In the hub, at accept and then each time the client is readable until the preamble is whole: read it, then
        route, connect and hand over to the relay."""
        gateway = self.gateway
        try:
            try:
                data = self.client.recv(READ_SIZE)
            except BlockingIOError:
                self.await_preamble()
                return
            except OSError:
                raise _ClientGone("client_reset") from None
            if not data:
                raise _ClientGone("client_closed")
            preamble = self.sniffer.feed(data)
            if preamble is sniff.NEED_MORE:
                self.await_preamble()
                return
            if self.waiter is not None:
                self.stop_waiting()
            self.decided(preamble)
            if not self.connected_at_once():
                return
        except GatewayError as exc:
            self.stop_waiting()
            gateway.spawn(self.refuse_and_close, exc)  # the reply may have to wait for the client
            return
        except _ClientGone as exc:
            self.stop_waiting()
            self.outcome = exc.outcome
            self.close()
            return
        except BaseException:
            self.stop_waiting()
            self.outcome = "error"
            self.close()
            raise
        try:
            self.start_relay()
        except BaseException:
            self.outcome = "error"
            if self.relay is None:
                self.close()
            raise

    def await_preamble(self) -> None:
        """Wait for more of the preamble with an io watcher and a timer, under the deadline counted from accept."""
        if self.waiter is not None:
            return
        loop = self.gateway.loop
        left = self.settings.preamble_timeout - (time.monotonic() - self.started)
        self.waiter = (loop.io(self.client.fileno(), READ), loop.timer(max(0.0, left)))
        self.waiter[0].start(self.on_preamble)
        self.waiter[1].start(self.on_preamble_timeout)
        self.gateway.waiting.add(self)

    def stop_waiting(self) -> None:
        if self.waiter is not None:
            self.waiter[0].close()
            self.waiter[1].close()
            self.waiter = None
            self.gateway.waiting.discard(self)

    def on_preamble_timeout(self) -> None:
        self.stop_waiting()
        self.gateway.spawn(self.refuse_and_close, self.preamble_late())

    def preamble_late(self) -> kiaerrors.PreambleTimeout:
        what = "request head" if self.listener == "http" else "ClientHello"
        return kiaerrors.PreambleTimeout(f"no complete {what} within {self.settings.preamble_timeout:g}s")

    def drained(self) -> None:
        """The drain is over while the preamble is still coming: reset the client."""
        self.stop_waiting()
        self.outcome = "drain_timeout"
        self.cut()
        self.close()

    def connected_at_once(self) -> bool:
        """Routed, in the hub: connected and the first bytes sent, or False and a greenlet goes on from there."""
        self.used = self.backend.addresses[0]  # a pool's is the one ``run`` connects to
        at_once = self.gateway.backends.connect_at_once(self.backend, self.domain, self.unsent)
        if at_once is None:
            self.gateway.spawn(self.run, ROUTED)
            return False
        self.backend_sock, sent = at_once
        if sent < len(self.unsent):
            self.unsent = self.unsent[sent:]
            self.gateway.spawn(self.run, CONNECTING)
            return False
        self.bytes_up = len(self.unsent) - len(self.header)  # the client's bytes: the PROXY header is ours
        self.unsent = b""
        self.connected()
        return True

    def run(self, stage: int = ARRIVED) -> None:
        """Sniff, route, allow, connect, PROXY header, relay; or refuse: from ``stage`` on, in a greenlet. One way out
        for what does not reach the relay: its sockets closed and its line logged."""
        try:
            first = sniff.NEED_MORE
            if stage == ARRIVED:
                if self.gateway.clients.is_trusted(self.peer[0]):
                    first = self.read_proxy_header()
                self.counted = self.gateway.clients.admit(self.peer[0])  # the client address is final now
            if stage <= ADMITTED:
                self.decided(self.read(self.sniffer, first))
            if stage <= ROUTED:
                self.backend_sock = self.connect(self.domain, self.settings.connect_timeout)
            elif stage == CONNECTING:
                self.gateway.backends.finish_connect(
                    self.backend_sock, self.backend, self.domain, self.settings.connect_timeout
                )
            self.send_first_bytes()
            self.connected()
        except GatewayError as exc:
            self.refuse(exc)
        except _ClientGone as exc:
            self.outcome = exc.outcome
        except Drained:  # thrown in by Gateway._cut: the drain is over
            self.outcome = "drain_timeout"
            self.cut()
        except OSError as exc:  # the backend broke before the relay began
            self.outcome = "backend_reset"
            self.reason = str(exc)
        except BaseException:
            self.outcome = "error"
            raise
        else:
            try:
                self.start_relay()
            except BaseException:
                self.outcome = "error"
                raise
        finally:
            if self.relay is None:
                self.close()

    def refuse_and_close(self, error: GatewayError) -> None:
        """In a greenlet: a refusal decided in the hub, whose reply may have to wait for the client."""
        try:
            self.refuse(error)
        except Drained:
            self.cut()
        finally:
            self.close()

    def read(
        self, sniffer: sniff.HttpSniffer | sniff.TlsSniffer | proxyproto.ProxyHeaderReader, result: object
    ) -> sniff.Preamble | proxyproto.ProxyHeader:
        """Feed ``sniffer`` until it decides, under one deadline counted from accept.

        The deadline's timer is started only if a read would block. ``result`` is
        the answer to the bytes fed already (those after a PROXY header), if any.
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
            raise self.preamble_late() from None
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

    def decided(self, preamble: sniff.Preamble) -> None:
        """The preamble is in: route it, and make the first bytes for the backend (PROXY header, then the client's)."""
        metrics = self.gateway.metrics
        if metrics is not None:
            self.connecting = metrics.preamble_read(self.listener, self.started)
        self.domain = preamble.domain
        self.strict = self.frame_first_request()
        self.table = self.gateway.routes[self.listener]  # read once: a reload during the connect changes no entry
        self.backend = self.route(self.table)
        self.header = self.proxy_header()
        buffered = bytes(self.sniffer.buffer)
        if self.strict is not None:  # only the first head goes with the connect: the strict relay checks the rest
            buffered = buffered[: self.strict[1].end]
        self.unsent = self.header + buffered if self.header else buffered

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

    def send_first_bytes(self) -> None:
        """Send the backend what it has not taken yet of the first bytes: PROXY header, then the client's."""
        timeout = self.settings.connect_timeout
        try:
            sendall(self.backend_sock, self.unsent, timeout)
        except TimedOut:
            raise kiaerrors.BackendTimeout(f"backend {self.backend} took no data for {timeout:g}s") from None
        self.bytes_up = len(self.sniffer.buffer) if self.strict is None else self.strict[1].end
        self.unsent = b""

    def connected(self) -> None:
        metrics = self.gateway.metrics
        if metrics is not None:
            metrics.connected(self.listener, self.connecting)

    def start_relay(self) -> None:
        """Hand both sockets over to the relay, which calls ``done`` when it ends."""
        idle_timeout = self.settings.idle_timeout
        armed = self.gateway.armed
        if self.strict is None:
            self.relay = relay.Relay(self.client, self.backend_sock, idle_timeout, self.done, self, armed)
        else:
            parser, first, leftover = self.strict
            self.relay = kiastrict.StrictRelay(
                self.client,
                self.backend_sock,
                idle_timeout,
                self.done,
                self,
                parser=parser,
                first=first,
                leftover=leftover,
                allows=_SameEntry(self.gateway, self.table, self.domain),
                refuse=self.refuse_later,
                connect=self.connect_again,
                client_armed=armed,
            )
        self.gateway.relays.add(self.relay)
        # The relay owns the sockets now, and this object lives as long as it, for the log line: let go of what
        # only the stages needed (the sniffer holds the whole preamble), so an idle connection costs no more.
        self.sniffer = self.client = self.backend_sock = self.strict = self.table = None

    def refuse(self, error: GatewayError) -> None:
        """Answer a refused client: its reply, or a clean close; one refusal per client at its limit lingers."""
        self.outcome = error.outcome
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
        except Drained:  # the drain ended while the reply was on its way: cut it
            self.cut()
        finally:
            if linger and isinstance(error, kiaerrors.ClientLimit):
                clients.lingered(self.peer[0])

    def cut(self) -> None:
        """Make the coming close a reset: the gateway cuts this stream."""
        self.reset = True
        reset_on_close(self.client)
        if self.backend_sock is not None:
            reset_on_close(self.backend_sock)

    def close(self) -> None:
        """The connection ends before any relay: close its sockets (a FIN, unless it is cut) and log it."""
        if self.gateway.armed and not self.reset:  # armed at accept for the relay: a refusal ends with a FIN
            reset_on_close(self.client, False)
        self.client.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
        self.done(self)

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
        if not gateway.config.settings.log_connections:
            return
        fields = {"id": self.id, "listener": self.listener, "client": format_address(self.peer)}
        if self.proxy is not None:
            fields["proxy"] = format_address(self.proxy)
        fields["domain"] = self.domain
        fields["backend"] = str(self.used) if self.used else None
        fields["outcome"] = result.outcome
        fields["bytes_up"] = result.bytes_up
        fields["bytes_down"] = result.bytes_down
        fields["duration_ms"] = round((time.monotonic() - self.started) * 1000, 1)
        if self.reason:
            fields["reason"] = self.reason
        if self.tried:
            fields["tried"] = [str(address) for address in self.tried]
        gateway.log.connection(fields)


class _SameEntry:
    """Strict mode: does a later request's name route to the route entry of the connection's first request?

    An entry is its pattern and its backend, looked up in the table in force when
    the request arrives: two entries with the same address are still two, and a
    reload that keeps the entry keeps the connection's later requests.
    """

    __slots__ = ("entry", "gateway", "names", "table")

    def __init__(self, gateway: Any, table: kiaconfig.RouteTable, domain: str | None) -> None:
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


class Drained(BaseException):
    """Thrown into a connection's greenlet when the drain is over; a BaseException so no handler takes it for I/O."""


class _ClientGone(Exception):
    """The client closed or reset before the preamble was in: nothing to answer."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome
