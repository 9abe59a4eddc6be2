"""Traffic control of 0.3: backend pools with failover and cooldown, allow-lists, the per-client limit.

Clients bind 127.0.0.1 or 127.0.0.2 before they connect, to be two client addresses.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time

import pytest
from conftest import TIMEOUT, _HTTPBackend, _WhoAmI, free_closed_port, read_all
from hellos import real_hello
from test_errors import alert, blackhole, status_of  # noqa: F401 - blackhole is a fixture

import kiaerrors

ONE, TWO = "127.0.0.1", "127.0.0.2"  # two client addresses on the loopback
LISTEN = '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = ["127.0.0.1:0"]\n'


def connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=TIMEOUT, source_address=(source, 0))


def exchange_from(source: str, address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` from ``source``, half-close, and return everything that comes back."""
    with connect_from(source, address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def get(address: tuple[str, int], host: str, source: str = ONE) -> bytes:
    return exchange_from(source, address, f"GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


def served_by(response: bytes) -> str:
    """The name of the whoami backend that answered."""
    assert response.startswith(b"HTTP/1.1 200"), response[:80]
    return response.partition(b"\r\n\r\n")[2].split()[0].decode()


def tls_get(address: tuple[str, int], sni: str, context: ssl.SSLContext) -> str:
    with connect_from(ONE, address) as raw, context.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(f"GET /whoami HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        return served_by(read_all(tls))


def connection_lines(gw, count: int, **match) -> list[dict]:
    """Wait for ``count`` connection lines whose fields include ``match``; return them in order."""

    def matches(line: dict) -> bool:
        return line.get("message") == "connection" and all(line.get(k) == v for k, v in match.items())

    found = 0

    def enough(line: dict) -> bool:  # wait_for offers each line once: count them as they come
        nonlocal found
        found += matches(line)
        return found >= count

    gw.wait_for(enough)
    return [line for line in gw.seen if matches(line)]


class LateBackend:
    """A whoami backend bound at once but listening only from ``start()``: until then, connects are refused."""

    def __init__(self, name: str) -> None:
        self.server = _HTTPBackend(("127.0.0.1", 0), _WhoAmI, bind_and_activate=False)
        self.server.server_bind()
        self.server.name, self.server.scheme = name, "http"
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(TIMEOUT)
        self.server.server_close()


@pytest.fixture
def late():
    backend = LateBackend("late")
    yield backend
    backend.close()


# ---------------------------------------------------------------------------
# Pools


def test_pool_goes_round_robin_and_logs_the_address_that_served(start_gateway, backends, client_context):
    b = backends
    gw = start_gateway(
        f'{LISTEN}[http_backends]\n"a.example" = ["{b["alpha"].address}", "{b["beta"].address}"]\n'
        f'[https_backends]\n"a.example" = {{ address = ["{b["alpha-tls"].address}", "{b["beta-tls"].address}"] }}\n'
    )
    names = [served_by(get(gw.http, "a.example")) for _ in range(6)]
    assert names == ["alpha", "beta"] * 3  # one worker: strict alternation
    lines = connection_lines(gw, 6, listener="http", outcome="ok")
    assert [line["backend"] for line in lines] == [b["alpha"].address, b["beta"].address] * 3
    assert not any("tried" in line for line in lines)  # no failover, nothing to tell
    assert [tls_get(gw.https, "a.example", client_context) for _ in range(4)] == ["alpha", "beta"] * 2


def test_pool_fails_over_and_skips_the_failed_address_while_it_cools_down(start_gateway, backends, late):
    alpha = backends["alpha"].address
    gw = start_gateway(
        f'{LISTEN}backend_cooldown = 60.0\n[http_backends]\n"a.example" = ["{late.address}", "{alpha}"]\n'
    )
    assert served_by(get(gw.http, "a.example")) == "alpha"  # refused first, then the next address
    line = gw.connection_log(outcome="ok")
    assert (line["backend"], line["tried"]) == (alpha, [late.address, alpha])
    late.start()  # it answers now, but it failed within backend_cooldown
    assert [served_by(get(gw.http, "a.example")) for _ in range(4)] == ["alpha"] * 4
    assert all(line["backend"] == alpha and "tried" not in line for line in connection_lines(gw, 5)[1:])


def test_pool_tries_a_cooled_down_address_again(start_gateway, backends, late):
    alpha = backends["alpha"].address
    gw = start_gateway(
        f'{LISTEN}backend_cooldown = 0.3\n[http_backends]\n"a.example" = ["{late.address}", "{alpha}"]\n'
    )
    assert served_by(get(gw.http, "a.example")) == "alpha"
    late.start()
    deadline = time.monotonic() + TIMEOUT
    names = set()
    while "late" not in names and time.monotonic() < deadline:  # round-robin comes to it every other connection
        names.add(served_by(get(gw.http, "a.example")))
    assert "late" in names
    assert gw.connection_log(backend=late.address, outcome="ok")


def test_pool_fails_over_from_a_backend_that_times_out(start_gateway, backends, blackhole):  # noqa: F811
    alpha = backends["alpha"].address
    gw = start_gateway(f'{LISTEN}connect_timeout = 0.5\n[http_backends]\n"a.example" = ["{blackhole}", "{alpha}"]\n')
    assert served_by(get(gw.http, "a.example")) == "alpha"
    line = gw.connection_log(outcome="ok")
    assert (line["backend"], line["tried"]) == (alpha, [blackhole, alpha])


def test_pool_all_failed_answers_as_the_last_attempt(start_gateway, blackhole):  # noqa: F811
    refused = f"127.0.0.1:{free_closed_port()}"
    pool = f'["{refused}", "{blackhole}"]'
    gw = start_gateway(
        f'{LISTEN}connect_timeout = 0.5\n[http_backends]\n"a.example" = {pool}\n'
        f'[https_backends]\n"a.example" = {pool}\n'
    )
    request = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    # First round: refused, then the black hole times out: 504.
    assert status_of(exchange_from(ONE, gw.http, request)) == 504
    line = gw.connection_log(outcome="backend_timeout")
    assert (line["backend"], line["tried"]) == (blackhole, [refused, blackhole])
    # Both cool down now, so both are tried, from where round-robin stands: the refusal is last, 502.
    assert status_of(exchange_from(ONE, gw.http, request)) == 502
    line = gw.connection_log(outcome="backend_unreachable")
    assert (line["backend"], line["tried"]) == (refused, [blackhole, refused])
    with connect_from(ONE, gw.https) as sock:
        sock.sendall(real_hello("a.example"))
        assert read_all(sock) == alert(80)
    assert gw.connection_log(listener="https")["tried"] == [refused, blackhole]


def free_descriptors(pid: int, limit: int) -> int:
    """Descriptors the process may still open under its RLIMIT_NOFILE of ``limit`` (every number is below it)."""
    return limit - len(os.listdir(f"/proc/{pid}/fd"))


def poll_free(pid: int, limit: int, wanted: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while free_descriptors(pid, limit) != wanted:
        assert time.monotonic() < deadline, f"{free_descriptors(pid, limit)} descriptors free, not {wanted}"
        time.sleep(0.01)


def read_response(sock: socket.socket) -> bytes:
    """One Content-Length framed response of a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def fill_descriptors(address: tuple[str, int], pid: int, limit: int, leave: int, request: bytes) -> list:
    """Connections that leave the gateway ``leave`` descriptors: relays (two each), then a client that sends nothing.

    Each step waits until the gateway holds what it took, so the count is exact.
    """
    held: list[socket.socket] = []
    free = free_descriptors(pid, limit)
    try:
        while free > leave:
            sock = socket.create_connection(address, timeout=TIMEOUT)
            held.append(sock)
            if free - leave >= 2:  # a keep-alive relay holds two: client and backend
                sock.sendall(request)
                assert read_response(sock).startswith(b"HTTP/1.1 200")
                free -= 2
            else:  # accepted, reading its preamble: one
                free -= 1
            poll_free(pid, limit, free)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts the gateway's descriptors in /proc")
def test_out_of_descriptors_is_a_local_error_and_cools_no_pool_address_down(start_gateway, backends, client_context):
    """The gateway's own shortage: 503 / alert 80, outcome local_error, no failover, and no address cooled down.

    Relays hold the descriptor limit but one: the next client is accepted and its
    connect finds no descriptor. Once the relays are gone, both pool addresses serve
    again in turn at once, well within backend_cooldown.
    """
    b = backends
    limit = 48
    gw = start_gateway(
        f"{LISTEN}backend_cooldown = 60.0\npreamble_timeout = 60.0\n"
        f'[http_backends]\n"a.example" = ["{b["alpha"].address}", "{b["beta"].address}"]\n'
        f'[https_backends]\n"a.example" = ["{b["alpha-tls"].address}", "{b["beta-tls"].address}"]\n',
        max_fds=limit,
    )
    pid = gw.proc.pid
    held = fill_descriptors(gw.http, pid, limit, 1, b"GET /whoami HTTP/1.1\r\nHost: a.example\r\n\r\n")
    try:
        answer = get(gw.http, "a.example")
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer[:80]
        assert b"open files" not in answer and b"EMFILE" not in answer  # the cause goes to the log only
        line = gw.connection_log(outcome="local_error", listener="http")
        assert "EMFILE" in line["reason"] and "tried" not in line, line  # no failover: the next fails alike
        poll_free(pid, limit, 1)
        with connect_from(ONE, gw.https) as sock:
            sock.sendall(real_hello("a.example"))
            assert read_all(sock) == alert(80)
        line = gw.connection_log(outcome="local_error", listener="https")
        assert "EMFILE" in line["reason"] and "tried" not in line, line
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + TIMEOUT
    while not get(gw.http, "a.example").startswith(b"HTTP/1.1 200"):  # the held relays end as their FINs arrive
        assert time.monotonic() < deadline, "not serving again after the descriptors were freed"
    names = [served_by(get(gw.http, "a.example")) for _ in range(4)]
    assert sorted(names) == ["alpha", "alpha", "beta", "beta"], names  # neither address was put in cooldown
    tls = [tls_get(gw.https, "a.example", client_context) for _ in range(2)]
    assert sorted(tls) == ["alpha", "beta"], tls


# ---------------------------------------------------------------------------
# Allow-lists


@pytest.mark.parametrize(
    ("error", "status", "tls"), [(kiaerrors.Forbidden, 403, alert(49)), (kiaerrors.ClientLimit, 429, b"")]
)
def test_refusal_replies_are_fixed(error, status, tls):
    reply = kiaerrors.reply(error("client 10.1.2.3 is outside the allow-list"), "http")
    assert reply == kiaerrors.http_response(status) and b"10.1.2.3" not in reply
    assert status_of(reply) == status
    assert kiaerrors.reply(error("x"), "https") == tls


def test_allow_list_refuses_other_clients_before_any_connect(start_gateway):
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(TIMEOUT)
    address = f"127.0.0.1:{backend.getsockname()[1]}"
    route = f'{{ address = "{address}", allow = ["127.0.0.2/32", "2001:db8::/32"] }}'
    gw = start_gateway(f'{LISTEN}[http_backends]\n"a.example" = {route}\n[https_backends]\n"a.example" = {route}\n')
    with backend:
        assert status_of(get(gw.http, "a.example", source=ONE)) == 403
        with connect_from(ONE, gw.https) as sock:
            sock.sendall(real_hello("a.example"))
            assert read_all(sock) == alert(49)
        for listener in ("http", "https"):
            line = gw.connection_log(outcome="forbidden", listener=listener)
            assert (line["client"].split(":")[0], line["backend"]) == (ONE, None)
        backend.setblocking(False)
        with pytest.raises(BlockingIOError):
            backend.accept()  # the backend never saw them
        backend.setblocking(True)
        with connect_from(TWO, gw.http) as client:  # the allowed client goes through
            client.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                assert conn.recv(4096).startswith(b"GET / HTTP/1.1\r\n")
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            assert read_all(client) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_allow_list_over_ipv6(start_gateway, backends):
    alpha = backends["alpha"].address
    gw = start_gateway(
        '[gateway]\nhttp_listen = ["[::1]:0"]\nhttps_listen = []\n[http_backends]\n'
        f'"six.example" = {{ address = "{alpha}", allow = ["10.0.0.0/8", "::1/128"] }}\n'
        f'"doc.example" = {{ address = "{alpha}", allow = ["127.0.0.0/8", "2001:db8::/32"] }}\n'
    )
    assert served_by(get(gw.http, "six.example", source="::1")) == "alpha"
    assert status_of(get(gw.http, "doc.example", source="::1")) == 403
    assert gw.connection_log(outcome="forbidden")["client"].startswith("[::1]:")


def test_a_dual_stack_listeners_ipv4_client_gets_the_ipv4_listeners_answers(start_gateway, backends):
    """One IPv4 client, one answer: on a dual-stack socket (IPV6_V6ONLY off, handed over by socket activation,
    bound to ::ffff:127.0.0.1 to stay on loopback) it is 127.0.0.1 as on an IPv4 listener, for the log, the
    allow-lists (::/0 admits it on neither, ::ffff:127.0.0.0/104 on both) and the PROXY header sent on."""
    from conftest import gateway_command
    from test_proxy_input import Recorder
    from test_upgrade import FirstClient, activator

    recorder = Recorder()
    ports = [free_closed_port(), free_closed_port()]
    command = [activator(), f"--listen=[::ffff:127.0.0.1]:{ports[0]}", f"--listen=127.0.0.1:{ports[1]}"]
    first = FirstClient(("127.0.0.1", ports[0]))  # socket activation starts the gateway at the first connect
    try:
        gw = start_gateway(
            f'[http_backends]\n"ten.example" = {{ address = "{recorder.address}", proxy_protocol = "v1", '
            'allow = ["::ffff:127.0.0.0/104"] }\n'
            f'"v6.example" = {{ address = "{backends["alpha"].address}", allow = ["::/0"] }}\n',
            command=[*command, "--fdname=http:http", *gateway_command()],
        )
        first.thread.join(TIMEOUT)
        for port in ports:
            with connect_from(ONE, ("127.0.0.1", port)) as sock:
                client = sock.getsockname()
                sock.sendall(b"GET / HTTP/1.1\r\nHost: ten.example\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                assert read_all(sock) == b""
            header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client[1]} {port}\r\n".encode()
            assert recorder.next() == header + b"GET / HTTP/1.1\r\nHost: ten.example\r\n\r\n"
            line = gw.connection_log(client=f"127.0.0.1:{client[1]}")
            assert line["outcome"] == "ok" and "proxy" not in line, line
            assert status_of(get(("127.0.0.1", port), "v6.example")) == 403
        forbidden = connection_lines(gw, 2, outcome="forbidden")
        assert all(line["client"].startswith("127.0.0.1:") for line in forbidden), forbidden
    finally:
        first.thread.join(TIMEOUT)
        recorder.close()


# ---------------------------------------------------------------------------
# Per-client limit


def hold(source: str, address: tuple[str, int], count: int) -> list[socket.socket]:
    """Open ``count`` connections that send nothing yet: each waits in the gateway for its preamble."""
    return [connect_from(source, address) for _ in range(count)]


def tls_closed_cleanly(source: str, address: tuple[str, int]) -> bool:
    """Send a ClientHello: True when the gateway closes with a FIN and nothing sent (no alert, no reset)."""
    with connect_from(source, address) as sock:
        sock.sendall(real_hello("a.example"))
        try:
            return sock.recv(4096) == b""
        except ConnectionResetError:
            return False


def assert_at_the_limit(gw, source: str, limit: int, host: str) -> None:
    """``limit`` connections from ``source`` are let in, the next is refused, and the held ones are served."""
    held = hold(source, gw.http, limit)
    try:
        assert status_of(exchange_from(source, gw.http, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")) == 429
        assert tls_closed_cleanly(source, gw.https)
        for sock in held:
            sock.sendall(f"GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert read_all(sock).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


def test_per_client_limit(start_gateway, backends):
    alpha = backends["alpha"].address
    gw = start_gateway(
        f'{LISTEN}max_connections_per_client = 3\npreamble_timeout = 30.0\n[http_backends]\n"a.example" = "{alpha}"\n'
    )
    held = hold(ONE, gw.http, 3)
    try:
        response = exchange_from(ONE, gw.http, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert status_of(response) == 429 and b"too many connections from this client" in response
        assert tls_closed_cleanly(ONE, gw.https)  # TLS and HTTP count together
        assert served_by(get(gw.http, "a.example", source=TWO)) == "alpha"  # another client is not limited
        for listener in ("http", "https"):
            assert gw.connection_log(outcome="client_limit", listener=listener)["client"].startswith(ONE + ":")
    finally:
        for sock in held:
            sock.close()


def test_a_client_over_its_limit_cannot_fill_max_connections(start_gateway, backends):
    """Refusals of one address opening idle connections fast must not hold the slots every client shares."""
    alpha = backends["alpha"].address
    gw = start_gateway(
        f"{LISTEN}max_connections = 20\nmax_connections_per_client = 2\npreamble_timeout = 30.0\n"
        f'[http_backends]\n"a.example" = "{alpha}"\n'
    )
    held: list[socket.socket] = []
    opened = threading.Event()
    stop = threading.Event()

    def hog() -> None:  # 127.0.0.2 opens idle connections as fast as it can and keeps them
        deadline = time.monotonic() + TIMEOUT
        while not stop.is_set() and len(held) < 600 and time.monotonic() < deadline:
            sock = socket.socket()
            held.append(sock)
            sock.bind((TWO, 0))
            sock.setblocking(False)
            try:
                sock.connect(gw.http)
            except BlockingIOError:
                pass
            if len(held) == 200:
                opened.set()
        opened.set()

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        assert opened.wait(TIMEOUT)
        for _ in range(3):
            started = time.monotonic()
            with connect_from(ONE, gw.http) as sock:
                sock.settimeout(3.0)  # held 1 s a refusal, 200 refusals in 18 slots would take 10 s
                sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
                assert served_by(read_all(sock, 3.0)) == "alpha", time.monotonic() - started
    finally:
        stop.set()
        thread.join(TIMEOUT)
        for sock in held:
            sock.close()


LINGER_RESET = struct.pack("ii", 1, 0)


def test_per_client_counts_never_leak(start_gateway, backends, blackhole):  # noqa: F811
    """After connections ending every way, each client again gets exactly its limit."""
    refused = f"127.0.0.1:{free_closed_port()}"
    alpha = backends["alpha"].address
    gw = start_gateway(
        f"{LISTEN}max_connections_per_client = 3\npreamble_timeout = 2.0\nconnect_timeout = 0.2\n"
        f'[http_backends]\n"a.example" = "{alpha}"\n"refused.example" = "{refused}"\n'
        f'"slow.example" = "{blackhole}"\n"pool.example" = ["{refused}", "{alpha}"]\n'
        f'"closed.example" = {{ address = "{alpha}", allow = ["10.0.0.0/8"] }}\n'
        f'[https_backends]\n"a.example" = "{backends["alpha-tls"].address}"\n'
    )
    made = 0
    stalled = [connect_from(TWO, gw.http) for _ in range(2)]  # preamble_timeout during the churn
    for sock in stalled:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.exa")
    made += len(stalled)

    def request(host: str, source: str = ONE) -> int:
        return status_of(exchange_from(source, gw.http, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))

    for round in range(220):
        source = (ONE, TWO)[round % 2]
        assert served_by(get(gw.http, "a.example", source)) == "alpha"
        assert served_by(get(gw.http, "pool.example", source)) == "alpha"
        assert request("nowhere.example", source) == 421
        assert request("refused.example", source) == 502
        assert request("closed.example", source) == 403
        assert status_of(exchange_from(source, gw.http, b"GET /a b HTTP/1.1\r\n\r\n")) == 400
        with connect_from(source, gw.https) as sock:  # no route: alert 112
            sock.sendall(real_hello("nowhere.example"))
            assert read_all(sock) == alert(112)
        reset = connect_from(source, gw.http)  # client_reset, or client_closed if it is not read yet
        reset.sendall(b"GET / HTTP/1.1\r\n")
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        reset.close()
        connect_from(source, gw.https).close()  # client_closed
        made += 9
        if round % 10 == 0:
            assert request("slow.example", source) == 504
            held = hold(source, gw.http, 3)
            assert request("a.example", source) == 429
            assert tls_closed_cleanly(source, gw.https)  # client_limit on TLS too
            for sock in held:
                sock.close()
            made += 6
    connection_lines(gw, made)  # every connection has ended and been logged
    outcomes = {line["outcome"] for line in gw.seen if line.get("message") == "connection"}
    assert outcomes >= {
        "ok",
        "no_route",
        "bad_request",
        "client_closed",
        "backend_unreachable",
        "backend_timeout",
        "forbidden",
        "client_limit",
        "preamble_timeout",
    }, outcomes
    for source in (ONE, TWO):
        assert_at_the_limit(gw, source, 3, "a.example")
    for sock in stalled:
        sock.close()
