"""Small socket steps the data path shares, written once: waiting, sending under a deadline, ending a stream.

Its own module because several modules follow the same rules (kiagateway.py
answering a refused client from its greenlet, kiabackends.py connecting,
relay.py and kiastrict.py from the event loop's callbacks), and a rule written
in each of them drifts. The sockets are plain non-blocking ones: a call is
tried first, and only when it would block does the greenlet park on a one-off
io watcher. It holds no state and never logs.
"""

from __future__ import annotations

import socket
import struct

import gevent

READ, WRITE = 1, 2  # libev event masks

# A refused client gets its reply, then a FIN; what it still sends is read and
# dropped for a moment, because closing a socket with unread bytes sends a reset
# that can overtake the reply in the client's kernel and discard it.
REPLY_SECONDS = 2.0  # to hand an error reply to a client before giving up on it
LINGER_SECONDS = 1.0  # after the reply, read and drop what the client still sends...
LINGER_BYTES = 65536  # ...up to this much

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset instead of a FIN
_LINGER_OFF = struct.pack("ii", 0, 0)  # the default: close() sends a FIN after the bytes still queued


def reset_on_close(sock: socket.socket, reset: bool = True) -> None:
    """Make the coming close of ``sock`` send a reset, or (``reset=False``) a FIN again.

    A stream the gateway cuts is cut with a reset, so that neither peer takes it
    for complete. A socket already gone (reset by its peer) gets its close alone.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET if reset else _LINGER_OFF)
    except OSError:
        pass


def arm_listener(listener: socket.socket) -> None:
    """Give a listener what each socket it accepts needs: no Nagle delay, and a reset on close until a relay ends
    gracefully. Linux passes both on to the accepted sockets: two setsockopt fewer per connection."""
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def arm_if_queued_before(sock: socket.socket) -> bool:
    """Arm an accepted socket as its listener would have: one whose handshake ended in the queue before the listener
    was armed (a socket handed over with clients waiting, workers arming after the supervisor's listen) came without.

    True if it came armed: the queue is first in, first out, so every later one did too.
    """
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(_LINGER_RESET)) == _LINGER_RESET:
        return True
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    return False


class TimedOut(Exception):
    """Raised by the timer of a deadline that a caller of ``sendall`` or ``wait`` set."""


def wait(sock: socket.socket, event: int) -> None:
    """Park this greenlet until ``sock`` is ready for ``event`` (READ or WRITE)."""
    hub = gevent.get_hub()
    watcher = hub.loop.io(sock.fileno(), event)
    try:
        hub.wait(watcher)
    finally:
        watcher.close()


def sendall(sock: socket.socket, data: bytes, timeout: float | None = None) -> None:
    """Send all of ``data``; if it has to wait, give up after ``timeout`` with TimedOut."""
    view = memoryview(data)
    deadline = None
    try:
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                if deadline is None and timeout is not None:
                    deadline = gevent.Timeout(timeout, TimedOut)
                    deadline.start()
                wait(sock, WRITE)
    finally:
        if deadline is not None:
            deadline.close()


def answer(client: socket.socket, reply: bytes, linger: bool = True) -> None:
    """Send a refused client its reply and a FIN, then read and drop what it still sends, so that closing does not
    reset the reply away.

    An empty reply is a clean close: the FIN alone. Without ``linger`` only the
    bytes already in are read, with no wait: what comes after the close may
    still reset the reply away. A client too slow to take the reply within
    REPLY_SECONDS gets the close alone; one that is gone, its close.
    """
    try:
        with gevent.Timeout(REPLY_SECONDS, False):
            sendall(client, reply)
            client.shutdown(socket.SHUT_WR)
            drained = 0
            with gevent.Timeout(LINGER_SECONDS, False):
                while drained < LINGER_BYTES:
                    try:
                        data = client.recv(LINGER_BYTES)
                    except BlockingIOError:
                        if not linger:
                            break
                        wait(client, READ)
                        continue
                    if not data:
                        break
                    drained += len(data)
    except OSError:
        pass
