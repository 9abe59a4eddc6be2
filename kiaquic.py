"""The QUIC listener: UDP datagrams routed by the SNI of the client's Initial packets, never decrypted beyond them.

One listening UDP socket serves every flow; a flow is a client address (host
and port). A datagram from an unknown address starts a flow only if
quicsniff.py takes it for a client's first Initial; the flow's datagrams are
held until the ClientHello is whole (``max_preamble`` bytes, within
``preamble_timeout``), then routed by the HTTPS route table: a socket of the
flow's own, connected to the route's UDP address, sends them in their order,
and every later datagram of the client follows. The backend's datagrams go
back to the client from the listening socket. Nothing is rewritten. The
connection IDs the backend chooses, in the clear in its long headers, are
learnt: a datagram from an unknown address that carries one belongs to that
flow, whose client moved (a NAT rebinding), and the flow follows it.

A refused flow (no route, an allow-list, the per-client limit,
``max_quic_flows``, a ClientHello that cannot become valid) gets one Initial
packet with CONNECTION_CLOSE, as a TLS client gets an alert. A backend is
unreachable only when an ICMP error comes back to the flow's socket before its
first answer: the held datagrams then go to the pool's next address, and the
client is refused only when none is left. A flow ends after
``quic_idle_timeout`` of silence either way; its log line is the connection
line, listener ``quic``, with the datagrams counted each way.

Driven by the event loop's callbacks: a flow holds no greenlet. Only a
backend given by name waits, in a greenlet, for the resolver.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent
import gevent.socket

import kiaerrors
import quicsniff
import sniff
from kiaclients import client_address, in_networks
from kiaconfig import Address
from kiaerrors import GatewayError
from kialog import format_address
from kiasocket import READ

ROUNDS = 64  # datagrams taken per readiness before other sockets get their turn
DATAGRAM = 65535  # the largest UDP payload: a datagram is read whole or not at all
IDLE_LOOKS = 4  # the idle timer looks this often per quic_idle_timeout
CIDS_KEPT = 8  # connection IDs learnt per flow: a backend changing its own more often is not followed further
_now = time.monotonic


class QuicListener:
    """Takes the datagrams of one UDP socket and hands each to its flow, or starts one.

    ``close`` (a stop, an upgrade) takes no new flow but keeps the socket for the
    open ones, which reach the client only through it; ``cut`` ends them.
    """

    def __init__(self, sock: socket.socket, gateway: Any) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.gateway = gateway
        self.address = sock.getsockname()
        self.loop = gevent.get_hub().loop
        self.watcher = self.loop.io(sock.fileno(), READ)
        self.flows: dict[tuple, Flow] = {}  # by client address
        self.by_cid: dict[bytes, Flow] = {}  # by a connection ID the backend chose, for clients that move
        self.cid_lengths: set[int] = set()  # the lengths of those IDs: a short header does not say
        self.closed = False  # no new flows: the process stops

    def resume(self) -> None:
        if not self.closed:
            self.watcher.start(self.on_readable)

    def on_readable(self) -> None:
        recvfrom = self.socket.recvfrom
        for _ in range(ROUNDS):
            try:
                data, address = recvfrom(DATAGRAM)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error reported on the listening socket: nothing to do with it
                continue
            flow = self.flows.get(address)
            if flow is None and self.by_cid:
                flow = self.moved(data, address)
            if flow is not None:
                flow.from_client(data)
            elif not self.closed:
                self.start_flow(data, address)

    def start_flow(self, data: bytes, address: tuple) -> None:
        """A datagram from a client address with no flow: a flow if it is a client's first Initial."""
        flow = Flow(self, address)
        try:
            result = flow.sniffer.feed(data)
        except (quicsniff.NotInitial, quicsniff.ClientClosed):  # dropped: nothing to answer
            return
        except GatewayError as exc:
            flow.refuse(exc)
            return
        if len(self.flows) >= self.gateway.config.settings.max_quic_flows:
            flow.refuse(kiaerrors.TooManyFlows(f"max_quic_flows ({len(self.flows)}) flows open"))
            return
        try:
            flow.counted = self.gateway.clients.admit(flow.peer[0])
        except GatewayError as exc:
            flow.refuse(exc)
            return
        self.flows[address] = flow
        self.gateway.accepted()
        if result is sniff.NEED_MORE:
            flow.wait_for_hello()
        else:
            flow.route(result)

    def moved(self, data: bytes, address: tuple) -> Flow | None:
        """The flow of a client seen at a new address (its NAT rebound it), by the Destination Connection ID of its
        datagram: one its backend chose. The flow follows it there."""
        if not data:
            return None
        if data[0] & 0x80:  # a long header says the ID's length
            flow = self.by_cid.get(data[6 : 6 + data[5]]) if len(data) > 6 else None
        else:
            flow = None
            for length in self.cid_lengths:
                flow = self.by_cid.get(data[1 : 1 + length])
                if flow is not None:
                    break
        if flow is not None:
            del self.flows[flow.client]
            self.flows[address] = flow
            flow.client = address
        return flow

    def send(self, data: bytes, address: tuple) -> bool:
        try:
            self.socket.sendto(data, address)
        except OSError:  # a full buffer or an unreachable client: UDP may lose it, and QUIC sends again
            return False
        return True

    def forget(self, flow: Flow) -> None:
        if self.flows.get(flow.client) is flow:
            del self.flows[flow.client]
        for cid in flow.cids:
            if self.by_cid.get(cid) is flow:
                del self.by_cid[cid]
        if self.closed and not self.flows:
            self._close_socket()

    def close(self) -> None:
        """Take no new flow; the socket closes with the last open one."""
        self.closed = True
        if not self.flows:
            self._close_socket()

    def cut(self) -> None:
        """The drain is over: end every open flow."""
        for flow in list(self.flows.values()):
            flow.end("drain_timeout")

    def _close_socket(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
            self.socket.close()


class Flow:
    """One client address's datagrams: held until routed, then relayed both ways until silence."""

    __slots__ = (
        "answered",
        "backend",
        "bytes_down",
        "bytes_up",
        "cids",
        "client",
        "counted",
        "datagrams_down",
        "datagrams_up",
        "domain",
        "ended",
        "gateway",
        "id",
        "last",
        "listener",
        "order",
        "outcome",
        "peer",
        "reader",
        "reason",
        "settings",
        "sniffer",
        "sock",
        "started",
        "timer",
        "tried",
        "used",
    )

    def __init__(self, listener: QuicListener, client: tuple) -> None:
        self.listener = listener
        self.gateway = gateway = listener.gateway
        self.settings = gateway.config.settings  # one flow, one set of settings, whatever a reload
        self.client = client  # the address datagrams come from and go back to
        self.peer = client_address(client)  # the same, as logs and policy see it (a mapped IPv4 as IPv4)
        self.id = gateway.next_id()
        self.started = self.last = _now()
        self.sniffer: quicsniff.InitialSniffer | None = quicsniff.InitialSniffer(self.settings.max_preamble)
        self.domain: str | None = None
        self.backend = None
        self.order: list[Address] = []  # the addresses still to try
        self.used: Address | None = None
        self.tried: list[Address] = []
        self.sock: socket.socket | None = None
        self.reader = self.timer = None
        self.answered = False  # the backend sent a datagram: no failover from here on
        self.cids: list[bytes] = []  # connection IDs the backend chose, learnt from its long headers
        self.bytes_up = self.bytes_down = self.datagrams_up = self.datagrams_down = 0
        self.outcome = "ok"
        self.reason: str | None = None
        self.counted: str | None = None
        self.ended = False

    def wait_for_hello(self) -> None:
        left = self.settings.preamble_timeout - (_now() - self.started)
        self.timer = self.listener.loop.timer(max(0.0, left))
        self.timer.start(self.hello_late)

    def hello_late(self) -> None:
        self.refuse(kiaerrors.PreambleTimeout(f"no complete ClientHello within {self.settings.preamble_timeout:g}s"))

    def from_client(self, data: bytes) -> None:
        self.last = _now()
        if self.sock is not None:
            try:
                self.sock.send(data)
            except BlockingIOError:  # the socket's buffer is full: as if the network lost it
                return
            except OSError:  # an ICMP error came back: the next read of the socket says so too
                return
            self.bytes_up += len(data)
            self.datagrams_up += 1
            return
        sniffer = self.sniffer
        if sniffer.result is not None:  # routed, the backend's name still resolving: hold it with the rest
            sniffer.datagrams.append(data)
            return
        try:
            result = sniffer.feed(data)
        except quicsniff.ClientClosed:
            self.end("client_closed")
            return
        except GatewayError as exc:
            self.refuse(exc)
            return
        if result is not sniff.NEED_MORE:
            self.route(result)

    def route(self, preamble: sniff.Preamble) -> None:
        """The ClientHello is whole: route it by the HTTPS table, then send the held datagrams."""
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        self.domain = preamble.domain
        backend = self.gateway.routes["https"].lookup(self.domain)
        if backend is None:
            self.refuse(kiaerrors.NoRoute(f"no route for {self.domain or 'no SNI'}"))
            return
        if backend.allow is not None and not in_networks(self.peer[0], backend.allow_masks):
            self.refuse(
                kiaerrors.Forbidden(f"client {self.peer[0]} is outside the allow-list of {self.domain}'s route")
            )
            return
        self.backend = backend
        self.order = self.gateway.backends.order(backend, backend.udp_addresses)
        self.next_address()

    def next_address(self) -> None:
        """Send the held datagrams to the next address of the route; refuse the client when none is left."""
        while self.order:
            address = self.used = self.order.pop(0)
            self.tried.append(address)
            if address.ip is None:
                gevent.spawn(self.resolve, address)
                return
            family = socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET
            if self.open_to(family, (address.host, address.port)):
                return
        self.refuse(kiaerrors.BackendUnreachable(f"no QUIC backend of {self.domain} answers"))

    def resolve(self, address: Address) -> None:
        """In a greenlet: a backend given by name, resolved now (DNS changes need no restart)."""
        try:
            found = gevent.socket.getaddrinfo(address.host, address.port, 0, socket.SOCK_DGRAM)
        except OSError as exc:
            self.reason = f"cannot resolve {address.host}: {exc}"
            found = []
        if self.ended:
            return
        for family, _, _, _, sockaddr in found:
            if self.open_to(family, sockaddr):
                return
        self.gateway.backends.failed(address)
        self.next_address()

    def open_to(self, family: int, sockaddr: tuple) -> bool:
        """A socket of this flow's own, connected to the backend, the held datagrams sent; False if it failed."""
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError as exc:
            self.reason = f"QUIC backend {self.used}: {exc.strerror or exc}"
            self.gateway.backends.failed(self.used)
            return False
        self.sock = sock
        self.reader = self.listener.loop.io(sock.fileno(), READ)
        self.reader.start(self.from_backend)
        for data in self.sniffer.datagrams:
            try:
                sock.send(data)
            except OSError:  # an ICMP error already: from_backend reads it and moves on
                break
            self.bytes_up += len(data)
            self.datagrams_up += 1
        if self.timer is None:
            period = self.settings.quic_idle_timeout / IDLE_LOOKS
            self.timer = self.listener.loop.timer(period, period)
            self.timer.start(self.idle_look)
        return True

    def from_backend(self) -> None:
        recv = self.sock.recv
        for _ in range(ROUNDS):
            try:
                data = recv(DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP unreachable: this address does not serve QUIC
                self.unreachable(exc)
                return
            self.last = _now()
            if data[0] & 0x80 and len(data) > 6:
                self.learn(data)
            if not self.answered:
                self.answered = True
                self.gateway.backends.answered(self.used)
                self.sniffer = None  # no failover now: the held datagrams are not needed again
            if self.listener.send(data, self.client):
                self.bytes_down += len(data)
                self.datagrams_down += 1

    def learn(self, data: bytes) -> None:
        """Keep the Source Connection ID of a backend's long-header packet: the client's packets carry it."""
        at = 6 + data[5]
        if at >= len(data):
            return
        cid = data[at + 1 : at + 1 + data[at]]
        if cid and cid not in self.cids and len(self.cids) < CIDS_KEPT and len(cid) <= quicsniff.MAX_CID:
            self.cids.append(cid)
            self.listener.by_cid[cid] = self
            self.listener.cid_lengths.add(len(cid))

    def unreachable(self, exc: OSError) -> None:
        self.reason = f"QUIC backend {self.used}: {exc.strerror or exc}"
        if self.answered:  # it served, then went away: the client's own timers end its connection
            self.end("backend_reset")
            return
        self.gateway.backends.failed(self.used)
        self.close_socket()
        self.bytes_up = self.datagrams_up = 0  # counted again for the next address
        self.next_address()

    def idle_look(self) -> None:
        if _now() - self.last >= self.settings.quic_idle_timeout:
            self.end("ok")  # silence is how every QUIC connection ends, to anyone outside it

    def refuse(self, error: GatewayError) -> None:
        """Answer a refused client with CONNECTION_CLOSE in an Initial, when the contract gives a code; end."""
        self.reason = error.reason
        code = kiaerrors.quic_close_code(error)
        sniffer = self.sniffer
        if code is not None and sniffer is not None and sniffer.version is not None:
            self.listener.send(sniffer.close_packet(code, error.outcome.encode()), self.client)
        self.end(error.outcome)

    def close_socket(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def end(self, outcome: str) -> None:
        """Forget the flow, once: its socket closed, its client released, its line logged."""
        if self.ended:
            return
        self.ended = True
        self.outcome = outcome
        self.close_socket()
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        gateway = self.gateway
        if self.listener.flows.get(self.client) is self:
            gateway.closed()
        self.listener.forget(self)
        if self.counted is not None:
            gateway.clients.release(self.counted)
        if not gateway.config.settings.log_connections:
            return
        fields = {"id": self.id, "listener": "quic", "client": format_address(self.peer)}
        fields["domain"] = self.domain
        fields["backend"] = str(self.used) if self.used else None
        fields["outcome"] = outcome
        fields["bytes_up"] = self.bytes_up
        fields["bytes_down"] = self.bytes_down
        fields["duration_ms"] = round((_now() - self.started) * 1000, 1)
        fields["datagrams_up"] = self.datagrams_up
        fields["datagrams_down"] = self.datagrams_down
        if self.reason and outcome != "ok":
            fields["reason"] = self.reason
        if len(self.tried) > 1:
            fields["tried"] = [str(address) for address in self.tried]
        gateway.log.connection(fields)
