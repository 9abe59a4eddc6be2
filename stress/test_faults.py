"""Backend faults: each gets the contract's answer, others keep being served, and descriptors return to baseline.

Each fault is tried through both listeners (the TLS one relays raw bytes after a real
ClientHello). Pooled pipes are descriptors: the baseline check covers them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import (
    TIMEOUT,
    assert_back_to_baseline,
    baseline,
    pick,
    record,
    reset,
    rss_kib,
    served,
    stress_toml,
    tracebacks,
    wait_until,
)
from hellos import real_hello

import relay

IDLE = 3.0  # idle_timeout of these gateways: longer than the slow backend's 1 s gaps, short enough to wait for
EXTRA = f"idle_timeout = {IDLE}\nconnect_timeout = 2.0"
LISTENERS = ("http", "https")


def head(listener: str, name: str) -> bytes:
    return real_hello(name) if listener == "https" else f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()


def read_to_end(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[str, bytes]:
    """How the stream ended ('eof', 'reset' or 'timeout') and what came before."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return "eof", bytes(data)
            data += chunk
    except ConnectionResetError:
        return "reset", bytes(data)
    except socket.timeout:
        return "timeout", bytes(data)


def gateway_for(start_gateway, backends, name: str, address: str):
    gw = start_gateway(stress_toml(backends, {name: address}, {name: address}, EXTRA))
    pids, before = baseline(gw)
    return gw, pids, before


def finish(gw, pids, before, scenario: str) -> None:
    """Others are served, descriptors come back, the log holds no traceback."""
    assert served(gw)
    now = assert_back_to_baseline(pids, before)
    assert not tracebacks(gw), tracebacks(gw)[:3]
    record(
        scenario,
        "sockets / pipes after, baseline",
        f"{now['socket']}/{now['pipe']}, {before['socket']}/{before['pipe']}",
    )


def test_backend_refuses(start_gateway, backends) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: connect is refused
        gw, pids, before = gateway_for(start_gateway, backends, "f.example", closed)
        for listener in LISTENERS:
            with socket.create_connection(getattr(gw, listener), timeout=TIMEOUT) as sock:
                sock.sendall(head(listener, "f.example"))
                how, data = read_to_end(sock)
            assert how == "eof"
            if listener == "http":
                assert data.startswith(b"HTTP/1.1 502 ")
            else:
                assert data == bytes((21, 3, 3, 0, 2, 2, 80))  # alert internal_error
    finish(gw, pids, before, "backend refuses")


def test_backend_resets_mid_stream(start_gateway, backends, raw_backend) -> None:
    def send_then_reset(sock: socket.socket) -> None:
        sock.recv(65536)
        sock.sendall(os.urandom(256 * 1024))
        reset(sock)

    backend = raw_backend(send_then_reset)
    gw, pids, before = gateway_for(start_gateway, backends, "f.example", backend.address)
    for listener in LISTENERS:
        with socket.create_connection(getattr(gw, listener), timeout=TIMEOUT) as sock:
            sock.sendall(head(listener, "f.example"))
            how, _ = read_to_end(sock)
        assert how == "reset", f"{listener}: the client saw {how}, not a reset"
        gw.connection_log(listener=listener, outcome="backend_reset")
    finish(gw, pids, before, "backend resets mid-stream")


def test_backend_never_answers(start_gateway, backends, raw_backend) -> None:
    backend = raw_backend(lambda sock: read_to_end(sock, TIMEOUT * 3))
    gw, pids, before = gateway_for(start_gateway, backends, "f.example", backend.address)
    waited = []
    for listener in LISTENERS:
        with socket.create_connection(getattr(gw, listener), timeout=TIMEOUT) as sock:
            sock.sendall(head(listener, "f.example"))
            started = time.monotonic()
            how, data = read_to_end(sock, IDLE + TIMEOUT)
            waited.append(time.monotonic() - started)
        assert how in ("eof", "reset") and data == b"", how
        assert IDLE * (1 - 1 / relay.IDLE_LOOKS) <= waited[-1] <= IDLE + TIMEOUT  # the timer may look a period early
        gw.connection_log(listener=listener, outcome="idle_timeout")
    record("backend never answers", f"client closed after (idle_timeout {IDLE:g} s)", f"{max(waited):.2f} s")
    finish(gw, pids, before, "backend never answers")


def test_backend_answers_a_byte_a_second(start_gateway, backends, raw_backend) -> None:
    count = pick(3, 8)

    def trickle(sock: socket.socket) -> None:
        sock.recv(65536)
        for _ in range(count):
            sock.sendall(b"x")
            time.sleep(1.0)  # the backend's pace, the scenario itself
        sock.shutdown(socket.SHUT_WR)
        read_to_end(sock)

    backend = raw_backend(trickle)
    gw, pids, before = gateway_for(start_gateway, backends, "f.example", backend.address)
    socks = {listener: socket.create_connection(getattr(gw, listener), timeout=TIMEOUT) for listener in LISTENERS}
    try:
        for listener, sock in socks.items():
            sock.sendall(head(listener, "f.example"))
        results = {listener: read_to_end(sock, count + TIMEOUT) for listener, sock in socks.items()}
    finally:
        for sock in socks.values():
            sock.close()
    for listener in LISTENERS:
        assert results[listener] == ("eof", b"x" * count), results[listener]
        gw.connection_log(listener=listener, outcome="ok", bytes_down=count)
    finish(gw, pids, before, "backend answers a byte a second")


def test_backend_closes_its_write_side_early(start_gateway, backends, raw_backend) -> None:
    size = pick(4, 64) * 1024 * 1024
    received: list[str] = []

    def early_close(sock: socket.socket) -> None:
        sock.sendall(b"early answer")
        sock.shutdown(socket.SHUT_WR)
        digest = hashlib.sha256()
        while True:
            data = sock.recv(262144)
            if not data:
                break
            digest.update(data)
        received.append(digest.hexdigest())

    backend = raw_backend(early_close)
    gw, pids, before = gateway_for(start_gateway, backends, "f.example", backend.address)
    sent = []
    for listener in LISTENERS:
        with socket.create_connection(getattr(gw, listener), timeout=TIMEOUT) as sock:
            first = head(listener, "f.example")
            sock.sendall(first)
            assert read_to_end(sock) == ("eof", b"early answer")
            body = os.urandom(size)
            sock.sendall(body)  # after the backend's FIN: the other direction keeps flowing
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == ("eof", b"")
            sent.append(hashlib.sha256(first + body).hexdigest())
        gw.connection_log(listener=listener, outcome="ok")
    assert wait_until(lambda: len(received) == 2)
    assert sorted(received) == sorted(sent)
    finish(gw, pids, before, "backend closes its write side early")


def test_backend_stops_reading(start_gateway, backends, raw_backend) -> None:
    """The client pushes an upload the backend never reads: the gateway's memory stays bounded."""
    upload = pick(128, 1024) * 1024 * 1024
    release = threading.Event()

    def never_read(sock: socket.socket) -> None:
        sock.recv(1)
        release.wait(TIMEOUT * 6)

    backend = raw_backend(never_read)
    gw, pids, before = gateway_for(start_gateway, backends, "f.example", backend.address)
    rss_before = rss_kib(pids)
    peak = rss_before
    pushed = {}
    block = os.urandom(1024 * 1024)
    try:
        for listener in LISTENERS:
            sock = socket.create_connection(getattr(gw, listener), timeout=TIMEOUT)
            sock.sendall(head(listener, "f.example"))
            sock.setblocking(False)
            total, last_progress = 0, time.monotonic()
            while total < upload and time.monotonic() - last_progress < 2.0:  # 2 s without progress: stalled
                try:
                    total += sock.send(block)
                    last_progress = time.monotonic()
                except BlockingIOError:
                    peak = max(peak, rss_kib(pids))
                    time.sleep(0.01)  # waiting for the gateway to take more; a poll of the upload
            peak = max(peak, rss_kib(pids))
            pushed[listener] = total
            assert total < upload, "an upload nobody reads went through whole"
            assert served(gw)  # served while the stalled upload is held
            reset(sock)
    finally:
        release.set()
    growth = (peak - rss_before) / 1024
    assert growth < 64, f"the gateway grew by {growth:.0f} MiB holding a stalled upload"
    record(
        "backend stops reading",
        f"{upload >> 20} MiB upload: taken before it stalled, http / tls",
        f"{pushed['http'] / 2**20:.1f} / {pushed['https'] / 2**20:.1f} MiB",
    )
    record("backend stops reading", "gateway peak RSS (growth)", f"{peak / 1024:.1f} MiB ({growth:+.1f} MiB)")
    finish(gw, pids, before, "backend stops reading")


KILLABLE = """
import socket, sys, threading
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
def serve(sock):
    block = b"y" * 65536
    while True:
        sock.sendall(block)  # it never reads: the client's bytes wait unread, so its death resets
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def test_backend_killed_mid_transfer(start_gateway, backends) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        port = int(proc.stdout.readline())
        gw, pids, before = gateway_for(start_gateway, backends, "f.example", f"127.0.0.1:{port}")
        socks = {listener: socket.create_connection(getattr(gw, listener), timeout=TIMEOUT) for listener in LISTENERS}
        for listener, sock in socks.items():
            sock.sendall(head(listener, "f.example") + b"z" * 65536)
            got = 0
            while got < 1024 * 1024:
                got += len(sock.recv(65536))
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        for listener, sock in socks.items():
            with sock:
                how, _ = read_to_end(sock)
            assert how == "reset", f"{listener}: the client saw {how}, not a reset"
            gw.connection_log(listener=listener, outcome="backend_reset")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stdout.close()
    finish(gw, pids, before, "backend killed (kill -9) mid-transfer")
