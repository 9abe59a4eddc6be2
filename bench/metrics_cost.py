#!/usr/bin/env python3
"""What metrics cost per connection: the gateway's CPU for short HTTP connections, metrics_listen off and on.

    python bench/metrics_cost.py [--connections=1000] [--rounds=30] [--control] [--cmd=kiagateway]

Starts two gateways with one worker each on loopback, one without and one with
metrics_listen, in front of one small backend that answers and closes. Each
round sends the same number of short connections (connect, one request, read
to the end, close) through each gateway in turn, A/B interleaved so that a
drift of the machine touches both, and reads the gateway's CPU time from
/proc/PID/schedstat (nanoseconds; /proc/PID/stat's ticks of 10 ms where it is
missing). It prints µs per connection per round, the medians, and the cost of
metrics as a difference and a share. One scrape per round goes to the gateway
with metrics, as Prometheus would, its CPU measured apart: Prometheus scrapes
every 15 s or so, not every thousand connections. Linux only; every process
it starts is stopped at the end.

The whole-gateway figure is at the mercy of a busy machine (a few µs of noise
per connection); it also prints the hooks' own cost measured in-process
(the calls kiagateway.py makes per connection, best of several runs), which
a loaded machine barely moves. ``--control`` runs the same with metrics off
in both gateways: the spread it shows is the noise floor of this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from pathlib import Path

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 128\r\nConnection: close\r\n\r\n" + b"x" * 128
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend(listener: socket.socket, stop: threading.Event) -> None:
    """Answer every connection with RESPONSE and close: the cheapest backend a gateway can have."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(RESPONSE)


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads: schedstat's nanoseconds, else stat's ticks."""
    tasks = Path(f"/proc/{pid}/task")
    total = 0.0
    for task in tasks.iterdir():
        schedstat = task / "schedstat"
        if schedstat.exists():
            total += int(schedstat.read_text().split()[0]) / 1e9
        else:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return total


def start_gateway(cmd: list[str], workdir: Path, name: str, backend_port: int, metrics: bool) -> tuple:
    port = free_port()
    metrics_port = free_port() if metrics else None
    config = workdir / f"{name}.toml"
    config.write_text(
        "[gateway]\n"
        f'http_listen = ["127.0.0.1:{port}"]\nhttps_listen = []\nworkers = 1\n'
        + (f'metrics_listen = "127.0.0.1:{metrics_port}"\n' if metrics else "")
        + f'[http_backends]\n"bench.example" = "127.0.0.1:{backend_port}"\n'
    )
    proc = subprocess.Popen(
        [*cmd, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"gateway {name} did not start") from None
            time.sleep(0.05)
    return proc, port, metrics_port


def hook_cost() -> float:
    """µs per connection of the calls the data path makes with metrics on: opened, preamble, connected, finished."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kiametrics

    stats = kiametrics.Stats()
    accepted = time.monotonic()

    def connection() -> None:
        stats.opened("http")
        stats.connected("http", stats.preamble_read("http", accepted))
        stats.finished("http", "ok", 100, 1000)

    number = 100_000
    return min(timeit.repeat(connection, number=number, repeat=7)) / number * 1e6


def run_batch(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(REQUEST)
            while sock.recv(65536):
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="connections per gateway per round")
    parser.add_argument("--rounds", type=int, default=30, help="short rounds pair better on a busy machine")
    parser.add_argument("--control", action="store_true", help="metrics off in both: the noise floor")
    parser.add_argument("--cmd", default=None, help="the gateway command (default: kiagateway beside this Python)")
    args = parser.parse_args()
    cmd = [args.cmd] if args.cmd else [shutil.which("kiagateway", path=os.path.dirname(sys.executable)) or "kiagateway"]

    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    thread = threading.Thread(target=backend, args=(listener, stop), daemon=True)
    thread.start()
    procs = []
    with tempfile.TemporaryDirectory() as scratch:
        try:
            off = start_gateway(cmd, Path(scratch), "off", listener.getsockname()[1], False)
            procs.append(off[0])
            on = start_gateway(cmd, Path(scratch), "on", listener.getsockname()[1], not args.control)
            procs.append(on[0])
            run_batch(off[1], 500)  # warm both up: greenlets parked, caches filled
            run_batch(on[1], 500)
            results: dict[str, list[float]] = {"off": [], "on": []}
            scrapes: list[float] = []
            for round_ in range(args.rounds):
                order = [("off", off), ("on", on)] if round_ % 2 == 0 else [("on", on), ("off", off)]
                for name, (proc, port, metrics_port) in order:
                    before = cpu_seconds(proc.pid)
                    run_batch(port, args.connections)
                    results[name].append((cpu_seconds(proc.pid) - before) / args.connections * 1e6)
                    if metrics_port:
                        before = cpu_seconds(proc.pid)
                        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                            r.read()
                        scrapes.append((cpu_seconds(proc.pid) - before) * 1e3)
                print(f"round {round_ + 1}: off {results['off'][-1]:.1f} µs/conn, on {results['on'][-1]:.1f} µs/conn")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            stop.set()
            thread.join(5)
            listener.close()
    print(f"the hooks alone, in-process: {hook_cost():.2f} µs/conn")
    if scrapes:
        print(f"one scrape: {statistics.median(scrapes):.2f} ms of the gateway's CPU (median)")
    off_us, on_us = statistics.median(results["off"]), statistics.median(results["on"])
    pairs = [b - a for a, b in zip(results["off"], results["on"])]
    print(f"median: off {off_us:.1f} µs/conn, on {on_us:.1f} µs/conn")
    print(
        f"metrics cost: {on_us - off_us:+.2f} µs/conn ({(on_us - off_us) / off_us:+.1%}); "
        f"paired differences: median {statistics.median(pairs):+.2f}, "
        f"mean {statistics.mean(pairs):+.2f} ± {statistics.stdev(pairs) / len(pairs) ** 0.5:.2f} (standard error), "
        f"min {min(pairs):+.2f}, max {max(pairs):+.2f} µs/conn"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
