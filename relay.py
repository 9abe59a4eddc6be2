"""Move bytes both ways between two connected gevent sockets until both ends are done.

One pump per direction. EOF on one side becomes ``shutdown(SHUT_WR)`` on the
other while the opposite direction keeps flowing (half-close). Silence in
both directions together for ``idle_timeout`` ends the relay; so does a reset
on either side, which is passed on as a reset to the other side so that
neither peer mistakes a broken stream for a complete one. A pump holds no
buffer while it waits. This module never closes the sockets it is given,
never touches the server, and never logs: it returns what happened.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

import gevent

CHUNK = 65536  # bytes per recv: the default socket buffer size, one syscall per 64 KiB

# SO_LINGER on, 0 seconds: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class RelayResult:
    bytes_up: int = 0  # client -> backend
    bytes_down: int = 0  # backend -> client
    outcome: str = "ok"  # ok | idle_timeout | client_reset | backend_reset


class _Relay:
    __slots__ = ("backend", "client", "idle_timeout", "last_activity", "pumps", "result")

    def __init__(self, client: socket.socket, backend: socket.socket, idle_timeout: float) -> None:
        self.client = client
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.pumps: list[gevent.Greenlet] = []
        self.result = RelayResult()

    def pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        src_name, dst_name = ("client", "backend") if up else ("backend", "client")
        recv, sendall = src.recv, dst.sendall
        src.settimeout(self.idle_timeout)
        dst.settimeout(self.idle_timeout)
        while True:
            try:
                data = recv(CHUNK)
            except socket.timeout:
                idle = time.monotonic() - self.last_activity
                if idle >= self.idle_timeout:
                    self.abort("idle_timeout", reset=False)
                    return
                src.settimeout(self.idle_timeout - idle)  # the other direction was busy
                continue
            except OSError:
                self.abort(f"{src_name}_reset")
                return
            if not data:
                _shutdown(dst, socket.SHUT_WR)
                return
            self.last_activity = time.monotonic()
            try:
                sendall(data)
            except socket.timeout:  # the peer read nothing for a whole idle_timeout
                self.abort("idle_timeout", reset=False)
                return
            except OSError:
                self.abort(f"{dst_name}_reset")
                return
            if up:
                self.result.bytes_up += len(data)
            else:
                self.result.bytes_down += len(data)
            src.settimeout(self.idle_timeout)

    def abort(self, outcome: str, reset: bool = True) -> None:
        """End both directions now; the first cause wins. A reset is passed on as a reset."""
        if self.result.outcome != "ok":
            return
        self.result.outcome = outcome
        if reset:
            for sock in (self.client, self.backend):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
        current = gevent.getcurrent()
        for pump in self.pumps:
            if pump is not current:
                pump.kill(block=False)


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:  # already gone: nothing left to tell it
        pass


def relay(client: socket.socket, backend: socket.socket, idle_timeout: float) -> RelayResult:
    """Relay until both directions have ended; the caller closes both sockets afterwards.

    With SO_LINGER set to 0 after a reset, that close passes the reset on.
    """
    state = _Relay(client, backend, idle_timeout)
    state.pumps = [
        gevent.spawn(state.pump, client, backend, True),
        gevent.spawn(state.pump, backend, client, False),
    ]
    try:
        gevent.joinall(state.pumps)
    finally:
        gevent.killall(state.pumps)
    return state.result
