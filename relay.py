"""Move bytes both ways between two connected sockets until both ends are done.

One pump per direction, driven by the event loop's readiness callbacks rather
than by a parked greenlet: an idle relay costs two small io watchers and a
timer, and holds no buffer and no pipe. A direction reads while its source is
readable and writes what it read at once; when the destination is full it
stops reading and waits for the destination to drain (backpressure). A
direction whose reads fill a whole chunk switches to ``os.splice`` through a
pipe borrowed from a pool for as long as data is in flight (Linux, Python
3.10+), so bulk data never enters Python; when splices turn small again it
goes back to copying, which is cheaper for small messages. The pool is
bounded (``MAX_PIPES``, and a share of the user's pipe quota: kiapipes.py)
and lends only pipes of ``PIPE_SIZE``: a direction that
gets none copies. TCP urgent data is not part of the stream: like a plain
``recv`` (no ``SO_OOBINLINE``), the relay drops the urgent byte and passes on
every other byte in order, on both paths.

Behind a client that never reads, a relay pins kernel memory in three places:
the client-facing socket's send queue, bounded by ``NOTSENT_LOWAT`` (2 MiB set
on every destination once a direction has sent 1 MiB, so that short connections
make no syscall for it: 2.1 MB measured, against 3.9 MB, the autotuned send
buffer, without it); the pipe, at most ``PIPE_SIZE`` on the splice path; and
the backend socket's receive queue, which the kernel's receive-buffer
autotuning sizes during the first burst, before the relay sees the client
stall (0.4-19 MB measured on loopback, at most ``net.ipv4.tcp_rmem``'s max, 32
MiB on Linux 6.18). A ``TCP_WINDOW_CLAMP`` set when the direction stalls comes
too late (the window is already announced, measured: no change), and a fixed
``SO_RCVBUF`` turns autotuning off for every transfer, so that part is left to
the kernel (see bench/stall_memory.py). The same holds, sides swapped, behind a
backend that never reads.

EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the opposite
direction keeps flowing (half-close). Silence in both directions together for
``idle_timeout`` (on the monotonic clock; bytes a slow reader takes out of the
kernel's send queue count as activity) ends the relay with a FIN, or with a
reset if bytes still in flight would be lost; a reset on either side ends it
and is passed on as a reset, so neither peer mistakes a broken stream for a
complete one. A relay may instead end with a reply of the caller's to the
client (``answer_and_close``: strict mode's refusals), closed by kiasocket.py's
linger rule. This module never logs and never touches the servers: it calls
``on_done(result)`` once, after both sockets are closed. ``Direction`` is its
extension point: kiastrict.py reads the client's side otherwise with the same
steps.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import time
from typing import Callable

import gevent

from kiapipes import PIPE_SIZE, PIPES
from kiasocket import LINGER_BYTES, LINGER_SECONDS, READ, REPLY_SECONDS, WRITE, reset_on_close

try:
    import termios
except ImportError:  # a Python built without it: no send-queue ioctl either
    termios = None

CHUNK = 65536  # bytes per recv: the default socket buffer, one syscall per 64 KiB
SPLICE_BELOW = 4096  # a splice that moves less than a page costs more than recv + send: copy again
# TCP_NOTSENT_LOWAT on each destination: send() and writability stop once this much is
# queued unsent, so a reader that takes nothing pins about this much in its socket's send
# queue instead of the autotuned send buffer (tcp_wmem's max, 4 MiB: 3.9 MB measured, 2.1
# with it). Two pipes' worth: writability comes below half of it, so a whole pipe then
# drains in one splice; at one pipe's worth drains went partial and bulk cost 15-20 % more
# CPU per GiB, at two the CPU and throughput of bulk downloads did not change measurably.
NOTSENT_LOWAT = 2 * PIPE_SIZE
LOWAT_AFTER = NOTSENT_LOWAT // 2  # bytes a direction sends before its destination gets NOTSENT_LOWAT
_NEVER = 1 << 62  # a byte count no direction reaches
ROUNDS = 16  # transfers per readiness callback before other connections get their turn
IDLE_LOOKS = 4  # the idle timer looks at the send queues this often per idle_timeout (see Relay.on_timer)

_LINUX = sys.platform.startswith("linux")
# KIAGATEWAY_NO_SPLICE=1 forces the copy path (kernels or sandboxes where splice misbehaves, and tests).
HAVE_SPLICE = _LINUX and hasattr(os, "splice") and not os.environ.get("KIAGATEWAY_NO_SPLICE")
if HAVE_SPLICE:
    # Linux's values where a Python build does not name them.
    _SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
    _splice = os.splice

# Linux's value where a Python build does not name it; None where there is no such option (OpenBSD).
_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if _LINUX else None)
# ioctl giving the bytes in a TCP socket's send queue not yet acknowledged: Linux's
# SIOCOUTQ, a BSD's FIONWRITE where Python names it; None where there is none (OpenBSD).
_OUTQ = 0x5411 if _LINUX else getattr(termios, "FIONWRITE", None)
_now = time.monotonic  # every deadline: libev's loop.now() follows the wall clock and its steps


class RelayResult:
    """What a relay reports when it ends. Any object with these three attributes will do (the gateway's
    Connection is its own result: one object fewer per connection)."""

    __slots__ = ("bytes_down", "bytes_up", "outcome")

    def __init__(self) -> None:
        self.bytes_up = 0  # client -> backend
        self.bytes_down = 0  # backend -> client
        self.outcome = "ok"  # ok | idle_timeout | client_reset | backend_reset | error


class Direction:
    """One way of the relay: src -> dst, with what is in flight when dst is full.

    The steps a direction that reads otherwise (kiastrict.py) builds on: ``read``
    takes a chunk from src, ``send`` passes bytes on or keeps them pending until
    dst drains, ``splice_once`` moves up to a limit without the bytes entering
    Python, ``on_eof`` ends the direction. It chooses with ``splice_limit`` and
    follows spliced bytes with ``took``; ``copy_once`` is its read of one chunk.
    """

    __slots__ = (
        "bulk",
        "dst",
        "dst_fd",
        "looked",
        "name",
        "pending",
        "pipe",
        "piped",
        "reader",
        "relay",
        "src",
        "src_fd",
        "taken",
        "unbounded",
        "up",
        "writer",
    )

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.up = up
        self.name = ("client", "backend") if up else ("backend", "client")  # (src, dst) for outcomes
        self.reader = relay.loop.io(self.src_fd, READ)
        self.writer = None  # made when dst first fills up
        self.pending: memoryview | None = None  # recv'd bytes dst did not take yet
        self.pipe: tuple[int, int] | None = None
        self.piped = 0  # bytes in the pipe
        self.bulk = False  # splicing: the last reads were big
        # Bytes dst's reader had taken when the idle timer last looked, and when that was;
        # the bytes sent before the relay count as taken.
        self.taken = relay.result.bytes_up if up else relay.result.bytes_down
        self.looked = relay.last_activity
        # Bytes sent before dst gets its NOTSENT_LOWAT: set once this many have gone, so a short connection
        # makes no setsockopt for it, and dst's queue holds at most this much unsent before the bound applies.
        self.unbounded = LOWAT_AFTER if _NOTSENT_LOWAT is not None else _NEVER

    def start(self) -> None:
        self.reader.start(self.on_readable)

    def on_readable(self) -> None:
        relay = self.relay
        try:
            for _ in range(ROUNDS):
                limit = self.splice_limit()
                if not (self.splice_once(limit) if limit else self.copy_once()):
                    break
            if self.pipe is not None and not self.piped:
                PIPES.put(self.pipe)  # nothing in flight: an idle relay holds no pipe
                self.pipe = None
        except BaseException:
            relay.abort("error")
            raise

    def splice_limit(self) -> int:
        """How many bytes the next read may splice; 0: copy it. Big reads splice, small ones copy."""
        return PIPE_SIZE if self.bulk or self.pipe is not None else 0

    def took(self, n: int) -> None:
        """``n`` bytes were spliced from src: small splices go back to copying."""
        self.bulk = n >= SPLICE_BELOW

    def read(self, size: int = CHUNK) -> bytes | None:
        """Up to ``size`` bytes from src; None if it has none now, ended (``on_eof`` ran) or broke (the relay ended)."""
        try:
            data = self.src.recv(size)
        except BlockingIOError:
            return None
        except OSError:
            self.relay.abort(f"{self.name[0]}_reset")
            return None
        if not data:
            self.on_eof()
            return None
        self.relay.last_activity = _now()  # touch() inlined: this runs per message
        return data

    def copy_once(self) -> bool:
        """recv one chunk and send it; False when this callback should stop.

        ``read`` and ``send`` written out: this runs per message, and two calls
        fewer per message are measurable on keep-alive requests.
        """
        relay = self.relay
        try:
            data = self.src.recv(CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            relay.abort(f"{self.name[0]}_reset")
            return False
        if not data:
            self.on_eof()
            return False
        relay.last_activity = _now()
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
        self.unbounded -= sent
        if self.unbounded < 0:
            self.bound_dst()
        if sent < size:
            self.pending = memoryview(data)[sent:]
            self._wait_writable()
            return False
        return size == CHUNK  # a short read drained the socket

    def bound_dst(self) -> None:
        """Bound what dst queues unsent behind a slow reader (NOTSENT_LOWAT): once per direction, when it moves more
        than a little."""
        self.unbounded = _NEVER
        try:
            self.dst.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, NOTSENT_LOWAT)
        except OSError:  # a kernel without it: dst's send buffer alone bounds what it queues
            pass

    def send(self, data: bytes) -> bool:
        """Pass ``data`` on to dst; False if some of it waits for dst to take it (reading stops meanwhile), or the
        relay ended."""
        relay = self.relay
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
        self.unbounded -= sent
        if self.unbounded < 0:
            self.bound_dst()
        if sent < len(data):
            self.pending = memoryview(data)[sent:]
            self._wait_writable()
            return False
        return True

    def splice_once(self, limit: int = PIPE_SIZE) -> bool:
        """Splice up to ``limit`` bytes src -> pipe -> dst; False when this callback should stop.

        With no pipe to be had, the read copies instead (``copy_once``); so it does
        when src is readable yet has nothing to splice: TCP urgent data at the front
        of the queue stops splice() for good, while recv() steps over it (the urgent
        byte is not part of the stream). Rare otherwise: a full pipe's worth read
        just before.
        """
        if self.pipe is None:
            self.pipe = PIPES.get()
            if self.pipe is None:
                return self.copy_once()
        try:
            n = _splice(self.src_fd, self.pipe[1], limit, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return self.copy_once()
        except OSError:
            self.relay.abort(f"{self.name[0]}_reset")
            return False
        if not n:
            self.on_eof()
            return False
        self.relay.touch()
        self.took(n)
        self.piped = n
        # A non-blocking splice takes all the socket holds, up to the length
        # asked: less means the socket is empty, so skip the splice that would
        # only say EAGAIN.
        return self._drain_pipe() and n == limit

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
        self.unbounded -= n
        if self.unbounded < 0:
            self.bound_dst()

    def _wait_writable(self) -> None:
        self.reader.stop()
        if self.writer is None:
            self.writer = self.relay.loop.io(self.dst_fd, WRITE)
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

    def reader_took(self, now: float) -> float | None:
        """The time of the previous look if dst's reader took bytes since (the earliest they can
        have moved), else None; records this look.

        A full destination wakes us only when much of its (often MiB-sized) send
        buffer is free, so a slow reader can be busy for longer than idle_timeout
        without one writable event. What it took is what we wrote to dst less
        what dst's kernel send queue still holds: a count that only grows, so a
        look from before our last write is still a fair base.
        """
        try:
            unsent = struct.unpack("i", fcntl.ioctl(self.dst_fd, _OUTQ, b"\0\0\0\0"))[0]
        except OSError:  # refused here: judge by writable events alone
            return None
        taken = (self.relay.result.bytes_up if self.up else self.relay.result.bytes_down) - unsent
        since = self.looked if taken > self.taken else None
        self.taken, self.looked = taken, now
        return since

    def on_eof(self) -> None:
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
        "answering",
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
    up_class: type[Direction] = Direction
    down_class: type[Direction] = Direction

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        on_done: Callable[[RelayResult], None],
        result: RelayResult | None = None,
        client_armed: bool = False,
    ) -> None:
        self.loop = gevent.get_hub().loop
        self.client, self.backend = client, backend  # non-blocking, owned by the relay from now on
        # Armed until a graceful end: a process killed outright (kill -9, the OOM killer) runs no code of
        # ours, and the kernel's close of these sockets must then be a reset, never a FIN taken for the end.
        # ``client_armed``: the client socket is armed already (Linux: inherited from its listener).
        if not client_armed:
            reset_on_close(client)
        reset_on_close(backend)
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.result = result or RelayResult()
        self.last_activity = _now()
        self.answering: _Answer | None = None  # the reply the relay ends with, once answer_and_close began
        self.up = self.up_class(self, self.client, self.backend, True)
        self.down = self.down_class(self, self.backend, self.client, False)
        self.open_directions = 2  # directions not finished yet
        self.timer = self.loop.timer(idle_timeout / IDLE_LOOKS)
        try:
            self.timer.start(self.on_timer)
            self.up.start()
            self.down.start()
        except BaseException:
            # Undone before the caller closes the sockets: libev aborts the whole process
            # when it meets a started io watcher whose descriptor was closed (epoll_ctl: EBADF).
            self.timer.close()
            self.timer = None  # ended: a later abort() or end() does nothing
            self.up.close()
            self.down.close()
            raise

    def touch(self) -> None:
        self.last_activity = _now()

    def on_timer(self) -> None:
        """Cut the relay once nothing moved for idle_timeout, bytes a reader took from the kernel included.

        Such bytes are seen only by looking, IDLE_LOOKS times per period, and are
        dated to the look before, the earliest they can have moved: a relay is cut
        at most idle_timeout / IDLE_LOOKS early, never a whole period late (a
        reader that takes nothing is judged at the first expiry).
        """
        now = _now()
        if _OUTQ is not None:
            for direction in (self.up, self.down):
                took = direction.reader_took(now)
                if took is not None and took > self.last_activity:
                    self.last_activity = took
        idle = now - self.last_activity
        if idle >= self.idle_timeout:
            waiting = [d for d in (self.up, self.down) if d.pending is not None or d.piped]
            # Bytes still in flight are lost: then a reset says so, a FIN would not.
            self.abort("idle_timeout", reset=bool(waiting))
            return
        self.timer.close()  # re-arm: a few timers per period, not one per byte
        self.timer = self.loop.timer(min(self.idle_timeout - idle, self.idle_timeout / IDLE_LOOKS))
        self.timer.start(self.on_timer)

    def direction_done(self) -> None:
        self.open_directions -= 1
        if not self.open_directions:
            self.end()

    def abort(self, outcome: str, reset: bool = True) -> None:
        """End both directions now; a reset is passed on as a reset."""
        if self.timer is None:
            return  # already ended
        self.result.outcome = outcome
        self.end(reset)

    def end(self, reset: bool = False) -> None:
        """Close both sockets, with a FIN after every byte or (``reset``) a reset, and report the result once."""
        if self.timer is None:
            return
        if not reset:  # a graceful end: disarm the reset set at the start, so the close is a FIN after every byte
            reset_on_close(self.client, False)
            reset_on_close(self.backend, False)
        self.timer.close()
        self.timer = None
        self.up.close()
        self.down.close()
        self.client.close()
        self.backend.close()
        self.on_done(self.result)

    def answer_and_close(self, reply: bytes, outcome: str) -> None:
        """End with ``reply`` to the client instead of the backend's bytes: send it, a FIN, read and drop what the
        client still sends (kiasocket's linger rule), then close. Call it once the bytes owed to the client have
        gone; nothing else moves meanwhile."""
        if self.answering is not None or self.timer is None:
            return
        self.answering = _Answer(reply)
        self.result.outcome = outcome
        self.down.reader.stop()
        self.up.reader.stop()
        if self.up.writer is not None:  # bytes still on their way to the backend are not wanted any more
            self.up.writer.stop()
        self.timer.close()
        self.timer = self.loop.timer(REPLY_SECONDS + LINGER_SECONDS)
        self.timer.start(self.end)
        self._send_answer()

    def _send_answer(self) -> None:
        answer = self.answering
        try:
            sent = self.client.send(answer.reply)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client is gone: the close is all it gets
            self.end()
            return
        answer.reply = answer.reply[sent:]
        down = self.down
        if answer.reply:
            if down.writer is None:
                down.writer = self.loop.io(down.dst_fd, WRITE)
            down.writer.start(self._send_answer)
            return
        if down.writer is not None:
            down.writer.stop()
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.end()
            return
        self.up.reader.start(self._linger)

    def _linger(self) -> None:
        """Read and drop what the client still sends, until it closes: closing on unread bytes would reset."""
        answer = self.answering
        while True:
            try:
                data = self.client.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            answer.lingered += len(data)
            if not data or answer.lingered >= LINGER_BYTES:
                self.end()
                return


class _Answer:
    """What is left of the reply a relay ends with, and how much the client sent after it."""

    __slots__ = ("lingered", "reply")

    def __init__(self, reply: bytes) -> None:
        self.reply = memoryview(reply)
        self.lingered = 0
