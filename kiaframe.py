"""Messages between our own processes: each one framed by its length, so that a cut one is told from a whole one.

Three pipes carry pickles one way or the other: the supervisor's lifelines
(configs to its workers, kiasupervisor.py), the loader child's answer
(kiareload.py) and the workers' metrics snapshots (kiametrics.py). A pipe or a
socket gives bytes as they come, in pieces of any size; ``frame`` puts the
length in front of a message and ``take`` hands back the messages whole once
every byte of them is in, leaving a partial one in the buffer for the next read.

Its own module because those three have nothing else in common (the metrics
need nothing of the reload, the loader nothing of the supervisor): written
once here, the framing cannot drift between them. It does no I/O and imports
nothing of the project's; what the messages hold is their senders' business.
"""

from __future__ import annotations

import struct

__all__ = ["HEADER", "frame", "take"]

HEADER = struct.Struct("!Q")  # the length of the message that follows: 8 bytes, network order (a big table's config)


def frame(message: bytes) -> bytes:
    """``message`` with its length in front, ready to write. An empty message frames as its header alone."""
    return HEADER.pack(len(message)) + message


def take(buffer: bytearray) -> list[bytes]:
    """The whole messages at the start of ``buffer``, in order, removed from it; a partial one stays there."""
    messages = []
    start = 0
    with memoryview(buffer) as view:  # one copy per message, however big; released before the buffer shrinks
        while len(view) - start >= HEADER.size:
            end = start + HEADER.size + HEADER.unpack_from(view, start)[0]
            if end > len(view):
                break
            messages.append(bytes(view[start + HEADER.size : end]))
            start = end
    del buffer[:start]
    return messages
