"""Hostile clients: slowloris, malformed preambles, resets, clients that never read, a burst of silent connects."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TIMEOUT,
    assert_back_to_baseline,
    base,
    baseline,
    fds,
    p99,
    pick,
    record,
    reset,
    rss_kib,
    served,
    stress_toml,
    timed_request,
    tracebacks,
    wait_until,
)
from hellos import real_hello

import proxyproto


async def probe(address: tuple[str, int], payload: bytes, limit: float) -> tuple[str, bytes, float]:
    """Connect, send ``payload`` (no half-close), and wait up to ``limit`` s for the gateway to end it."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"connect failed: {exc!r}", b"", time.monotonic() - started
    data = bytearray()
    how = "timeout"
    try:
        if payload:
            writer.write(payload)
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), limit - (time.monotonic() - started))
            if not chunk:
                how = "eof"
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except asyncio.TimeoutError:
        how = "timeout"
    finally:
        writer.transport.abort()
    return how, bytes(data), time.monotonic() - started


async def bounded_gather(jobs, concurrency: int) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def run(job):
        async with gate:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


# ---------------------------------------------------------------------------


SLICES = 20  # the slowloris bytes of each second go out in this many slices


def test_slowloris_leaves_a_normal_client_served(start_gateway, backends) -> None:
    per_listener = pick(200, 1000)
    requests = pick(40, 100)  # per phase, for the p99
    gw = start_gateway(stress_toml(backends, {}, {}, "preamble_timeout = 60.0"))
    pids, before = baseline(gw)
    http_head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Slow: "
    tls_head = real_hello("a.example")[:40]

    def open_slow() -> list[socket.socket]:
        socks = []
        for address, first in ((gw.http, http_head), (gw.https, tls_head)):
            for _ in range(per_listener):
                sock = socket.create_connection(address, timeout=TIMEOUT)
                sock.sendall(first[:10])
                sock.setblocking(False)
                socks.append(sock)
        return socks

    def measure() -> list[float]:
        return [timed_request(gw.http) for _ in range(requests)]

    unloaded: list[float] = []
    loaded: list[float] = []
    held_peak = 0
    for _ in range(2):  # interleaved: the machine's own load weighs on both alike
        unloaded += measure()
        slow = open_slow()
        stop = threading.Event()

        def trickle(socks=slow, stop=stop) -> None:
            # A byte a second per connection, the slowloris pace, sent in SLICES spread over the second:
            # one burst would hold this process's GIL and be measured as the gateway's latency.
            turn = 0
            while not stop.wait(1.0 / SLICES):
                for sock in socks[turn % SLICES :: SLICES]:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass
                turn += 1

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            assert wait_until(lambda: fds(pids)["socket"] - before["socket"] >= 2 * per_listener)
            held_peak = max(held_peak, fds(pids)["socket"] - before["socket"])
            loaded += measure()
        finally:
            stop.set()
            trickler.join(TIMEOUT)
            for sock in slow:
                reset(sock)
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw)
    ratio = p99(loaded) / p99(unloaded)
    name = f"slowloris, {per_listener} per listener"
    record(name, "connections held by the gateway at once", held_peak)
    record(
        name,
        "normal client p99 unloaded / loaded (ratio)",
        f"{p99(unloaded) * 1000:.1f} / {p99(loaded) * 1000:.1f} ms ({ratio:.2f}x)",
    )
    # Within 2x; a p99 of a few ms on two shared cores moves by more than that alone, hence the floor.
    assert p99(loaded) <= max(2 * p99(unloaded), 0.030), (p99(unloaded), p99(loaded))


# ---------------------------------------------------------------------------


def _dictionary(path: Path) -> list[bytes]:
    tokens = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith('"') and line.endswith('"'):
            tokens.append(line[1:-1].encode("latin-1").decode("unicode_escape").encode("latin-1"))
    return tokens


def _corpus() -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Seeds for each listener and the fuzzers' dictionary tokens."""
    hellos = [p.read_bytes() for p in sorted((ROOT / "tests" / "data" / "clienthello").glob("*.bin"))]
    heads = [
        b"GET / HTTP/1.1\r\nHost: m.example\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: m.example:80\r\nContent-Length: 3\r\n\r\nabc",
        b"GET http://m.example/ HTTP/1.1\r\nHost: m.example\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
        b"HEAD / HTTP/1.0\r\nHost: [::1]:8080\r\n\r\n",
        b"CONNECT m.example:443 HTTP/1.1\r\nHost: m.example:443\r\n\r\n",
    ]
    tokens = _dictionary(ROOT / "fuzz" / "http.dict") + _dictionary(ROOT / "fuzz" / "proxy.dict")
    return heads, hellos, tokens


def mutate(rng: random.Random, seed: bytes, tokens: list[bytes]) -> bytes:
    """One to four of: flip bytes, cut, insert a token, repeat or drop a slice, add garbage."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data) + 1) if data else 0
        if kind == 0 and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            del data[at:]
        elif kind == 2:
            data[at:at] = rng.choice(tokens)
        elif kind == 3 and data:
            end = min(len(data), at + rng.randint(1, 64))
            data[at:at] = data[at:end] * rng.randint(1, 50)
        elif kind == 4:
            del data[at : at + rng.randint(1, 64)]
        else:
            data += os.urandom(rng.randint(1, 300))
    return bytes(data)


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "behind-trusted-proxy"])
def test_malformed_preambles_get_an_answer_or_a_close_in_time(start_gateway, backends, proxied: bool) -> None:
    """Behind a trusted proxy, each preamble comes after a PROXY v1 or v2 header, mutated with it."""
    count = pick(1000, 10000)
    preamble_timeout = 1.0  # short, so that the incomplete ones end soon
    extra = f"preamble_timeout = {preamble_timeout}\nmax_preamble = 16384"
    if proxied:
        extra += '\ntrusted_proxies = ["127.0.0.1"]'
    gw = start_gateway(stress_toml(backends, {}, {}, extra))
    pids, before = baseline(gw)
    heads, hellos, tokens = _corpus()
    rng = random.Random(1313)
    jobs = []
    for i in range(count):
        listener = "https" if i % 2 else "http"
        if rng.random() < 0.1:  # now and then the other listener's kind
            listener = "http" if listener == "https" else "https"
        seed = rng.choice(hellos if i % 2 else heads)
        if proxied:  # documentation addresses (RFC 5737): bytes in a header, never a destination
            seed = proxyproto.proxy_header(rng.choice(("v1", "v2")), ("192.0.2.1", 40000), ("198.51.100.1", 443)) + seed
        jobs.append((getattr(gw, listener), mutate(rng, seed, tokens)))
    limit = preamble_timeout + 5.0  # the gateway's deadline, and room for this loaded machine

    async def run() -> list:
        return await bounded_gather((probe(address, payload, limit) for address, payload in jobs), 200)

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    late = [(jobs[i][1][:60], r) for i, r in enumerate(results) if r[0] not in ("eof", "reset")]
    assert not late, late[:5]
    if proxied:  # a normal client behind the proxy
        header = proxyproto.proxy_header("v1", ("192.0.2.1", 40000), ("198.51.100.1", 80))
        reply = base.exchange(gw.http, header + b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
    else:
        assert served(gw)
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw), tracebacks(gw)[:3]
    outcomes: dict[str, int] = {}
    for line in gw.seen:
        if line.get("message") == "connection":
            outcomes[line["outcome"]] = outcomes.get(line["outcome"], 0) + 1
    answered = sum(1 for r in results if r[1])
    name = f"malformed preambles, {count}" + (", after a PROXY header" if proxied else "")
    record(name, "answered / closed silently / not ended in time", f"{answered} / {count - answered} / {len(late)}")
    record(
        name, "slowest end (preamble_timeout 1 s) / wall time", f"{max(r[2] for r in results):.2f} s / {elapsed:.1f} s"
    )
    ranked = sorted(outcomes.items(), key=lambda kv: -kv[1])
    record(name, "outcomes logged", ", ".join(f"{k} {v}" for k, v in ranked))


# ---------------------------------------------------------------------------


def test_resets_mid_preamble_and_mid_relay(start_gateway, backends, raw_backend) -> None:
    count = pick(200, 1000)
    ends: list[str] = []

    def echo(sock: socket.socket) -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    ends.append("eof")
                    return
                sock.sendall(data)
        except ConnectionResetError:
            ends.append("reset")

    backend = raw_backend(echo)
    gw = start_gateway(stress_toml(backends, {"e.example": backend.address}, {"e.example": backend.address}))
    pids, before = baseline(gw)
    heads = {"http": b"GET / HTTP/1.1\r\nHost: e.example\r\n\r\n", "https": real_hello("e.example")}
    for i in range(count):
        listener = "https" if i % 2 else "http"
        sock = socket.create_connection(getattr(gw, listener), timeout=TIMEOUT)
        sock.sendall(heads[listener][: len(heads[listener]) // 2])
        reset(sock)
    relayed = []
    for i in range(count):
        listener = "https" if i % 2 else "http"
        sock = socket.create_connection(getattr(gw, listener), timeout=TIMEOUT)
        sock.sendall(heads[listener] + b"ping")
        got = b""
        while not got.endswith(b"ping"):
            got += sock.recv(65536)
        sock.sendall(b"pong")  # in flight as the client resets
        relayed.append(sock)
    for sock in relayed:
        reset(sock)
    assert wait_until(lambda: len(ends) == count)
    assert served(gw)
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw)
    name = f"client resets, {count} mid-preamble + {count} mid-relay"
    record(name, "backend saw a reset / a clean end", f"{ends.count('reset')} / {ends.count('eof')}")
    assert ends.count("eof") == 0, "a client's reset reached the backend as a clean end"


# ---------------------------------------------------------------------------


def test_clients_that_never_read(start_gateway, backends, raw_backend) -> None:
    clients = pick(20, 100)
    each = pick(64, 256) * 1024 * 1024  # what each backend tries to send
    pushed: list[int] = []
    release = threading.Event()

    def flood(sock: socket.socket) -> None:
        sock.recv(65536)
        sock.setblocking(False)
        block = b"d" * 65536
        total, last = 0, time.monotonic()
        while total < each and time.monotonic() - last < 2.0:  # 2 s without progress: paused
            try:
                total += sock.send(block)
                last = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)  # the gateway takes no more: poll until it does or the pause is plain
        pushed.append(total)
        release.wait(TIMEOUT * 6)

    backend = raw_backend(flood)
    gw = start_gateway(stress_toml(backends, {"n.example": backend.address}, {"n.example": backend.address}))
    pids, before = baseline(gw)
    rss_before = rss_kib(pids)
    socks = []
    try:
        for i in range(clients):
            listener = "https" if i % 2 else "http"
            sock = socket.create_connection(getattr(gw, listener), timeout=TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(real_hello("n.example") if i % 2 else b"GET / HTTP/1.1\r\nHost: n.example\r\n\r\n")
            socks.append(sock)
        assert wait_until(lambda: len(pushed) == clients, TIMEOUT * 3)
        rss = rss_kib(pids)
        assert served(gw)
    finally:
        release.set()
        for sock in socks:
            reset(sock)
    assert max(pushed) < each, "the backend was never paused"
    growth = (rss - rss_before) / 1024
    assert growth < 64, f"the gateway grew by {growth:.0f} MiB for clients that never read"
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw)
    name = f"clients that never read, {clients}"
    record(name, f"backend sent before it was paused, of {each >> 20} MiB", f"max {max(pushed) / 2**20:.1f} MiB")
    record(name, "gateway RSS (growth)", f"{rss / 1024:.1f} MiB ({growth:+.1f} MiB)")


# ---------------------------------------------------------------------------


def test_burst_of_silent_connects(start_gateway, backends) -> None:
    count = pick(1000, 5000)
    preamble_timeout = 2.0
    gw = start_gateway(stress_toml(backends, {}, {}, f"preamble_timeout = {preamble_timeout}"))
    pids, before = baseline(gw)
    latencies: list[float] = []
    done = threading.Event()

    def normal_client() -> None:
        while not done.is_set():
            latencies.append(timed_request(gw.http))
            done.wait(0.1)

    limit = preamble_timeout + 8.0  # the deadline, plus the time to accept a burst on this loaded machine

    async def run() -> list:
        targets = [gw.https if i % 2 else gw.http for i in range(count)]
        return await asyncio.gather(*(probe(address, b"", limit) for address in targets))

    watcher = threading.Thread(target=normal_client, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(run())
    finally:
        done.set()
        watcher.join(TIMEOUT)
    late = [r for r in results if r[0] not in ("eof", "reset")]
    assert not late, late[:5]
    http = results[0::2]
    assert all(r[1].startswith(b"HTTP/1.1 408 ") for r in http), [r for r in http if not r[1].startswith(b"HTTP")][:3]
    assert all(r[1] == b"" for r in results[1::2])
    assert latencies, "the normal client was never served during the burst"
    assert_back_to_baseline(pids, before)
    assert not tracebacks(gw)
    name = f"burst of {count} silent connects"
    record(
        name,
        "ended by the gateway: earliest / latest (preamble_timeout 2 s)",
        f"{min(r[2] for r in results):.2f} / {max(r[2] for r in results):.2f} s",
    )
    record(name, "normal client meanwhile: requests, p99", f"{len(latencies)}, {p99(latencies) * 1000:.1f} ms")
