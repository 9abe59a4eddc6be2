#!/usr/bin/env python3
"""What a reload of a big route table costs the connections in flight: request latency during reloads vs without.

    python bench/reload_bench.py [--routes=100000] [--reloads=3] [--clients=4] [--workers=1,2] [--cmd=kiagateway]

Starts an HTTP backend (threads in this process) and kiagateway with
``--routes`` routes on loopback, runs ``--clients`` client threads sending
``GET`` requests (one connection each, ``Connection: close``) through the
gateway, measures each request's latency for a baseline period, then sends
SIGHUP ``--reloads`` times (waiting for every process's "config reloaded"
line each time), and prints the max and p99 latency of the requests that
overlapped a reload next to the baseline's, and the same for one control
client that asks the backend directly: what the machine itself adds (other
processes on the same cores). The target (issue 10): with
100,000 routes, no request waits more than 50 ms longer during a reload.
Everything it starts is stopped at the end, its scratch directory removed.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

TIMEOUT = 10.0  # seconds any one request may take before the run counts it failed
START_TIMEOUT = 120.0  # seconds the gateway may take to validate the table at start and to reload it


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


class _Backend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def write_config(path: str, routes: int, backend: int) -> None:
    """``routes`` routes (most to unused loopback ports, as a big table's are), and bench.example to the backend."""
    with open(path, "w") as f:
        f.write('[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nlog_connections = false\n')
        f.write(f'[http_backends]\n"bench.example" = "127.0.0.1:{backend}"\n')
        for i in range(routes - 1):
            f.write(f'"r{i}.bench.example" = "127.0.0.1:{1 + i % 16}"\n')


class Gateway:
    def __init__(self, cmd: list[str], config: str, workers: int) -> None:
        self.workers = workers
        self.proc = subprocess.Popen(
            [*cmd, "--log-format=json", f"--workers={workers}", config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = ("127.0.0.1", 0)
        for line in self.until(lambda line: line.get("message") == "ready", START_TIMEOUT):
            if line.get("message") == "listening for http":
                host, _, port = line["address"].rpartition(":")
                self.address = (host, int(port))

    def _read(self) -> None:
        for raw in self.proc.stderr:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                self.lines.put({"message": raw.decode(errors="replace").rstrip()})
        self.lines.put(None)

    def until(self, done, timeout: float) -> list[dict]:
        """The log lines up to the first for which ``done`` is true."""
        seen: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise SystemExit(f"the gateway exited: {seen[-5:]}")
            seen.append(line)
            if done(line):
                return seen

    def reload(self) -> None:
        """SIGHUP, then wait until every process has applied the new table (or the reload failed)."""
        self.proc.send_signal(signal.SIGHUP)
        waiting = set(range(1, self.workers + 1)) if self.workers > 1 else {None}
        while waiting:
            line = self.until(lambda line: line.get("message") == "config reloaded", START_TIMEOUT)[-1]
            waiting.discard(line.get("worker"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client(address: tuple[str, int], timings: list, stop: threading.Event, failures: list) -> None:
    request = b"GET / HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n"
    while not stop.is_set():
        start = time.monotonic()
        try:
            with socket.create_connection(address, timeout=TIMEOUT) as sock:
                sock.sendall(request)
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
            if not reply.endswith(b"ok"):
                raise OSError(f"unexpected reply {reply[:60]!r}")
        except OSError as exc:
            failures.append(str(exc))
            continue
        timings.append((start, time.monotonic() - start))


def summary(seconds: list[float]) -> str:
    if not seconds:
        return "no requests"
    seconds = sorted(seconds)
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    p50, top = seconds[len(seconds) // 2], seconds[-1]
    return f"n={len(seconds):5d}  p50={p50 * 1e3:7.1f} ms  p99={p99 * 1e3:7.1f} ms  max={top * 1e3:7.1f} ms"


def run(cmd: list[str], config: str, workers: int, backend: tuple[str, int], args: argparse.Namespace) -> dict:
    gateway = Gateway(cmd, config, workers)
    timings: list[tuple[float, float]] = []
    control: list[tuple[float, float]] = []  # the same requests straight to the backend: the machine's own noise
    failures: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=client, args=(gateway.address, timings, stop, failures), daemon=True)
        for _ in range(args.clients)
    ]
    threads.append(threading.Thread(target=client, args=(backend, control, stop, failures), daemon=True))
    try:
        for thread in threads:
            thread.start()
        time.sleep(args.baseline)  # the baseline period: the clients are busy meanwhile
        windows = []
        for _ in range(args.reloads):
            begun = time.monotonic()
            gateway.reload()
            windows.append((begun, time.monotonic()))
            time.sleep(args.baseline / 2)  # between reloads, more baseline
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
        gateway.stop()

    def overlaps(start: float, seconds: float) -> bool:
        return any(start <= end and start + seconds >= begun for begun, end in windows)

    during = [s for start, s in timings if overlaps(start, s)]
    baseline = [s for start, s in timings if not overlaps(start, s)]
    for who, measured in (("through the gateway", timings), ("control", control)):
        for start, s in sorted(measured, key=lambda t: -t[1])[:3]:  # where the slowest fell: a hint to the cause
            at = [f"{start - begun:+.2f} s of {end - begun:.2f} s" for begun, end in windows if start <= end + 1]
            print(f"  slow request {who}: {s * 1e3:.0f} ms at {at[:1] or ['baseline']}")
    added = (max(during) - max(baseline)) if during and baseline else float("nan")
    print(f"workers={workers}: {args.reloads} reloads of {args.routes} routes, {sum(e - b for b, e in windows):.1f} s")
    print(f"  baseline  {summary(baseline)}")
    print(f"  reloading {summary(during)}")
    print(f"  control, straight to the backend: baseline  {summary([s for t, s in control if not overlaps(t, s)])}")
    print(f"  control, straight to the backend: reloading {summary([s for t, s in control if overlaps(t, s)])}")
    print(f"  added max latency {added * 1e3:.1f} ms (target < 50 ms); failures {len(failures)}")
    return {"workers": workers, "added_max_ms": added * 1e3, "failures": len(failures)}


def loop_lag(config: str, reloads: int) -> None:
    """The event loop's own stalls, measured inside this process: a greenlet that sleeps 1 ms notes how late it wakes.

    Free of what the clients above also measure (the machine's other
    processes), this isolates what a reload does to a loop: a lone process's
    reload (a loader child, then the slices), and a worker's (the slices a
    supervisor sends). The machine's noise shows in the "idle" line.
    """
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gevent

    import kiaconfig
    import kiareload

    phase = ["idle"]
    lags: dict[str, list[float]] = {}

    def ticker() -> None:
        last = time.monotonic()
        while True:
            gevent.sleep(0.001)
            now = time.monotonic()
            lags.setdefault(phase[0], []).append(now - last)
            last = now

    def load() -> kiaconfig.Config:
        return kiaconfig.load(config)

    running = load()
    message = kiareload.pack(running)
    tick = gevent.spawn(ticker)
    gevent.sleep(1.0)
    for _ in range(reloads):
        phase[0] = "alone: load in a child, take the slices, swap"
        running = kiareload.load_in_child(load)
        phase[0] = "idle"
        gevent.sleep(0.5)
        phase[0] = "worker: take the slices a supervisor sent, swap"
        running = kiareload.unpack(message)[0]
        phase[0] = "idle"
        gevent.sleep(0.5)
    tick.kill()
    print(f"event loop stalls in this process, {reloads} reloads of {len(running.http_routes)} routes:")
    for name, seconds in lags.items():
        seconds.sort()
        print(f"  {name:50s} max {seconds[-1] * 1e3:6.1f} ms  p99 {seconds[int(len(seconds) * 0.99)] * 1e3:6.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds of load without a reload")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--cmd", default=shutil.which("kiagateway", path=os.path.dirname(sys.executable)) or "kiagateway"
    )
    args = parser.parse_args()
    backend = _Backend(("127.0.0.1", 0), _Hello)
    threading.Thread(target=backend.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    scratch = tempfile.mkdtemp(prefix="reload-bench-")
    try:
        config = os.path.join(scratch, "servers.toml")
        write_config(config, args.routes, backend.server_address[1])
        address = ("127.0.0.1", backend.server_address[1])
        results = [run(args.cmd.split(), config, int(n), address, args) for n in args.workers.split(",")]
        loop_lag(config, args.reloads)
    finally:
        backend.shutdown()
        backend.server_close()
        shutil.rmtree(scratch)
    return 0 if all(r["added_max_ms"] < 50 and not r["failures"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
