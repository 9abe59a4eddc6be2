"""Integrity: many connections each moving MiBs both ways at once arrive whole and in order (sha256 at both ends).

Half of them go through the HTTP listener, half through the TLS listener: after a real
ClientHello the gateway relays bytes it never decrypts, so raw bytes after the hello test
the TLS relay the same way a TLS session would. Each stream is built from a random block
read at a different offset per chunk, so a lost, repeated or reordered chunk changes the hash.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import pytest
from conftest import (
    TIMEOUT,
    assert_back_to_baseline,
    baseline,
    fds,
    pick,
    record,
    rss_kib,
    stress_toml,
    tracebacks,
    wait_until,
)
from hellos import real_hello

CHUNK = 256 * 1024  # one send: large enough that the gateway's reads fill its 64 KiB chunks and splice
BLOCK = random.Random(13).randbytes(4 * 1024 * 1024)  # streams are windows onto it; random: no period to hide a slip


def chunks(seed: int, total: int):
    """``total`` bytes of the stream named ``seed``, as memoryviews (no copy)."""
    view = memoryview(BLOCK)
    sent, k = 0, 0
    while sent < total:
        size = min(CHUNK, total - sent)
        offset = (seed * 7919 + k * 4099) % (len(BLOCK) - CHUNK)
        yield view[offset : offset + size]
        sent += size
        k += 1


def send_stream(sock: socket.socket, head: bytes, seed: int, total: int) -> str:
    digest = hashlib.sha256(head)
    sock.sendall(head)
    for chunk in chunks(seed, total):
        digest.update(chunk)
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def recv_stream(sock: socket.socket) -> tuple[str, int]:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    size = 0
    while True:
        n = sock.recv_into(buffer)
        if not n:
            return digest.hexdigest(), size
        digest.update(view[:n])
        size += n


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("path", ["splice", "copy"])
def test_every_byte_arrives_in_order(start_gateway, backends, raw_backend, path: str, workers: int) -> None:
    count = pick(16, 64)
    each = pick(4, 32) * 1024 * 1024
    at_backend: list[tuple[str, str]] = []  # (received, sent) per connection
    lock = threading.Lock()
    seeds = iter(range(10_000, 20_000))

    def echo_own_stream(sock: socket.socket) -> None:
        with lock:
            seed = next(seeds)
        result: dict[str, str] = {}
        sender = threading.Thread(target=lambda: result.update(sent=send_stream(sock, b"", seed, each)), daemon=True)
        sender.start()
        received, _ = recv_stream(sock)
        sender.join(TIMEOUT * 12)
        with lock:
            at_backend.append((received, result.get("sent", "send failed")))

    backend = raw_backend(echo_own_stream)
    env = {"KIAGATEWAY_NO_SPLICE": "1"} if path == "copy" else {}
    gw = start_gateway(
        stress_toml(backends, {"s.example": backend.address}, {"s.example": backend.address}, f"workers = {workers}"),
        env=env,
    )
    pids, before = baseline(gw)
    assert len(pids) == workers + (1 if workers > 1 else 0)
    at_client: list[tuple[str, str]] = []
    failures: list[str] = []
    peak = {"pipe": 0, "rss": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak["pipe"] = max(peak["pipe"], fds(pids)["pipe"] - before["pipe"])
            peak["rss"] = max(peak["rss"], rss_kib(pids))

    def client(i: int) -> None:
        tls = i % 2 == 1
        head = real_hello("s.example") if tls else b"POST /up HTTP/1.1\r\nHost: s.example\r\n\r\n"
        try:
            with socket.create_connection(gw.https if tls else gw.http, timeout=TIMEOUT * 6) as sock:
                result: dict[str, str] = {}
                sender = threading.Thread(
                    target=lambda: result.update(sent=send_stream(sock, head, i, each)), daemon=True
                )
                sender.start()
                received, size = recv_stream(sock)
                sender.join(TIMEOUT * 12)
                if size != each:
                    failures.append(f"connection {i} ({'tls' if tls else 'http'}) got {size} of {each} bytes")
                with lock:
                    at_client.append((result.get("sent", "send failed"), received))
        except OSError as exc:
            failures.append(f"connection {i}: {exc!r}")

    rss_before = rss_kib(pids)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 60)
    elapsed = time.monotonic() - started
    done.set()
    watcher.join(TIMEOUT)
    assert not failures, failures[:5]
    assert not backend.errors
    # A client ends when its download does; the backend's end of the upload may still be on its way.
    assert wait_until(lambda: len(at_backend) == count, TIMEOUT * 3), f"{len(at_backend)} backend ends of {count}"
    # The pairs match: what each client sent is what one backend connection received, and back.
    assert sorted(at_client) == sorted(at_backend)
    assert len(at_client) == count
    assert "send failed" not in str(at_client)
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw)
    moved = 2 * count * each / 2**20
    name = f"integrity, {path}, {workers} worker{'s' if workers > 1 else ''}"
    record(name, f"{count} connections x {each >> 20} MiB each way, failures", f"{len(failures)}")
    record(name, "MiB moved / s", f"{moved:.0f} MiB / {elapsed:.1f} s = {moved / elapsed:.0f} MiB/s")
    record(name, "peak pipe fds in use / RSS growth", f"{peak['pipe']} / {(peak['rss'] - rss_before) / 1024:.1f} MiB")
