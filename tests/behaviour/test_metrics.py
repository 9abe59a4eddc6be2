"""kiametrics.py: /metrics and /healthz on metrics_listen, scraped by a real client from the installed gateway."""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from conftest import TIMEOUT, exchange, free_closed_port, gateway_command, read_all
from prometheus_client.parser import text_string_to_metric_families
from test_processes import wait_stopped

import kiagateway
import kiametrics

ASK = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"


def worker_pids(gw, count: int) -> list[int]:
    """The PIDs of the latest start of each worker 1..count; with one worker, the gateway's own."""
    if count == 1:
        return [gw.proc.pid]
    wanted = set(range(1, count + 1))
    gw.wait_for(lambda _: {line["worker"] for line in gw.seen if line.get("message") == "worker started"} >= wanted)
    started = {line["worker"]: line["pid"] for line in gw.seen if line.get("message") == "worker started"}
    return [started[n] for n in range(1, count + 1)]


def metrics_toml(backends: dict, extra: str = "") -> str:
    """HTTP and TLS routes for a.example, one to a closed port, and metrics on a free port."""
    return f"""
[gateway]
http_listen = ["127.0.0.1:0"]
https_listen = ["127.0.0.1:0"]
metrics_listen = "127.0.0.1:0"
{extra}
[http_backends]
"a.example" = "{backends["alpha"].address}"
"down.example" = "127.0.0.1:{free_closed_port()}"
[https_backends]
"a.example" = "{backends["alpha-tls"].address}"
"""


def get(gw, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request to the gateway's metrics address, by http.client."""
    host, port = gw.listening["metrics"][0]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def scrape(gw) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, parsed by prometheus_client's parser: {(name, labels): value}."""
    status, content_type, body = get(gw, "/metrics")
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_connections(gw, count: int) -> list[dict]:
    """The connection log lines, once ``count`` are written: the metrics count them at the same moment."""
    gw.wait_for(lambda _: sum(line.get("message") == "connection" for line in gw.seen) >= count)
    return [line for line in gw.seen if line.get("message") == "connection"]


def https_get(gw, client_context: ssl.SSLContext) -> bytes:
    raw = socket.create_connection(gw.https, timeout=TIMEOUT)
    with client_context.wrap_socket(raw, server_hostname="a.example") as tls:
        tls.sendall(ASK)
        return read_all(tls)


@contextlib.contextmanager
def only(gw, worker: int, workers: int):
    """Let ``worker`` alone accept, the others stopped (SIGSTOP), so that each worker gets its share."""
    others = [pid for n, pid in enumerate(worker_pids(gw, workers), 1) if n != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        for pid in others:
            wait_stopped(pid)
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("workers", [1, 2])
def test_counts_are_exact_after_a_known_mix(start_gateway, backends, client_context, workers):
    gw = start_gateway(metrics_toml(backends), f"--workers={workers}")
    with only(gw, 1, workers):
        answers = [exchange(gw.http, ASK) for _ in range(5)]
        assert all(answer.endswith(b"alpha http a.example") for answer in answers)
        for _ in range(3):
            assert exchange(gw.http, ASK.replace(b"a.example", b"nowhere.example")).startswith(b"HTTP/1.1 421")
        wait_connections(gw, 8)
    with only(gw, workers, workers):  # with 2 workers, the second one has the rest
        for _ in range(2):
            assert exchange(gw.http, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
        for _ in range(4):
            assert https_get(gw, client_context).endswith(b"alpha https a.example")
        assert exchange(gw.http, ASK.replace(b"a.example", b"down.example")).startswith(b"HTTP/1.1 502")
        wait_connections(gw, 15)
    lines = wait_connections(gw, 15)
    assert len({line["id"].split(".")[0] for line in lines}) == workers  # each worker served some
    samples = scrape(gw)

    finished = {key[1]: n for key, n in samples.items() if key[0] == "kiagateway_connections_total"}
    assert finished == {
        frozenset({("listener", "http"), ("outcome", "ok")}): 5,
        frozenset({("listener", "http"), ("outcome", "no_route")}): 3,
        frozenset({("listener", "http"), ("outcome", "bad_request")}): 2,
        frozenset({("listener", "https"), ("outcome", "ok")}): 4,
        frozenset({("listener", "http"), ("outcome", "backend_unreachable")}): 1,
    }
    for listener in ("http", "https"):
        assert value(samples, "kiagateway_connections_open", listener=listener) == 0
        for direction in ("up", "down"):  # the same figures as the log lines
            logged = sum(line[f"bytes_{direction}"] for line in lines if line["listener"] == listener)
            assert value(samples, "kiagateway_bytes_total", listener=listener, direction=direction) == logged
    assert value(samples, "kiagateway_bytes_total", listener="http", direction="up") == 5 * len(ASK)
    assert value(samples, "kiagateway_bytes_total", listener="http", direction="down") == sum(map(len, answers))
    # preamble: every connection that sent a whole one; connect: every one whose backend answered
    assert value(samples, "kiagateway_preamble_seconds_count", listener="http") == 5 + 3 + 1
    assert value(samples, "kiagateway_preamble_seconds_count", listener="https") == 4
    assert value(samples, "kiagateway_connect_seconds_count", listener="http") == 5
    assert value(samples, "kiagateway_connect_seconds_count", listener="https") == 4
    assert value(samples, "kiagateway_connect_seconds_bucket", listener="https", le="+Inf") == 4
    assert 0 < value(samples, "kiagateway_preamble_seconds_sum", listener="http") < 9 * TIMEOUT
    assert value(samples, "kiagateway_build_info", version=kiagateway.__version__) == 1
    assert value(samples, "kiagateway_reloads_total", result="ok") == 0
    assert value(samples, "kiagateway_worker_restarts_total") == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_open_connections_are_counted_while_held(start_gateway, backends, client_context, workers):
    gw = start_gateway(metrics_toml(backends), f"--workers={workers}")
    held = socket.create_connection(gw.http, timeout=TIMEOUT)
    half = socket.create_connection(gw.https, timeout=TIMEOUT)
    try:
        held.sendall(ASK.replace(b"Connection: close", b"Connection: keep-alive"))
        assert held.recv(65536).startswith(b"HTTP/1.1 200")  # the keep-alive relay stays open
        half.sendall(b"\x16\x03\x01")  # a ClientHello's first bytes: the preamble is being read
        deadline = time.monotonic() + TIMEOUT
        while (value(samples := scrape(gw), "kiagateway_connections_open", listener="https")) != 1:
            assert time.monotonic() < deadline, "the half-sent ClientHello is never counted open"
        assert value(samples, "kiagateway_connections_open", listener="http") == 1
    finally:
        held.close()
        half.close()
    wait_connections(gw, 2)
    deadline = time.monotonic() + TIMEOUT  # the text may be one rendered up to RENDER_EVERY ago
    while value(samples := scrape(gw), "kiagateway_connections_open", listener="http") != 0:
        assert time.monotonic() < deadline, "the closed relay is still counted open"
        time.sleep(0.1)
    assert value(samples, "kiagateway_connections_open", listener="https") == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_are_counted_by_result(start_gateway, backends, workers):
    gw = start_gateway(metrics_toml(backends), f"--workers={workers}")
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(lambda line: line.get("message") == "config reloaded")
    good = gw.config.read_text()
    gw.config.write_text(good + '"bad.example" = "not an address"\n')
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(lambda line: line.get("message", "").startswith("reload failed"))
    samples = scrape(gw)
    assert value(samples, "kiagateway_reloads_total", result="ok") == 1
    assert value(samples, "kiagateway_reloads_total", result="error") == 1


def test_a_reload_cannot_move_the_metrics(start_gateway, backends):
    gw = start_gateway(metrics_toml(backends))
    elsewhere = free_closed_port()
    moved = f'metrics_listen = "127.0.0.1:{elsewhere}"'
    gw.config.write_text(gw.config.read_text().replace('metrics_listen = "127.0.0.1:0"', moved))
    gw.proc.send_signal(signal.SIGHUP)
    warning = gw.wait_for(lambda line: line.get("key") == "metrics_listen")
    assert "restart" in warning["message"] and warning["new"] == f"127.0.0.1:{elsewhere}"
    assert value(scrape(gw), "kiagateway_reloads_total", result="ok") == 1  # still on the old address
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", elsewhere), timeout=TIMEOUT).close()


def test_a_killed_worker_is_counted_and_its_counts_stay(start_gateway, backends):
    gw = start_gateway(metrics_toml(backends), "--workers=2")
    for _ in range(6):
        assert exchange(gw.http, ASK.replace(b"a.example", b"nowhere.example")).startswith(b"HTTP/1.1 421")
    wait_connections(gw, 6)
    assert value(scrape(gw), "kiagateway_connections_total", listener="http", outcome="no_route") == 6
    first, _ = worker_pids(gw, 2)
    os.kill(first, signal.SIGKILL)
    gw.wait_for(lambda line: line.get("message") == "worker started" and line["worker"] == 1 and line["pid"] != first)
    samples = scrape(gw)
    assert value(samples, "kiagateway_worker_restarts_total") == 1
    assert value(samples, "kiagateway_connections_total", listener="http", outcome="no_route") == 6  # never down
    assert value(samples, "kiagateway_preamble_seconds_count", listener="http") == 6


def test_a_stuck_worker_does_not_stall_the_scrape(start_gateway, backends):
    gw = start_gateway(metrics_toml(backends), "--workers=2")
    scrape(gw)  # each worker's counts as last heard: zero
    stuck, _ = worker_pids(gw, 2)
    os.kill(stuck, signal.SIGSTOP)
    try:
        began = time.monotonic()
        samples = scrape(gw)
        assert time.monotonic() - began < kiametrics.SNAPSHOT_WAIT + TIMEOUT / 2
        assert value(samples, "kiagateway_build_info", version=kiagateway.__version__) == 1
        assert get(gw, "/healthz")[0] == 200
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert scrape(gw)  # the late answer is told apart from the next one's


@pytest.mark.parametrize("workers", [1, 2])
def test_healthz_turns_503_while_draining(start_gateway, backends, workers):
    gw = start_gateway(metrics_toml(backends, "drain_timeout = 3.0"), f"--workers={workers}")
    assert get(gw, "/healthz") == (200, "text/plain; charset=us-ascii", b"ok\n")
    assert get(gw, "/other")[0] == get(gw, "/metrics", "POST")[0] == get(gw, "/healthzz")[0] == 404
    held = socket.create_connection(gw.http, timeout=TIMEOUT)
    try:
        held.sendall(ASK.replace(b"Connection: close", b"Connection: keep-alive"))
        assert held.recv(65536)  # in the relay, kept open by keep-alive
        gw.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while get(gw, "/healthz")[0] != 503:
            assert time.monotonic() < deadline, "/healthz never turned 503"
        assert get(gw, "/healthz")[2] == b"draining\n"
        assert gw.proc.poll() is None  # still draining the held connection
    finally:
        held.close()
    assert gw.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_head_request_gets_a_404_with_no_body(start_gateway, backends, workers):
    gw = start_gateway(metrics_toml(backends), f"--workers={workers}")
    answer = exchange(gw.listening["metrics"][0], b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    fields, _, body = answer.partition(b"\r\n\r\n")
    assert fields.startswith(b"HTTP/1.1 404 Not Found\r\n") and body == b""
    assert b"\r\nContent-Length: 10\r\n" in fields  # what a GET's body ("not found\n") would have been
    assert gw.stop() == 0


def test_metrics_listen_needs_the_extra(tmp_path, backends):
    hidden = tmp_path / "hidden" / "prometheus_client"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("hidden by the test", name="prometheus_client")\n')
    config = tmp_path / "servers.toml"
    config.write_text(metrics_toml(backends))
    env = {**os.environ, "PYTHONPATH": str(hidden.parent)}
    for args in (["--check"], []):
        done = subprocess.run(
            [*gateway_command(), *args, str(config)], env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        assert done.returncode == 1
        assert "metrics_listen needs the metrics extra: pip install 'kiagateway[metrics]'" in done.stderr
        assert "starting" not in done.stderr


# The pure parts.


class Flood:
    """``count`` sockets on ``port`` that each send one byte and wait; each one dropped is opened again at once.

    A thread with a deadline, stopped by ``stop``; ``renewed`` counts the drops it saw.
    """

    def __init__(self, port: int, count: int = 48) -> None:
        self.address = ("127.0.0.1", port)
        self.count = count
        self.renewed = 0
        self.open = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks: list[socket.socket] = []
        deadline = time.monotonic() + 6 * TIMEOUT
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                while len(socks) < self.count:
                    sock = socket.socket()
                    sock.settimeout(1.0)
                    try:
                        sock.connect(self.address)
                        sock.sendall(b"G")
                    except OSError:
                        sock.close()
                        break
                    socks.append(sock)
                self.open = len(socks)
                readable, _, _ = select.select(socks, [], [], 0.01)
                for sock in readable:  # dropped by the gateway (nothing else comes): open another one
                    try:
                        sock.recv(1)
                    except OSError:
                        pass
                    sock.close()
                    socks.remove(sock)
                    self.renewed += 1
        finally:
            for sock in socks:
                sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


def probe_healthz(port: int, timeout: float = 1.0) -> tuple[bytes, float]:
    """One /healthz asked with a ``timeout`` on the whole exchange: (the answer, seconds it took)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
        answer = read_all(sock, max(0.01, timeout - (time.monotonic() - start)))
    return answer, time.monotonic() - start


PROBES = 20
ONCE_A_SECOND = 1.0  # DESIGN.md: the /metrics text is rendered at most once a second


@pytest.mark.parametrize("workers", [1, 2])
def test_healthz_answers_within_a_second_while_other_clients_hold_the_port(start_gateway, backends, workers):
    """Clients that connect and send one byte cannot hold /healthz off: a probe with a 1 s timeout always gets 200."""
    gw = start_gateway(metrics_toml(backends), f"--workers={workers}")
    port = gw.listening["metrics"][0][1]
    flood = Flood(port)
    try:
        deadline = time.monotonic() + TIMEOUT
        while flood.open < flood.count:  # the flood is in place before the first probe
            assert time.monotonic() < deadline, f"only {flood.open} flooding sockets connected"
            time.sleep(0.01)
        answers = []
        for _ in range(PROBES):
            try:
                answer, took = probe_healthz(port)
            except OSError as exc:
                answer, took = repr(exc).encode(), 1.0
            answers.append((answer[:12], round(took, 3)))
            time.sleep(0.05)  # the flood renews what the probe's arrival evicted
        assert flood.thread.is_alive()
    finally:
        flood.stop()
    assert [a for a in answers if a[0] != b"HTTP/1.1 200" or a[1] >= 1.0] == []
    assert flood.renewed >= PROBES  # the flood was pressing: every probe evicted one of its sockets at least
    assert exchange(gw.http, ASK).endswith(b"alpha http a.example")


@pytest.mark.parametrize("workers", [1, 2])
def test_back_to_back_scrapes_render_the_text_at_most_once_a_second(start_gateway, backends, workers):
    """A scrape within a second of a rendering gets the same bytes, even though a connection finished meanwhile;
    after that second the new count shows."""
    gw = start_gateway(metrics_toml(backends), f"--workers={workers}")
    for attempt in range(3):  # a loaded machine may take longer than a second over the pair: try again
        time.sleep(ONCE_A_SECOND)  # any text rendered before is stale: the first scrape renders
        start = time.monotonic()
        first = get(gw, "/metrics")[2]
        assert exchange(gw.http, ASK).endswith(b"alpha http a.example")
        wait_connections(gw, attempt + 1)  # counted by now
        second = get(gw, "/metrics")[2]
        if time.monotonic() - start < ONCE_A_SECOND:
            break
    else:
        pytest.skip("the machine is too slow to scrape twice within a second")
    assert second == first
    deadline = time.monotonic() + TIMEOUT
    while (text := get(gw, "/metrics")[2]) == first:
        assert time.monotonic() < deadline, "the text is never rendered again"
        time.sleep(0.1)
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }
    assert value(samples, "kiagateway_connections_total", listener="http", outcome="ok") == attempt + 1
