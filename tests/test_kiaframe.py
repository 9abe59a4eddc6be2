"""Length-framed messages (kiaframe.py): whole messages out, partial ones kept, fed a byte at a time."""

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kiaframe


def test_a_frame_is_the_length_then_the_message():
    assert kiaframe.frame(b"abc") == b"\0\0\0\0\0\0\0\x03abc"
    assert kiaframe.frame(b"") == bytes(kiaframe.HEADER.size)  # the empty message: a header alone


def test_take_leaves_a_partial_message_in_the_buffer():
    buffer = bytearray(kiaframe.frame(b"one") + kiaframe.frame(b"") + kiaframe.frame(b"three")[:-1])
    assert kiaframe.take(buffer) == [b"one", b""]
    assert buffer == kiaframe.frame(b"three")[:-1]
    assert kiaframe.take(buffer) == []  # still not whole: nothing taken, nothing lost
    buffer += b"e"
    assert kiaframe.take(buffer) == [b"three"]
    assert buffer == b""


@pytest.mark.parametrize("kept", range(kiaframe.HEADER.size))
def test_a_partial_header_stays(kept):
    buffer = bytearray(kiaframe.frame(b"x")[:kept])
    assert kiaframe.take(buffer) == []
    assert len(buffer) == kept


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=64))
def test_any_cut_gives_back_the_messages_in_order(messages, piece):
    stream = b"".join(map(kiaframe.frame, messages))
    buffer = bytearray()
    taken = []
    for start in range(0, len(stream), piece):  # as a pipe or a socket would hand them over
        buffer += stream[start : start + piece]
        taken += kiaframe.take(buffer)
    assert taken == messages
    assert buffer == b""


def test_a_message_crosses_a_real_pipe_in_pieces():
    message = os.urandom(200_000)  # past a pipe's 64 KiB: the reader gets it in several reads
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        out = memoryview(kiaframe.frame(message))
        buffer = bytearray()
        taken = []
        while out or not taken:
            if out:
                try:
                    out = out[os.write(write_end, out) :]
                except BlockingIOError:
                    pass
            buffer += os.read(read_end, 1 << 16)
            taken += kiaframe.take(buffer)
        assert taken == [message]
    finally:
        os.close(read_end)
        os.close(write_end)
