#!/usr/bin/env python3
"""How long sniff.py takes per preamble, and what share of a proxied connection that is.

    python bench/sniff_bench.py [--gateway-cpu-us=285] [--loops=300]

Times ``sniff_tls`` over every ClientHello in tests/data/clienthello/ and
``sniff_http`` over a few typical request heads, each fed in one piece (the
common case: one recv holds the whole preamble) and, for reference, in 1 KiB
reads. The share is the median parse time over the CPU time a whole proxied
connection costs the gateway (accept, sniff, connect, relay, close), which you
measure elsewhere and pass in; 285 us is the default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sniff  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "clienthello"
HEADS = {
    "curl": b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    "browser": (
        b"GET /index.html HTTP/1.1\r\nHost: www.example.com\r\nConnection: keep-alive\r\n"
        b"Upgrade-Insecure-Requests: 1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
        b"(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\nAccept: text/html,application/xhtml+xml,"
        b"application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Accept-Language: en-GB,en;q=0.9\r\n\r\n"
    ),
    "big-cookie": b"GET /app HTTP/1.1\r\nHost: app.example.com\r\nCookie: " + b"s=" + b"x" * 4000 + b"\r\n\r\n",
    "absolute-form": b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
}


def per_call_us(fn, data: bytes, loops: int, chunk: int | None = None) -> float:
    """Best of 5 batches of ``loops`` calls, in microseconds per call."""
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(loops):
            sniffer = fn()
            for piece in pieces:
                sniffer.feed(piece)
        best = min(best, (time.perf_counter_ns() - start) / loops / 1000)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway-cpu-us", type=float, default=285.0, help="gateway CPU us per proxied connection")
    parser.add_argument("--loops", type=int, default=300)
    args = parser.parse_args()

    print(f"{'ClientHello':40} {'bytes':>6} {'one read us':>12} {'1 KiB reads us':>15}")
    tls_times = []
    for path in sorted(CORPUS.glob("*.bin")):
        data = path.read_bytes()
        whole = per_call_us(sniff.TlsSniffer, data, args.loops)
        chunked = per_call_us(sniff.TlsSniffer, data, args.loops, 1024)
        tls_times.append(whole)
        print(f"{path.stem:40} {len(data):6d} {whole:12.2f} {chunked:15.2f}")
    print(f"{'HTTP head':40} {'bytes':>6} {'one read us':>12} {'1 KiB reads us':>15}")
    http_times = []
    for name, data in HEADS.items():
        whole = per_call_us(sniff.HttpSniffer, data, args.loops)
        chunked = per_call_us(sniff.HttpSniffer, data, args.loops, 1024)
        http_times.append(whole)
        print(f"{name:40} {len(data):6d} {whole:12.2f} {chunked:15.2f}")

    tls_median = statistics.median(tls_times)
    http_median = statistics.median(http_times)
    print()
    print(f"median per ClientHello: {tls_median:.2f} us ({len(tls_times)} hellos)")
    print(f"median per HTTP head:   {http_median:.2f} us ({len(http_times)} heads)")
    for what, median in (("TLS", tls_median), ("HTTP", http_median)):
        share = 100 * median / args.gateway_cpu_us
        print(f"{what} parsing share of {args.gateway_cpu_us:g} us gateway CPU per connection: {share:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
