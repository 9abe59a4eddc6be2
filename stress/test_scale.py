"""Scale: thousands of concurrent relays with traffic trickling on each; memory per relay and time to set them up."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time

import pytest
from conftest import (
    TIMEOUT,
    assert_back_to_baseline,
    baseline,
    cpu_seconds,
    pick,
    record,
    rss_kib,
    served,
    stress_toml,
    tracebacks,
)
from hellos import real_hello

CONNECTS_IN_FLIGHT = 256  # within the listen backlog, so a burst of SYNs is not dropped and retried after 1 s


# The echo backend runs in a process of its own: this process holds the client ends, and a process
# may not raise its hard RLIMIT_NOFILE here (20,000), less than both ends of 10,000 connections.
ECHO = """
import asyncio

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)  # until killed by the test

asyncio.run(main())
"""


# A byte per relay every TICK seconds at most this many a second in all: asyncio in this process, the
# gateway and the echo process share two cores, and the test's own loop must not be the bottleneck.
TICKS_PER_SECOND = 2000


async def _scale(gw, count: int, trickle_seconds: float, pids: list[int]) -> dict[str, float]:
    heads = [b"GET / HTTP/1.1\r\nHost: r.example\r\n\r\n!", real_hello("r.example") + b"!"]
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_one(i: int) -> None:
        head = heads[i % 2]
        async with gate:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*(gw.https if i % 2 else gw.http)), TIMEOUT)
            writer.write(head)
            await asyncio.wait_for(reader.readexactly(len(head)), TIMEOUT * 3)
        conns.append((reader, writer))

    rss_before = rss_kib(pids)
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    await asyncio.gather(*(open_one(i) for i in range(count)))
    setup = time.monotonic() - started
    setup_cpu = cpu_seconds(pids) - cpu_before
    rss_set_up = rss_kib(pids)
    echoes = 0
    tick = max(1.0, count / TICKS_PER_SECOND)
    end = time.monotonic() + trickle_seconds

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, offset: float) -> None:
        nonlocal echoes
        await asyncio.sleep(offset * tick)  # spread the relays' ticks over the period
        while True:
            writer.write(b"t")
            await asyncio.wait_for(reader.readexactly(1), TIMEOUT * 3)
            echoes += 1
            if time.monotonic() + tick > end:
                return
            await asyncio.sleep(tick)  # the trickle's pace

    await asyncio.gather(*(trickle(r, w, (i % 100) / 100) for i, (r, w) in enumerate(conns)))
    rss_trickled = rss_kib(pids)
    for _, writer in conns:
        writer.close()
    return {
        "setup": setup,
        "setup_cpu": setup_cpu,
        "per_relay": (rss_set_up - rss_before) / count,
        "per_relay_trickled": (rss_trickled - rss_before) / count,
        "echoes": echoes,
        "tick": tick,
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_relays(start_gateway, backends, workers: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    count = pick(1000, 10000)
    if workers == 1:
        count = min(count, (hard - 200) // 2)  # a single worker holds both ends of each relay
    trickle_seconds = pick(3.0, 10.0)
    backend = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        address = f"127.0.0.1:{int(backend.stdout.readline())}"
        extra = f"workers = {workers}\nmax_connections = {count + 1000}"
        gw = start_gateway(stress_toml(backends, {"r.example": address}, {"r.example": address}, extra))
        pids, before = baseline(gw)
        result = asyncio.run(_scale(gw, count, trickle_seconds, pids))
        assert served(gw)
        assert_back_to_baseline(pids, before, TIMEOUT * 3)
    finally:
        backend.kill()
        backend.wait(TIMEOUT)
        backend.stdout.close()
    assert result["echoes"] >= count  # every relay echoed every byte it was sent (a lost one times out above)
    assert not tracebacks(gw)
    name = f"scale, {count} relays, {workers} worker{'s' if workers > 1 else ''}"
    record(name, "time to set them all up", f"{result['setup']:.2f} s ({count / result['setup']:.0f}/s)")
    record(name, "gateway CPU per relay set up", f"{result['setup_cpu'] / count * 1e6:.0f} us")
    record(
        name,
        "gateway RSS per relay, set up / after trickling",
        f"{result['per_relay']:.2f} / {result['per_relay_trickled']:.2f} KiB",
    )
    record(
        name, f"bytes echoed in {trickle_seconds:g} s, a byte per relay every {result['tick']:g} s", result["echoes"]
    )
