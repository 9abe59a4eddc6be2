"""Every refusal gets the contract's answer, at once where the bytes allow, never a hang."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import TIMEOUT, exchange, free_closed_port, read_all, routes_toml
from hellos import real_hello

import kiaerrors

ALERT_HEADER = b"\x15\x03\x03\x00\x02\x02"  # alert record, TLS 1.2 legacy version, 2 bytes, fatal


def alert(description: int) -> bytes:
    return ALERT_HEADER + bytes([description])


@pytest.fixture
def patient_gateway(start_gateway, backends):
    """Long preamble timeout: an answer that comes quickly was not waited out."""
    refused = f"127.0.0.1:{free_closed_port()}"
    toml = routes_toml(backends, extra_gateway="preamble_timeout = 30.0")
    toml = toml.replace("[http_backends]", f'[http_backends]\n"refused.example" = "{refused}"')
    toml = toml.replace("[https_backends]", f'[https_backends]\n"refused.example" = "{refused}"')
    return start_gateway(toml)


def answer_without_closing(address, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes but keep our side open: the gateway must decide from these bytes alone."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(payload)
        return read_all(sock, timeout)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Length: "))[16:])
    assert len(body) == length
    return int(response[9:12])


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # missing Host
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",  # duplicate
        b"GET / HTTP/1.1\r\nX-A: 1\r\n Host: a.example\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n",  # whitespace before colon
        b"GET / HTTP/1.1\nHost: a.example\r\n\r\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: a.ex\rample\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: a.example\x00\r\n\r\n",  # NUL
        b"GET / HTTP/1.1\r\nHost: a.ex ample\r\n\r\n",  # not a name
        b"GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",  # userinfo
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",  # target vs Host
        b"GET / HTTP/2.0\r\n",  # can never be valid: refused before the head ends
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS on the HTTP port (says so)
        b"GET /a b HTTP/1.1\r\n",
    ],
)
def test_http_400(patient_gateway, head):
    started = time.monotonic()
    response = answer_without_closing(patient_gateway.http, head)
    assert status_of(response) == 400
    assert time.monotonic() - started < 5  # decided from the bytes, not by the 30 s timeout
    line = patient_gateway.connection_log(outcome="bad_request")
    assert line["reason"]


def test_http_body_bytes_are_forwarded(patient_gateway):
    request = b"POST /echo HTTP/1.1\r\nHost: a.example\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"
    response = answer_without_closing(patient_gateway.http, request)
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"\r\n\r\nhello world")


def test_http_408_preamble_timeout(start_gateway, backends):
    gw = start_gateway(routes_toml(backends, extra_gateway="preamble_timeout = 0.5"))
    started = time.monotonic()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.exa")
        time.sleep(0.2)
        sock.sendall(b"mple\r\n")  # still trickling: one deadline from accept, not per read
        response = read_all(sock)
    elapsed = time.monotonic() - started
    assert status_of(response) == 408
    assert 0.4 < elapsed < 3
    assert gw.connection_log(outcome="preamble_timeout")["listener"] == "http"
    # The greenlet whose deadline fired is parked and serves the next client.
    response = exchange(gw.http, b"GET /whoami HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"beta http b.example")


def test_http_431_as_soon_as_the_head_is_too_large(start_gateway, backends):
    gw = start_gateway(routes_toml(backends, extra_gateway="max_preamble = 1024\npreamble_timeout = 30.0"))
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: " + b"x" * 2000)
        response = read_all(sock, 5)
    assert status_of(response) == 431
    assert gw.connection_log(outcome="too_large")


def test_http_502_backend_refused(patient_gateway):
    response = exchange(patient_gateway.http, b"GET / HTTP/1.1\r\nHost: refused.example\r\n\r\n")
    assert status_of(response) == 502
    line = patient_gateway.connection_log(outcome="backend_unreachable")
    assert "refused" in line["reason"].lower()


@pytest.fixture
def blackhole():
    """A listener whose accept queue is full: new connects get no SYN-ACK and hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    yield f"127.0.0.1:{server.getsockname()[1]}"
    for sock in [*fillers, server]:
        sock.close()


def test_504_and_alert_on_backend_connect_timeout(start_gateway, backends, blackhole):
    toml = routes_toml(backends, extra_gateway="connect_timeout = 0.5")
    toml = toml.replace("[http_backends]", f'[http_backends]\n"slow.example" = "{blackhole}"')
    toml = toml.replace("[https_backends]", f'[https_backends]\n"slow.example" = "{blackhole}"')
    gw = start_gateway(toml)
    response = exchange(gw.http, b"GET / HTTP/1.1\r\nHost: slow.example\r\n\r\n")
    assert status_of(response) == 504
    assert answer_without_closing(gw.https, real_hello("slow.example")) == alert(80)
    assert gw.connection_log(outcome="backend_timeout", listener="https")
    # The greenlet whose connect timed out is parked and serves the next client.
    response = exchange(gw.http, b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"alpha http a.example")


@pytest.mark.parametrize("sni", ["unknown.example", None])
def test_tls_no_route_alert_112(patient_gateway, sni):
    started = time.monotonic()
    assert answer_without_closing(patient_gateway.https, real_hello(sni)) == alert(112)
    assert time.monotonic() - started < 5
    assert patient_gateway.connection_log(outcome="no_route", listener="https")


def test_tls_sslv2_hello_without_default_gets_alert_112(patient_gateway):
    # SSLv2-compatible ClientHello: 2-byte length with the high bit, msg_type 1, version 3.1
    hello = bytes.fromhex("801f010301000600000010") + bytes.fromhex("000035 00002f 00000a") + b"\x01" * 16
    hello = bytes([0x80, len(hello) - 2]) + hello[2:]
    assert answer_without_closing(patient_gateway.https, hello) == alert(112)


def test_tls_backend_refused_alert_80(patient_gateway):
    assert answer_without_closing(patient_gateway.https, real_hello("refused.example")) == alert(80)
    assert patient_gateway.connection_log(outcome="backend_unreachable", listener="https")


def test_tls_malformed_hello_decode_error(patient_gateway):
    hello = bytearray(real_hello("a.example"))
    hello[9] ^= 0x40  # the handshake length now lies
    assert answer_without_closing(patient_gateway.https, bytes(hello)) in (alert(50), alert(40))


def test_http_on_tls_port_gets_400_saying_so(patient_gateway):
    response = answer_without_closing(patient_gateway.https, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert status_of(response) == 400
    assert b"TLS port" in response
    assert patient_gateway.connection_log(outcome="http_on_tls_port")


def test_garbage_on_tls_port_is_closed_at_once(patient_gateway):
    started = time.monotonic()
    assert answer_without_closing(patient_gateway.https, b"\x00\x01\x02garbage") == b""
    assert time.monotonic() - started < 5
    assert patient_gateway.connection_log(outcome="not_tls")


def test_tls_preamble_timeout_closes_quietly(start_gateway, backends):
    gw = start_gateway(routes_toml(backends, extra_gateway="preamble_timeout = 0.5"))
    hello = real_hello("a.example")
    started = time.monotonic()
    assert answer_without_closing(gw.https, hello[:20]) == b""
    assert 0.4 < time.monotonic() - started < 3
    assert gw.connection_log(outcome="preamble_timeout", listener="https")


def test_client_that_leaves_early_is_logged(patient_gateway):
    with socket.create_connection(patient_gateway.https, timeout=TIMEOUT):
        pass
    assert patient_gateway.connection_log(outcome="client_closed", listener="https")


@pytest.mark.parametrize(
    "error",
    [
        kiaerrors.BackendUnreachable("connect to 10.1.2.3:5432 for a.example: Connection refused"),
        kiaerrors.BackendUnreachable("cannot resolve billing-db.internal for a.example: Name or service not known"),
        kiaerrors.BackendUnreachable("connect to 10.1.2.3:5432 for a.example: Too many open files"),
        kiaerrors.BackendTimeout("connect to billing-db.internal:5432 for a.example timed out after 3s"),
        kiaerrors.BadRequest("invalid host: invalid character in b'<script>'"),
    ],
)
def test_error_reply_carries_a_fixed_text_per_status(error):
    reply = kiaerrors.reply(error, "http")
    assert reply == kiaerrors.http_response(error.http_status)
    for inside in (b"10.1.2.3", b"5432", b"billing", b"internal", b"refused", b"files", b"script", b"3s"):
        assert inside not in reply
    assert reply == kiaerrors.reply(type(error)("another reason"), "http")  # fixed: the reason is not in it


def test_502_and_504_bodies_name_nothing_inside(start_gateway, backends, blackhole):
    refused = free_closed_port()
    toml = routes_toml(backends, extra_gateway="connect_timeout = 0.5")
    toml = toml.replace(
        "[http_backends]",
        f'[http_backends]\n"refused.example" = "localhost:{refused}"\n"slow.example" = "{blackhole}"',
    )
    gw = start_gateway(toml)
    blackhole_port = blackhole.rpartition(":")[2].encode()
    for host, status, port, outcome in (
        ("refused.example", 502, str(refused).encode(), "backend_unreachable"),
        ("slow.example", 504, blackhole_port, "backend_timeout"),
    ):
        response = exchange(gw.http, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        assert status_of(response) == status
        body = response.partition(b"\r\n\r\n")[2]
        for inside in (port, b"127.0.0.1", b"localhost", b"refused", b"timed out"):
            assert inside not in body, body
        line = gw.connection_log(domain=host)
        assert line["outcome"] == outcome
        assert str(port.decode()) in line["reason"]  # the cause goes to the log


@pytest.fixture
def default_route_gateway(start_gateway, backends):
    """A gateway with a "*" route: a request refused with 400 was not sent to the default backend."""
    toml = routes_toml(backends, extra_gateway="preamble_timeout = 30.0")
    return start_gateway(toml.replace("[http_backends]", f'[http_backends]\n"*" = "{backends["default"].address}"'))


@pytest.mark.parametrize(
    "head",
    [
        b"GET ws://a.example/chat HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"GET ftp://a.example/file HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n",
    ],
)
def test_unroutable_targets_get_400_not_the_default_route(default_route_gateway, head):
    response = answer_without_closing(default_route_gateway.http, head)
    assert status_of(response) == 400
    assert default_route_gateway.connection_log(outcome="bad_request")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HEAD / HTTP/1.1\r\nHost: a.ex ample\r\n\r\n", 400),
        (b"HEAD / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n", 421),
    ],
)
def test_refused_head_request_gets_no_body(patient_gateway, head, status):
    response = answer_without_closing(patient_gateway.http, head)
    fields, _, body = response.partition(b"\r\n\r\n")
    assert fields.startswith(b"HTTP/1.1 %d " % status)
    assert body == b""
    length = int(next(line for line in fields.split(b"\r\n") if line.startswith(b"Content-Length: "))[16:])
    assert length == len(kiaerrors.http_response(status).partition(b"\r\n\r\n")[2])  # the GET's body size


def test_http_response_for_head_has_the_fields_without_the_body():
    full = kiaerrors.http_response(502)
    assert kiaerrors.http_response(502, head=True) == full.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
