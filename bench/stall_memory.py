#!/usr/bin/env python3
"""Kernel memory a client that never reads pins in the gateway, and bulk throughput, per relay path.

    python bench/stall_memory.py stall [--copy] [--size=64] [--src=DIR]
    python bench/stall_memory.py bulk [--copy] [--clients=8] [--size=256] [--src=DIR]

``stall``: a backend sends SIZE MiB to a client that reads nothing; once the
backend's sends stop, prints the gateway's two sockets of that relay as ``ss -tmn``
shows them (skmem r = receive queue, w = send queue, both in bytes of kernel memory
with overhead; rb/tb = the buffer sizes they may grow to) and the change of
/proc/net/sockstat "TCP: mem" (all TCP sockets of the machine, in pages: noisy on a
shared machine). ``bulk``: CLIENTS downloads of SIZE MiB at once, read as fast as
they come; prints wall time and the gateway's CPU. ``--copy`` sets
KIAGATEWAY_NO_SPLICE=1; ``--src`` runs the gateway from another source tree (say a
``git archive`` of an older commit) with this Python. Everything on 127.0.0.1; every
process and thread it starts is stopped by the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

HEAD = b"GET /stream HTTP/1.1\r\nHost: raw.example\r\n\r\n"
MIB = 1 << 20
TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def skmem(local: tuple[str, int], peer: tuple[str, int]) -> dict[str, int]:
    """The skmem fields of the TCP socket local -> peer, from ``ss -tmnH``; {} if not found."""
    out = subprocess.run(
        ["ss", "-tmnH", "src", f"{local[0]}:{local[1]}", "dst", f"{peer[0]}:{peer[1]}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    found = re.search(r"skmem:\(([^)]*)\)", out)
    if not found:
        return {}
    return {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", found.group(1))}


def tcp_mem_pages() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Gateway:
    def __init__(self, backend_port: int, copy: bool, src: str | None, workdir: str) -> None:
        config = os.path.join(workdir, "servers.toml")
        with open(config, "w") as f:
            f.write(
                '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nidle_timeout = 120\n'
                f'[http_backends]\n"raw.example" = "127.0.0.1:{backend_port}"\n'
            )
        env = dict(os.environ)
        if copy:
            env["KIAGATEWAY_NO_SPLICE"] = "1"
        if src:
            env["PYTHONPATH"] = src
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiagateway", "--log-format=json", config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=src or workdir,
        )
        self.port = 0
        for raw in self.proc.stderr:
            line = json.loads(raw)
            if line.get("message", "").startswith("listening for "):
                self.port = int(line["address"].rpartition(":")[2])
            if line.get("message") == "ready":
                break
        assert self.port, "the gateway did not start"
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep its stderr flowing

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


class Backend:
    """Accepts ``count`` connections; sends ``size`` bytes down each after the request head."""

    def __init__(self, count: int, size: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(TIMEOUT)
        self.port = self.server.getsockname()[1]
        self.size = size
        self.sent = [0] * count
        self.peers: list[tuple[str, int] | None] = [None] * count
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _serve(self, i: int) -> None:
        chunk = memoryview(bytes(MIB))
        try:
            conn, peer = self.server.accept()
        except OSError:
            return
        self.peers[i] = peer
        with conn:
            conn.settimeout(TIMEOUT)
            got = b""
            while len(got) < len(HEAD):
                got += conn.recv(len(HEAD) - len(got))
            try:
                while self.sent[i] < self.size:
                    self.sent[i] += conn.send(chunk[: min(MIB, self.size - self.sent[i])])
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()
        for thread in self.threads:
            thread.join(TIMEOUT)


def stall(args: argparse.Namespace, workdir: str) -> dict:
    backend = Backend(1, args.size * MIB)
    gw = Gateway(backend.port, args.copy, args.src, workdir)
    client = None
    try:
        before = tcp_mem_pages()
        client = socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT)
        client.sendall(HEAD)
        # Wait until the backend's sends stop: every buffer on the way is as full as it gets.
        deadline = time.monotonic() + TIMEOUT
        last, since = -1, time.monotonic()
        while time.monotonic() - since < args.settle:
            assert time.monotonic() < deadline, f"still sending after {TIMEOUT}s"
            if backend.sent[0] != last:
                last, since = backend.sent[0], time.monotonic()
            time.sleep(0.05)
        after = tcp_mem_pages()
        client_side = skmem(("127.0.0.1", gw.port), client.getsockname())
        backend_side = skmem(backend.peers[0], ("127.0.0.1", backend.port))
        return {
            "path": "copy" if args.copy else "splice",
            "backend_sent": backend.sent[0],
            "gw_backend_socket": backend_side,
            "gw_client_socket": client_side,
            "gw_pinned_MiB": round((backend_side.get("r", 0) + client_side.get("w", 0)) / MIB, 2),
            "sockstat_delta_MiB": round((after - before) * os.sysconf("SC_PAGE_SIZE") / MIB, 2),
        }
    finally:
        if client is not None:
            client.close()
        gw.stop()
        backend.close()


def bulk(args: argparse.Namespace, workdir: str) -> dict:
    size = args.size * MIB
    backend = Backend(args.clients, size)
    gw = Gateway(backend.port, args.copy, args.src, workdir)
    got = [0] * args.clients
    errors: list[BaseException] = []

    def download(i: int) -> None:
        buf = bytearray(MIB)
        try:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
                sock.sendall(HEAD)
                while got[i] < size:
                    n = sock.recv_into(buf)
                    if not n:
                        break
                    got[i] += n
        except OSError as exc:
            errors.append(exc)

    try:
        cpu0, t0 = cpu_seconds(gw.proc.pid), time.monotonic()
        threads = [threading.Thread(target=download, args=(i,), daemon=True) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 3)
        wall, cpu = time.monotonic() - t0, cpu_seconds(gw.proc.pid) - cpu0
        assert not errors and got == [size] * args.clients, (errors, got)
        total = size * args.clients
        return {
            "path": "copy" if args.copy else "splice",
            "wall_s": round(wall, 2),
            "MiB_per_s": round(total / MIB / wall),
            "gw_cpu_s": round(cpu, 2),
            "gw_cpu_s_per_GiB": round(cpu / (total / (1 << 30)), 3),
        }
    finally:
        gw.stop()
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("stall", "bulk"))
    parser.add_argument("--copy", action="store_true", help="the copy path (KIAGATEWAY_NO_SPLICE=1)")
    parser.add_argument("--size", type=int, help="MiB per download (stall 64, bulk 256)")
    parser.add_argument("--clients", type=int, default=8, help="bulk: downloads at once")
    parser.add_argument("--settle", type=float, default=1.5, help="stall: seconds without a send that mean stalled")
    parser.add_argument("--src", help="run the gateway from this source tree")
    args = parser.parse_args()
    args.size = args.size or (64 if args.mode == "stall" else 256)
    with tempfile.TemporaryDirectory() as workdir:
        print(json.dumps((stall if args.mode == "stall" else bulk)(args, workdir)))


if __name__ == "__main__":
    main()
