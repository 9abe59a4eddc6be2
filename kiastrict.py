"""Strict keep-alive routing (``http_strict_host``): a relay whose client side follows every request.

``StrictRelay`` is relay.py's ``Relay`` with two other directions. The client
-> backend one feeds what it reads to an ``httpstream.RequestStream`` and passes
on only bytes that belong to requests already checked: a head waits until it
is whole and its Host routes to the connection's route entry; the body after
it is counted and passed on unread (spliced when large). The backend -> client
one stays a plain pump; it looks at a response only after a request with
``Upgrade: websocket`` or ``CONNECT`` that is the first of its backend
connection, and then reads just its first 12 bytes: a ``101`` (a ``2xx`` to
CONNECT) ends inspection, anything else lets it go on. No other protocol is
trusted to end it: an upgrade to h2c is refused by httpstream.py; any other is
passed on as the first request (inspection goes on) and refused (400) as a
later one, before it reaches the backend: its new protocol's bytes would wait
for the backend's close to be refused.

A request that routes elsewhere, or that cannot be framed, is never passed on:
the backend gets a FIN after the requests before it, the responses it still
owes reach the client until it closes (or ``idle_timeout`` passes), then the
client gets the reply (421 or 400) and a FIN. Like relay.py, this module never
logs and never touches the servers: the gateway hands it ``allows`` (does this
name route to the connection's entry?), ``refuse`` (log the refusal, give the
reply's bytes) and ``connect`` (a new connection to the entry, made as the
first one was).

The start of a backend connection's response stream is the only response
boundary known without parsing responses, which the gateway never does. So a
later ``Upgrade: websocket`` or ``CONNECT`` gets a backend connection of its
own, by the same steps as a refusal: it is held with all that follows, the
client is not read, the backend gets a FIN and the responses it owes reach the
client until it closes. Then a greenlet connects anew (the connect blocks),
the held bytes go first on the new connection, checked as before, and its
first response decides as for a first request. A connect that fails is
answered as for a first request (502 or 504); a backend that keeps its
connection open for ``idle_timeout`` after the FIN gets the client a 400.
"""

from __future__ import annotations

import re
import socket
from typing import Callable

import gevent

import httpstream
import relay
from kiaerrors import BadRequest, GatewayError, HostChanged
from kiapipes import PIPE_SIZE
from kiasocket import reset_on_close
from relay import CHUNK, HAVE_SPLICE

__all__ = ["StrictRelay"]

STATUS_BYTES = 12  # "HTTP/1.1 101": all a status line's start needs to say "upgraded" or not
_SWITCHED = {  # the first requests after which a protocol may take over: "other" upgrades are never trusted
    "websocket": re.compile(rb"HTTP/1\.[01] 101"),
    "connect": re.compile(rb"HTTP/1\.[01] 2[0-9][0-9]"),
}


def _host_changed(domain: str | None) -> HostChanged:
    return HostChanged(f"request for {domain or 'no Host'} routes to another entry than this connection's")


class _StrictUp(relay.Direction):
    """Client -> backend: parse, check, pass on only what is checked."""

    __slots__ = ("forwarded", "held", "parser", "raw", "received")

    def __init__(self, owner: StrictRelay, src: socket.socket, dst: socket.socket, up: bool) -> None:
        super().__init__(owner, src, dst, up)
        self.parser: httpstream.RequestStream | None = owner.parser
        self.received = self.forwarded = owner.first_end  # stream offsets: read from the client / passed on
        self.held = b""  # bytes [forwarded, received): read, not yet passed on
        self.raw = False  # the protocol changed: a plain pump from now on

    def start(self) -> None:
        leftover = self.relay.leftover
        if leftover:  # pipelined after the first head in the first read: checked like any read
            self.relay.loop.run_callback(self._take, leftover)
        else:
            super().start()

    def _take(self, data: bytes) -> None:
        if self.relay is None:  # ended before this ran
            return
        try:
            self.received += len(data)
            if self._pass_on(data):
                self.reader.start(self.on_readable)
        except BaseException:
            self.relay.abort("error")
            raise

    def splice_limit(self) -> int:
        """Splice body bytes only, no more than the body holds: the next head must come through Python."""
        if self.raw:
            return super().splice_limit()
        parser = self.parser
        if HAVE_SPLICE and parser.body_left >= CHUNK and parser.checked == self.received:
            return min(PIPE_SIZE, parser.body_left)
        return 0

    def took(self, n: int) -> None:
        if self.raw:
            super().took(n)
            return
        self.parser.skip(n)
        self.received += n
        self.forwarded += n

    def copy_once(self) -> bool:
        """Read a chunk and pass on what it completes of requests that may go; False when reading should stop."""
        if self.raw:
            return super().copy_once()
        data = self.read()
        if data is None:
            return False
        owner = self.relay
        self.received += len(data)
        domain = self.parser.plain_head(data)
        if domain is httpstream.NOT_PLAIN:
            self.parser.feed(data)
            return self._pass_on(data) and len(data) == CHUNK
        if owner.allows(domain):  # the usual keep-alive read, one whole head: _pass_on's work, shortened
            self.forwarded = self.received
            self.send(data)
            return False  # a head is shorter than a chunk: the socket is drained
        self.held = data  # all before it has gone: forwarded is where it starts
        owner.refused(_host_changed(domain), data)
        self.stop_up()
        return False

    def _pass_on(self, data: bytes) -> bool:
        """Check the requests the parser can now read; send what may go. False when reading should stop."""
        owner = self.relay
        parser = self.parser
        refusal = switch = None
        try:
            while (event := parser.next_event()) is not httpstream.NEED_MORE:
                if not owner.allows(event.domain):
                    refusal = _host_changed(event.domain)
                    limit = event.start
                    break
                if event.upgrade:  # a later 101 ends inspection only as the first response of a backend connection
                    if event.upgrade in _SWITCHED:
                        switch = event
                    else:
                        refusal = BadRequest("Upgrade to a protocol other than websocket after the first request")
                    limit = event.start
                    break
            else:
                limit = parser.checked
        except GatewayError as exc:
            limit, refusal = parser.checked, exc
        if self.held:
            data = self.held + data
        count = limit - self.forwarded
        self.forwarded = limit
        if count < len(data):
            self.held = data[count:]
            data = data[:count]
        else:
            self.held = b""
        if data and not self.send(data):
            if self.pending is not None:  # stop_up once the pending bytes have gone (else the relay ended)
                if refusal is not None:
                    owner.refused(refusal, self.held)
                owner.switch = switch
            return False
        if refusal is not None:
            owner.refused(refusal, self.held)
            self.stop_up()
            return False
        if switch is not None:
            owner.switch = switch
            self.stop_up()
            return False
        return True

    def on_writable(self) -> None:
        super().on_writable()
        owner = self.relay
        if owner is None or self.pending is not None or self.piped:
            return
        if owner.refusal is not None or owner.switch is not None:
            self.stop_up()

    def stop_up(self) -> None:
        """A request was refused, or needs a new backend connection, and all before it has gone: read no more,
        and tell the backend so."""
        self.reader.stop()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:  # already gone: the down direction ends the relay
            pass
        if not self.relay.down_open:  # the backend had closed, and the client has its FIN: nothing to answer on
            self.relay.end()

    def go_raw(self) -> None:
        """The backend switched protocols: pass on what is held, then pump without parsing."""
        self.raw = True
        self.parser = None
        held, self.held = self.held, b""
        if not held:
            return
        if self.pending is not None:
            self.pending = memoryview(bytes(self.pending) + held)
            return
        self.send(held)


class _StrictDown(relay.Direction):
    """Backend -> client: a plain pump that may look at the first response's status, and answers a refusal."""

    __slots__ = ("status",)

    def __init__(self, owner: StrictRelay, src: socket.socket, dst: socket.socket, up: bool) -> None:
        super().__init__(owner, src, dst, up)
        self.status = b""

    def start(self) -> None:
        if self.relay.awaiting:  # the plain pump's callback stays free of the check: it runs per response
            self.reader.start(self.on_inspect)
        else:
            super().start()

    def on_inspect(self) -> None:
        if self._inspect():
            self.reader.stop()
            self.reader.start(self.on_readable)
            self.on_readable()

    def _inspect(self) -> bool:
        """Read up to the first 12 bytes of the response and decide; True if pumping may go on now."""
        owner = self.relay
        try:
            data = self.read(STATUS_BYTES - len(self.status))
            if data is None:
                return False
            self.status += data
            if len(self.status) == STATUS_BYTES:
                if owner.refusal is None and owner.switch is None and _SWITCHED[owner.awaiting].match(self.status):
                    owner.up.go_raw()  # before the client sees the 101: its next bytes are the new protocol's
                owner.awaiting = ""
            return self.send(data) and not owner.awaiting
        except BaseException:
            owner.abort("error")
            raise

    def on_eof(self) -> None:
        owner = self.relay
        up = owner.up
        # A backend that closes before it took every request before an Upgrade or CONNECT gets no successor.
        if owner.refusal is None and (owner.switch is None or up.pending is not None or up.piped):
            owner.down_open = False
            super().on_eof()
            return
        self.reader.stop()
        owner.down_open = False
        if owner.refusal is not None:
            owner.answer()
        else:
            owner.switch_backend()


class StrictRelay(relay.Relay):
    """A relay for one strict HTTP connection whose first request, up to ``first_end``, has gone to the backend."""

    __slots__ = (
        "allows",
        "awaiting",
        "connect",
        "down_open",
        "first_end",
        "leftover",
        "parser",
        "refusal",
        "refuse",
        "reply",
        "switch",
    )
    up_class = _StrictUp
    down_class = _StrictDown

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        on_done: Callable[[relay.RelayResult], None],
        result: relay.RelayResult,
        *,
        parser: httpstream.RequestStream,
        first: httpstream.Request,
        leftover: bytes,
        allows: Callable[[str | None], bool],
        refuse: Callable[[GatewayError, bytes], bytes],
        connect: Callable[[str | None], socket.socket],
        client_armed: bool = False,
    ) -> None:
        self.parser = parser
        self.first_end = first.end
        self.leftover = leftover  # bytes of the first read after the first head, fed to the parser already
        self.allows = allows
        self.refuse = refuse
        self.connect = connect  # blocks: a new backend connection to the entry, PROXY header sent, for this name
        self.refusal: GatewayError | None = None
        self.switch: httpstream.Request | None = None  # a later Upgrade or CONNECT held for a new backend connection
        self.reply = b""
        # "websocket" or "connect" until the first response's status is read
        self.awaiting = first.upgrade if first.upgrade in _SWITCHED else ""
        self.down_open = True
        super().__init__(client, backend, idle_timeout, on_done, result, client_armed)

    def refused(self, error: GatewayError, rest: bytes) -> None:
        """A request will not be passed on; ``rest`` are the client's bytes from its first byte on."""
        self.refusal = error
        self.result.outcome = error.outcome
        self.reply = self.refuse(error, rest)

    def abort(self, outcome: str, reset: bool = True) -> None:
        """As Relay's, except that a refused connection whose backend went quiet still gets its answer, and so
        does a later Upgrade or CONNECT whose backend never closed: a 400, as no new connection can follow it."""
        if outcome == "idle_timeout" and self.answering is None and self.down.pending is None and not self.down.piped:
            if self.refusal is None and self.switch is not None:
                reason = "Upgrade or CONNECT after the first request: the backend kept its connection open after a FIN"
                self.refused(BadRequest(reason), self.up.held)
            if self.refusal is not None:
                reset_on_close(self.backend)  # the backend is cut: a reset tells it so
                self.answer()
                return
        super().abort(outcome, reset)

    def switch_backend(self) -> None:
        """The backend closed after every response owed: connect anew for the held Upgrade or CONNECT.

        The connect blocks, so it runs in a greenlet of its own; the client is not
        read meanwhile and the idle timer waits (the connect has connect_timeout).
        """
        self.timer.stop()
        gevent.spawn(self._connect_anew, self.switch.domain)

    def _connect_anew(self, domain: str | None) -> None:
        try:
            backend = self.connect(domain)
        except GatewayError as exc:  # 502 or 504, as to a first request: the responses owed have gone
            if self.timer is not None:
                self.refused(exc, self.up.held)
                self.answer()
            return
        except OSError:  # the new backend broke before it took the PROXY header
            self.abort("backend_reset")
            return
        except BaseException:
            self.abort("error")
            raise
        if self.timer is None:  # the relay ended meanwhile (drain_timeout): the new connection is cut
            reset_on_close(backend)
            backend.close()
            return
        try:
            self._resume(backend)
        except BaseException:
            self.abort("error")
            raise

    def _resume(self, backend: socket.socket) -> None:
        """Go on with a new backend: new directions, the held request passed on first, then the client read again."""
        reset_on_close(backend)  # as in Relay.__init__: a kill -9 must reset it
        old, old_up, old_down = self.backend, self.up, self.down
        self.backend = backend  # from here end closes it
        self.touch()
        up = self.up_class(self, self.client, backend, True)
        up.received, up.forwarded, up.held = old_up.received, old_up.forwarded, old_up.held  # and the parser
        down = self.down_class(self, backend, self.client, False)
        old_up.close()
        old_down.close()
        self.up, self.down = up, down
        reset_on_close(old, False)  # it ended cleanly, both ways
        old.close()
        self.awaiting, self.switch = self.switch.upgrade, None  # the new connection's first response decides
        self.down_open = True
        self.timer.start(self.on_timer)
        self.down.start()
        self.up._take(b"")

    def answer(self) -> None:
        """The responses owed have gone: the client gets the refusal's reply and a FIN."""
        self.answer_and_close(self.reply, self.refusal.outcome)
