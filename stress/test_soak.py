"""Soak: a mix of HTTP, TLS and errors at half the measured peak connection rate, with SIGHUPs on the way.

RSS and descriptors are sampled through the run; their slope after warm-up (least squares)
shows a leak as a steady climb.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

from conftest import (
    TIMEOUT,
    assert_back_to_baseline,
    base,
    baseline,
    drain_log,
    fds,
    pick,
    record,
    rss_kib,
    stress_toml,
    tracebacks,
)
from hellos import real_hello

SENDERS = 8  # threads that run the schedule: enough to keep up with a few hundred connections a second here


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, per minute."""
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / var if var else 0.0


def test_soak(start_gateway, backends, client_context) -> None:
    duration = pick(30.0, 600.0)
    hups = pick(4, 20)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a backend that refuses
        down = f"127.0.0.1:{closed.getsockname()[1]}"
        toml = stress_toml(backends, {"down.example": down}, {"down.example": down}, "preamble_timeout = 5.0")
        gw = start_gateway(toml)
        pids, before = baseline(gw)

        def http(host: str, status: bytes, head: bytes = b"") -> None:
            request = head or f"GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            reply = base.exchange(gw.http, request)
            assert reply.startswith(b"HTTP/1.1 " + status), reply[:60]

        def tls_ok() -> None:
            raw = socket.create_connection(gw.https, timeout=TIMEOUT)
            with client_context.wrap_socket(raw, server_hostname="a.example") as sock:
                sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
                reply = base.read_all(sock)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:60]

        def tls_alert(name: str, alert: int) -> None:
            with socket.create_connection(gw.https, timeout=TIMEOUT) as sock:
                sock.sendall(real_hello(name))
                assert base.read_all(sock) == bytes((21, 3, 3, 0, 2, 2, alert))

        mix = [  # ten slots: 5 HTTP, 2 TLS, 3 refusals of the kinds clients meet
            lambda: http("a.example", b"200"),
            lambda: http("a.example", b"200"),
            lambda: http("a.example", b"200"),
            lambda: http("b.example", b"421"),
            lambda: http("a.example", b"400", b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
            lambda: http("down.example", b"502"),
            tls_ok,
            tls_ok,
            lambda: tls_alert("nope.example", 112),
            lambda: http("a.example", b"200"),
        ]

        # Peak: plain HTTP connections as fast as SENDERS threads go, for 2 s.
        peak_count = [0]
        stop_peak = time.monotonic() + 2.0

        def hammer() -> None:
            while time.monotonic() < stop_peak:
                http("a.example", b"200")
                peak_count[0] += 1

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(SENDERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
        peak_rate = peak_count[0] / 2.0
        rate = peak_rate / 2

        lock = threading.Lock()
        schedule = iter(range(10**9))
        done: dict[str, int] = {"ok": 0}
        errors: list[str] = []
        started = time.monotonic()
        end = started + duration

        def sender() -> None:
            while True:
                with lock:
                    i = next(schedule)
                due = started + i / rate
                if due >= end:
                    return
                time.sleep(max(0.0, due - time.monotonic()))  # the schedule's pace, open loop
                try:
                    mix[i % len(mix)]()
                    with lock:
                        done["ok"] += 1
                except (AssertionError, OSError) as exc:
                    with lock:
                        errors.append(f"{i % len(mix)}: {exc!r}")

        rss: list[tuple[float, float]] = []
        descriptors: list[tuple[float, float]] = []
        threads = [threading.Thread(target=sender, daemon=True) for _ in range(SENDERS)]
        for thread in threads:
            thread.start()
        reloads = 0
        next_hup = started + duration / (hups + 1)
        while time.monotonic() < end:
            now = time.monotonic()
            rss.append((now - started, rss_kib(pids)))
            descriptors.append((now - started, sum(fds(pids).values())))
            if now >= next_hup and reloads < hups:
                gw.proc.send_signal(signal.SIGHUP)
                reloads += 1
                next_hup += duration / (hups + 1)
            time.sleep(0.25)  # the sampling period
        for thread in threads:
            thread.join(TIMEOUT * 3)
    assert not errors, errors[:5]
    loaded = [line for line in drain_log(gw) if line.get("message") == "config reloaded"]
    assert len(loaded) == hups, f"{len(loaded)} reloads logged of {hups}"
    after = assert_back_to_baseline(pids, before)
    assert not tracebacks(gw), tracebacks(gw)[:3]
    warm = [s for s in rss if s[0] >= duration * 0.2]  # warm-up: the first fifth (greenlets, pipes, caches)
    warm_fds = [s for s in descriptors if s[0] >= duration * 0.2]
    rss_slope = slope_per_minute(warm)
    name = f"soak, {duration:g} s, {hups} SIGHUPs"
    record(name, "peak rate measured / rate held", f"{peak_rate:.0f} / {done['ok'] / duration:.0f} connections/s")
    record(name, "connections served as expected / unexpected", f"{done['ok']} / {len(errors)}")
    record(
        name,
        "RSS after warm-up: first / last, slope",
        f"{warm[0][1] / 1024:.1f} / {warm[-1][1] / 1024:.1f} MiB, {rss_slope:+.0f} KiB/min",
    )
    record(
        name,
        "descriptors after warm-up: slope; at the end / baseline",
        f"{slope_per_minute(warm_fds):+.1f}/min; {sum(after.values())} / {sum(before.values())}",
    )
    # Flat: a leak of even 100 bytes a connection would climb by MiBs a minute at this rate.
    assert rss_slope < 1024, f"RSS climbs by {rss_slope:.0f} KiB/min after warm-up"
