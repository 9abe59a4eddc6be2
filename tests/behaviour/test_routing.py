"""Every routing rule, over real HTTP and TLS clients, through the gateway subprocess."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import struct
import subprocess

import pytest
from conftest import TIMEOUT, exchange, read_all, routes_toml
from test_relaying import HEAD, RawBackend

import proxyproto


def http_get(address, host: str, target: str = "/whoami", version: str = "HTTP/1.1") -> bytes:
    request = f"GET {target} {version}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return exchange(address, request)


def tls_get(address, sni: str | None, client_context: ssl.SSLContext, verify: bool = True) -> bytes:
    ctx = client_context
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(address, timeout=TIMEOUT) as raw, ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(f"GET /whoami HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := tls.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("a.example", b"alpha http"),
        ("A.Example", b"alpha http"),  # case
        ("a.example.", b"alpha http"),  # trailing dot
        ("a.example:8080", b"alpha http"),  # port
        ("b.example", b"beta http"),
        ("x.b.example", b"wild http"),  # wildcard
        ("y.x.b.example", b"wild http"),  # any depth
        ("deep.sub.b.example", b"alpha http"),  # exact beats wildcard
    ],
)
def test_http_routes_by_host(gateway, host, expected):
    response = http_get(gateway.http, host)
    assert response.startswith(b"HTTP/1.1 200")
    assert response.split(b"\r\n\r\n", 1)[1].startswith(expected)


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("a.example", b"alpha https"),
        ("b.example", b"beta https"),
        ("x.b.example", b"wild https"),
        ("deep.sub.b.example", b"alpha https"),  # longest wildcard suffix wins
    ],
)
def test_tls_routes_by_sni(gateway, client_context, sni, expected):
    response = tls_get(gateway.https, sni, client_context)
    assert response.startswith(b"HTTP/1.1 200")
    assert response.split(b"\r\n\r\n", 1)[1].startswith(expected)


def test_http_client_library(gateway):
    conn = http.client.HTTPConnection(*gateway.http, timeout=TIMEOUT)
    conn.request("POST", "/echo", body=b"x" * 100000, headers={"Host": "b.example"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == b"x" * 100000
    conn.close()


def test_absolute_form_target_wins(gateway):
    response = exchange(
        gateway.http, b"GET http://b.example/whoami HTTP/1.1\r\nHost: B.example\r\nConnection: close\r\n\r\n"
    )
    assert b"beta http" in response


def test_wildcard_does_not_match_apex_and_no_default_gives_421(start_gateway, backends):
    toml = routes_toml(backends).replace('"b.example" = ', '"unused.example" = ')
    gw = start_gateway(toml)
    response = http_get(gw.http, "b.example")
    assert response.startswith(b"HTTP/1.1 421 Misdirected Request\r\n")
    assert b"Connection: close" in response
    line = gw.connection_log(domain="b.example")
    assert line["outcome"] == "no_route"


def test_default_route(start_gateway, backends):
    toml = routes_toml(backends).replace("[http_backends]", f'[http_backends]\n"*" = "{backends["default"].address}"')
    gw = start_gateway(toml)
    assert b"default http" in http_get(gw.http, "nowhere.example")
    assert b"default http" in exchange(gw.http, b"GET /whoami HTTP/1.0\r\n\r\n")  # no Host at all


def test_tls_without_sni_uses_default(start_gateway, backends, client_context):
    toml = routes_toml(backends) + f'"*" = "{backends["default-tls"].address}"\n'
    gw = start_gateway(toml)
    assert b"default https" in tls_get(gw.https, None, client_context, verify=False)
    assert b"default https" in tls_get(gw.https, "other.example", client_context, verify=False)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_both_listeners(gateway, ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    http_host, http_port = gateway.http
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--connect-to",
            f"a.example:80:{http_host}:{http_port}",
            "http://a.example/whoami",
        ],
        capture_output=True,
        timeout=TIMEOUT * 2,
    )
    assert out.stdout.startswith(b"alpha http"), out.stderr
    tls_host, tls_port = gateway.https
    out = subprocess.run(
        [
            "curl", "-sS", "--max-time", "10", "--cacert", str(ca_file),
            "--connect-to", f"b.example:443:{tls_host}:{tls_port}", "https://b.example/whoami",
        ],
        capture_output=True,
        timeout=TIMEOUT * 2,
    )  # fmt: skip
    assert out.stdout.startswith(b"beta https"), out.stderr


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
@pytest.mark.parametrize("extra", [[], ["-max_send_frag", "512"]])
def test_openssl_s_client(gateway, extra):
    host, port = gateway.https
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{host}:{port}",
            "-servername",
            "x.b.example",
            "-quiet",
            "-ign_eof",
            *extra,
        ],
        input=b"GET /whoami HTTP/1.1\r\nHost: x.b.example\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=TIMEOUT * 2,
    )
    assert b"wild https" in out.stdout, out.stderr


def test_clienthello_one_byte_at_a_time(gateway, client_context):
    """A ClientHello trickled in single bytes (one TCP segment each) is still routed."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context.wrap_bio(incoming, outgoing, server_hostname="a.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(gateway.https, timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(hello)):
            sock.sendall(hello[i : i + 1])
        while True:  # finish the handshake over the same socket
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "gateway closed during the handshake"
                incoming.write(data)
        if outgoing.pending:
            sock.sendall(outgoing.read())
        assert tls.getpeercert()["subjectAltName"]
    line = gateway.connection_log(domain="a.example", listener="https")
    assert line["bytes_up"] >= len(hello)


def test_ipv6_listener(start_gateway, backends):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    gw = start_gateway(routes_toml(backends, listen_http='"[::1]:0"', listen_https='"[::1]:0"'))
    assert gw.http[0] == "::1"
    response = http_get(gw.http, "a.example")
    assert b"alpha http" in response
    line = gw.connection_log(domain="a.example")
    assert line["client"].startswith("[::1]:")


def test_backend_names_resolve_at_connect_time(start_gateway, backends):
    """A backend given by name (here localhost, from /etc/hosts) is looked up per connection."""
    toml = routes_toml(backends).replace(
        "[http_backends]", f'[http_backends]\n"named.example" = "localhost:{backends["beta"].port}"'
    )
    gw = start_gateway(toml)
    assert b"beta http" in http_get(gw.http, "named.example")
    assert gw.connection_log(domain="named.example")["backend"] == f"localhost:{backends['beta'].port}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_for_a_link_local_client_has_no_scope(version):
    client = ("fe80::1%eth0", 40000, 0, 2)  # as accept() gives a link-local peer
    local = ("fe80::2%eth0", 80, 0, 2)
    header = proxyproto.proxy_header(version, client, local)
    if version == "v1":
        assert header == b"PROXY TCP6 fe80::1 fe80::2 40000 80\r\n"
    else:
        assert header[12:16] == b"\x21\x21\x00\x24"  # v2 PROXY, TCP over IPv6, 36 address bytes
        addresses = socket.inet_pton(socket.AF_INET6, "fe80::1") + socket.inet_pton(socket.AF_INET6, "fe80::2")
        assert header[16:] == addresses + struct.pack("!HH", 40000, 80)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_over_ipv6(start_gateway, version):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    seen = {}

    def backend(conn):
        seen["data"] = read_all(conn)  # until the client's half-close comes through

    be = RawBackend(backend)
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["[::1]:0"]\nhttps_listen = []\n[http_backends]\n'
            f'"raw.example" = {{ address = "{be.address}", proxy_protocol = "{version}" }}\n'
        )
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(HEAD)
            sock.shutdown(socket.SHUT_WR)
            client = sock.getsockname()
            assert read_all(sock) == b""
        be.check()
    finally:
        be.close()
    expected = proxyproto.proxy_header(version, client, gw.http)
    assert expected.startswith((b"PROXY TCP6 ::1 ::1 ", b"\r\n\r\n\x00\r\nQUIT\n\x21\x21"))
    assert seen["data"] == expected + HEAD
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bytes_up_counts_the_client_bytes_not_the_proxy_header(start_gateway, version):
    payload = HEAD + b"x" * 1000
    seen = {}

    def backend(conn):
        seen["data"] = read_all(conn)

    be = RawBackend(backend)
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n[http_backends]\n'
            f'"raw.example" = {{ address = "{be.address}", proxy_protocol = "{version}" }}\n'
        )
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b""
        be.check()
    finally:
        be.close()
    assert seen["data"].endswith(payload) and len(seen["data"]) > len(payload)  # the header came first
    line = gw.connection_log(domain="raw.example")
    assert (line["outcome"], line["bytes_up"], line["bytes_down"]) == ("ok", len(payload), 0)
