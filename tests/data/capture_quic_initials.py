#!/usr/bin/env python3
"""Capture real QUIC clients' first datagrams into tests/data/quic-initial/.

Run it again whenever a client changes (``python tests/data/capture_quic_initials.py [OUTDIR]``).
A UDP socket on 127.0.0.1 records what each client sends before any answer:
the datagrams of its first flight, as many as its ClientHello fills (aioquic:
one; Chromium's post-quantum hello: two). Each capture is stored as
``NAME-N.bin`` (datagram N, the exact bytes) and ``NAME.json`` (client, its
version, the SNI it was asked to send, how many datagrams). A client missing
from this machine is skipped with a note. Everything stays on loopback:
Chromium is pointed at 127.0.0.1 by a host-resolver rule, never by DNS.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "quic-initial"
WAIT = 30.0  # upper bound on one client's first flight (a cold headless browser on a busy machine)
SNI = "pq.example"


def record(count: int, start) -> list[bytes]:
    """The first ``count`` datagrams sent to a fresh UDP socket by what ``start(port)`` launches."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)
        stop = start(sock.getsockname()[1])
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        try:
            while len(got) < count and time.monotonic() < deadline:
                try:
                    got.append(sock.recv(65536))
                except socket.timeout:
                    continue
        finally:
            stop()
        return got


def aioquic_flight(version: int) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(is_client=True, server_name=SNI, alpn_protocols=["h3"])
    config.supported_versions = [version]
    connection = QuicConnection(configuration=config)
    connection.connect(("127.0.0.1", 443), now=time.time())
    return [data for data, _ in connection.datagrams_to_send(now=time.time())]


def chromium_flight(binary: str) -> list[bytes]:
    profile = tempfile.mkdtemp(prefix="quic-capture-")

    def start(port: int):
        process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={profile}",
                "--enable-quic",
                f"--origin-to-force-quic-on={SNI}:443",
                f"--host-resolver-rules=MAP {SNI}:443 127.0.0.1:{port}",
                f"https://{SNI}/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.kill()
            process.wait()
            shutil.rmtree(profile, ignore_errors=True)

        return stop

    return record(2, start)  # its post-quantum ClientHello spans two datagrams


def version_of(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.mkdir(parents=True, exist_ok=True)
    captures: dict[str, tuple[list[bytes], dict]] = {}
    try:
        import aioquic

        captures["aioquic-v1"] = (aioquic_flight(0x00000001), {"client": f"aioquic {aioquic.__version__}"})
        captures["aioquic-v2"] = (aioquic_flight(0x6B3343CF), {"client": f"aioquic {aioquic.__version__}"})
    except ImportError:
        print("aioquic missing: skipped", file=sys.stderr)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        captures["chromium-pq"] = (chromium_flight(chromium), {"client": version_of([chromium, "--version"])})
    else:
        print("chromium missing: skipped", file=sys.stderr)
    for name, (datagrams, meta) in captures.items():
        for index, datagram in enumerate(datagrams):
            (out / f"{name}-{index}.bin").write_bytes(datagram)
        meta.update(sni=SNI, datagrams=len(datagrams))
        (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: {[len(d) for d in datagrams]}")


if __name__ == "__main__":
    main()
