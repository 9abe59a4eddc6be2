"""Small socket rules the data path shares, written once: event masks, how a close ends a stream, the reply's linger.

Its own module because three modules follow the same rules (kiagateway.py
answering a refused client from its greenlet, relay.py and kiastrict.py from
the event loop's callbacks), and a rule written in each of them drifts. It
holds no state and never logs.
"""

from __future__ import annotations

import socket
import struct

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
