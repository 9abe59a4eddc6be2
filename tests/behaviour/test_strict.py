"""Strict keep-alive routing (http_strict_host) through the gateway subprocess, with real clients and backends.

The backends record every request they receive on each connection, parsed the
way a plain HTTP/1.1 server does, so each test can say what reached them: a
request that routes to another route entry never does, whatever the client
pipelines, however it splits its bytes, whatever its bodies look like.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import TIMEOUT, gateway_command, read_all
from test_errors import blackhole  # noqa: F401 - a fixture
from test_relaying import cpu_seconds
from test_traffic import fill_descriptors

LARGE = 3 * 1024 * 1024  # a response bigger than every socket buffer on the way: still in flight when 421 waits


class RecordingBackend:
    """A keep-alive HTTP/1.1 server on 127.0.0.1:0 that records each request of each connection.

    Answers ``200`` with a body naming the request; ``/large`` gets LARGE bytes; ``/ws`` with
    Upgrade gets ``101`` and CONNECT gets ``200``, then the connection echoes raw bytes; ``/silent``
    gets no answer at all; after ``/close`` the backend closes. With ``accepts`` it closes its
    listener after that many connections: the next connect is refused. With ``proxy`` each
    connection starts with a PROXY v1 line, kept in ``proxy_lines``.
    """

    def __init__(self, name: str, accepts: int | None = None, proxy: bool = False) -> None:
        self.name = name
        self.accepts = accepts
        self.proxy = proxy
        self.proxy_lines: list[bytes] = []
        self.resets = 0  # tunnels that ended with a reset
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.connections: list[list[dict]] = []
        self.raw: list[bytes] = []  # what each tunnel echoed
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            requests: list[dict] = []
            self.connections.append(requests)
            if len(self.connections) == self.accepts:
                self.server.close()
            thread = threading.Thread(target=self._serve, args=(conn, requests), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, requests: list[dict]) -> None:
        conn.settimeout(TIMEOUT * 3)
        try:
            with conn, conn.makefile("rb") as rfile:
                if self.proxy:
                    self.proxy_lines.append(rfile.readline())
                while True:
                    line = rfile.readline()
                    if not line:
                        return
                    method, target, _ = line.decode("latin-1").split(" ", 2)
                    fields = {}
                    while (field := rfile.readline()) not in (b"\r\n", b""):
                        name, _, value = field.decode("latin-1").partition(":")
                        fields[name.strip().lower()] = value.strip()
                    body, trailers = b"", {}
                    if fields.get("transfer-encoding") == "chunked":
                        while size := int(rfile.readline().split(b";")[0], 16):
                            body += rfile.read(size)
                            assert rfile.read(2) == b"\r\n"
                        while (field := rfile.readline()) not in (b"\r\n", b""):
                            name, _, value = field.decode("latin-1").partition(":")
                            trailers[name.strip().lower()] = value.strip()
                    elif "content-length" in fields:
                        body = rfile.read(int(fields["content-length"]))
                    host = fields.get("host")
                    requests.append(
                        {"method": method, "target": target, "host": host, "body": body, "trailers": trailers}
                    )
                    if target == "/silent":  # a backend that hangs: only the gateway's idle_timeout ends it
                        self.stopping.wait(TIMEOUT * 3)
                        return
                    if (target == "/ws" and "upgrade" in fields) or method == "CONNECT":
                        status = b"101 Switching Protocols" if method != "CONNECT" else b"200 Connection established"
                        conn.sendall(b"HTTP/1.1 " + status + b"\r\n\r\n")
                        self._echo(conn, rfile)
                        return
                    reply = f"{self.name} {method} {target} {len(body)}".encode()
                    if target == "/large":
                        reply = b"L" * LARGE
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
                    if target == "/close":
                        return
        except BaseException as exc:
            self.errors.append(exc)

    def _echo(self, conn: socket.socket, rfile) -> None:
        echoed = b""
        try:
            while data := rfile.read1(65536):
                echoed += data
                conn.sendall(data)
        except ConnectionResetError:
            self.resets += 1
            return
        self.raw.append(echoed)

    def requests(self) -> list[dict]:
        return [r for c in self.connections for r in c]

    def close(self) -> None:
        self.stopping.set()
        self.server.close()
        self.thread.join(TIMEOUT)
        for thread in self.threads:
            thread.join(TIMEOUT)
        assert not self.errors, self.errors


@pytest.fixture
def strict(start_gateway):
    """Start a gateway in strict mode with two entries on one backend (a, c) and one on another (b)."""
    made = []

    def start(strict: bool = True, extra: str = "", env: dict | None = None):
        one, two = RecordingBackend("one"), RecordingBackend("two")
        made.extend((one, two))
        gw = start_gateway(
            f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n'
            f"http_strict_host = {'true' if strict else 'false'}\n{extra}\n"
            f'[http_backends]\n"a.example" = "{one.address}"\n"*.a.example" = "{one.address}"\n'
            f'"c.example" = "{one.address}"\n"b.example" = "{two.address}"\n',
            env=env,
        )
        return gw, one, two

    yield start
    for backend in made:
        backend.close()


def get(host: str, target: str = "/", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def post(host: str, body: bytes, target: str = "/up") -> bytes:
    return f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a response stream (Content-Length framed, as our backends and the gateway write it)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:200]
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def talk(address, pieces: list[bytes], pause: float = 0.0) -> bytes:
    """Send ``pieces`` one by one (each its own segment), half-close, then read to EOF."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            if pause:
                time.sleep(pause)  # not synchronisation: spreads the pieces over several reads of the gateway
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_head(sock: socket.socket) -> bytes:
    """A response head, read a byte at a time so that nothing after it is taken."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, head
        head += byte
    return head


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --------------------------------------------------------------------------


def test_another_entry_pipelined_after_a_large_response_gets_421_after_it(strict):
    gw, one, two = strict()
    data = talk(gw.http, [get("a.example", "/large") + get("b.example", "/stolen") + get("a.example", "/after")])
    got = responses(data)
    assert [status for status, _ in got] == [200, 421]
    assert got[0][1] == b"L" * LARGE
    assert b"another host" in got[1][1]
    assert [r["target"] for r in one.requests()] == ["/large"]
    assert two.requests() == []
    line = gw.connection_log(domain="a.example")
    assert line["outcome"] == "host_changed" and "b.example" in line["reason"]


def test_strict_off_keeps_the_old_behaviour(strict):
    """The bypass strict mode closes: without it, the second request reaches the first backend."""
    gw, one, _ = strict(strict=False)
    data = talk(gw.http, [get("a.example") + get("b.example", "/stolen")])
    assert [status for status, _ in responses(data)] == [200, 200]
    assert [r["host"] for r in one.requests()] == ["a.example", "b.example"]


def test_same_backend_address_but_another_entry_is_refused(strict):
    gw, one, _ = strict()
    data = talk(gw.http, [get("a.example") + get("c.example", "/stolen")])
    assert [status for status, _ in responses(data)] == [200, 421]
    assert [r["host"] for r in one.requests()] == ["a.example"]


@pytest.mark.parametrize("size", [1, 7, 100])
def test_same_entry_split_anywhere_is_forwarded_and_another_never(strict, size):
    gw, one, two = strict()
    stream = (
        get("a.example", "/1")
        + post("A.Example:80", get("b.example", "/hidden"), "/2")  # a body that looks like a request
        + get("x.a.example", "/3")  # another name, the same entry? no: *.a.example is an entry of its own
    )
    data = talk(gw.http, split(stream, size), pause=0.001 if size > 1 else 0.0)
    assert [status for status, _ in responses(data)] == [200, 200, 421]
    assert [(r["target"], r["body"]) for r in one.requests()] == [("/1", b""), ("/2", get("b.example", "/hidden"))]
    assert two.requests() == []


def test_chunked_body_with_trailers_then_another_entry(strict):
    gw, one, two = strict()
    hidden = get("b.example", "/hidden")
    body = b"5;ext=1\r\nhello\r\n%x\r\n%s\r\n0\r\nX-Sum: 7\r\n\r\n" % (len(hidden), hidden)
    head = b"POST /chunks HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = talk(gw.http, split(head + body + get("a.example", "/next") + get("b.example"), 13), pause=0.001)
    assert [status for status, _ in responses(data)] == [200, 200, 421]
    first, second = one.requests()
    assert first["body"] == b"hello" + hidden and first["trailers"] == {"x-sum": "7"}
    assert second["target"] == "/next"
    assert two.requests() == []


@pytest.mark.parametrize(
    "fields",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # CL.TE
        "Transfer-Encoding: xchunked\r\n",  # TE.TE
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    ],
)
def test_ambiguous_framing_is_400_in_the_first_request_and_later(strict, fields):
    gw, one, _ = strict()
    bad = f"POST / HTTP/1.1\r\nHost: a.example\r\n{fields}\r\n".encode() + b"0\r\n\r\nhello"
    data = talk(gw.http, [bad])
    assert data.startswith(b"HTTP/1.1 400 ")
    assert one.connections == []  # not even connected
    data = talk(gw.http, [get("a.example") + bad])
    assert [status for status, _ in responses(data)] == [200, 400]
    assert [r["target"] for r in one.requests()] == ["/"]
    assert gw.connection_log(outcome="bad_request", domain="a.example")


def test_upgrade_101_ends_inspection(strict):
    gw, one, _ = strict()
    upgrade = get("a.example", "/ws", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(upgrade)
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        tunnel = get("b.example", "/in-the-tunnel")
        sock.sendall(tunnel)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == tunnel
    assert one.raw == [tunnel]


def test_upgrade_refused_by_the_backend_keeps_inspecting(strict):
    gw, one, _ = strict()
    refused = get("a.example", "/no-ws", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
    data = talk(gw.http, [refused + get("b.example", "/stolen")])
    assert [status for status, _ in responses(data)] == [200, 421]
    assert [r["target"] for r in one.requests()] == ["/no-ws"]


def test_connect_200_ends_inspection(strict):
    gw, _, _ = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\x16\x03\x01 not http at all")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"\x16\x03\x01 not http at all"


def test_silent_backend_answered_after_idle_timeout(strict):
    gw, one, _ = strict(extra="idle_timeout = 1.0")
    started = time.monotonic()
    data = talk(gw.http, [get("a.example", "/silent") + get("b.example", "/stolen")])
    assert data.startswith(b"HTTP/1.1 421 ") and time.monotonic() - started >= 0.9
    assert [r["target"] for r in one.requests()] == ["/silent"]
    assert gw.connection_log(outcome="host_changed")


def test_a_later_head_left_unfinished_ends_at_idle_timeout(strict):
    """Bytes the strict relay holds back count as activity on the idle timer's clock (monotonic)."""
    gw, _, _ = strict(extra="idle_timeout = 1.0")
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example"))
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET / HTTP/1.1\r\nHo")  # a head that never ends: held back, then silence
        sent = time.monotonic()
        read_all(sock)
        assert time.monotonic() - sent < 4.0
    assert gw.connection_log(outcome="idle_timeout")


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_large_upload_passes_and_the_next_head_is_still_checked(strict, mode):
    gw, one, _ = strict(env={"KIAGATEWAY_NO_SPLICE": "1"} if mode == "copy" else None)
    body = bytes(range(256)) * 8192  # 2 MiB: spliced past the parser when splice is there
    data = talk(gw.http, [post("a.example", body) + get("a.example", "/next") + get("b.example")])
    assert [status for status, _ in responses(data)] == [200, 200, 421]
    first, second = one.requests()
    assert first["body"] == body and second["target"] == "/next"
    line = gw.connection_log(outcome="host_changed")
    assert line["bytes_up"] == len(post("a.example", body) + get("a.example", "/next"))


def test_a_large_upload_with_no_pipe_free_is_copied(strict):
    """No pipe to be had (KIAGATEWAY_MAX_PIPES=0: the pool's cap, or a container's pipe quota): the body is copied.

    A 1 MiB POST from curl, and one from http.client followed by another request on
    the same keep-alive connection: each body reaches the backend intact, each client
    its answer, each connection logs ok, and the gateway prints no traceback.
    """
    gw, one, _ = strict(env={"KIAGATEWAY_MAX_PIPES": "0"})
    bodies = [os.urandom(1 << 20), os.urandom(1 << 20)]
    url = f"http://{gw.http[0]}:{gw.http[1]}/curl"
    command = ["curl", "-sS", "--max-time", str(TIMEOUT), "-H", "Host: a.example", "-H", "Expect:"]
    curl = subprocess.run(
        [*command, "--data-binary", "@-", url],
        input=bodies[0],
        capture_output=True,
        timeout=TIMEOUT * 2,
    )
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout == f"one POST /curl {len(bodies[0])}".encode()
    client = http.client.HTTPConnection(*gw.http, timeout=TIMEOUT)
    try:
        client.request("POST", "/kept", body=bodies[1], headers={"Host": "a.example"})
        answer = client.getresponse()
        assert (answer.status, answer.read()) == (200, f"one POST /kept {len(bodies[1])}".encode())
        client.request("GET", "/next", headers={"Host": "a.example"})
        answer = client.getresponse()
        assert (answer.status, answer.read()) == (200, b"one GET /next 0")
    finally:
        client.close()
    received = [(r["target"], hashlib.sha256(r["body"]).hexdigest()) for r in one.requests()]
    assert received == [
        ("/curl", hashlib.sha256(bodies[0]).hexdigest()),
        ("/kept", hashlib.sha256(bodies[1]).hexdigest()),
        ("/next", hashlib.sha256(b"").hexdigest()),
    ]
    assert gw.stop() == 0
    lines = [line for line in gw.seen if line.get("message") == "connection"]
    assert [line["outcome"] for line in lines] == ["ok", "ok"]
    assert all(line["bytes_up"] > len(bodies[0]) for line in lines), lines
    assert not [line for line in gw.seen if line.get("message") == "NOT JSON" or line.get("outcome") == "error"]


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    head = read_head(sock)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = b""
    while len(body) < length:
        data = sock.recv(length - len(body))
        assert data, head
        body += data
    return int(head.split(b" ")[1]), body


def test_requests_sent_one_at_a_time_are_each_checked_and_forwarded(strict):
    """The usual keep-alive client: one whole head per read, repeated or not, then one for another entry."""
    gw, one, two = strict()
    sent = b""
    heads = [get("a.example", "/same")] * 4 + [get("a.example", f"/p{i}", "Accept: */*\r\n") for i in range(3)]
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        for head in heads:  # each waits for its answer: the gateway reads it whole, alone
            sock.sendall(head)
            sent += head
            assert read_response(sock)[0] == 200
        sock.sendall(get("b.example", "/stolen"))
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 421 ")
    assert [r["target"] for r in one.requests()] == ["/same"] * 4 + ["/p0", "/p1", "/p2"]
    assert len(one.connections) == 1 and two.requests() == []
    line = gw.connection_log(outcome="host_changed")
    assert line["bytes_up"] == len(sent)


def test_the_table_in_force_when_the_request_arrives_decides(strict):
    """A reload that keeps the entry keeps the connection; one that moves the name refuses its next request."""
    gw, one, two = strict()
    text = gw.config.read_text()
    reloads: list[dict] = []

    def reload(new_text: str) -> None:
        gw.config.write_text(new_text)
        gw.proc.send_signal(signal.SIGHUP)
        reloads.append(
            gw.wait_for(lambda line: line.get("message") == "config reloaded" and all(line is not r for r in reloads))
        )

    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/1"))
        assert read_response(sock)[0] == 200
        reload(text.replace('"b.example"', '"d.example"'))  # another table, the same entry for a.example
        sock.sendall(get("a.example", "/2"))
        assert read_response(sock)[0] == 200
        reload(text.replace(f'"a.example" = "{one.address}"', f'"a.example" = "{two.address}"'))
        sock.sendall(get("a.example", "/3"))
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 421 ")
    assert [r["target"] for r in one.requests()] == ["/1", "/2"]
    assert two.requests() == []


def test_refused_after_the_backend_closed_ends_the_connection(strict):
    gw, one, two = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/close"))
        assert read_response(sock)[0] == 200
        assert sock.recv(100) == b""  # the backend's FIN, passed on
        sock.sendall(get("b.example", "/stolen"))  # the client may still write: half-close
        line = gw.connection_log(outcome="host_changed")
    assert "b.example" in line["reason"]
    assert [r["target"] for r in one.requests()] == ["/close"] and two.requests() == []


WEBSOCKET = "Connection: Upgrade\r\nUpgrade: websocket\r\n"


def targets(backend: RecordingBackend) -> list[list[str]]:
    """The targets each connection of ``backend`` received, one list per connection."""
    return [[r["target"] for r in requests] for requests in backend.connections]


def echo_through(sock: socket.socket, data: bytes) -> None:
    """Send raw bytes through a tunnel the backend echoes, read them back, then close it: nothing else comes."""
    sock.sendall(data)
    echoed = b""
    while len(echoed) < len(data):
        chunk = sock.recv(len(data) - len(echoed))
        assert chunk, echoed
        echoed += chunk
    assert echoed == data
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == b""


@pytest.mark.parametrize(
    "later, target",
    [
        (get("a.example", "/ws", WEBSOCKET), "/ws"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", "a.example:443"),
    ],
    ids=["websocket", "connect"],
)
def test_a_later_upgrade_or_connect_gets_a_backend_connection_of_its_own(strict, later, target):
    """A later 101 (2xx to CONNECT) is the first response of a new backend connection: the only response
    boundary known without parsing responses. The old connection ends after the responses it owed."""
    gw, one, _ = strict()
    tunnel = get("b.example", "/in-the-tunnel")
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/1"))
        assert read_response(sock) == (200, b"one GET /1 0")
        sock.sendall(later)
        assert read_head(sock).startswith(b"HTTP/1.1 101" if target == "/ws" else b"HTTP/1.1 200")
        echo_through(sock, tunnel)
    assert targets(one) == [["/1"], [target]] and one.raw == [tunnel]
    line = gw.connection_log(domain="a.example")
    assert line["outcome"] == "ok" and line["backend"] == one.address


def test_a_later_upgrade_pipelined_after_a_large_response_comes_after_it(strict):
    gw, one, _ = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/large") + get("a.example", "/ws", WEBSOCKET))
        assert read_response(sock) == (200, b"L" * LARGE)
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        echo_through(sock, b"\x81\x05hello")
    assert targets(one) == [["/large"], ["/ws"]] and one.raw == [b"\x81\x05hello"]


def test_a_later_upgrade_answered_without_101_keeps_inspecting_and_another_may_follow(strict):
    """Each later Upgrade gets a connection of its own, whatever came of the one before."""
    gw, one, two = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/1") + get("a.example", "/no-ws", WEBSOCKET))
        assert read_response(sock) == (200, b"one GET /1 0")
        assert read_response(sock) == (200, b"one GET /no-ws 0")
        sock.sendall(get("a.example", "/2"))
        assert read_response(sock) == (200, b"one GET /2 0")
        sock.sendall(get("a.example", "/ws", WEBSOCKET))
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        echo_through(sock, get("b.example", "/in-the-tunnel"))
    assert targets(one) == [["/1"], ["/no-ws", "/2"], ["/ws"]] and two.connections == []


def test_after_a_later_upgrade_answered_without_101_another_entry_gets_421(strict):
    gw, one, two = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/1"))
        assert read_response(sock)[0] == 200
        sock.sendall(get("a.example", "/no-ws", WEBSOCKET))
        assert read_response(sock) == (200, b"one GET /no-ws 0")
        sock.sendall(get("b.example", "/stolen"))
        assert read_all(sock).startswith(b"HTTP/1.1 421 ")
    assert targets(one) == [["/1"], ["/no-ws"]] and two.connections == []
    assert gw.connection_log(outcome="host_changed", domain="a.example")


def test_a_later_upgrade_for_another_entry_gets_421_and_reaches_no_backend(strict):
    gw, one, two = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/1") + get("b.example", "/ws", WEBSOCKET))
        data = read_all(sock)
    assert [status for status, _ in responses(data)] == [200, 421]
    assert targets(one) == [["/1"]] and two.connections == []
    assert gw.connection_log(outcome="host_changed", domain="a.example")


def test_a_later_upgrade_to_another_protocol_is_refused_before_it_is_forwarded(strict):
    """No 101 to it ends inspection: its bytes would wait for the backend's close to be refused. Refused at once."""
    gw, one, _ = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/1") + get("a.example", "/ws", "Connection: Upgrade\r\nUpgrade: foo/2\r\n"))
        data = read_all(sock)  # no half-close: the answer must come without one
    assert [status for status, _ in responses(data)] == [200, 400]
    assert targets(one) == [["/1"]] and one.raw == []
    assert gw.connection_log(outcome="bad_request")


def test_a_later_upgrade_whose_new_connect_is_refused_gets_502_after_the_responses_owed(start_gateway):
    one = RecordingBackend("one", accepts=1)
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nhttp_strict_host = true\n'
            f'[http_backends]\n"a.example" = "{one.address}"\n'
        )
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(get("a.example", "/1") + get("a.example", "/ws", WEBSOCKET))
            data = read_all(sock)  # no half-close
        assert [status for status, _ in responses(data)] == [200, 502]
        assert targets(one) == [["/1"]]
        line = gw.connection_log(outcome="backend_unreachable", domain="a.example")
        assert one.address in line["reason"] and one.address.encode() not in data
    finally:
        one.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts the gateway's descriptors in /proc")
def test_a_later_upgrade_whose_new_connect_finds_no_descriptor_gets_503(start_gateway):
    """The new connect of a later Upgrade is answered as a first request's: the gateway's shortage is a 503."""
    one = RecordingBackend("one")
    limit = 40
    held = []
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nhttp_strict_host = true\n'
            f'preamble_timeout = 60.0\n[http_backends]\n"a.example" = "{one.address}"\n',
            max_fds=limit,
        )
        pid = gw.proc.pid
        sock = socket.create_connection(gw.http, timeout=TIMEOUT)
        held.append(sock)
        sock.sendall(get("a.example", "/1"))
        assert read_response(sock)[0] == 200
        held += fill_descriptors(gw.http, pid, limit, 0, get("a.example", "/2"))
        sock.sendall(get("a.example", "/close") + get("a.example", "/ws", WEBSOCKET))
        data = read_all(sock)
        assert [status for status, _ in responses(data)] == [200, 503], data[-200:]
        line = gw.connection_log(outcome="local_error", domain="a.example")
        assert "EMFILE" in line["reason"] and b"EMFILE" not in data
        assert targets(one)[0] == ["/1", "/close"]
    finally:
        for other in held:
            other.close()
        one.close()


def test_the_new_connection_of_a_later_upgrade_gets_the_proxy_header_and_a_kill_resets_it(start_gateway):
    """The new backend connection is the connection's as much as the first: the same PROXY header, and the
    reset armed at the start of a relay, so that a gateway killed outright never leaves it a clean end."""
    one = RecordingBackend("one", proxy=True)
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nhttp_strict_host = true\n'
            f'[http_backends]\n"a.example" = {{ address = "{one.address}", proxy_protocol = "v1" }}\n'
        )
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(get("a.example", "/1") + get("a.example", "/ws", WEBSOCKET))
            assert read_response(sock)[0] == 200
            assert read_head(sock).startswith(b"HTTP/1.1 101")
            header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {sock.getsockname()[1]} {gw.http[1]}\r\n".encode()
            assert one.proxy_lines == [header, header]
            gw.proc.kill()
            gw.proc.wait(TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while not one.resets:
                assert time.monotonic() < deadline, "the new backend connection did not end with a reset"
                time.sleep(0.01)
        assert targets(one) == [["/1"], ["/ws"]]
    finally:
        one.close()


def test_a_drain_that_ends_during_the_new_connect_resets_the_client(start_gateway, blackhole):  # noqa: F811
    """The relay ends while its new connect waits: the client gets a reset, the gateway exits cleanly."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp to see the gateway's connect wait")
    one = RecordingBackend("one")
    try:
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nhttp_strict_host = true\n'
            "connect_timeout = 5.0\ndrain_timeout = 0.5\n"
            f'[http_backends]\n"a.example" = ["{one.address}", "{blackhole}"]\n'  # round-robin: the hole second
        )
        port = int(blackhole.rsplit(":", 1)[1])
        waiting = syn_sent_to(port)  # the fixture's own fillers
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(get("a.example", "/1") + get("a.example", "/ws", WEBSOCKET))
            assert read_response(sock)[0] == 200
            deadline = time.monotonic() + TIMEOUT
            while syn_sent_to(port) == waiting:  # the first backend connection ended; the new one waits
                assert time.monotonic() < deadline, "the gateway never connected to the black hole"
                time.sleep(0.01)
            gw.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        assert gw.proc.wait(TIMEOUT) == 0
        gw.stop()  # exited already: this reads every line it wrote into gw.seen
        assert gw.connection_log(outcome="drain_timeout", domain="a.example")
        assert [line for line in gw.seen if line.get("message") == "NOT JSON"] == []  # no traceback
        assert targets(one) == [["/1"]]
    finally:
        one.close()


def test_a_later_upgrade_whose_backend_never_closes_gets_400_after_idle_timeout(strict):
    gw, one, _ = strict(extra="idle_timeout = 1.0")
    started = time.monotonic()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/silent") + get("a.example", "/ws", WEBSOCKET))
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 400 ") and time.monotonic() - started >= 0.9
    assert targets(one) == [["/silent"]]
    line = gw.connection_log(outcome="bad_request", domain="a.example")
    assert "kept its connection open" in line["reason"]


def syn_sent_to(port: int) -> int:
    """How many loopback connects to ``port`` wait for a SYN-ACK (Linux's /proc/net/tcp, state 02)."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            remote, state = line.split()[2:4]
            count += state == "02" and int(remote.split(":")[1], 16) == port
    return count


def test_a_reload_during_the_connect_keeps_the_entry_the_backend_was_looked_up_in(start_gateway, blackhole):  # noqa: F811
    """The entry later requests are compared with is the one the first request was routed by, not a newer one."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp to see the gateway's connect wait")
    one, two = RecordingBackend("one"), RecordingBackend("two")
    try:
        text = (
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nhttp_strict_host = true\n'
            "connect_timeout = 2.5\n"  # the window for the reload: long enough under load, short for the suite
            f'[http_backends]\n"a.example" = ["{blackhole}", "{one.address}"]\n"b.example" = "{two.address}"\n'
        )
        gw = start_gateway(text)
        port = int(blackhole.rsplit(":", 1)[1])
        waiting = syn_sent_to(port)  # the fixture's own fillers
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(get("a.example", "/1"))
            deadline = time.monotonic() + TIMEOUT
            while syn_sent_to(port) == waiting:  # the gateway has looked a.example up and connects to the hole
                assert time.monotonic() < deadline, "the gateway never connected to the black hole"
                time.sleep(0.01)
            # The new table sends both names to one entry: two; the connection's backend stays one.
            gw.config.write_text(text.split("[http_backends]")[0] + f'[http_backends]\n"*.example" = "{two.address}"\n')
            gw.proc.send_signal(signal.SIGHUP)
            gw.wait_for(lambda line: line.get("message") == "config reloaded")
            assert read_response(sock)[0] == 200  # failed over to one, the old table's entry
            sock.sendall(get("b.example", "/stolen"))
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock).startswith(b"HTTP/1.1 421 ")
        assert [r["target"] for r in one.requests()] == ["/1"]
        assert gw.connection_log(outcome="host_changed")
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize(
    "fields",
    [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket, H2C\r\n",
        "Connection: HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
    ],
)
def test_an_h2c_upgrade_is_refused_before_it_reaches_the_backend(strict, fields):
    """After a 101 to h2c, every HTTP/2 stream could name any host: the request never goes."""
    gw, one, _ = strict()
    data = talk(gw.http, [get("a.example", "/ws", fields)])
    assert data.startswith(b"HTTP/1.1 400 ")
    assert one.requests() == []
    assert gw.connection_log(outcome="bad_request", domain="a.example")


def test_a_101_to_another_protocol_than_websocket_keeps_inspecting(strict):
    gw, one, two = strict()
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("a.example", "/ws", "Connection: Upgrade\r\nUpgrade: foo/2\r\n"))
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        sock.sendall(get("b.example", "/stolen"))
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 421 ")
    assert one.raw == [b""] and two.requests() == []


@pytest.mark.parametrize("method", ["CONNECT", "connect"])
def test_a_connect_target_must_agree_with_host(strict, method):
    """The tunnel's target is the name a forward proxy would go to: it must be the one routed, first or later."""
    gw, one, two = strict()
    connect = f"{method} b.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n".encode()
    assert talk(gw.http, [connect]).startswith(b"HTTP/1.1 400 ")
    data = talk(gw.http, [get("a.example", "/1") + connect])
    assert [status for status, _ in responses(data)] == [200, 400]
    assert [r["target"] for r in one.requests()] == ["/1"] and two.requests() == []


# --- allow-lists turn strict mode on (issue 17 item 1) -------------------------

OUTSIDE = "10.0.0.0/8"  # an allow-list that excludes every test client (127.0.0.1)


def shared_backend_toml(address: str, allow: bool = True, extra: str = "") -> str:
    """The issue's reproduction: one backend serves www.test for anyone and admin.test for a network only."""
    admin = f'{{ address = "{address}", allow = ["{OUTSIDE}"] }}' if allow else f'"{address}"'
    return (
        f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n{extra}\n'
        f'[http_backends]\n"www.test" = "{address}"\n"admin.test" = {admin}\n'
    )


@pytest.fixture
def shared_backend():
    backend = RecordingBackend("shared")
    yield backend
    backend.close()


def curl_www_then_admin(address: tuple[str, int]) -> list[str]:
    """The issue's curl: www.test, then --next admin.test's /admin/secret, on one keep-alive connection.

    Each transfer prints its status and how many connections it opened (0: it reused the first).
    """
    host, port = address
    transfers = [("www.test", "/"), ("admin.test", "/admin/secret")]
    command = ["curl"]
    for index, (name, target) in enumerate(transfers):
        command += ["--next"] if index else []
        command += ["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n"]
        command += ["-H", f"Host: {name}", f"http://{host}:{port}{target}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT * 2)
    return out.stdout.splitlines()


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_an_allow_list_holds_for_every_request_of_a_keep_alive_connection(start_gateway, shared_backend):
    """Left at its default, http_strict_host is on while an HTTP route has an allow-list: a client outside
    admin.test's list never gets a request to the backend by sending it after one for www.test."""
    gw = start_gateway(shared_backend_toml(shared_backend.address))
    www, admin = curl_www_then_admin(gw.http)
    assert www == "200 1"
    assert admin == "421 0"  # refused on the same connection: strict mode's answer for another entry
    assert [(r["host"], r["target"]) for r in shared_backend.requests()] == [("www.test", "/")]
    line = gw.connection_log(domain="www.test")
    assert line["outcome"] == "host_changed" and "admin.test" in line["reason"], line
    assert not [seen for seen in gw.seen if "http_strict_host" in seen.get("message", "")]  # no warning


def test_a_reload_that_adds_an_allow_list_turns_strict_mode_on(start_gateway, shared_backend):
    gw = start_gateway(shared_backend_toml(shared_backend.address, allow=False))
    gw.config.write_text(shared_backend_toml(shared_backend.address))
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(lambda line: line.get("message") == "config reloaded")
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(get("www.test"))
        assert read_response(sock)[0] == 200
        sock.sendall(get("admin.test", "/admin/secret"))
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith((b"HTTP/1.1 421 ", b"HTTP/1.1 403 "))
    assert [(r["host"], r["target"]) for r in shared_backend.requests()] == [("www.test", "/")]


def test_http_strict_host_false_with_an_allow_list_is_warned_at_start_up_by_check_and_reload(
    start_gateway, shared_backend
):
    """Written false, the 0.2 behaviour stays; start-up, --check and a reload say what it costs."""
    toml = shared_backend_toml(shared_backend.address, extra="http_strict_host = false")
    gw = start_gateway(toml)
    warning = gw.wait_for(lambda line: "http_strict_host = false" in line.get("message", ""))
    assert warning["level"] == "warning" and "'admin.test' has an allow-list" in warning["message"], warning
    assert "www.test" not in warning["message"]
    out = subprocess.run(
        [*gateway_command(), "--check", str(gw.config)], capture_output=True, text=True, timeout=TIMEOUT * 2
    )
    assert out.returncode == 0
    assert "http_strict_host = false, yet [http_backends] 'admin.test' has an allow-list" in out.stderr
    assert "has an allow-list" not in out.stdout and "strict keep-alive" not in out.stdout  # off, as written
    gw.config.write_text(shared_backend_toml(shared_backend.address))  # the line removed: the default, no warning
    out = subprocess.run(
        [*gateway_command(), "--check", "--json", str(gw.config)], capture_output=True, text=True, timeout=TIMEOUT * 2
    )
    assert (out.returncode, out.stderr) == (0, "")
    assert json.loads(out.stdout)["gateway"]["http_strict_host"] is True
    out = subprocess.run(
        [*gateway_command(), "--check", str(gw.config)], capture_output=True, text=True, timeout=TIMEOUT * 2
    )
    assert (out.returncode, out.stderr) == (0, "")
    assert "strict keep-alive routing: every request's Host is checked (the default while" in out.stdout
    gw.config.write_text(toml)  # a reload that brings the line back warns again
    gw.proc.send_signal(signal.SIGHUP)
    again = gw.wait_for(lambda line: "http_strict_host = false" in line.get("message", "") and line is not warning)
    assert again["message"] == warning["message"]
    gw.wait_for(lambda line: line.get("message") == "config reloaded")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to read the gateway's CPU time")
def test_urgent_data_in_a_body_neither_spins_nor_loses_bytes(strict):
    """An MSG_OOB byte in a body being spliced: copied past as relay.py does, the bytes after it arrive, no busy loop.

    Splicing stops for good at urgent data; a plain recv steps over the urgent byte,
    which is not part of the stream.
    """
    gw, one, _ = strict()
    before, after = os.urandom(1 << 20), os.urandom(256 << 10)
    body = before + after
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(post("a.example", body)[: -len(body)] + before)
        cpu = cpu_seconds(gw.proc.pid)
        sock.send(b"!", socket.MSG_OOB)
        sock.sendall(after)
        sock.settimeout(3.0)  # a stuck direction answers nothing
        status, answer = read_response(sock)
        spent = cpu_seconds(gw.proc.pid) - cpu
    assert spent < 1.0, f"the gateway used {spent:.2f}s of CPU for 256 KiB"
    assert (status, answer) == (200, f"one POST /up {len(body)}".encode())
    assert hashlib.sha256(one.requests()[0]["body"]).digest() == hashlib.sha256(body).digest()
    assert gw.connection_log(domain="a.example")["outcome"] == "ok"
