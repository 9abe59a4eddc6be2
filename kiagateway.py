"""kiagateway's data path: accept, read the preamble, route, connect, hand over to the relay.

It reads only the first bytes of each connection, never decrypts TLS and
never rewrites HTTP: the bytes it read are forwarded as they came, then the
relay (relay.py, kiastrict.py in strict mode) moves the rest both ways. A
client refused before the relay gets the contract's answer from here: an HTTP
status or a TLS alert with a fixed text, nothing of the inside. The command
line is kiacli.py, which hands ``Gateway`` to kiaprocess.py to run.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import os
import socket
import struct
import sys
import time

import gevent
import gevent.event
import gevent.server
import gevent.socket

import httpstream
import kiaconfig
import kiametrics
import kiastrict
import kiaupgrade
import proxyproto
import relay
import sniff
from kiaconfig import Address, Backend, Config, Settings
from kialog import Log, format_address

__version__ = "0.3.0"

READ_SIZE = 16384  # one recv while reading the preamble; most heads and hellos fit whole
REPLY_TIMEOUT = 2.0  # seconds to hand an error reply to a client before giving up on it
LINGER_SECONDS = 1.0  # after an error reply, read and drop what the client still sends...
LINGER_BYTES = 65536  # ...up to this much, so that closing does not reset the reply away
IDLE_GREENLETS = 64  # connection greenlets kept parked for reuse
NAMES_KEPT = 16  # per strict connection, names known to route to its entry: a client sending many costs lookups only
CUT_WAIT = 5.0  # seconds connections reset at the end of the drain get to close and log; they need a moment
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN
# The gateway's own shortage, not the backend's: no descriptor (per process, system-wide), no buffer, no memory.
_SHORTAGE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


# ---------------------------------------------------------------------------
# Replies for refused connections, one place for every GatewayError.

_HTTP_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


# What a refused client is told: a fixed text per status. The cause (backend
# address, errno, resolver message, the client's own bytes) goes to the log only.
_HTTP_DETAILS = {
    400: "the request head is malformed or names no valid host",
    403: "this client may not use the requested host",
    408: "the request head did not arrive in time",
    421: "this gateway has no route for the requested host",
    429: "too many connections from this client",
    431: "the request head is too large",
    502: "the backend for this host cannot be reached",
    503: "the gateway cannot take this request now; try again later",
    504: "the backend for this host did not answer in time",
}
_HTTP_ON_TLS_PORT = "plain HTTP was sent to the TLS port"
_HOST_CHANGED = "this connection serves another host; send the request on a new connection"


def http_response(status: int, detail: str | None = None, head: bool = False) -> bytes:
    """A short plain-text answer; ``detail`` defaults to the status's fixed text.

    The answer to a HEAD request has no body (RFC 9110 section 9.3.2); its
    Content-Length still gives the size the body would have had.
    """
    body = f"{status} {_HTTP_REASONS[status]}: {detail or _HTTP_DETAILS[status]}\n".encode("ascii", "replace")
    fields = (
        f"HTTP/1.1 {status} {_HTTP_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return fields.encode("ascii") + (b"" if head else body)


def tls_alert(description: int) -> bytes:
    """A fatal alert record (RFC 8446 section 6): content type 21, legacy version 3.3, level 2."""
    return bytes((21, 3, 3, 0, 2, 2, description))


def error_reply(error: sniff.GatewayError, listener: str, preamble: bytes | bytearray = b"") -> bytes:
    """The bytes a refused client gets: an HTTP answer, a TLS alert, or nothing.

    ``preamble`` is what the client sent so far: a HEAD request gets no body.
    """
    if error.http_status is None:
        return b""  # a clean close on either listener
    head = preamble.startswith(b"HEAD ")
    if isinstance(error, sniff.HttpOnTlsPort):
        return http_response(error.http_status, _HTTP_ON_TLS_PORT, head)
    if isinstance(error, sniff.HostChanged):
        return http_response(error.http_status, _HOST_CHANGED, head)
    if listener == "http":
        return http_response(error.http_status, head=head)
    if error.tls_alert is not None:
        return tls_alert(error.tls_alert)
    return b""


# ---------------------------------------------------------------------------
# PROXY protocol header for backends that ask for the client's address
# (haproxy.org/download/2.6/doc/proxy-protocol.txt).

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client: tuple, local: tuple) -> bytes:
    """PROXY v1 or v2 header for a TCP connection from ``client`` to ``local``.

    Both are final addresses (``client_address``): an IPv4 client is TCP4 /
    AF_INET. The header holds one family; should the two differ (an IPv4 client
    named by a proxy that it reached over IPv6), the IPv4 one is written in its
    IPv6 form, as HAProxy does. A link-local IPv6 address comes with its scope
    (``fe80::1%eth0``): the header has no place for it, and it names an
    interface of this host only.
    """
    client_ip, local_ip = client[0].partition("%")[0], local[0].partition("%")[0]
    v6 = ":" in client_ip
    if v6 != (":" in local_ip):
        v6 = True
        client_ip, local_ip = (ip if ":" in ip else "::ffff:" + ip for ip in (client_ip, local_ip))
    if version == "v1":
        return f"PROXY TCP{6 if v6 else 4} {client_ip} {local_ip} {client[1]} {local[1]}\r\n".encode("ascii")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    addresses = (
        socket.inet_pton(family, client_ip)
        + socket.inet_pton(family, local_ip)
        + struct.pack("!HH", client[1], local[1])
    )
    # version 2, command PROXY; TCP over IPv6 (0x21) or IPv4 (0x11)
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21 if v6 else 0x11, len(addresses)) + addresses


# ---------------------------------------------------------------------------
# Accepting: the listeners' StreamServers.


class _AcceptPaused(Exception):
    """Raised from accept when the process is out of descriptors: gevent backs off and retries."""


class _Server(gevent.server.StreamServer):
    """StreamServer that pauses accepting while the gateway is full and logs accept failures."""

    def __init__(self, listener: socket.socket, name: str, gateway: Gateway) -> None:
        super().__init__(listener, gateway.dispatch)  # called by do_handle below, with the listener's name
        self.name = name
        self.family = listener.family  # read once: the property builds an enum each time
        self.gateway = gateway

    def full(self) -> bool:
        """Asked before each accept; True pauses accepting until ``Gateway._closed`` resumes it."""
        gateway = self.gateway
        if gateway.open >= gateway.config.settings.max_connections:
            gateway.paused = True
        return gateway.paused

    def do_read(self) -> tuple[socket.socket, tuple] | None:
        """Accept one client as a plain non-blocking socket: the gateway waits on it itself."""
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None  # the client left before we accepted it
            self.gateway.log.error(
                "accept failed, pausing this listener", address=format_address(self.address), cause=str(exc)
            )
            self.gateway.starved = True
            raise _AcceptPaused() from exc
        client = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gateway = self.gateway
        gateway.open += 1  # counted here, before the next accept asks full()
        if gateway.open == 1:
            gateway.drained.clear()
        return client, address

    def do_handle(self, client: socket.socket, address: tuple) -> None:
        self.gateway.dispatch(client, address, self.name)

    def do_close(self, *args: object) -> None:
        """The gateway closes each client itself, or hands it to a relay that does."""


# ---------------------------------------------------------------------------
# The gateway: a greenlet per connection until the backend is connected, then
# a callback-driven relay (relay.py) that holds no greenlet.


class Gateway:
    """Serves the listeners; ``reload`` swaps the route table without dropping a connection."""

    def __init__(self, cfg: Config, log: Log, worker: int = 0) -> None:
        self.config = cfg
        self.log = log
        self.routes = {"http": cfg.http_routes, "https": cfg.https_routes}
        self.servers: list[_Server] = []
        self.open = 0  # connections accepted and not yet closed, relays included
        self.paused = False  # accepting stopped at max_connections
        self.starved = False  # an accept failed (out of descriptors): gevent retries after up to 1 s, a close at once
        self.drained = gevent.event.Event()
        self._ids = itertools.count(1)
        # Unique across respawned workers and restarts; an upgrade in place keeps the PID, so it adds its count.
        upgrades = kiaupgrade.generation()
        self._id_prefix = f"{os.getpid()}-{upgrades}." if upgrades else f"{os.getpid()}."
        self._idle: list = []  # connection greenlets parked between connections
        self.relays: set[relay.Relay] = set()  # open relays, reset if still open when the drain ends
        self.handling: set = set()  # greenlets reading a preamble, connecting or answering
        self._lookups: dict[tuple[str, int], gevent.event.AsyncResult] = {}  # backend names being resolved
        relay.configure_pipes(kiaconfig.resolve_workers(cfg.settings.workers))  # this process's share of the pipe quota
        self._pools: dict[int, _Pool] = {}  # round-robin state of the pools used, by id() of their Backend
        self._cooling: dict[Address, float] = {}  # pool addresses that failed -> monotonic time they are tried again
        self._per_client: dict[str, int] = {}  # open connections by client address, with max_connections_per_client
        self._lingering: set[str] = set()  # clients with a refusal for their limit lingering (_refuse_over_limit)
        self.metrics: kiametrics.Stats | None = None  # set by the life cycle when metrics_listen is set

    def serve(self, listeners: list[tuple[str, socket.socket]]) -> None:
        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, _AcceptPaused)  # logged once by _Server, not as a traceback
        for name, sock in listeners:
            server = _Server(sock, name, self)
            server.start()
            self.servers.append(server)

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

    def reload(self, cfg: Config) -> None:
        self.config = cfg
        self.routes = {"http": cfg.http_routes, "https": cfg.https_routes}
        self._pools = {}  # the new table's pools are new objects; round-robin starts over on them
        now = time.monotonic()
        self._cooling = {address: until for address, until in self._cooling.items() if until > now}
        self._resume_if_room()  # a raised max_connections takes effect now, not at the next close

    def _resume_if_room(self) -> None:
        if self.paused and self.open < self.config.settings.max_connections:
            self.paused = False
            for server in self.servers:
                server._start_accepting_if_started()

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

    def _closed(self) -> None:
        """One connection fewer: resume accepting if that frees a slot, wake a waiting stop."""
        self.open -= 1
        if self.paused:
            self._resume_if_room()
        elif self.starved:  # a descriptor is free now: accept again without waiting for gevent's back-off
            self.starved = False
            for server in self.servers:
                server._start_accepting_if_started()
        if not self.open:
            self.drained.set()

    def handle(self, client: socket.socket, address: tuple, listener: str) -> None:
        greenlet = gevent.getcurrent()
        self.handling.add(greenlet)
        try:
            self._handle(client, address, listener)
        finally:
            self.handling.discard(greenlet)

    def _handle(self, client: socket.socket, address: tuple, listener: str) -> None:
        address = client_address(address)  # the accepted address is final here, unless a trusted proxy names another
        conn = _Connection(self, listener, address)
        settings = self.config.settings
        backend_sock = None
        strict = None
        checks_every_request = listener == "http" and settings.http_strict_host
        if listener == "http":  # in strict mode the sniffer also collects the first request's framing
            sniffer = sniff.HttpSniffer(settings.max_preamble, framing=checks_every_request)
        else:
            sniffer = sniff.TlsSniffer(settings.max_preamble)
        proxied_to = None  # where a trusted proxy's client connected to, from its PROXY header
        try:
            first = sniff.NEED_MORE
            if settings.trusted_proxies and _trusted(address, settings.trusted_proxies):
                conn.proxy = address  # logged as proxy=, whatever its header says: a too-broad list shows
                proxied_to, rest = self._read_proxy_header(client, conn, settings)
                if rest:
                    first = sniffer.feed(rest)
            self._admit(conn)  # the client address is final here, after a trusted PROXY header
            preamble = self._read_preamble(client, sniffer, listener, settings, conn.started, first)
            metrics = self.metrics
            if metrics is not None:
                connecting = metrics.preamble_read(listener, conn.started)
            buffered = bytes(sniffer.buffer)
            conn.domain = preamble.domain
            if checks_every_request:
                # The first request is framed as every later one will be: ambiguous framing is a 400 now.
                # Only its head goes with the connect; what follows is checked by the relay.
                parser = httpstream.RequestStream(settings.max_preamble)
                first = parser.begin(sniffer)
                buffered, leftover = buffered[: first.end], buffered[first.end :]
                strict = (parser, first, leftover)
            table = self.routes[listener]  # read once: a reload during the connect must not change the entry
            backend = table.lookup(preamble.domain)
            if backend is None:
                name = preamble.domain or ("no SNI" if listener == "https" else "no Host")
                raise sniff.NoRoute(f"no route for {name}")
            conn.backend = backend
            if backend.allow is not None and not allowed(conn.peer[0], backend.allow_masks):
                raise sniff.Forbidden(f"client {conn.peer[0]} is outside the allow-list of {preamble.domain}'s route")
            backend_sock = self._connect(backend, preamble.domain, settings.connect_timeout, conn)
            if metrics is not None:
                metrics.connected(listener, connecting)
            header = b""  # sent again on the new connection a later Upgrade or CONNECT gets in strict mode
            if backend.proxy_protocol:
                try:
                    local = client_address(client.getsockname()) if proxied_to is None else proxied_to
                except OSError:
                    raise _ClientGone("client_reset") from None
                header = proxy_header(backend.proxy_protocol, conn.peer, local)
            try:
                _sendall(backend_sock, header + buffered, settings.connect_timeout)
            except _ConnectTimedOut:
                raise sniff.BackendTimeout(
                    f"backend {backend} took no data for {settings.connect_timeout:g}s"
                ) from None
            conn.result.bytes_up = len(buffered)  # the client's bytes: the PROXY header is ours
        except sniff.GatewayError as exc:
            conn.result.outcome = exc.outcome
            conn.reason = exc.reason
            reply = error_reply(exc, listener, sniffer.buffer)
            if isinstance(exc, sniff.ClientLimit):
                self._refuse_over_limit(client, reply, conn)
            else:
                _answer(client, reply, fin=exc.http_status is None)
        except _ClientGone as exc:
            conn.result.outcome = exc.outcome
        except _Drained:  # thrown in by _cut: the drain is over
            conn.result.outcome = "drain_timeout"
            _reset(client, backend_sock)
        except OSError as exc:  # the backend broke before the relay began
            conn.result.outcome = "backend_reset"
            conn.reason = str(exc)
        except BaseException:
            conn.result.outcome = "error"
            _close(client, backend_sock)
            conn.done(conn.result)
            raise
        else:
            try:
                if strict is None:
                    conn.relay = relay.Relay(client, backend_sock, settings.idle_timeout, conn.done, conn.result)
                else:
                    parser, first, leftover = strict
                    conn.relay = kiastrict.StrictRelay(
                        client,
                        backend_sock,
                        settings.idle_timeout,
                        conn.done,
                        conn.result,
                        parser=parser,
                        first=first,
                        leftover=leftover,
                        allows=_SameEntry(self, table, preamble.domain),
                        refuse=conn.refuse,
                        connect=functools.partial(self._connect_again, backend, header, conn),
                    )
                self.relays.add(conn.relay)
            except BaseException:
                conn.result.outcome = "error"
                _close(client, backend_sock)
                conn.done(conn.result)
                raise
            return
        _close(client, backend_sock)
        conn.done(conn.result)

    def _read_proxy_header(self, client: socket.socket, conn: _Connection, settings: Settings) -> tuple:
        """Read a trusted proxy's PROXY header; its source becomes ``conn.peer``, the client for all that follows.

        Returns the address the client connected to at the proxy (None: keep this
        connection's own) and the bytes after the header, which are the preamble's.
        Both addresses are final (``client_address``).
        The header shares the preamble's deadline, counted from accept. Whatever
        keeps it from coming whole, a late, cut short or bad header, is refused with
        a clean close: the peer is a proxy, and no answer would mean anything to it.
        """
        reader = proxyproto.ProxyHeaderReader(settings.max_preamble)
        try:
            header = self._read_preamble(client, reader, conn.listener, settings, conn.started)
        except sniff.PreambleTimeout:
            raise proxyproto.BadProxyHeader(
                f"no complete PROXY header from a trusted proxy within {settings.preamble_timeout:g}s"
            ) from None
        except _ClientGone as exc:
            if exc.outcome == "client_closed" and reader.buffer:
                raise proxyproto.BadProxyHeader("the trusted proxy closed in the middle of a PROXY header") from None
            raise
        if header.source is None:
            return None, bytes(reader.buffer[header.length :])
        conn.peer = client_address(header.source)  # final: a mapped IPv4 client is its IPv4 address from here on
        return client_address(header.destination), bytes(reader.buffer[header.length :])

    def _read_preamble(
        self,
        client: socket.socket,
        sniffer: sniff.HttpSniffer | sniff.TlsSniffer | proxyproto.ProxyHeaderReader,
        listener: str,
        settings: Settings,
        accepted: float,
        result: object = sniff.NEED_MORE,
    ) -> sniff.Preamble | proxyproto.ProxyHeader:
        """Feed ``sniffer`` until it decides, under one deadline counted from accept.

        The deadline's timer is started only if a read would block: most preambles
        are whole in the first read. ``result`` is the answer to the bytes fed
        already (those after a PROXY header), if any.
        """
        deadline = None
        try:
            while result is sniff.NEED_MORE:
                try:
                    data = client.recv(READ_SIZE)
                except BlockingIOError:
                    if deadline is None:
                        deadline = gevent.Timeout(max(0.0, settings.preamble_timeout - (time.monotonic() - accepted)))
                        deadline.start()
                    _wait(client, _READ)
                    continue
                except OSError:
                    raise _ClientGone("client_reset") from None
                if not data:
                    raise _ClientGone("client_closed")
                result = sniffer.feed(data)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise sniff.PreambleTimeout(
                f"no complete {'request head' if listener == 'http' else 'ClientHello'} "
                f"within {settings.preamble_timeout:g}s"
            ) from None
        finally:
            if deadline is not None:
                deadline.close()
        return result

    def _admit(self, conn: _Connection) -> None:
        """Count the connection against max_connections_per_client, or raise ClientLimit if its client is at it.

        Call it once the client address is final: right after accept, or for a
        connection from a trusted proxy once its PROXY header has named the
        client. ``_Connection.done`` gives the count back, once, however the
        connection ends. With no limit set it does nothing.
        """
        limit = self.config.settings.max_connections_per_client
        if not limit:
            return
        key = client_key(conn.peer[0])
        count = self._per_client.get(key, 0)
        if count >= limit:
            raise sniff.ClientLimit(f"{count} connections open from {key} (max_connections_per_client = {limit})")
        self._per_client[key] = count + 1
        conn.counted = key

    def _refuse_over_limit(self, client: socket.socket, reply: bytes, conn: _Connection) -> None:
        """Refuse a client at its limit; one such refusal per client lingers at a time, the others close at once.

        Lingering (``_answer``) keeps the reply from being reset away, but holds a
        max_connections slot up to LINGER_SECONDS: a client opening idle connections
        faster than max_connections a second would fill them all. So a client holds
        at most its limit plus one slot. The slot is not given back early instead:
        refusals lingering off the count would be bounded by nothing, and each holds
        a descriptor that check_nofile's budget does not have.
        """
        key = client_key(conn.peer[0])
        if key in self._lingering:
            _answer(client, reply, fin=True, linger=False)
            return
        self._lingering.add(key)
        try:
            _answer(client, reply, fin=True)
        finally:
            self._lingering.discard(key)

    def _release(self, key: str) -> None:
        """One connection fewer from ``key``; a client with none left leaves the table, so it never grows."""
        count = self._per_client[key] - 1
        if count:
            self._per_client[key] = count
        else:
            del self._per_client[key]

    def _connect(self, backend: Backend, domain: str | None, timeout: float, conn: _Connection) -> socket.socket:
        """Connect to the route's address, or to its pool's; ``conn.address`` says which was tried last."""
        addresses = backend.addresses
        if len(addresses) == 1:
            conn.address = addresses[0]
            return self._connect_to(addresses[0], domain, timeout)
        return self._connect_pool(backend, domain, timeout, conn)

    def _connect_again(self, backend: Backend, header: bytes, conn: _Connection, domain: str | None) -> socket.socket:
        """Strict mode: a new connection to the connection's entry for a later Upgrade or CONNECT, ``header`` sent.

        The first connect's path (pool order, cooldown, ``connect_timeout``, names
        resolved now), so ``conn`` names the address that serves from now on.
        """
        timeout = self.config.settings.connect_timeout
        conn.tried = None  # the log line's list is that of the connect that serves
        sock = self._connect(backend, domain, timeout, conn)
        try:
            _sendall(sock, header, timeout)
        except _ConnectTimedOut:
            sock.close()
            raise sniff.BackendTimeout(f"backend {backend} took no data for {timeout:g}s") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_pool(self, backend: Backend, domain: str | None, timeout: float, conn: _Connection) -> socket.socket:
        """Try a pool's addresses, each once with its own ``timeout``, until one connects.

        The order starts one further round the pool at each connection
        (round-robin, per route entry and worker); addresses that failed within
        ``backend_cooldown`` go last, so they are tried only when every other has
        failed too. All failed: the last attempt's error is the answer.
        """
        pool = self._pools.get(id(backend))
        if pool is None or pool.backend is not backend:  # a new entry, or a dead one's id reused
            pool = self._pools[id(backend)] = _Pool(backend)
        addresses = backend.addresses
        start = pool.next
        pool.next = (start + 1) % len(addresses)
        order = addresses[start:] + addresses[:start]
        cooling = self._cooling
        if cooling:
            now = time.monotonic()
            for address in order:
                if cooling.get(address, now) < now:  # cooled down: forget it
                    del cooling[address]
            order = [a for a in order if a not in cooling] + [a for a in order if a in cooling]
        cooldown = self.config.settings.backend_cooldown
        tried = []
        for address in order:
            conn.address = address
            tried.append(address)
            try:
                sock = self._connect_to(address, domain, timeout)
            except sniff.LocalShortage:  # the next address would fail the same way, and neither is at fault
                if len(tried) > 1:
                    conn.tried = tried
                raise
            except (sniff.BackendUnreachable, sniff.BackendTimeout) as exc:
                if cooldown:
                    cooling[address] = time.monotonic() + cooldown
                error = exc
                continue
            if cooling:
                cooling.pop(address, None)  # if it was cooling down: it answers again
            if len(tried) > 1:
                conn.tried = tried
            return sock
        if len(tried) > 1:
            conn.tried = tried
        raise type(error)(f"{error.reason} (the last of {len(tried)} pool addresses tried)")

    def _connect_to(self, address: Address, domain: str | None, timeout: float) -> socket.socket:
        """Connect to one address within ``timeout``; BackendUnreachable or BackendTimeout says why not,
        LocalShortage if the gateway itself lacks a descriptor, a buffer or memory for it."""
        try:
            if address.ip is not None:  # no resolver round-trip for IP literals
                family = socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET
                return _open_connection(family, (address.host, address.port), timeout)
            # Names resolve at connect time, so DNS changes need no restart; the
            # lookup and every address tried share the one connect_timeout.
            with gevent.Timeout(timeout, _ConnectTimedOut):
                error: OSError = OSError("no address")
                for family, _, _, _, sockaddr in self._resolve(address.host, address.port):
                    try:
                        return _open_connection(family, sockaddr, None)
                    except OSError as exc:
                        if exc.errno in _SHORTAGE:
                            raise
                        error = exc
                raise error
        except _ConnectTimedOut:
            raise sniff.BackendTimeout(f"connect to {address} for {domain} timed out after {timeout:g}s") from None
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_MEMORY:
                raise sniff.LocalShortage(f"cannot resolve {address.host} for {domain}: {exc.strerror}") from None
            raise sniff.BackendUnreachable(f"cannot resolve {address.host} for {domain}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno in _SHORTAGE:
                raise sniff.LocalShortage(
                    f"connect to {address} for {domain}: {errno.errorcode[exc.errno]} ({exc.strerror}): "
                    "the gateway's own shortage, not the backend's"
                ) from None
            raise sniff.BackendUnreachable(f"connect to {address} for {domain}: {exc.strerror or exc}") from None

    def _resolve(self, host: str, port: int) -> list:
        """getaddrinfo for a backend name, with one lookup in flight per name that later callers join.

        gevent resolves in a pool of about ten threads, and a lookup that outlives
        connect_timeout keeps its thread to the end. Without sharing, a burst of
        connections to one name whose resolver is slow filled the pool, and every
        other route given by name, even one in /etc/hosts, timed out behind it.
        Nothing is cached: a lookup that ends is forgotten. Ten slow names at once
        still fill the pool. gevent's c-ares resolver would need no threads, but it
        ignores nsswitch.conf and is not in every build, so the system's stays.
        """
        key = (host, port)
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = gevent.event.AsyncResult()
            gevent.spawn_raw(self._lookup, key, lookup)
        return lookup.get()

    def _lookup(self, key: tuple[str, int], lookup: gevent.event.AsyncResult) -> None:
        """One lookup; its result goes to whoever still waits for it, even after the first one gave up."""
        try:
            lookup.set(gevent.socket.getaddrinfo(key[0], key[1], 0, socket.SOCK_STREAM))
        except OSError as exc:  # gaierror included: each waiter turns it into its reply
            lookup.set_exception(exc)
        finally:
            del self._lookups[key]


class _Pool:
    """A pool's state in one worker: where its next connection starts round the addresses."""

    __slots__ = ("backend", "next")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend  # held, so that its id() is not reused while this is in the table
        self.next = 0


_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96 (RFC 4291 section 2.5.5.2): an IPv4 address in IPv6


def client_address(address: tuple) -> tuple:
    """The address as the gateway uses it: an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``) as ``(a.b.c.d, port)``.

    A dual-stack listener sees an IPv4 client so, and a PROXY header may name
    one so: it is the IPv4 client everywhere (logs, allow-lists, per-client
    limits, the PROXY header sent on), so that one client gets one answer on
    every listener. Applied once where the client address becomes final (after
    accept, after a trusted PROXY header), not in each of those. Any other
    address is returned as it is.
    """
    host = address[0]
    if host.startswith("::ffff:"):  # every mapped address's text begins so (inet_ntop, ipaddress)
        packed = socket.inet_pton(socket.AF_INET6, host)
        if packed[:12] == _V4_MAPPED:
            return socket.inet_ntop(socket.AF_INET, packed[12:]), address[1]
    return address


def client_key(host: str) -> str:
    """The client as the per-client limit counts it: an IPv4 address, or an IPv6 address's /64.

    ``host`` is final (``client_address``): an IPv4 client has one key on every
    listener. An IPv6 host is usually given a whole /64 (RFC 7421) and may take
    any address in it for each connection, so the /64 is what one client holds.
    """
    if ":" not in host:
        return host
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # a link-local scope is not part of it
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def allowed(host: str, masks: tuple[tuple[int, int, int], ...]) -> bool:
    """Is the client at ``host`` in one of the networks (``Backend.allow_masks``)?

    ``host`` is final (``client_address``): an IPv4 client matches IPv4 networks
    only, ``::/0`` none of them. A link-local address's scope is not part of it.
    """
    if ":" in host:
        version, number = 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
    else:
        version, number = 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    return any(net_version == version and number & mask == network for net_version, network, mask in masks)


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


class _ConnectTimedOut(Exception):
    """Raised by the connect deadline's timer."""


class _Drained(BaseException):
    """Thrown into a connection's greenlet when the drain is over; a BaseException so no handler takes it for I/O."""


# Blocking-style I/O on plain non-blocking sockets: try the call, and only when
# it would block, park this greenlet on a one-off io watcher.

_READ, _WRITE = 1, 2  # libev event masks


def _wait(sock: socket.socket, event: int) -> None:
    hub = gevent.get_hub()
    watcher = hub.loop.io(sock.fileno(), event)
    try:
        hub.wait(watcher)
    finally:
        watcher.close()


def _sendall(sock: socket.socket, data: bytes, timeout: float | None = None) -> None:
    """Send all of ``data``; if it has to wait, give up after ``timeout`` with _ConnectTimedOut."""
    view = memoryview(data)
    deadline = None
    try:
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                if deadline is None and timeout is not None:
                    deadline = gevent.Timeout(timeout, _ConnectTimedOut)
                    deadline.start()
                _wait(sock, _WRITE)
    finally:
        if deadline is not None:
            deadline.close()


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # non-blocking from birth: one syscall fewer where supported


def _open_connection(family: int, sockaddr: tuple, timeout: float | None) -> socket.socket:
    """Connect; wait (under ``timeout`` if given, else the caller's) only if the connect is still in progress."""
    sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        error = sock.connect_ex(sockaddr)
        if error == errno.EINPROGRESS:
            try:
                sock.getpeername()  # a local backend is usually connected already: no need to wait
                error = 0
            except OSError:
                if timeout is None:
                    _wait(sock, _WRITE)
                else:
                    with gevent.Timeout(timeout, _ConnectTimedOut):
                        _wait(sock, _WRITE)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


class _Connection:
    """What the log line of one connection needs, kept until the connection ends."""

    __slots__ = (
        "address",
        "backend",
        "counted",
        "domain",
        "ended",
        "gateway",
        "id",
        "listener",
        "peer",
        "proxy",
        "reason",
        "relay",
        "result",
        "started",
        "tried",
    )

    def __init__(self, gateway: Gateway, listener: str, address: tuple) -> None:
        self.gateway = gateway
        self.id = gateway._id_prefix + str(next(gateway._ids))
        self.listener = listener
        self.peer = address  # the client: a trusted proxy's PROXY header replaces it, for all that follows
        self.proxy: tuple | None = None  # the trusted proxy's own address, when the connection came from one
        self.started = time.monotonic()
        self.domain: str | None = None
        self.backend: Backend | None = None
        self.address: Address | None = None  # the backend address tried last: the one that serves
        self.tried: list[Address] | None = None  # every address tried, when a pool tried more than one
        self.counted: str | None = None  # the key _admit counted this connection under
        self.reason: str | None = None
        self.result = relay.RelayResult()
        self.relay: relay.Relay | None = None
        self.ended = False
        if gateway.metrics is not None:
            gateway.metrics.opened(listener)

    def done(self, result: relay.RelayResult) -> None:
        """Count the connection closed and log it, once: a relay that failed to start may call again."""
        if self.ended:
            return
        self.ended = True
        gateway = self.gateway
        if self.relay is not None:
            gateway.relays.discard(self.relay)
            self.relay = None  # the relay holds self.done: without this cycle its objects are freed now, not by the GC
        gateway._closed()
        if self.counted is not None:
            gateway._release(self.counted)
        if gateway.metrics is not None:
            gateway.metrics.finished(self.listener, result.outcome, result.bytes_up, result.bytes_down)
        fields = {"id": self.id, "listener": self.listener, "client": format_address(self.peer)}
        if self.proxy is not None:
            fields["proxy"] = format_address(self.proxy)
        fields |= {
            "domain": self.domain,
            "backend": str(self.address) if self.address else None,
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

    def refuse(self, error: sniff.GatewayError, rest: bytes) -> bytes:
        """A later request of a strict connection is refused: keep why for the log line; the reply's bytes."""
        self.reason = error.reason
        return error_reply(error, "http", rest)


def _trusted(address: tuple, networks: tuple) -> bool:
    """Is the peer (a final address, ``client_address``) in a ``trusted_proxies`` network?"""
    ip = ipaddress.ip_address(address[0])  # "fe80::1%eth0" too: the scope is kept and ignored by `in`
    return any(ip in network for network in networks)


class _ClientGone(Exception):
    """The client closed or reset before the preamble was in: nothing to answer."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _close(*socks: socket.socket | None) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def _reset(*socks: socket.socket | None) -> None:
    """Make the coming close send a reset: the gateway cuts these streams."""
    for sock in socks:
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:  # already gone: the close is all it gets
                pass


def _answer(client: socket.socket, reply: bytes, fin: bool = False, linger: bool = True) -> None:
    """Send an error reply, then drain briefly so that closing does not reset it away.

    An empty reply sends nothing, unless ``fin`` asks for a clean close: a FIN
    alone, and the client's unread bytes drained so the close sends no reset.
    Without ``linger`` only the bytes already in are drained, with no wait:
    what comes after the close may still reset the reply away.
    """
    if not reply and not fin:
        return
    try:
        with gevent.Timeout(REPLY_TIMEOUT, False):  # a client too slow to take it gets the close alone
            _sendall(client, reply)
            client.shutdown(socket.SHUT_WR)
            drained = 0
            with gevent.Timeout(LINGER_SECONDS, False):
                while drained < LINGER_BYTES:
                    try:
                        data = client.recv(READ_SIZE)
                    except BlockingIOError:
                        if not linger:
                            break
                        _wait(client, _READ)
                        continue
                    if not data:
                        break
                    drained += len(data)
    except OSError:  # the client is gone: the close is all it gets
        pass
    except _Drained:  # the drain ended while the reply was on its way: cut it
        _reset(client)


# ---------------------------------------------------------------------------
# Command line: config with the options over it, --check, main.


if __name__ == "__main__":  # python -m kiagateway: the command line is kiacli's
    import kiacli

    sys.exit(kiacli.main())
