#!/usr/bin/env python3
"""The load of conn_profile.py: its backends and its client, each run in a process of its own.

    python bench/profile_load.py backend DIR [--http-port=P] [--tls-port=P]
    python bench/profile_load.py client {http|tls} PORT HOST COUNT

The backend makes a throw-away ECDSA P-256 certificate in DIR (with the
``cryptography`` package, else the openssl command), listens for plain HTTP and
for TLS on 127.0.0.1, prints {"http": port, "tls": port} on one line once both
listen, then answers each connection in turn: read the request head, send one
small response, close. It stops when its standard input closes (its parent is
gone) or on SIGTERM. It sends no session tickets: no connection can resume.

The client makes COUNT sequential connections to 127.0.0.1:PORT, each a new TCP
connection with one ``GET /small`` and ``Connection: close``, read to EOF; for
tls, a full handshake naming HOST in the SNI first (no session is ever reused),
the request inside. It checks every response, prints {"connections": n,
"seconds": s} and exits 0; the first failure exits 1 with the reason on stderr.
Every socket wait is bounded by TIMEOUT, so a stuck gateway fails the run.

Both are written to cost little (raw sockets, no framework): they share the
cores with the gateway measured, whose CPU is what the profile reports. Neither
knows anything of the gateway in front of it.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

TIMEOUT = 5.0  # seconds any one socket wait may take; a loopback connection needs milliseconds
BODY = b"s" * 64  # a small response: the profile is about the connection, not the bytes
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY
)
HEAD_LIMIT = 16384  # a request head longer than this is not the client's


def request(host: str) -> bytes:
    return f"GET /small HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


# --------------------------------------------------------------------------- backend


def make_cert(directory: Path) -> tuple[Path, Path]:
    """Write an ECDSA P-256 self-signed certificate and its key into ``directory``; return their paths."""
    cert, key = directory / "backend.crt", directory / "backend.key"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = ["openssl", "req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        openssl += ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=profile.example"]
        subprocess.run(openssl, check=True, capture_output=True, timeout=30)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "profile.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(private, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key.write_bytes(private.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert.write_bytes(built.public_bytes(pem))
    return cert, key


def answer(conn: socket.socket) -> None:
    """Read one request head from ``conn``, send RESPONSE. The caller closes."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data or len(head) > HEAD_LIMIT:
            return
        head += data
    conn.sendall(RESPONSE)


def serve(listener: socket.socket, context: ssl.SSLContext | None) -> None:
    """Answer the connections of ``listener`` one at a time: the client is sequential."""
    while True:
        conn, _ = listener.accept()
        try:
            conn.settimeout(TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            answer(conn)
        except OSError as exc:  # a gateway that gave up on a connection: say so, go on with the next
            print(f"backend: {exc}", file=sys.stderr, flush=True)
        finally:
            conn.close()


def backend(directory: Path, http_port: int, tls_port: int) -> int:
    cert, key = make_cert(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.num_tickets = 0  # no resumption: every connection a full handshake
    ports = {}
    for mode, port, ctx in (("http", http_port, None), ("tls", tls_port, context)):
        listener = socket.create_server(("127.0.0.1", port), backlog=512)
        ports[mode] = listener.getsockname()[1]
        threading.Thread(target=serve, args=(listener, ctx), daemon=True).start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the parent closes the pipe or is gone
    return 0


# --------------------------------------------------------------------------- client


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def client(mode: str, port: int, host: str, count: int) -> int:
    payload = request(host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # a throw-away certificate: the handshake's cost is what counts
    context.verify_mode = ssl.CERT_NONE
    address = ("127.0.0.1", port)
    started = time.perf_counter()
    for number in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as browsers do: no Nagle wait
            sock.connect(address)
            if mode == "tls":
                sock = context.wrap_socket(sock, server_hostname=host)  # a new session each time: never resumed
            sock.sendall(payload)
            reply = read_to_eof(sock)
        except OSError as exc:
            print(f"client: connection {number + 1} of {count} failed: {exc!r}", file=sys.stderr)
            return 1
        finally:
            sock.close()
        if not (reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n" + BODY)):
            print(f"client: connection {number + 1} of {count}: unexpected reply {reply[:80]!r}", file=sys.stderr)
            return 1
    print(json.dumps({"connections": count, "seconds": time.perf_counter() - started}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "backend":
        options = dict(arg[2:].split("=", 1) for arg in argv[2:])
        return backend(Path(argv[1]), int(options.get("http-port", 0)), int(options.get("tls-port", 0)))
    if len(argv) == 5 and argv[0] == "client" and argv[1] in ("http", "tls"):
        return client(argv[1], int(argv[2]), argv[3], int(argv[4]))
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
