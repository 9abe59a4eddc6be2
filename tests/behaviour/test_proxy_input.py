"""trusted_proxies: PROXY v1/v2 headers from trusted peers, end to end with real sockets and a real HAProxy.

Clients bind 127.0.0.2 (trusted) or 127.0.0.1 (not) before connecting, to be
different addresses on loopback. A recording backend behind a route with
``proxy_protocol = "v2"`` shows which client the gateway passed on.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import TIMEOUT, Gateway, gateway_command, read_all
from hellos import real_hello

import proxyproto
from kiaconfig import ConfigError, validate

TRUSTED, UNTRUSTED = "127.0.0.2", "127.0.0.1"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: raw.example\r\n\r\n"
HELLO = real_hello("raw.example")
PREAMBLES = {"http": REQUEST, "https": HELLO}
PREAMBLE_TIMEOUT = 2.0  # short enough for the slow-header tests, long enough for a loaded machine
_ports = itertools.count(20000)  # a fresh source port per header: each connection's log line is told apart


class Recorder:
    """A TCP server on 127.0.0.1:0 that records each connection's bytes up to the peer's EOF."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)  # how often the accept loop looks at the stop flag
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.received: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._record, args=(conn,), daemon=True).start()

    def _record(self, conn: socket.socket) -> None:
        with conn:
            self.received.put(read_all(conn))

    def next(self) -> bytes:
        return self.received.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.server.close()


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder()
    yield rec
    rec.close()


def proxied_toml(recorder: Recorder, trusted: str = f'"{TRUSTED}/32"') -> str:
    return f"""
[gateway]
http_listen = ["127.0.0.1:0"]
https_listen = ["127.0.0.1:0"]
preamble_timeout = {PREAMBLE_TIMEOUT}
trusted_proxies = [{trusted}]

[http_backends]
"raw.example" = {{ address = "{recorder.address}", proxy_protocol = "v2" }}

[https_backends]
"raw.example" = {{ address = "{recorder.address}", proxy_protocol = "v2" }}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, recorder):
    """One gateway for the module: trusts 127.0.0.2 only."""
    gateway = Gateway(tmp_path_factory.mktemp("proxied"), proxied_toml(recorder))
    yield gateway
    gateway.stop()


def connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def send_and_finish(sock: socket.socket, data: bytes) -> bytes:
    """Send, half-close, and read what comes back until EOF; a reset fails the test."""
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)  # ConnectionResetError here: the gateway reset instead of closing cleanly
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def header(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    return proxyproto.proxy_header(version, source, destination)


def client_field(address: tuple) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


# --------------------------------------------------------------------------
# A trusted proxy's header names the client


@pytest.mark.parametrize("listener", ["http", "https"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_source_is_the_client_for_log_and_backend(gw, recorder, listener, version):
    for source, destination in (
        (("203.0.113.7", next(_ports)), ("198.51.100.1", 443)),
        (("2001:db8::7", next(_ports)), ("2001:db8::1", 8443)),
    ):
        sock = connect_from(TRUSTED, getattr(gw, listener))
        proxy = sock.getsockname()
        assert send_and_finish(sock, header(version, source, destination) + PREAMBLES[listener]) == b""
        # The backend's header names the original client and where it connected to at the proxy.
        assert recorder.next() == header("v2", source, destination) + PREAMBLES[listener]
        line = gw.connection_log(client=client_field(source))
        assert (line["outcome"], line["listener"], line["domain"]) == ("ok", listener, "raw.example")
        assert line["proxy"] == client_field(proxy)  # the proxy that named the client
        assert line["bytes_up"] == len(PREAMBLES[listener])  # the incoming header is not the client's


def test_header_split_across_many_segments(gw, recorder):
    source = ("192.0.2.99", next(_ports))
    data = header("v2", source, ("198.51.100.1", 80)) + REQUEST
    with connect_from(TRUSTED, gw.http) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), 3):
            sock.sendall(data[i : i + 3])
            time.sleep(0.002)  # pacing, not synchronisation: lets each piece leave as a segment of its own
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    assert recorder.next() == header("v2", source, ("198.51.100.1", 80)) + REQUEST
    assert gw.connection_log(client=client_field(source))["outcome"] == "ok"


def test_v2_local_keeps_the_connection_address(gw, recorder):
    local_header = SIG + b"\x20\x00\x00\x00"  # LOCAL, as a proxy's health check sends it
    sock = connect_from(TRUSTED, gw.http)
    client = sock.getsockname()
    assert send_and_finish(sock, local_header + REQUEST) == b""
    assert recorder.next() == header("v2", client, gw.http) + REQUEST
    assert gw.connection_log(client=client_field(client))["outcome"] == "ok"


def test_a_late_preamble_after_the_header_is_a_preamble_timeout_for_the_header_client(gw):
    source = ("192.0.2.50", next(_ports))
    with connect_from(TRUSTED, gw.http) as sock:
        sock.sendall(header("v1", source, ("198.51.100.1", 80)) + b"GET / HTTP/1.1\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 408 ")
    assert gw.connection_log(client=client_field(source))["outcome"] == "preamble_timeout"


# --------------------------------------------------------------------------
# Anything but a whole, valid header from a trusted peer: a clean close


BAD = {
    "missing": REQUEST,
    "tls-without-header": HELLO,
    "malformed-v1": b"PROXY TCP4 203.0.113.7 198.51.100.1 1234 80 \r\n" + REQUEST,
    "v1-wrong-family": b"PROXY TCP4 2001:db8::7 2001:db8::1 1234 80\r\n" + REQUEST,
    "v1-bare-lf": b"PROXY TCP4 203.0.113.7 198.51.100.1 1234 80\n" + REQUEST,
    "oversized-v1": b"PROXY UNKNOWN " + b"f" * 200 + b"\r\n" + REQUEST,
    "oversized-v2": SIG + b"\x21\x11" + struct.pack("!H", 60000) + bytes(200),
    "v2-udp": SIG + b"\x21\x12\x00\x0c" + bytes(12) + REQUEST,
    "v2-short-block": SIG + b"\x21\x21\x00\x0c" + bytes(12) + REQUEST,
    "truncated-v1": b"PROXY TCP4 203.0.113.7 198.51.10",
    "lying-v2-length": SIG + b"\x21\x11\x00\x40" + bytes(12),  # 64 announced, 12 sent, then EOF
}


@pytest.mark.parametrize("listener", ["http", "https"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_header_from_a_trusted_peer_is_a_clean_close(gw, listener, case):
    sock = connect_from(TRUSTED, getattr(gw, listener))
    client = sock.getsockname()
    assert send_and_finish(sock, BAD[case]) == b""  # a FIN with nothing before it
    line = gw.connection_log(client=client_field(client))
    assert (line["outcome"], line["domain"], line["backend"]) == ("bad_proxy_header", None, None)


def test_a_header_arriving_too_slowly_is_a_clean_close(gw):
    started = time.monotonic()
    with connect_from(TRUSTED, gw.http) as sock:
        client = sock.getsockname()
        sock.sendall(b"PROXY TCP4 203.0.113.7 ")  # and nothing more: the deadline runs from accept
        assert sock.recv(100) == b""
    assert time.monotonic() - started >= PREAMBLE_TIMEOUT * 0.9
    line = gw.connection_log(client=client_field(client))
    assert line["outcome"] == "bad_proxy_header" and "within" in line["reason"]


def test_a_trusted_peer_that_sends_nothing_is_just_closed(gw):
    with connect_from(TRUSTED, gw.http) as sock:
        client = sock.getsockname()
        sock.shutdown(socket.SHUT_WR)  # a TCP health check: connect, then close
        assert read_all(sock) == b""
    assert gw.connection_log(client=client_field(client))["outcome"] == "client_closed"


# --------------------------------------------------------------------------
# From any other address a PROXY header is just the first bytes


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_untrusted_peer_header_is_not_trusted(gw, version):
    spoof = header(version, ("203.0.113.66", 1), ("198.51.100.1", 80))
    sock = connect_from(UNTRUSTED, gw.http)
    client = sock.getsockname()
    assert send_and_finish(sock, spoof + REQUEST).startswith(b"HTTP/1.1 400 ")
    assert gw.connection_log(client=client_field(client))["outcome"] == "bad_request"

    sock = connect_from(UNTRUSTED, gw.https)
    client = sock.getsockname()
    assert send_and_finish(sock, spoof + HELLO) == b""  # not TLS: closed at once, no alert
    assert gw.connection_log(client=client_field(client))["outcome"] == "not_tls"


def test_untrusted_peer_without_header_is_served_as_before(gw, recorder):
    sock = connect_from(UNTRUSTED, gw.http)
    client = sock.getsockname()
    assert send_and_finish(sock, REQUEST) == b""
    assert recorder.next() == header("v2", client, gw.http) + REQUEST
    line = gw.connection_log(client=client_field(client))
    assert line["outcome"] == "ok" and "proxy" not in line


# --------------------------------------------------------------------------
# An IPv4-mapped client is its IPv4 address everywhere

MAPPED, PLAIN = "::ffff:10.1.1.1", "10.1.1.1"  # one client, in the form an IPv6 header or socket gives it


def proxy_to(listener: tuple[str, int]) -> socket.socket:
    """A connection from the listener's own loopback address (trusted), of its family."""
    family = socket.AF_INET6 if ":" in listener[0] else socket.AF_INET
    sock = socket.socket(family)
    sock.settimeout(TIMEOUT)
    sock.bind((listener[0], 0))
    sock.connect(listener)
    return sock


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_mapped_client_named_by_a_proxy_is_its_ipv4_address_on_every_listener(start_gateway, backends, version):
    """``::ffff:10.1.1.1`` from a trusted proxy, on an IPv4 and an IPv6 listener alike: logged as 10.1.1.1 with
    the proxy, admitted by 10.0.0.0/8 and refused by ::/0, counted as 10.1.1.1, passed on as TCP4 / AF_INET."""
    recorder = Recorder()
    try:
        gw = start_gateway(f"""
[gateway]
http_listen = ["127.0.0.1:0", "[::1]:0"]
https_listen = []
trusted_proxies = ["127.0.0.1/32", "::1/128"]
max_connections_per_client = 1

[http_backends]
"ten.example" = {{ address = "{recorder.address}", proxy_protocol = "{version}", allow = ["10.0.0.0/8"] }}
"who.example" = {{ address = "{backends["alpha"].address}", allow = ["10.0.0.0/8"] }}
"v6.example" = {{ address = "{backends["alpha"].address}", allow = ["::/0"] }}
""")
        to = ("::ffff:10.0.0.1", 8080)  # where the client connected at the proxy, mapped too
        for listener in gw.listening["http"]:
            port = next(_ports)
            sock = proxy_to(listener)
            proxy = client_field(sock.getsockname())
            request = REQUEST.replace(b"raw.example", b"ten.example")
            assert send_and_finish(sock, header(version, (MAPPED, port), to) + request) == b""
            sent = recorder.next()
            if version == "v1":
                assert sent == f"PROXY TCP4 {PLAIN} 10.0.0.1 {port} 8080\r\n".encode() + request
            else:  # TCP over IPv4 (0x11), 12 bytes of addresses and ports
                fields = struct.pack("!BBH", 0x21, 0x11, 12) + socket.inet_aton(PLAIN) + socket.inet_aton("10.0.0.1")
                assert sent == SIG + fields + struct.pack("!HH", port, 8080) + request
            line = gw.connection_log(client=f"{PLAIN}:{port}")
            assert (line["outcome"], line["proxy"]) == ("ok", proxy)

            port = next(_ports)
            sock = proxy_to(listener)
            request = REQUEST.replace(b"raw.example", b"v6.example")
            assert send_and_finish(sock, header(version, (MAPPED, port), to) + request).startswith(b"HTTP/1.1 403 ")
            assert gw.connection_log(client=f"{PLAIN}:{port}")["outcome"] == "forbidden"

        # One count for the client in either form, on either listener.
        held = proxy_to(gw.listening["http"][0])
        held.sendall(header(version, (MAPPED, next(_ports)), to) + b"GET /whoami HTTP/1.1\r\nHost: who.example\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")  # relayed: counted
        with held:
            for listener, claimed in zip(gw.listening["http"], (PLAIN, MAPPED)):
                port = next(_ports)
                sock = proxy_to(listener)
                plain_to = ("10.0.0.1", 8080) if claimed == PLAIN else to
                request = REQUEST.replace(b"raw.example", b"who.example")
                assert send_and_finish(sock, header(version, (claimed, port), plain_to) + request).startswith(
                    b"HTTP/1.1 429 "
                )
                line = gw.connection_log(client=f"{PLAIN}:{port}")
                assert line["outcome"] == "client_limit" and PLAIN in line["reason"]
    finally:
        recorder.close()


def test_a_header_sent_on_for_an_ipv4_client_and_an_ipv6_destination_is_tcp6_as_haproxy_writes_it():
    """One family per header: an IPv4 client named by a proxy it reached over IPv6 goes in its IPv6 form."""
    v1 = proxyproto.proxy_header("v1", ("10.1.1.1", 5), ("2001:db8::1", 80))
    assert v1 == b"PROXY TCP6 ::ffff:10.1.1.1 2001:db8::1 5 80\r\n"
    v2 = proxyproto.proxy_header("v2", ("10.1.1.1", 5), ("2001:db8::1", 80))
    addresses = socket.inet_pton(socket.AF_INET6, "::ffff:10.1.1.1") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert v2 == SIG + struct.pack("!BBH", 0x21, 0x21, 36) + addresses + struct.pack("!HH", 5, 80)


# --------------------------------------------------------------------------
# Config


def test_trusted_proxies_config():
    settings = validate({"gateway": {"trusted_proxies": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]}}).settings
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
    assert validate({}).settings.trusted_proxies == ()


@pytest.mark.parametrize(
    "value, expected",
    [
        (["10.0.0.1/8"], "'10.0.0.1/8' is not a network: 10.0.0.1/8 has host bits set (did you mean '10.0.0.0/8'?)"),
        (["10.0.0.0/33"], "'10.0.0.0/33' is not a network"),
        (["example.com"], "'example.com' is not a network"),
        ("10.0.0.0/8", "must be a list of networks"),
        ([8], "8 is no string"),
    ],
)
def test_trusted_proxies_errors_name_the_key(value, expected):
    with pytest.raises(ConfigError) as info:
        validate({"gateway": {"trusted_proxies": value}}, "servers.toml")
    (error,) = info.value.errors
    assert error.startswith("servers.toml: [gateway] trusted_proxies: ") and expected in error


def test_check_prints_the_trusted_networks(tmp_path):
    config = tmp_path / "servers.toml"
    config.write_text(
        '[gateway]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n[http_backends]\n"a.example" = "127.0.0.1:1"\n'
    )
    out = subprocess.run(
        [*gateway_command(), "--check", str(config)], capture_output=True, text=True, timeout=TIMEOUT, check=True
    ).stdout
    assert "trusted proxies (a PROXY header required): 10.0.0.0/8, ::1/128\n" in out


# --------------------------------------------------------------------------
# A real HAProxy in front, with send-proxy-v2

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)
HAPROXY_CLIENT = "127.0.0.3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_haproxy(tmp_path, target: tuple[str, int]) -> tuple[subprocess.Popen, int]:
    """HAProxy in TCP mode on a free port, sending PROXY v2 to ``target`` from 127.0.0.2.

    Retried on another port if HAProxy exits (the port was taken meanwhile).
    """
    for attempt in range(5):
        port = free_port()  # HAProxy needs a port number: one free a moment ago, retried if taken since
        cfg = tmp_path / f"haproxy{attempt}.cfg"
        cfg.write_text(
            f"""
global
    maxconn 100

defaults
    mode tcp
    timeout connect {int(TIMEOUT * 1000)}
    timeout client {int(TIMEOUT * 1000)}
    timeout server {int(TIMEOUT * 1000)}

frontend in
    bind 127.0.0.1:{port}
    default_backend gateway

backend gateway
    server gw {target[0]}:{target[1]} send-proxy-v2 source {TRUSTED}
"""
        )
        proc = subprocess.Popen(
            [HAPROXY, "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                time.sleep(0.05)  # polling for the listener, with a deadline
        output = stop_haproxy(proc)
    pytest.fail(f"haproxy did not start: {output}")


def stop_haproxy(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(TIMEOUT)
    return proc.stdout.read().decode(errors="replace")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_real_haproxy_send_proxy_v2(tmp_path, recorder):
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", proxied_toml(recorder))
    proc, port = start_haproxy(tmp_path, gateway.http)
    try:
        sock = connect_from(HAPROXY_CLIENT, ("127.0.0.1", port))
        client = sock.getsockname()
        assert send_and_finish(sock, REQUEST) == b""
        # HAProxy names the client and its own frontend; the gateway passes both on.
        assert recorder.next() == header("v2", client, ("127.0.0.1", port)) + REQUEST
        line = gateway.connection_log(client=client_field(client))
        assert (line["outcome"], line["domain"]) == ("ok", "raw.example")
    finally:
        output = stop_haproxy(proc)
        gateway.stop()
    assert "ALERT" not in output, output
