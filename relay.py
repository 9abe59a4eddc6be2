"""Move bytes both ways between two connected sockets until both ends are done.

One pump per direction, driven by the event loop's readiness callbacks rather
than by a parked greenlet: an idle relay costs two small io watchers and a
timer, and holds no buffer and no pipe. A direction reads while its source is
readable and writes what it read at once; when the destination is full it
stops reading and waits for the destination to drain (backpressure). A
direction whose reads fill a whole chunk switches to ``os.splice`` through a
pipe borrowed from a pool for as long as data is in flight (Linux, Python
3.10+), so bulk data never enters Python; when splices turn small again it
goes back to copying, which is cheaper for small messages.

EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the opposite
direction keeps flowing (half-close). Silence in both directions together for
``idle_timeout`` ends the relay with a FIN; a reset on either side ends it and
is passed on as a reset, so neither peer mistakes a broken stream for a
complete one. This module never logs and never touches the servers: it calls
``on_done(result)`` once, after both sockets are closed.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Callable

import gevent

CHUNK = 65536  # bytes per recv: the default socket buffer, one syscall per 64 KiB
SPLICE_BELOW = 4096  # a splice that moves less than a page costs more than recv + send: copy again
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ for pooled pipes: 1 MiB moves bulk data in few syscalls
PIPES_KEPT = 64  # free pipes kept for reuse; creating and sizing a pipe costs more than a small connection
ROUNDS = 16  # transfers per readiness callback before other connections get their turn

# KIAGATEWAY_NO_SPLICE=1 forces the copy path (kernels or sandboxes where splice misbehaves, and tests).
HAVE_SPLICE = sys.platform.startswith("linux") and hasattr(os, "splice") and not os.environ.get("KIAGATEWAY_NO_SPLICE")
if HAVE_SPLICE:
    _SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    _splice = os.splice
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ on Linux (named in fcntl only from Python 3.10)

_READ, _WRITE = 1, 2  # libev event masks
_SIOCOUTQ = 0x5411  # Linux ioctl: bytes in a TCP socket's send queue not yet acknowledged
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


@dataclass
class RelayResult:
    bytes_up: int = 0  # client -> backend
    bytes_down: int = 0  # backend -> client
    outcome: str = "ok"  # ok | idle_timeout | client_reset | backend_reset | error


class PipePool:
    """Empty, pre-sized pipes lent to directions while they splice."""

    def __init__(self, keep: int = PIPES_KEPT) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over /proc/sys/fs/pipe-max-size: the default size still works
            pass
        return read_end, write_end

    def put(self, pipe: tuple[int, int], empty: bool = True) -> None:
        if empty and len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


PIPES = PipePool()


class _Direction:
    """One way of the relay: src -> dst, with what is in flight when dst is full."""

    __slots__ = (
        "bulk",
        "dst",
        "dst_fd",
        "name",
        "pending",
        "pipe",
        "piped",
        "reader",
        "relay",
        "src",
        "src_fd",
        "unsent",
        "up",
        "writer",
    )

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.up = up
        self.name = ("client", "backend") if up else ("backend", "client")  # (src, dst) for outcomes
        self.reader = relay.loop.io(self.src_fd, _READ)
        self.writer = None  # made when dst first fills up
        self.pending: memoryview | None = None  # recv'd bytes dst did not take yet
        self.pipe: tuple[int, int] | None = None
        self.piped = 0  # bytes in the pipe
        self.bulk = False  # splicing: the last reads were big
        self.unsent: int | None = None  # dst's kernel send queue when the idle timer last looked

    def start(self) -> None:
        self.reader.start(self.on_readable)

    def on_readable(self) -> None:
        relay = self.relay
        try:
            for _ in range(ROUNDS):
                if self.bulk or self.pipe is not None:
                    if not self._splice_once():
                        break
                elif not self._copy_once():
                    break
            if self.pipe is not None and not self.piped:
                PIPES.put(self.pipe)  # nothing in flight: an idle relay holds no pipe
                self.pipe = None
        except BaseException:
            relay.abort("error")
            raise

    def _copy_once(self) -> bool:
        """recv one chunk and send it; False when this callback should stop."""
        try:
            data = self.src.recv(CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            self.relay.abort(f"{self.name[0]}_reset")
            return False
        if not data:
            self._on_eof()
            return False
        relay = self.relay
        relay.last_activity = relay.loop.now()  # touch() and _count() inlined: this runs per message
        size = len(data)
        self.bulk = HAVE_SPLICE and size == CHUNK
        try:
            sent = self.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            relay.abort(f"{self.name[1]}_reset")
            return False
        if self.up:
            relay.result.bytes_up += sent
        else:
            relay.result.bytes_down += sent
        if sent < size:
            self.pending = memoryview(data)[sent:]
            self._wait_writable()
            return False
        return size == CHUNK  # a short read drained the socket

    def _splice_once(self) -> bool:
        if self.pipe is None:
            try:
                self.pipe = PIPES.get()
            except OSError:  # out of descriptors: copy this round instead
                return self._copy_once()
        try:
            n = _splice(self.src_fd, self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return False
        except OSError:
            self.relay.abort(f"{self.name[0]}_reset")
            return False
        if not n:
            self._on_eof()
            return False
        self.relay.touch()
        self.bulk = n >= SPLICE_BELOW
        self.piped = n
        # A non-blocking splice takes all the socket holds, up to the length
        # asked: less means the socket is empty, so skip the splice that would
        # only say EAGAIN.
        return self._drain_pipe() and n == PIPE_SIZE

    def _drain_pipe(self) -> bool:
        """Splice the pipe into dst; False if dst filled up (then we wait for it) or broke."""
        while self.piped:
            try:
                n = _splice(self.pipe[0], self.dst_fd, self.piped, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                n = 0
            except OSError:
                self.relay.abort(f"{self.name[1]}_reset")
                return False
            if not n:
                self._wait_writable()
                return False
            self.piped -= n
            self._count(n)
            self.relay.touch()  # bytes taken by a slow reader are activity too
        return True

    def _count(self, n: int) -> None:
        if self.up:
            self.relay.result.bytes_up += n
        else:
            self.relay.result.bytes_down += n

    def _wait_writable(self) -> None:
        self.reader.stop()
        if self.writer is None:
            self.writer = self.relay.loop.io(self.dst_fd, _WRITE)
        self.writer.start(self.on_writable)

    def on_writable(self) -> None:
        try:
            if self.pending is not None:
                try:
                    sent = self.dst.send(self.pending)
                except BlockingIOError:
                    return
                except OSError:
                    self.relay.abort(f"{self.name[1]}_reset")
                    return
                self._count(sent)
                self.relay.touch()
                self.pending = self.pending[sent:] if sent < len(self.pending) else None
                if self.pending is not None:
                    return
            elif not self._drain_pipe():
                return
            self.writer.stop()
            if self.pipe is not None:
                PIPES.put(self.pipe)
                self.pipe = None
            self.reader.start(self.on_readable)
        except BaseException:
            self.relay.abort("error")
            raise

    def kernel_drained(self) -> bool:
        """Whether dst's kernel send queue shrank since last asked: its reader is taking bytes.

        A full destination wakes us only when much of its (often MiB-sized) send
        buffer is free, so a slow reader can be busy for longer than idle_timeout
        without one writable event.
        """
        try:
            unsent = struct.unpack("i", fcntl.ioctl(self.dst_fd, _SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:  # no such ioctl here: judge by writable events alone
            return False
        # With no earlier look, bytes still queued get the benefit of the doubt once.
        drained = unsent < self.unsent if self.unsent is not None else unsent > 0
        self.unsent = unsent
        return drained

    def _on_eof(self) -> None:
        """src is done. Nothing is in flight: a direction reads only after dst took all it had."""
        self.reader.stop()
        if self.relay.open_directions > 1:  # else closing dst right after sends the FIN anyway
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:  # already gone: nothing left to tell it
                pass
        self.relay.direction_done()

    def close(self) -> None:
        """Stop and forget the watchers and the relay: no reference cycle outlives the relay,
        so its objects are freed at once instead of waiting for the garbage collector."""
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        if self.pipe is not None:
            PIPES.put(self.pipe, empty=not self.piped)
            self.pipe = None
        self.reader = self.writer = self.relay = None


class Relay:
    """Both directions of one connection, plus the idle timer; ends by calling ``on_done``."""

    __slots__ = (
        "backend",
        "client",
        "down",
        "idle_timeout",
        "last_activity",
        "loop",
        "on_done",
        "open_directions",
        "result",
        "timer",
        "up",
    )
    # The classes of the two directions: kiastrict.py's strict mode follows the client's requests.
    up_class: type[_Direction] = _Direction
    down_class: type[_Direction] = _Direction

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        on_done: Callable[[RelayResult], None],
        result: RelayResult | None = None,
    ) -> None:
        self.loop = gevent.get_hub().loop
        self.client, self.backend = client, backend  # non-blocking, owned by the relay from now on
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.result = result or RelayResult()
        self.last_activity = self.loop.now()
        self.up = self.up_class(self, self.client, self.backend, True)
        self.down = self.down_class(self, self.backend, self.client, False)
        self.open_directions = 2  # directions not finished yet
        self.timer = self.loop.timer(idle_timeout)
        self.timer.start(self.on_timer)
        self.up.start()
        self.down.start()

    def touch(self) -> None:
        self.last_activity = self.loop.now()

    def on_timer(self) -> None:
        idle = self.loop.now() - self.last_activity
        if idle >= self.idle_timeout:
            waiting = [d for d in (self.up, self.down) if d.pending is not None or d.piped]
            if any([self.up.kernel_drained(), self.down.kernel_drained()]):  # a slow reader still takes bytes
                self.touch()
                idle = 0.0
            else:
                # Bytes still in flight are lost: then a reset says so, a FIN would not.
                self.abort("idle_timeout", reset=bool(waiting))
                return
        self.timer.close()  # re-arm for the rest of the idle period: one timer per period, not per byte
        self.timer = self.loop.timer(self.idle_timeout - idle)
        self.timer.start(self.on_timer)

    def direction_done(self) -> None:
        self.open_directions -= 1
        if not self.open_directions:
            self._end()

    def abort(self, outcome: str, reset: bool = True) -> None:
        """End both directions now; a reset is passed on as a reset."""
        if self.timer is None:
            return  # already ended
        self.result.outcome = outcome
        if reset:
            for sock in (self.client, self.backend):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
        self._end()

    def _end(self) -> None:
        if self.timer is None:
            return
        self.timer.close()
        self.timer = None
        self.up.close()
        self.down.close()
        self.client.close()
        self.backend.close()
        self.on_done(self.result)
