"""Strict keep-alive routing under load: every request of many connections checked, none for another entry let through.

Each client keeps one connection and sends batches of requests, pipelined and cut at
random places: GETs repeated and not, Content-Length bodies and chunked ones (with
extensions and trailers), bodies that hold whole requests for another host. The backend
parses what it receives as any HTTP/1.1 server does and answers each request with the
sha256 of what it saw; the client checks every answer in order. Some connections end
with a request for another route entry: the answers owed come first, then 421, and the
other entry's backend never hears of it.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

from conftest import (
    TIMEOUT,
    assert_back_to_baseline,
    baseline,
    pick,
    record,
    stress_toml,
    tracebacks,
)

SMUGGLED = b"GET /stolen HTTP/1.1\r\nHost: other.example\r\n\r\n"  # in bodies: body bytes, never a request


def read_request(rfile) -> tuple[bytes, bytes] | None:
    """(request line + Host, body) of the next request, framed as RFC 9112 says; None at EOF."""
    line = rfile.readline()
    if not line:
        return None
    fields = {}
    while (field := rfile.readline()) not in (b"\r\n", b""):
        name, _, value = field.partition(b":")
        fields[name.strip().lower()] = value.strip()
    body = b""
    if fields.get(b"transfer-encoding") == b"chunked":
        while size := int(rfile.readline().split(b";")[0], 16):
            body += rfile.read(size)
            rfile.read(2)
        while rfile.readline() not in (b"\r\n", b""):  # trailers
            pass
    elif b"content-length" in fields:
        body = rfile.read(int(fields[b"content-length"]))
    return line.strip() + b" " + fields.get(b"host", b"-"), body


def answer(name: str, seen: list[bytes]):
    def serve(sock: socket.socket) -> None:
        with sock, sock.makefile("rb") as rfile:
            while (request := read_request(rfile)) is not None:
                what, body = request
                seen.append(what)
                reply = f"{name} {hashlib.sha256(what + body).hexdigest()}".encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))

    return serve


def make_request(rng: random.Random, n: int) -> tuple[bytes, bytes]:
    """(bytes on the wire, what the backend should hash: request line + Host, then the body)."""
    kind = rng.choice(["get", "get", "again", "length", "chunked"])
    target = b"/same" if kind == "again" else b"/r%d" % n
    line = (b"POST " if kind in ("length", "chunked") else b"GET ") + target + b" HTTP/1.1"
    body = rng.randbytes(rng.choice([0, 1, 100, 5000, 70_000, 300_000])) if kind in ("length", "chunked") else b""
    if body and rng.random() < 0.5:
        at = rng.randrange(len(body))
        body = body[:at] + SMUGGLED + body[at:]
    head = line + b"\r\nHost: s.example\r\nUser-Agent: stress\r\n"
    if kind == "length":
        wire = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif kind == "chunked":
        wire, at = head + b"Transfer-Encoding: chunked\r\n\r\n", 0
        while at < len(body):
            size = rng.randint(1, 40_000)
            wire += b"%x%s\r\n%s\r\n" % (len(body[at : at + size]), rng.choice([b"", b";x=1"]), body[at : at + size])
            at += size
        wire += b"0\r\nX-Sum: 1\r\n\r\n"
    else:
        wire = head + b"\r\n"
    return wire, line + b" s.example" + body


def read_answer(rfile) -> tuple[int, bytes]:
    status = int(rfile.readline().split(b" ")[1])
    length = 0
    while (field := rfile.readline()) not in (b"\r\n", b""):
        name, _, value = field.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, rfile.read(length)


def test_strict_connections_under_load(start_gateway, backends, raw_backend) -> None:
    clients, batches = pick(8, 64), pick(6, 100)
    seen_s: list[bytes] = []
    seen_other: list[bytes] = []
    s_backend = raw_backend(answer("s", seen_s))
    other_backend = raw_backend(answer("other", seen_other))
    gw = start_gateway(
        stress_toml(
            backends,
            {"s.example": s_backend.address, "other.example": other_backend.address},
            {},
            "http_strict_host = true\nworkers = 2",
        )
    )
    pids, before = baseline(gw)
    failures: list[str] = []
    counts = {"requests": 0, "refused": 0, "bytes": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        ends_elsewhere = i % 4 == 0
        try:
            with socket.create_connection(gw.http, timeout=TIMEOUT * 6) as sock, sock.makefile("rb") as rfile:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for batch in range(batches):
                    requests = [make_request(rng, batch * 10 + k) for k in range(rng.randint(1, 4))]
                    wire = b"".join(w for w, _ in requests)
                    last = ends_elsewhere and batch == batches - 1
                    if last:
                        wire += SMUGGLED
                    cuts = sorted(rng.sample(range(1, len(wire)), min(3, len(wire) - 1)))
                    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
                        sock.sendall(wire[a:b])
                    for _, expected in requests:
                        status, body = read_answer(rfile)
                        if (status, body) != (200, b"s " + hashlib.sha256(expected).hexdigest().encode()):
                            failures.append(f"client {i} batch {batch}: {status} {body[:80]!r}")
                            return
                    with lock:
                        counts["requests"] += len(requests)
                        counts["bytes"] += len(wire)
                    if last:
                        status, _ = read_answer(rfile)
                        if status != 421 or rfile.read(1):
                            failures.append(f"client {i}: {status} for another entry, or more after it")
                        with lock:
                            counts["refused"] += 1
        except (OSError, ValueError, IndexError) as exc:
            failures.append(f"client {i}: {exc!r}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 30)
    elapsed = time.monotonic() - started
    assert not failures, failures[:5]
    assert seen_other == [], seen_other[:3]  # no request for another entry, pipelined or smuggled, ever got there
    assert len(seen_s) == counts["requests"]
    assert counts["refused"] == len(range(0, clients, 4))
    assert not s_backend.errors and not other_backend.errors
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw)
    name = "strict keep-alive routing, 2 workers"
    record(name, f"{clients} connections x {batches} pipelined batches, failures", f"{len(failures)}")
    record(name, "requests checked and answered / refused (421)", f"{counts['requests']} / {counts['refused']}")
    record(name, "MiB sent / s", f"{counts['bytes'] / 2**20:.0f} MiB / {elapsed:.1f} s")
