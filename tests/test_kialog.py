"""The operator log: a broken or slow stderr costs counted lines, never control flow; journald priorities.

The unit tests drive kialog.Log over real pipes; the end-to-end tests give the
gateway subprocess a pipe of our own as stderr, so that they can stop reading
it or close it, which conftest's Gateway (always reading) cannot.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

import gevent
import pytest
from conftest import TIMEOUT

import kialog
from kialog import Log

SMALL_PIPE = 4096  # the smallest pipe Linux allows: a few log lines fill it, so a test need not make thousands


def small_pipe() -> tuple[int, int]:
    """A pipe (read end, write end) made as small as the platform allows; its size is pipe_size(r)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    except (AttributeError, OSError):  # not Linux: the default size, which pipe_size() gives, and tests write more
        pass
    return r, w


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 65536


class Reader:
    """Reads a pipe or socket to EOF in a thread, once ``start()`` is called (or after TIMEOUT, to end a hang)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self.go = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.go.wait(TIMEOUT)
        while chunk := os.read(self.fd, 65536):
            self.data += chunk

    def start(self) -> None:
        self.go.set()

    def lines(self) -> list[str]:
        """The whole lines read so far."""
        return bytes(self.data).decode().split("\n")[:-1]

    def finish(self, *write_ends: int) -> list[str]:
        """Close the write ends, read to EOF, return the lines."""
        for fd in write_ends:
            os.close(fd)
        self.start()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        return self.lines()


CONNECTION = {
    "id": 1,
    "listener": "http",
    "client": "127.0.0.1:5",
    "domain": "a.example",
    "backend": "127.0.0.1:6",
    "outcome": "ok",
    "bytes_up": 1,
    "bytes_down": 2,
    "duration_ms": 3,
}


def test_lines_reach_a_pipe_whole_and_in_order():
    r, w = os.pipe()
    reader = Reader(r)
    log = Log("json", fd=w)
    log.info("one", n=1)
    for i in range(3):
        log.connection({**CONNECTION, "id": i})
    log.warning("two")  # the connection lines batched before it go first
    log.connection(CONNECTION)
    log.close()
    lines = [json.loads(line) for line in reader.finish(w)]
    os.close(r)
    assert [(line["message"], line.get("id")) for line in lines] == [
        ("one", None),
        ("connection", 0),
        ("connection", 1),
        ("connection", 2),
        ("two", None),
        ("connection", 1),
    ]
    assert log.lost == 0


def numbered(i: int) -> str:
    return f"line {i:07d} " + "x" * 80


def test_a_full_pipe_never_blocks_and_what_the_queue_cannot_hold_is_counted_lost():
    r, w = small_pipe()
    reader = Reader(r)  # not reading yet: after TIMEOUT it would, to end a write that blocks
    log = Log("text", fd=w)
    sent = (kialog.QUEUE_LIMIT + pipe_size(r)) // len(numbered(0)) + 1000
    started = time.monotonic()
    for i in range(sent):
        log.info(numbered(i))
    assert time.monotonic() - started < TIMEOUT / 2, "writing blocked until the reader woke"
    assert 1000 <= log.lost < sent
    lost = log.lost
    reader.start()
    log.close(TIMEOUT)  # waits for the reader to take the queue
    lines = reader.finish(w)
    os.close(r)
    assert [line.split(" info ", 1)[1] for line in lines[:-1]] == [numbered(i) for i in range(sent - lost)]
    assert lines[-1].endswith(f" warning log lines lost: the reader of stderr fell behind lost={lost}")


def test_the_event_loop_writes_the_queue_once_the_reader_is_back():
    r, w = small_pipe()
    reader = Reader(r)
    log = Log("text", fd=w)
    sent = 2 * pipe_size(r) // len(numbered(0))
    for i in range(sent):
        log.info(numbered(i))
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    while len(reader.lines()) < sent and time.monotonic() < deadline:
        gevent.sleep(0.01)  # the watcher on the pipe writes when the reader has made room
    assert len(reader.lines()) == sent
    log.close()
    assert reader.finish(w)[-1].endswith(numbered(sent - 1))
    os.close(r)
    assert log.lost == 0


def test_a_gone_reader_costs_counted_lines_never_an_exception():
    r, w = os.pipe()
    os.close(r)
    log = Log("text", fd=w)
    log.info("one")
    log.error("two")
    log.connection(CONNECTION)
    log.flush()
    log.close()
    os.close(w)
    assert log.lost == 3


def test_a_socket_keeps_its_mode_and_is_written_without_blocking():
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # full after a few lines
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = Reader(theirs.fileno())
    log = Log("text", fd=ours.fileno())
    sent = 1000
    started = time.monotonic()
    for i in range(sent):
        log.info(numbered(i))
    assert time.monotonic() - started < TIMEOUT / 2, "writing blocked until the reader woke"
    assert not fcntl.fcntl(ours.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # shared with other processes: untouched
    reader.start()
    log.close(TIMEOUT)
    ours.shutdown(socket.SHUT_WR)
    lines = reader.finish()
    ours.close()
    theirs.close()
    assert [line.split(" info ", 1)[1] for line in lines] == [numbered(i) for i in range(sent)]


def test_a_forked_worker_does_not_write_its_parents_queue_again():
    r, w = small_pipe()
    reader = Reader(r)
    log = Log("text", fd=w)
    sent = 2 * pipe_size(r) // len(numbered(0))  # the pipe is full and the queue holds the rest
    for i in range(sent):
        log.info(numbered(i))
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            gevent.reinit()
            log.info("child")
            log.close(TIMEOUT)
            code = 0
        finally:
            os._exit(code)
    reader.start()
    log.close(TIMEOUT)
    assert os.waitpid(pid, 0)[1] == 0
    lines = reader.finish(w)
    os.close(r)
    texts = [line.split(" info ", 1)[1] for line in lines]
    assert [text for text in texts if text != "child"] == [numbered(i) for i in range(sent)]
    assert texts.count("child") == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_journal_prefixes_in_both_formats_connection_lines_too(monkeypatch, fmt):
    r, w = os.pipe()
    reader = Reader(r)
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(w))
    log = Log(fmt, fd=w)
    log.error("e")
    log.warning("w")
    log.info("i")
    log.connection(CONNECTION)
    log.connection(CONNECTION)
    log.close()
    lines = reader.finish(w)
    os.close(r)
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<6>", "<6>"]
    if fmt == "json":
        assert [json.loads(line[3:])["message"] for line in lines] == ["e", "w", "i", "connection", "connection"]


def journal_stream(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_a_pools_tried_addresses_are_in_both_formats():
    fields = {**CONNECTION, "backend": "127.0.0.1:7", "tried": ["127.0.0.1:6", "127.0.0.1:7"], "reason": "x y"}
    r, w = os.pipe()
    reader = Reader(r)
    for fmt in ("text", "json"):
        log = Log(fmt, fd=w)
        log.connection(fields)
        log.close()
    text, line = reader.finish(w)
    os.close(r)
    assert " backend=127.0.0.1:7 " in text and text.endswith(' tried=127.0.0.1:6,127.0.0.1:7 reason="x y"')
    assert json.loads(line)["tried"] == ["127.0.0.1:6", "127.0.0.1:7"]


def test_a_trusted_proxys_address_is_in_both_formats_after_the_client():
    proxied = {"id": 1, "listener": "http", "client": "10.1.1.1:4000", "proxy": "127.0.0.1:5555", **CONNECTION}
    proxied["client"] = "10.1.1.1:4000"
    r, w = os.pipe()
    reader = Reader(r)
    for fmt in ("text", "json"):
        log = Log(fmt, fd=w)
        log.connection(proxied)
        log.connection(CONNECTION)  # not from a trusted proxy: no such field
        log.close()
    text, plain, line, plain_line = reader.finish(w)
    os.close(r)
    assert " client=10.1.1.1:4000 proxy=127.0.0.1:5555 domain=a.example " in text
    assert "proxy" not in plain
    assert list(json.loads(line))[3:7] == ["id", "listener", "client", "proxy"]
    assert json.loads(line)["proxy"] == "127.0.0.1:5555" and "proxy" not in json.loads(plain_line)
