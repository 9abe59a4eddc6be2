"""The relay through the gateway: bulk both ways, half-close, idle timeout, resets, urgent data, clock steps, pipes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from conftest import TIMEOUT, read_all

HEAD = b"GET /stream HTTP/1.1\r\nHost: raw.example\r\n\r\n"
HAVE_SPLICE_HERE = sys.platform.startswith("linux") and hasattr(os, "splice")


class RawBackend:
    """A TCP server on 127.0.0.1:0 that runs ``handler(conn)`` for each connection in a thread."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(TIMEOUT)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
            with conn:
                conn.settimeout(TIMEOUT * 3)
                self.handler(conn)
        except BaseException as exc:  # reported by the test through .check()
            self.errors.append(exc)
        finally:
            self.done.set()

    def check(self) -> None:
        assert self.done.wait(TIMEOUT * 3), "backend handler did not finish"
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self.server.close()
        self.thread.join(TIMEOUT)


@pytest.fixture(params=["splice", "copy"])
def raw_gateway(start_gateway, request):
    """Start a gateway routing raw.example (HTTP) to a RawBackend running ``handler``.

    Every relay test runs twice: with the splice path and with the recv/send copy path.
    """
    base_env = {"KIAGATEWAY_NO_SPLICE": "1"} if request.param == "copy" else {}
    made = []

    def start(handler, extra: str = "", env: dict | None = None):
        backend = RawBackend(handler)
        made.append(backend)
        gw = start_gateway(
            f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n{extra}\n'
            f'[http_backends]\n"raw.example" = "{backend.address}"\n',
            env={**base_env, **(env or {})},
        )
        return gw, backend

    yield start
    for backend in made:
        backend.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(65536, n - len(data)))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def stream_both_ways(sock: socket.socket, outgoing: bytes, incoming_size: int) -> str:
    """Send ``outgoing`` while receiving ``incoming_size`` bytes; return the sha256 of what came in."""
    digest = hashlib.sha256()
    sender = threading.Thread(target=sock.sendall, args=(outgoing,), daemon=True)
    sender.start()
    received = 0
    while received < incoming_size:
        chunk = sock.recv(1 << 20)
        assert chunk, f"EOF after {received} of {incoming_size} bytes"
        digest.update(chunk)
        received += len(chunk)
    sender.join(TIMEOUT * 3)
    assert not sender.is_alive()
    return digest.hexdigest()


SIZE = 32 << 20


def test_32_mib_each_way_at_once(raw_gateway):
    up, down = os.urandom(SIZE), os.urandom(SIZE)
    seen = {}

    def backend(conn):
        assert recv_exactly(conn, len(HEAD)) == HEAD
        seen["up"] = stream_both_ways(conn, down, SIZE)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""

    gw, be = raw_gateway(backend)
    with socket.create_connection(gw.http, timeout=TIMEOUT * 3) as sock:
        sock.sendall(HEAD)
        got_down = stream_both_ways(sock, up, SIZE)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    be.check()
    assert seen["up"] == hashlib.sha256(up).hexdigest()
    assert got_down == hashlib.sha256(down).hexdigest()
    line = gw.connection_log(domain="raw.example")
    assert (line["outcome"], line["bytes_up"], line["bytes_down"]) == ("ok", len(HEAD) + SIZE, SIZE)


def test_client_half_close_keeps_the_answer_flowing(raw_gateway):
    def backend(conn):
        request = read_all(conn)  # only ends when the client's EOF came through
        conn.sendall(b"got " + str(len(request)).encode())
        time.sleep(0.1)  # the answer is written after EOF, in two pieces
        conn.sendall(b" bytes")

    gw, be = raw_gateway(backend)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD + b"payload")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"got %d bytes" % (len(HEAD) + 7)
    be.check()
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


def test_backend_half_close_keeps_the_upload_flowing(raw_gateway):
    def backend(conn):
        assert recv_exactly(conn, len(HEAD)) == HEAD
        conn.sendall(b"send me more")
        conn.shutdown(socket.SHUT_WR)
        assert read_all(conn) == b"more" * 1000

    gw, be = raw_gateway(backend)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        assert read_all(sock) == b"send me more"  # EOF from the backend reached us
        sock.sendall(b"more" * 1000)  # and our direction still works
        sock.shutdown(socket.SHUT_WR)
    be.check()


def test_idle_timeout_counts_silence_not_total_time(raw_gateway):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        for _ in range(10):  # 2.5 s of trickle, longer than the 1 s idle timeout
            conn.sendall(b".")
            time.sleep(0.25)
        assert conn.recv(1) == b""  # then silence: the gateway closes us

    gw, be = raw_gateway(backend, extra="idle_timeout = 1.0")
    started = time.monotonic()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        assert read_all(sock) == b"." * 10
    elapsed = time.monotonic() - started
    assert 3.0 < elapsed < 6.0
    be.check()
    line = gw.connection_log(domain="raw.example")
    assert line["outcome"] == "idle_timeout"
    assert line["bytes_down"] == 10


def test_backend_reset_is_passed_on(raw_gateway):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"partial")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    gw, be = raw_gateway(backend)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        assert recv_exactly(sock, 7) == b"partial"
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    be.check()
    assert gw.connection_log(domain="raw.example")["outcome"] == "backend_reset"


def test_client_reset_is_passed_on(raw_gateway):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while conn.recv(65536):
                pass

    gw, be = raw_gateway(backend)
    sock = socket.create_connection(gw.http, timeout=TIMEOUT)
    sock.sendall(HEAD)
    assert recv_exactly(sock, 5) == b"hello"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    be.check()
    assert gw.connection_log(domain="raw.example")["outcome"] == "client_reset"


def test_a_killed_gateway_resets_its_relays(raw_gateway):
    """kill -9 (the OOM killer) runs no code of ours: the kernel closes the relay's sockets, and a close
    with SO_LINGER 0 is a reset, so neither peer takes a cut stream for a complete one."""
    backend_end = []

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        try:
            while conn.recv(65536):
                pass
            backend_end.append("eof")
        except ConnectionResetError:
            backend_end.append("reset")

    gw, be = raw_gateway(backend)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        assert recv_exactly(sock, 5) == b"hello"
        gw.proc.kill()
        gw.proc.wait(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            sock.recv(65536)
    be.check()
    assert backend_end == ["reset"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_comes_first(start_gateway, version):
    seen = {}

    def backend(conn):
        expected_len = 0
        if version == "v1":
            header = b""
            while not header.endswith(b"\r\n"):
                header += conn.recv(1)
            seen["header"] = header
        else:
            fixed = recv_exactly(conn, 16)
            expected_len = struct.unpack("!H", fixed[14:16])[0]
            seen["header"] = fixed + recv_exactly(conn, expected_len)
        seen["rest"] = recv_exactly(conn, len(HEAD))
        conn.sendall(b"ok")

    be = RawBackend(backend)
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n[http_backends]\n'
            f'"raw.example" = {{ address = "{be.address}", proxy_protocol = "{version}" }}\n'
        )
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(HEAD)
            assert recv_exactly(sock, 2) == b"ok"
            client_port = sock.getsockname()[1]
        be.check()
    finally:
        be.close()
    gw_port = gw.http[1]
    if version == "v1":
        assert seen["header"] == f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {gw_port}\r\n".encode()
    else:
        assert seen["header"][:12] == b"\r\n\r\n\x00\r\nQUIT\n"
        assert seen["header"][12:16] == b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 address bytes
        assert seen["header"][16:] == socket.inet_aton("127.0.0.1") * 2 + struct.pack("!HH", client_port, gw_port)
    assert seen["rest"] == HEAD


def slow_read(sock: socket.socket, n: int) -> str:
    """Read ``n`` bytes 2 KiB at a time and return their sha256."""
    digest, got = hashlib.sha256(), 0
    while got < n:
        chunk = sock.recv(2048)
        assert chunk, f"EOF after {got} of {n} bytes"
        digest.update(chunk)
        got += len(chunk)
    return digest.hexdigest()


def small_buffer_connection(address) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT * 3)
    sock.connect(address)
    return sock


def test_slow_readers_get_every_byte_in_order(raw_gateway):
    """Backpressure both ways: the gateway stops reading while the other side is full."""
    size = 4 << 20
    up, down = os.urandom(size), os.urandom(size)
    seen = {}

    def backend(conn):
        assert recv_exactly(conn, len(HEAD)) == HEAD
        conn.sendall(down)  # the client reads slowly: this waits on the gateway's backpressure
        seen["up"] = slow_read(conn, size)

    gw, be = raw_gateway(backend)
    with small_buffer_connection(gw.http) as sock:
        sock.sendall(HEAD)
        assert slow_read(sock, size) == hashlib.sha256(down).hexdigest()
        sock.sendall(up)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    be.check()
    assert seen["up"] == hashlib.sha256(up).hexdigest()


def test_eof_waits_for_the_bytes_still_in_flight(raw_gateway):
    """A backend that writes a lot and closes at once: the client still gets all of it, then EOF."""
    down = os.urandom(4 << 20)

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(down)

    gw, be = raw_gateway(backend)
    with small_buffer_connection(gw.http) as sock:
        sock.sendall(HEAD)
        assert slow_read(sock, len(down)) == hashlib.sha256(down).hexdigest()
        assert read_all(sock) == b""
    be.check()
    line = gw.connection_log(domain="raw.example")
    assert (line["outcome"], line["bytes_down"]) == ("ok", len(down))


def test_a_slow_steady_reader_is_not_idle(raw_gateway):
    """Bytes a slow client takes count as activity: a long download is never cut by idle_timeout."""
    down = os.urandom(1 << 20)

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(down)

    gw, be = raw_gateway(backend, extra="idle_timeout = 1.0")
    started = time.monotonic()
    with small_buffer_connection(gw.http) as sock:
        sock.sendall(HEAD)
        digest, got = hashlib.sha256(), 0
        while got < len(down):
            chunk = sock.recv(65536)
            assert chunk, f"cut off after {got} bytes"
            digest.update(chunk)
            got += len(chunk)
            time.sleep(0.008)  # a slow client: the whole download takes longer than idle_timeout
        assert digest.hexdigest() == hashlib.sha256(down).hexdigest()
    assert time.monotonic() - started > 1.0
    be.check()
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to read the gateway's CPU time")
def test_urgent_data_neither_spins_nor_loses_bytes(raw_gateway):
    """An MSG_OOB byte on a direction that splices: the bytes after it still arrive, without a busy loop.

    The contract: the urgent byte is not part of the stream (a plain recv, without
    SO_OOBINLINE, steps over it), every other byte arrives in order. (A strict
    request body: tests/behaviour/test_strict.py.)
    """
    before, after = os.urandom(1 << 20), os.urandom(256 << 10)
    head = b"POST /up HTTP/1.1\r\nHost: raw.example\r\nContent-Length: %d\r\n\r\n" % (len(before) + len(after))
    expected = head + before + after
    got = {}
    arrived = threading.Event()

    def backend(conn):
        digest, n = hashlib.sha256(), 0
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            n += len(chunk)
            if n >= len(expected):
                arrived.set()
        got["size"], got["sha"] = n, digest.hexdigest()

    gw, be = raw_gateway(backend)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(head + before)
        cpu = cpu_seconds(gw.proc.pid)
        sock.send(b"!", socket.MSG_OOB)
        sock.sendall(after)
        arrived.wait(2.0)  # the half-close must not be what ends a stuck direction
        spent = cpu_seconds(gw.proc.pid) - cpu
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    be.check()
    assert spent < 1.0, f"the gateway used {spent:.2f}s of CPU for 256 KiB"
    assert (got["size"], got["sha"]) == (len(expected), hashlib.sha256(expected).hexdigest())
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


def test_a_client_that_never_reads_is_cut_after_one_idle_timeout(raw_gateway):
    """A zero-window client: the first expiry judges, with a reset, not a second period later."""
    seen = {}

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        try:
            conn.sendall(bytes(64 << 20))  # far more than the buffers hold: it stops when they are full
        except OSError as exc:  # the gateway's reset ends it
            seen["error"] = exc

    gw, be = raw_gateway(backend, extra="idle_timeout = 1.0")
    with small_buffer_connection(gw.http) as sock:
        sock.sendall(HEAD)
        line = gw.connection_log(domain="raw.example")
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
    be.check()
    assert isinstance(seen.get("error"), ConnectionResetError)
    assert line["outcome"] == "idle_timeout"
    assert 1000 <= line["duration_ms"] < 1800, line


@pytest.fixture
def clock_shift(tmp_path):
    """(env, step): env makes a gateway's wall clock follow step(seconds), through an LD_PRELOAD shim."""
    cc = shutil.which("cc")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs cc and Linux's LD_PRELOAD to shift a process's wall clock")
    shim, offset = tmp_path / "clockshift.so", tmp_path / "clockshift"
    source = os.path.join(os.path.dirname(os.path.dirname(__file__)), "clockshift.c")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), source, "-ldl"], check=True, timeout=TIMEOUT * 3)
    offset.write_text("0")
    return {"LD_PRELOAD": str(shim), "CLOCKSHIFT_FILE": str(offset)}, lambda seconds: offset.write_text(str(seconds))


def test_a_wall_clock_step_forward_cuts_no_active_relay(raw_gateway, clock_shift):
    """+30 s on the wall clock between two bytes of a relay that is never 2 s idle: it stays up."""
    env, step = clock_shift
    first, second = threading.Event(), threading.Event()

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        started = time.monotonic()
        time.sleep(1.0)
        conn.sendall(bytes(1 << 20))  # big enough for the splice path to take it
        assert first.wait(TIMEOUT)  # the test has stepped the clock: the idle timer fires at +2 s
        time.sleep(max(0.0, started + 2.5 - time.monotonic()))
        conn.sendall(b"more")
        assert second.wait(TIMEOUT)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""

    gw, be = raw_gateway(backend, extra="idle_timeout = 2.0", env=env)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        recv_exactly(sock, 1 << 20)
        step(30)
        first.set()
        assert recv_exactly(sock, 4) == b"more"
        second.set()
        assert read_all(sock) == b""
    be.check()
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


def test_a_wall_clock_step_back_keeps_no_idle_relay(raw_gateway, clock_shift):
    """-20 s on the wall clock of an idle relay: it is still cut after 1 s of silence, not 21 s."""
    env, step = clock_shift

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        assert conn.recv(1) == b""

    gw, be = raw_gateway(backend, extra="idle_timeout = 1.0", env=env)
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        assert recv_exactly(sock, 5) == b"hello"
        step(-20)
        assert read_all(sock, timeout=TIMEOUT) == b""
    be.check()
    line = gw.connection_log(domain="raw.example")
    assert line["outcome"] == "idle_timeout"
    assert line["duration_ms"] < 4000, line


class BulkBackend:
    """Accepts ``count`` connections on 127.0.0.1:0; sends ``blob`` down each, reporting progress."""

    def __init__(self, count: int, blob: bytes) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(TIMEOUT)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.blob, self.count = blob, count
        self.sent = [0] * count
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _serve(self, i: int) -> None:
        try:
            conn, _ = self.server.accept()
            with conn:
                conn.settimeout(TIMEOUT * 3)
                recv_exactly(conn, len(HEAD))
                view = memoryview(self.blob)
                while self.sent[i] < len(view):
                    self.sent[i] += conn.send(view[self.sent[i] : self.sent[i] + (256 << 10)])
        except BaseException as exc:  # reported by check()
            self.errors.append(exc)

    def wait_sent(self, at_least: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while min(self.sent) < at_least and not self.errors:
            assert time.monotonic() < deadline, f"backends sent only {self.sent}"
            time.sleep(0.01)

    def check(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT * 3)
        self.server.close()
        if self.errors:
            raise self.errors[0]


def gateway_pipes(pid: int) -> dict[str, int]:
    """The gateway's pipes: {pipe inode: one of its fds}, from /proc/PID/fd."""
    pipes = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if link.startswith("pipe:"):
            pipes[link] = int(fd)
    return pipes


def download_all(gw, backend: BulkBackend, sockets: list, sample) -> None:
    """Every client gets the whole blob, while ``sample()`` runs before, during and after."""
    for sock in sockets:
        sock.sendall(HEAD)
    backend.wait_sent(2 << 20)  # the clients read nothing yet: the gateway holds what is in flight
    sample()
    expected = hashlib.sha256(backend.blob).hexdigest()
    for sock in sockets:
        assert slow_read(sock, len(backend.blob)) == expected
        sample()
    backend.check()


@pytest.mark.skipif(not HAVE_SPLICE_HERE, reason="pipes are used only where the gateway splices")
def test_pipes_stay_within_the_cap(start_gateway):
    """KIAGATEWAY_MAX_PIPES=2: six downloads at once hold no more than 2 pipes, the rest copy."""
    count, cap = 6, 2
    backend = BulkBackend(count, os.urandom(4 << 20))
    gw = start_gateway(
        f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n'
        f'[http_backends]\n"raw.example" = "{backend.address}"\n',
        env={"KIAGATEWAY_MAX_PIPES": str(cap)},
    )
    baseline = gateway_pipes(gw.proc.pid)
    most = [0]

    def sample():
        most[0] = max(most[0], len(set(gateway_pipes(gw.proc.pid)) - set(baseline)))

    sockets = [socket.create_connection(gw.http, timeout=TIMEOUT * 3) for _ in range(count)]
    try:
        download_all(gw, backend, sockets, sample)
    finally:
        for sock in sockets:
            sock.close()
    assert 0 < most[0] <= cap, f"{most[0]} pipes open with a cap of {cap}"


@contextlib.contextmanager
def pipe_quota_spent(user: pwd.struct_passwd, room: int):
    """A process of ``user`` that holds 1 MiB pipes until the user's pipe quota leaves room for ``room`` more."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child uses nothing but os calls, then _exit
        status = 1
        try:
            os.close(ready_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            pipes = []
            while len(pipes) < 4096:
                r, w = os.pipe()
                try:
                    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
                except PermissionError:  # the quota is spent
                    os.close(r)
                    os.close(w)
                    break
                pipes.append((r, w))
            for r, w in pipes[:room]:
                os.close(r)
                os.close(w)
            os.write(ready_w, str(len(pipes)).encode())
            os.read(hold_r, 1)  # until the parent closes its end
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(hold_r)
    try:
        filled = os.read(ready_r, 32)
        assert filled and int(filled) > room, f"the pipe quota of {user.pw_name} could not be filled"
        yield
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def pipe_size(pid: int, fd: int) -> int:
    """F_GETPIPE_SZ of another process's pipe, opened anew through /proc."""
    with open(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as pipe:
        return fcntl.fcntl(pipe.fileno(), 1032)  # F_GETPIPE_SZ


@pytest.mark.skipif(not HAVE_SPLICE_HERE or os.geteuid() != 0, reason="needs Linux's splice and root to run as nobody")
def test_an_unprivileged_gateway_never_splices_through_a_small_pipe(start_gateway, searchable_dir):
    """Another process of the user left room for 2 pipes in its quota: all bytes arrive, through full pipes only."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    with pipe_quota_spent(nobody, room=2):
        count = 6
        backend = BulkBackend(count, os.urandom(4 << 20))
        gw = start_gateway(
            f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nuser = "nobody"\n'
            f'[http_backends]\n"raw.example" = "{backend.address}"\n',
            under=searchable_dir,
        )
        baseline = gateway_pipes(gw.proc.pid)
        sizes = {}

        def sample():
            for name, fd in gateway_pipes(gw.proc.pid).items():
                if name not in baseline:
                    try:
                        sizes[name] = pipe_size(gw.proc.pid, fd)
                    except FileNotFoundError:  # closed meanwhile
                        pass

        sockets = [socket.create_connection(gw.http, timeout=TIMEOUT * 3) for _ in range(count)]
        try:
            download_all(gw, backend, sockets, sample)
        finally:
            for sock in sockets:
                sock.close()
        assert all(size >= 1 << 20 for size in sizes.values()), f"pipe sizes: {sorted(sizes.values())}"


def skmem(local: tuple, peer: tuple) -> dict[str, int]:
    """The kernel memory of the TCP socket local -> peer as ``ss -tmn`` shows it (r: receive queue,
    w: send queue, rb/tb: the sizes they may grow to, in bytes); {} when ss finds no such socket."""
    out = subprocess.run(
        ["ss", "-tmnH", "src", f"{local[0]}:{local[1]}", "dst", f"{peer[0]}:{peer[1]}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    found = re.search(r"skmem:\(([^)]*)\)", out)
    return {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", found.group(1))} if found else {}


@pytest.mark.skipif(shutil.which("ss") is None or not sys.platform.startswith("linux"), reason="needs Linux's ss")
def test_a_client_that_never_reads_pins_little_in_the_gateway(raw_gateway):
    """A backend sends 64 MiB to a client that reads nothing: once every buffer on the way is
    full, the gateway's client-facing socket holds about NOTSENT_LOWAT (2 MiB: 2.1 MB measured),
    not its whole autotuned send buffer (tcp_wmem's max, 4 MiB: 3.9 MB measured without it)."""
    progress = {"sent": 0}

    def backend(conn):
        progress["gateway"] = conn.getpeername()
        recv_exactly(conn, len(HEAD))
        chunk = bytes(256 << 10)
        try:
            while progress["sent"] < 64 << 20:
                progress["sent"] += conn.send(chunk)
        except OSError:  # the client's close ends it
            pass

    gw, be = raw_gateway(backend, extra="idle_timeout = 60")
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(HEAD)
        deadline = time.monotonic() + TIMEOUT * 2
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 1.0:  # no send for a second: all the buffers are full
            assert time.monotonic() < deadline, f"the backend still sends after {progress['sent']} bytes"
            if progress["sent"] != last:
                last, since = progress["sent"], time.monotonic()
            time.sleep(0.02)
        client_side = skmem(gw.http, sock.getsockname())
        backend_side = skmem(progress["gateway"], be.server.getsockname())
    be.check()
    assert client_side and backend_side, "ss shows no socket of this relay"
    # The low-water mark plus a few segments' overhead; the send buffer alone would allow 4 MiB.
    assert client_side["w"] < 3 << 20, (client_side, backend_side)
    assert progress["sent"] < 64 << 20, "a client that reads nothing took everything"
