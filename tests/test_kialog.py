"""The operator log: a broken or slow stderr costs counted lines, never control flow; journald priorities.

The unit tests drive kialog.Log over real pipes; the end-to-end tests give the
gateway subprocess a pipe of our own as stderr, so that they can stop reading
it or close it, which conftest's Gateway (always reading) cannot.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import time

import pytest
from conftest import TIMEOUT, gateway_command, read_all
from test_relay import HEAD, RawBackend, recv_exactly

SMALL_PIPE = 4096  # the smallest pipe Linux allows: a few log lines fill it, so a test need not make thousands


def small_pipe() -> tuple[int, int]:
    """A pipe (read end, write end) made as small as the platform allows; its size is pipe_size(r)."""
    r, w = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux only; elsewhere the default size, and the tests write more
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    return r, w


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 65536


class LoggedGateway:
    """The gateway as a subprocess whose stderr is the write end of a pipe this test holds the read end of."""

    def __init__(self, tmp_path, toml: str, *args: str, env: dict | None = None, journal: bool = False) -> None:
        config = tmp_path / "servers.toml"
        config.write_text(toml)
        self.config = config
        self.r, w = small_pipe()
        if journal:  # as systemd says stderr is the journal's stream: its device and inode
            env = {**(env or {}), "JOURNAL_STREAM": journal_stream(w)}
        try:
            self.proc = subprocess.Popen(
                [*gateway_command(), *args, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=w,
                env={**os.environ, **(env or {})},
            )
        finally:
            os.close(w)
        self.pending = b""

    def read_lines(self, until, timeout: float = TIMEOUT) -> list[str]:
        """Read lines until ``until(lines)`` holds for those read so far (or EOF), within ``timeout``."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while not until(lines):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"log lines not seen within {timeout}s; got {lines[-5:]}"
            if not select.select([self.r], [], [], remaining)[0]:
                continue
            data = os.read(self.r, 65536)
            if not data:
                break
            *whole, self.pending = (self.pending + data).split(b"\n")
            lines += [line.decode() for line in whole]
        return lines

    def address(self, lines: list[str]) -> tuple[str, int]:
        listening = next(json.loads(line) for line in lines if '"listening for http"' in line)
        host, _, port = listening["address"].rpartition(":")
        return host, int(port)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        if self.r >= 0:
            os.close(self.r)
            self.r = -1


def journal_stream(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def started(lines: list[str], workers: str) -> bool:
    """Every process has said it serves: "ready", and "worker started" from each worker."""
    return any('"ready"' in line for line in lines) and (
        workers == "1" or sum('"worker started"' in line for line in lines) == int(workers)
    )


def wait_refused(address: tuple[str, int]) -> None:
    """Wait until the listener refuses connections: the stop has begun in every process."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=TIMEOUT).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    raise AssertionError(f"{address} still accepts {TIMEOUT}s after SIGTERM")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_with_stderr_reader_gone_still_drains_and_exits_0(tmp_path, workers):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        assert recv_exactly(conn, 3) == b"bye"
        conn.sendall(b"ok")

    be = RawBackend(backend)
    gw = LoggedGateway(
        tmp_path,
        f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n'
        f'[http_backends]\n"raw.example" = "{be.address}"\n',
        "--log-format=json",
        f"--workers={workers}",
    )
    try:
        address = gw.address(gw.read_lines(lambda lines: started(lines, workers)))
        os.close(gw.r)  # the reader is gone: every write to stderr now fails with EPIPE
        gw.r = -1
        with socket.create_connection(address, timeout=TIMEOUT) as sock:
            sock.sendall(HEAD)
            assert recv_exactly(sock, 5) == b"hello"
            gw.proc.send_signal(signal.SIGTERM)
            wait_refused(address)
            assert gw.proc.poll() is None, f"exited with {gw.proc.returncode} before the relay finished"
            sock.sendall(b"bye")
            assert read_all(sock) == b"ok"
        assert gw.proc.wait(TIMEOUT) == 0
        be.check()
    finally:
        be.close()
        gw.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stderr_reader_that_stops_reading_never_stalls_serving(tmp_path, workers):
    gw = LoggedGateway(
        tmp_path,
        '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n[http_backends]\n"a.example" = "127.0.0.1:9"\n',
        "--log-format=json",
        f"--workers={workers}",
    )
    try:
        address = gw.address(gw.read_lines(lambda lines: started(lines, workers)))
        # Stop reading. Each refused request logs a line of ~250 bytes: 4 pipe buffers' worth.
        requests = 4 * pipe_size(gw.r) // 250
        for _ in range(requests):
            with socket.create_connection(address, timeout=TIMEOUT) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
                assert read_all(sock).startswith(b"HTTP/1.1 4"), "no answer: the event loop is blocked"
        # Read again: the lines held back while the pipe was full come now, each whole.
        lines = gw.read_lines(lambda lines: sum('"connection"' in line for line in lines) == requests)
        for line in lines:
            assert json.loads(line)["message"] in ("connection", "worker started")
        gw.proc.send_signal(signal.SIGTERM)
        assert any('"stopped"' in line for line in gw.read_lines(lambda lines: False))
        assert gw.proc.wait(TIMEOUT) == 0
    finally:
        gw.close()


V01_CONFIG = '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n[backends]\n"a.example" = "127.0.0.1:9"\n'


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_under_journald_lines_start_with_their_priority(tmp_path, fmt):
    gw = LoggedGateway(tmp_path, V01_CONFIG, f"--log-format={fmt}", journal=True)
    try:
        lines = gw.read_lines(lambda lines: any("ready" in line for line in lines))
        gw.config.write_text("[gateway]\nbogus = 1\n")
        gw.proc.send_signal(signal.SIGHUP)
        lines += gw.read_lines(lambda lines: any("reload failed" in line for line in lines))
    finally:
        gw.close()
    prefixes = {}
    for line in lines:
        assert line[:1] == "<" and line[2:3] == ">", line
        # journald strips the prefix: what it keeps is the JSON object, or the text line
        level = json.loads(line[3:])["level"] if fmt == "json" else line[3:].split()[1]
        prefixes.setdefault(level, set()).add(line[:3])
    assert prefixes == {"info": {"<6>"}, "warning": {"<4>"}, "error": {"<3>"}}


def test_not_under_journald_lines_have_no_prefix(tmp_path):
    r, w = os.pipe()  # the variable names another stream (as a child of a unit with stderr redirected sees)
    other = journal_stream(w)
    os.close(r)
    os.close(w)
    gw = LoggedGateway(tmp_path, V01_CONFIG, "--log-format=text", env={"JOURNAL_STREAM": other})
    try:
        lines = gw.read_lines(lambda lines: any(" ready" in line for line in lines))
    finally:
        gw.close()
    assert " warning " in lines[0]
    assert not any(line.startswith("<") for line in lines), lines
