#!/usr/bin/env python3
"""Capture real clients' ClientHellos into tests/data/clienthello/, and add hand-made oddities.

Run it again whenever a client changes (``python tests/data/capture_clienthellos.py [OUTDIR]``).
A listener on 127.0.0.1 accepts one connection per client, reads the TLS records
up to the end of the ClientHello (reassembled here without sniff.py, so a bug
there cannot shape the corpus), then closes. Each capture is stored as
``NAME.bin`` (the exact bytes) and ``NAME.json`` (client, its version, the SNI
it was asked to send, and how it was run). A client missing from this machine
is skipped with a note. Everything stays on loopback: clients are pointed at
127.0.0.1 by name mapping, never by DNS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

OUT = Path(__file__).resolve().parent / "clienthello"
TIMEOUT = 20.0  # upper bound on any one client run
SLOW_START = 90.0  # a cold headless browser on a busy 2-core machine
PORT = "@PORT@"  # stands for the capture port in a command line
LONG_ALPN = [f"proto-{i:03d}-{'x' * 20}" for i in range(40)]


def read_client_hello(conn: socket.socket) -> bytes:
    """Read whole TLS records until a complete handshake message is in; return every byte read."""
    data = b""
    at = 0
    handshake = b""
    while True:
        while len(data) - at >= 5:
            length = int.from_bytes(data[at + 3 : at + 5], "big")
            if len(data) < at + 5 + length:
                break
            handshake += data[at + 5 : at + 5 + length]
            at += 5 + length
            if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
                return data[:at]
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"client closed after {len(data)} bytes")
        data += chunk


class Listener:
    """Accept connections on 127.0.0.1 and capture the first ClientHello of each."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.port = self.sock.getsockname()[1]

    def capture(self) -> bytes:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            return read_client_hello(conn)

    def close(self) -> None:
        self.sock.close()


def run_command(listener: Listener, argv: list[str], stdin: bytes = b"") -> bytes:
    """Start ``argv``, capture its hello, then stop it (it never gets a ServerHello)."""
    argv = [arg.replace(PORT, str(listener.port)) for arg in argv]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    ) as process:
        try:
            if stdin:
                process.stdin.write(stdin)
                process.stdin.flush()
            return listener.capture()
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: chromium is a wrapper script
            process.wait(TIMEOUT)


def run_python(listener: Listener, sni: str | None, version: ssl.TLSVersion, alpn: list[str] | None = None) -> bytes:
    def client() -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = context.maximum_version = version
        if alpn:
            context.set_alpn_protocols(alpn)
        try:
            with socket.create_connection(("127.0.0.1", listener.port), timeout=TIMEOUT) as raw:
                context.wrap_socket(raw, server_hostname=sni)
        except OSError:
            pass  # the listener hangs up after the hello

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        return listener.capture()
    finally:
        thread.join(TIMEOUT)


def version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).decode(errors="replace").splitlines()
    return next((line.strip() for line in lines if line.strip() and "unexpected operator" not in line), "unknown")


JAVA_CLIENT = """
import javax.net.ssl.*;
import java.util.List;
public class Hello {
    public static void main(String[] args) throws Exception {
        SSLSocket s = (SSLSocket) SSLSocketFactory.getDefault().createSocket("127.0.0.1", Integer.parseInt(args[0]));
        SSLParameters p = s.getSSLParameters();
        p.setServerNames(List.of(new SNIHostName(args[1])));
        s.setSSLParameters(p);
        s.setSoTimeout(20000);
        try { s.startHandshake(); } catch (Exception e) { }
        s.close();
    }
}
"""

NODE_CLIENT = """
const tls = require('tls');
const s = tls.connect({host: '127.0.0.1', port: +process.argv[1], servername: process.argv[2],
                       rejectUnauthorized: false, ALPNProtocols: ['h2', 'http/1.1']});
s.on('error', () => process.exit(0));
setTimeout(() => process.exit(0), 20000);
"""

PERL_CLIENT = """
use IO::Socket::SSL;
IO::Socket::SSL->new(PeerAddr => '127.0.0.1', PeerPort => $ARGV[0], SSL_hostname => $ARGV[1],
                     SSL_verify_mode => SSL_VERIFY_NONE, Timeout => 20);
"""


def real_clients(scratch: str):
    """(name, client, version, sni, how, runner) for every client this machine has."""
    py_version = f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}"
    openssl = shutil.which("openssl")
    connect = f"127.0.0.1:{PORT}"
    if openssl:
        v = version_of([openssl, "version"])
        s_client = [openssl, "s_client", "-connect", connect, "-quiet"]
        yield (
            "openssl-s_client",
            "openssl s_client",
            v,
            "openssl.corpus.example",
            "defaults",
            [*s_client, "-servername", "openssl.corpus.example"],
        )
        yield (
            "openssl-s_client-max-send-frag-512",
            "openssl s_client",
            v,
            "frag.corpus.example",
            ("-max_send_frag 512 and a long -alpn list, so the hello spans records"),
            [*s_client, "-servername", "frag.corpus.example", "-max_send_frag", "512", "-alpn", ",".join(LONG_ALPN)],
        )
        yield (
            "openssl-s_client-no-tls1_3",
            "openssl s_client",
            v,
            "tls12.corpus.example",
            "-no_tls1_3",
            [*s_client, "-servername", "tls12.corpus.example", "-no_tls1_3"],
        )
        yield (
            "openssl-s_client-long-alpn",
            "openssl s_client",
            v,
            "alpn.corpus.example",
            "40-entry -alpn",
            [*s_client, "-servername", "alpn.corpus.example", "-alpn", ",".join(LONG_ALPN)],
        )
    curl = shutil.which("curl")
    if curl:
        name = "curl.corpus.example"
        yield (
            "curl",
            "curl",
            version_of([curl, "--version"]),
            name,
            "--resolve to 127.0.0.1",
            [
                curl,
                "-sk",
                "--max-time",
                str(TIMEOUT),
                "--resolve",
                f"{name}:{PORT}:127.0.0.1",
                f"https://{name}:{PORT}/",
            ],
        )
    gnutls = shutil.which("gnutls-cli")
    if gnutls:
        yield (
            "gnutls-cli",
            "gnutls-cli",
            version_of([gnutls, "--version"]),
            "gnutls.corpus.example",
            "--sni-hostname",
            [
                gnutls,
                "--insecure",
                "--sni-hostname",
                "gnutls.corpus.example",
                "-p",
                PORT,
                "127.0.0.1",
            ],
        )
    wget = shutil.which("wget")
    if wget:
        yield (
            "wget",
            "wget",
            version_of([wget, "--version"]),
            "localhost",
            "https://localhost (no name mapping)",
            [
                wget,
                "-q",
                "-O",
                "/dev/null",
                "--no-check-certificate",
                "--tries=1",
                f"--timeout={TIMEOUT:g}",
                "--inet4-only",
                f"https://localhost:{PORT}/",
            ],
        )
    node = shutil.which("node")
    if node:
        yield (
            "node",
            "node tls",
            version_of([node, "--version"]),
            "node.corpus.example",
            "tls.connect, ALPN h2",
            [
                node,
                "-e",
                NODE_CLIENT,
                PORT,
                "node.corpus.example",
            ],
        )
    perl = shutil.which("perl")
    if perl:
        v = version_of([perl, "-MIO::Socket::SSL", "-e", "print qq(IO::Socket::SSL $IO::Socket::SSL::VERSION)"])
        yield (
            "perl-io-socket-ssl",
            "perl IO::Socket::SSL",
            v,
            "perl.corpus.example",
            "SSL_hostname",
            [
                perl,
                "-e",
                PERL_CLIENT,
                PORT,
                "perl.corpus.example",
            ],
        )
    java = shutil.which("java")
    if java:
        source = Path(scratch) / "Hello.java"
        source.write_text(JAVA_CLIENT)
        yield (
            "java",
            "java SSLSocket",
            version_of([java, "-version"]),
            "java.corpus.example",
            "SSLSocket, SNIHostName",
            [
                java,
                str(source),
                PORT,
                "java.corpus.example",
            ],
        )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        name = "chromium.corpus.example"
        yield (
            "chromium-headless",
            "chromium",
            version_of([chromium, "--version"]),
            name,
            "headless, MAP * to loopback",
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                f"--user-data-dir={scratch}/chromium-profile",
                f"--host-resolver-rules=MAP * 127.0.0.1:{PORT}",
                f"https://{name}/",
            ],
        )
    for version, tag in ((ssl.TLSVersion.TLSv1_2, "tls12"), (ssl.TLSVersion.TLSv1_3, "tls13")):
        sni = f"python-{tag}.corpus.example"
        yield f"python-ssl-{tag}", "python ssl", py_version, sni, f"TLS {tag[3]}.{tag[4]} only", (sni, version)
    yield "python-ssl-no-sni", "python ssl", py_version, None, "server_hostname=None", (None, ssl.TLSVersion.TLSv1_3)


def fragment(data: bytes, size: int) -> bytes:
    """Re-cut the handshake bytes of one-record ``data`` into records of ``size`` bytes."""
    header, payload = data[:5], data[5:]
    assert int.from_bytes(header[3:5], "big") == len(payload), "expects a one-record hello"
    return b"".join(
        header[:3] + len(payload[i : i + size]).to_bytes(2, "big") + payload[i : i + size]
        for i in range(0, len(payload), size)
    )


def memory_hello(sni: str | None) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def with_sni(data: bytes, old: bytes, new: bytes) -> bytes:
    """Swap the SNI of a one-record hello for a name of the same length (no length to fix)."""
    assert len(old) == len(new) and data.count(old) == 1
    return data.replace(old, new)


def hand_made():
    """(name, note, sni, bytes) for oddities no client here sends on its own."""
    yield "odd-no-sni", "Python ssl hello without server_name", None, memory_hello(None)
    # Swapped for a name of the same length, so every length field stays right.
    yield (
        "odd-trailing-dot",
        "SNI with a trailing dot",
        "trailing-dot.example",
        with_sni(memory_hello("trailing-dotX.example"), b"trailing-dotX.example", b"trailing-dot.example."),
    )
    yield (
        "odd-upper-case",
        "SNI in upper case",
        "upper-case.example",
        with_sni(memory_hello("upper-case.example"), b"upper-case.example", b"UPPER-Case.EXAMPLE"),
    )
    for size in (1, 7, 100):
        yield (
            f"odd-split-{size}",
            f"hello re-cut into {size}-byte records",
            "split.example",
            fragment(memory_hello("split.example"), size),
        )
    # RFC 5246 appendix E.2: SSL 2.0-compatible CLIENT-HELLO, no extensions, so no SNI.
    cipher_specs = bytes.fromhex("00002f000035000005000004")
    challenge = bytes(range(16))
    body = b"\x01\x03\x01" + len(cipher_specs).to_bytes(2, "big") + b"\x00\x00" + b"\x00\x10"
    body += cipher_specs + challenge
    yield "odd-sslv2-compatible", "SSL 2.0-compatible ClientHello", None, (0x8000 | len(body)).to_bytes(2, "big") + body


def save(out: Path, name: str, data: bytes, meta: dict) -> None:
    (out / f"{name}.bin").write_bytes(data)
    (out / f"{name}.json").write_text(json.dumps({**meta, "bytes": len(data)}, indent=2) + "\n")
    print(f"{name}: {len(data)} bytes, sni={meta['sni']!r}")


def main(argv: list[str]) -> int:
    """Capture into the directory named by the only argument, tests/data/clienthello/ by default."""
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name, client, version, sni, how, runner in real_clients(scratch):
            # A fresh listener per client: a late connection cannot be taken for the next client's.
            listener = Listener(SLOW_START if client == "chromium" else TIMEOUT)
            try:
                data = run_python(listener, *runner) if isinstance(runner, tuple) else run_command(listener, runner)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"{name}: skipped ({exc})", file=sys.stderr)
                failures += 1
                continue
            finally:
                listener.close()
            save(out, name, data, {"client": client, "version": version, "sni": sni, "how": how, "kind": "captured"})
    for name, note, sni, data in hand_made():
        save(out, name, data, {"client": "hand-made", "version": None, "sni": sni, "how": note, "kind": "hand-made"})
    return 1 if failures else 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))
