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
import sys
import threading
import time

import pytest
from conftest import TIMEOUT, exchange, gateway_command, read_all
from test_kialog import Reader, journal_stream, pipe_size, small_pipe
from test_relaying import HEAD, RawBackend, recv_exactly


@pytest.mark.parametrize("reopen", ["/proc/self/fd/{}", "/nonexistent/{}"])  # Linux, and where /proc is not
def test_the_pipe_is_given_back_blocking_by_the_process_that_changed_it(reopen):
    """At exit, for whoever writes to the pipe next; but not at a worker's exit, under its supervisor."""
    r, w = os.pipe()
    script = f"""if True:
        import fcntl, os, kialog
        kialog._REOPEN = {reopen!r}
        log = kialog.Log()
        log.info("supervisor")
        pid = os.fork()
        if pid == 0:
            log.info("worker")
            log.close()
            os._exit(0)
        os.waitpid(pid, 0)
        print(bool(fcntl.fcntl(2, fcntl.F_GETFL) & os.O_NONBLOCK))
    """
    reader = Reader(r)
    reader.start()
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], stderr=w, stdout=subprocess.PIPE, timeout=TIMEOUT, check=True
        ).stdout
        assert out == b"True\n"  # non-blocking while serving, the worker's exit left it so
        assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK  # the supervisor's exit gave it back
    finally:
        lines = reader.finish(w)
        os.close(r)
    assert [line.split(" info ", 1)[1] for line in lines] == ["supervisor", "worker"]


def test_tracebacks_on_a_full_stderr_neither_raise_nor_block():
    """What Python itself writes to sys.stderr (gevent's tracebacks, warnings) takes the log's way out too."""
    r, w = small_pipe()
    script = f"""if True:
        import gevent, kialog, sys
        log = kialog.Log()
        for i in range({2 * pipe_size(r) // 100}):  # fill the pipe, nobody reads
            log.info("filler " + "x" * 100)
        gevent.spawn(lambda: 1 / 0).join()  # the hub prints the traceback to sys.stderr
        print("after", file=sys.stderr)
        print(log.lost, flush=True)
        sys.stdin.read()  # exit once the test reads stderr again
    """
    reader = Reader(r)  # reads only when told, or after TIMEOUT to end a write that blocks (and fail)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=w)
    try:
        started = time.monotonic()
        lost = proc.stdout.readline()
        assert time.monotonic() - started < TIMEOUT / 2, "writing blocked until the reader woke"
        assert lost == b"0\n"  # the queue held all of it
        reader.start()
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stdout.close()
        lines = reader.finish(w)
        os.close(r)
    assert "ZeroDivisionError" in "".join(lines)
    assert lines[-1] == "after"


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


def test_log_connections_false_leaves_connection_lines_out_and_a_reload_brings_them_back(tmp_path):
    """For journald's rate limit: connection lines are most of the log; start-up and errors stay."""
    toml = '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nlog_connections = {}\n[http_backends]\n'
    toml += '"a.example" = "127.0.0.1:9"\n'
    gw = LoggedGateway(tmp_path, toml.format("false"), "--log-format=json")
    try:
        address = gw.address(gw.read_lines(lambda lines: started(lines, "1")))
        assert exchange(address, b"GET / HTTP/1.1\r\nHost: one.example\r\n\r\n").startswith(b"HTTP/1.1 4")
        gw.config.write_text(toml.format("true"))
        gw.proc.send_signal(signal.SIGHUP)
        gw.read_lines(lambda lines: any('"config reloaded"' in line for line in lines))
        assert exchange(address, b"GET / HTTP/1.1\r\nHost: two.example\r\n\r\n").startswith(b"HTTP/1.1 4")
        gw.proc.send_signal(signal.SIGTERM)
        lines = [json.loads(line) for line in gw.read_lines(lambda lines: False)]  # to EOF
        assert gw.proc.wait(TIMEOUT) == 0
    finally:
        gw.close()
    assert [line["domain"] for line in lines if line["message"] == "connection"] == ["two.example"]
    assert lines[-1]["message"] == "stopped"


class Lines:
    """Reads an fd (a pipe's read end, a pty's master) in a thread, line by line, until EOF or ``close``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # a pty's master reads EIO once every slave is closed
                data = b""
            *whole, pending = (pending + data).split(b"\n")
            with self.changed:
                self.lines += [line.decode().rstrip("\r") for line in whole]
                self.changed.notify_all()
            if not data:
                return

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.lines), timeout), f"not seen: {self.lines[-5:]}"
            return list(self.lines)


NO_ROUTE = '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n[http_backends]\n"a.example" = "127.0.0.1:9"\n'


def listening_on(lines: list[str]) -> tuple[str, int]:
    listening = next(json.loads(line) for line in lines if '"listening for http"' in line)
    host, _, port = listening["address"].rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_suspended_terminal_never_stalls_serving(tmp_path, workers):
    """Ctrl-S (XOFF) on the terminal the gateway logs to: its blocking writes stopped every connection."""
    import pty
    import termios

    config = tmp_path / "servers.toml"
    config.write_text(NO_ROUTE)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*gateway_command(), "--log-format=json", f"--workers={workers}", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    lines = Lines(master)
    try:
        address = listening_on(lines.wait_for(lambda lines: started(lines, workers)))
        termios.tcflow(slave, termios.TCOOFF)  # what Ctrl-S does: the terminal takes no more output
        try:
            for i in range(20):  # a connection line each, every one waiting for the terminal
                with socket.create_connection(address, timeout=3.0) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
                    assert read_all(sock, 3.0).startswith(b"HTTP/1.1 421"), f"request {i}: the event loop is blocked"
        finally:
            termios.tcflow(slave, termios.TCOON)
        lines.wait_for(lambda lines: sum('"connection"' in line for line in lines) == 20)  # then written, whole
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        os.close(slave)
        lines.thread.join(TIMEOUT)
        os.close(master)
    for line in lines.lines:
        json.loads(line)  # every line whole


@pytest.mark.parametrize("upgrade", [False, True])
def test_the_callers_stderr_pipe_keeps_its_mode_while_serving_and_after(tmp_path, upgrade):
    """The pipe is shared with the shell, a tee, a container runtime: O_NONBLOCK there is theirs too.

    After an upgrade in place the new program found it set already and left it so at exit.
    """
    config = tmp_path / "servers.toml"
    config.write_text(NO_ROUTE)
    r, w = os.pipe()  # this test keeps the write end: it sees the flags of the description the gateway got

    def nonblocking() -> bool:
        return bool(fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK)

    proc = subprocess.Popen(
        [*gateway_command(), "--log-format=json", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=w,
    )
    lines = Lines(r)
    try:
        address = listening_on(lines.wait_for(lambda lines: started(lines, "1")))
        assert exchange(address, b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n").startswith(b"HTTP/1.1 421")
        lines.wait_for(lambda lines: any('"connection"' in line for line in lines))
        assert not nonblocking()
        if upgrade:
            proc.send_signal(signal.SIGUSR2)
            lines.wait_for(lambda lines: sum('"ready"' in line for line in lines) == 2)
            assert exchange(address, b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n").startswith(b"HTTP/1.1 421")
            assert not nonblocking()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        lines.wait_for(lambda lines: sum('"stopped"' in line for line in lines) == 1 + upgrade)
        assert not nonblocking()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        os.close(w)
        lines.thread.join(TIMEOUT)
        os.close(r)
