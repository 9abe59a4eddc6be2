"""Upload throughput through kiagateway with http_strict_host on and off.

python bench/upload_bench.py [--gib 1] [--rounds 3] [--cmd kiagateway]

One keep-alive connection POSTs a body of --gib GiB (Content-Length) to a sink
backend on loopback, then a second small request on the same connection, so the
strict run also frames past the body. Strict mode checks the head and then
passes the body on unread (spliced on Linux). Prints, per mode, the best wall
time and the gateway's CPU seconds (utime + stime from /proc), and the ratios.
Every process and socket it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BLOCK = 4 << 20  # bytes per sendall: big enough that the client costs little


def sink(server: socket.socket) -> None:
    """Read requests (Content-Length bodies), drop the bodies, answer 200; one connection at a time."""
    buf = bytearray(1 << 20)
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        break
                    pending += data
                if b"\r\n\r\n" not in pending:
                    break
                head, _, pending = pending.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                taken = min(length, len(pending))
                pending, left = pending[taken:], length - taken
                view = memoryview(buf)
                while left:
                    n = conn.recv_into(view[: min(left, len(buf))])
                    if not n:
                        break
                    left -= n
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(port: int, size: int) -> None:
    block = b"x" * BLOCK
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: bench.example\r\nContent-Length: %d\r\n\r\n" % size)
        left = size
        while left:
            n = min(left, BLOCK)
            sock.sendall(block[:n])
            left -= n
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: bench.example\r\n\r\n")
        got = b""
        while got.count(b"HTTP/1.1 200") < 2:
            data = sock.recv(65536)
            if not data:
                raise SystemExit(f"connection closed early: {got!r}")
            got += data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_mode(cmd: list[str], strict: bool, backend: int, size: int, rounds: int, work: Path) -> tuple[float, float]:
    port = free_port()
    conf = work / f"strict-{strict}.toml"
    conf.write_text(
        f'[gateway]\nhttp_listen = ["127.0.0.1:{port}"]\nhttps_listen = []\nlog_connections = false\n'
        f"http_strict_host = {'true' if strict else 'false'}\n"
        f'[http_backends]\n"bench.example" = "127.0.0.1:{backend}"\n'
    )
    with open(work / f"gw-{strict}.log", "wb") as log:
        proc = subprocess.Popen([*cmd, str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while b" ready" not in (work / f"gw-{strict}.log").read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.1)
        best = cpu = float("inf")
        for _ in range(rounds):
            before, started = cpu_seconds(proc.pid), time.monotonic()
            upload(port, size)
            best = min(best, time.monotonic() - started)
            cpu = min(cpu, cpu_seconds(proc.pid) - before)
        return best, cpu
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    default = Path(sys.executable).with_name("kiagateway")
    parser.add_argument("--cmd", default=str(default) if default.exists() else shutil.which("kiagateway"))
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=sink, args=(server,), daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="kiagateway-upload-"))
    try:
        results = {}
        for strict in (False, True):
            results[strict] = run_mode([args.cmd], strict, server.getsockname()[1], size, args.rounds, work)
            wall, cpu = results[strict]
            mode = "on " if strict else "off"
            print(f"strict {mode}: {size / wall / 1e9:.2f} GB/s, {wall:.2f} s, gateway CPU {cpu:.2f} s")
        (off_wall, off_cpu), (on_wall, on_cpu) = results[False], results[True]
        print(f"strict on / off: throughput x{off_wall / on_wall:.2f}, gateway CPU x{on_cpu / off_cpu:.2f}")
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
