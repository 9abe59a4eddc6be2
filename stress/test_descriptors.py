"""Descriptors: a flood past a low RLIMIT_NOFILE neither crashes nor spins the gateway, and it recovers."""

from __future__ import annotations

import socket
import time

from conftest import (
    TIMEOUT,
    cpu_seconds,
    drain_log,
    pick,
    record,
    reset,
    served,
    stress_toml,
    tracebacks,
    tree,
    wait_until,
)

NOFILE = 64  # low enough that a modest flood runs the gateway out of descriptors


def test_flood_past_the_descriptor_limit(start_gateway, backends) -> None:
    flood = pick(200, 1000)
    gw = start_gateway(stress_toml(backends, {}, {}, "preamble_timeout = 60.0"), max_fds=NOFILE)
    pids = tree(gw.proc.pid)
    socks = []
    try:
        for i in range(flood):
            sock = socket.create_connection(gw.https if i % 2 else gw.http, timeout=TIMEOUT)
            socks.append(sock)  # silent: each holds a gateway descriptor until preamble_timeout
        gw.wait_for(lambda line: line.get("message") == "accept failed, pausing this listener")
        time.sleep(0.5)  # let the back-off settle before the idle window is measured
        before = cpu_seconds(pids)
        window_started = time.monotonic()
        time.sleep(2.0)  # the measured window itself: the gateway's CPU time over 2 s of waiting
        window = time.monotonic() - window_started
        spent = cpu_seconds(pids) - before
        assert gw.proc.poll() is None, "the gateway died of the flood"
        assert spent < 0.3, f"the gateway spent {spent:.2f} s of CPU in {window:.1f} s while out of descriptors"
        pauses = sum(1 for line in drain_log(gw) if line.get("message") == "accept failed, pausing this listener")
    finally:
        for sock in socks:
            reset(sock)
    started = time.monotonic()
    assert wait_until(lambda: served(gw, timeout=2.0), TIMEOUT * 3)
    recovered = time.monotonic() - started
    assert not tracebacks(gw), tracebacks(gw)[:3]
    name = f"descriptors: {flood} silent connects at RLIMIT_NOFILE {NOFILE}"
    record(name, "gateway CPU while out of descriptors", f"{spent:.3f} s in {window:.1f} s")
    record(
        name, "'accept failed' lines while stuck / serves again after the flood left", f"{pauses} / {recovered:.2f} s"
    )
