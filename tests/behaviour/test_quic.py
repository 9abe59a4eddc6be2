"""HTTP/3 through the gateway's QUIC listener: real aioquic servers and clients, routed by the SNI of the Initials."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, gateway_command

pytest.importorskip("aioquic")

PEER = Path(__file__).with_name("h3peer.py")
CRYPTO_ERROR = 0x100


class H3Backend:
    """An aioquic HTTP/3 server as a process of its own: it answers every GET with its name and the path."""

    def __init__(self, name: str, cert: Path, key: Path, *options: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), "serve", name, str(cert), str(key), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()  # bounded: the process prints its port or dies
        assert line.strip().isdigit(), f"{name} did not start"
        self.address = f"127.0.0.1:{int(line)}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.proc.stdout.close()


def h3_get(address: tuple[str, int], sni: str, path: str, cafile: Path, *options: str) -> dict:
    """One HTTP/3 request by a real client, in a process of its own: what it got, or the close code that refused it."""
    done = subprocess.run(
        [sys.executable, str(PEER), "get", address[0], str(address[1]), sni, path, str(cafile), *options],
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def pki(tmp_path_factory, ca, server_cert):
    directory = tmp_path_factory.mktemp("quic-pki")
    cert, key, cafile = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    server_cert.private_key_pem.write_to_path(str(key))
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(cafile))
    return cert, key, cafile


@pytest.fixture(scope="module")
def h3_backends(pki):
    cert, key, _ = pki
    started = {name: H3Backend(name, cert, key) for name in ("alpha", "beta")}
    yield started
    for backend in started.values():
        backend.close()


def quic_toml(backends: dict, routes: str = "", gateway: str = "") -> str:
    """Two routes over QUIC only; flows still open at the end of a test get a short drain."""
    if "drain_timeout" not in gateway:
        gateway += "\ndrain_timeout = 0.5"
    return f"""
[gateway]
http_listen = []
https_listen = []
quic_listen = ["127.0.0.1:0"]
{gateway}

[https_backends]
"a.example" = "{backends["alpha"].address}"
"b.example" = "{backends["beta"].address}"
{routes}
"""


def test_two_backends_told_apart_by_sni(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends, gateway="quic_idle_timeout = 0.5"))
    quic = gw.listening["quic"][0]
    for sni, name in (("a.example", "alpha"), ("b.example", "beta")):
        got = h3_get(quic, sni, "/hello", pki[2])
        assert (got.get("status"), got.get("head")) == (200, f"{name} /hello"), got
    for sni, name in (("a.example", "alpha"), ("b.example", "beta")):  # each flow ends after its silence
        line = gw.connection_log(listener="quic", domain=sni)
        assert line["outcome"] == "ok" and line["backend"] == h3_backends[name].address
        assert line["datagrams_up"] >= 3 and line["datagrams_down"] >= 3 and line["bytes_down"] > 1000, line


def test_a_download_arrives_whole(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends))
    got = h3_get(gw.listening["quic"][0], "a.example", "/bytes/3000000", pki[2])
    direct = h3_get(
        ("127.0.0.1", int(h3_backends["alpha"].address.rsplit(":", 1)[1])), "a.example", "/bytes/3000000", pki[2]
    )
    assert got["status"] == 200 and got["length"] == 3_000_000
    assert got["sha256"] == direct["sha256"]


@pytest.mark.parametrize(
    ("sni", "routes", "code", "outcome"),
    [
        ("nowhere.example", "", CRYPTO_ERROR + 112, "no_route"),
        (
            "c.example",
            '"c.example" = { address = "127.0.0.1:9", allow = ["10.0.0.0/8"] }',
            CRYPTO_ERROR + 49,
            "forbidden",
        ),
    ],
)
def test_a_refused_client_fails_at_once_with_the_code_of_its_cause(
    start_gateway, h3_backends, pki, sni, routes, code, outcome
):
    gw = start_gateway(quic_toml(h3_backends, routes))
    got = h3_get(gw.listening["quic"][0], sni, "/", pki[2])
    assert got.get("error_code") == code, got
    assert got["seconds"] < 2  # the close, not the client's own timeout
    line = gw.connection_log(listener="quic", outcome=outcome)
    assert line["domain"] == sni and line["backend"] is None


def test_a_backend_that_answers_icmp_unreachable_is_skipped_in_a_pool(start_gateway, h3_backends, pki):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        nothing = f"127.0.0.1:{closed.getsockname()[1]}"
    routes = (
        f'"c.example" = {{ address = "127.0.0.1:9", quic_address = ["{nothing}", "{h3_backends["beta"].address}"] }}'
    )
    gw = start_gateway(quic_toml(h3_backends, routes))
    got = h3_get(gw.listening["quic"][0], "c.example", "/pool", pki[2])
    assert (got.get("status"), got.get("head")) == (200, "beta /pool"), got
    routes = f'"gone.example" = {{ address = "127.0.0.1:9", quic_address = "{nothing}" }}'
    gw2 = start_gateway(quic_toml(h3_backends, routes))
    got = h3_get(gw2.listening["quic"][0], "gone.example", "/", pki[2])
    assert got.get("error_code") == CRYPTO_ERROR + 80, got
    assert gw2.connection_log(listener="quic", outcome="backend_unreachable")["backend"] == nothing


def test_the_per_client_limit_refuses_with_connection_refused(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends, gateway="max_connections_per_client = 1\nquic_idle_timeout = 30.0"))
    quic = gw.listening["quic"][0]
    assert h3_get(quic, "a.example", "/", pki[2]).get("status") == 200  # its flow stays open until idle
    got = h3_get(quic, "a.example", "/", pki[2])
    assert got.get("error_code") == 0x2, got
    gw.connection_log(listener="quic", outcome="client_limit")


def test_garbage_and_short_datagrams_get_nothing_and_start_no_flow(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends, gateway="quic_idle_timeout = 0.5"))
    quic = gw.listening["quic"][0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for data in (b"", b"x", os.urandom(1300), b"\xc0\x00\x00\x00\x01" + bytes(1300)):
            sock.sendto(data, quic)
        with pytest.raises(socket.timeout):
            sock.recv(2048)
    assert h3_get(quic, "a.example", "/after", pki[2]).get("status") == 200  # and the listener still serves
    gw.connection_log(listener="quic", domain="a.example")
    gw.stop()
    assert [line["domain"] for line in gw.seen if line.get("message") == "connection"] == ["a.example"]


def test_a_reload_keeps_open_flows_on_their_backend(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends))
    quic = gw.listening["quic"][0]
    assert h3_get(quic, "a.example", "/", pki[2])["head"] == "alpha /"
    gw.config.write_text(gw.config.read_text().replace(h3_backends["alpha"].address, h3_backends["beta"].address, 1))
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(lambda line: line.get("message") == "config reloaded")
    assert h3_get(quic, "a.example", "/", pki[2])["head"] == "beta /"


def test_a_stop_lets_an_open_flow_finish_within_the_drain(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends, gateway="drain_timeout = 2.0"))
    quic = gw.listening["quic"][0]
    assert h3_get(quic, "a.example", "/", pki[2])["status"] == 200
    started = time.monotonic()
    assert gw.stop() == 0
    assert 1.5 < time.monotonic() - started < TIMEOUT  # the open flow kept the process for the drain
    assert gw.connection_log(listener="quic", outcome="drain_timeout")["domain"] == "a.example"


def test_an_upgrade_in_place_hands_the_udp_socket_on(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends))
    quic = gw.listening["quic"][0]
    assert h3_get(quic, "a.example", "/before", pki[2])["head"] == "alpha /before"
    gw.proc.send_signal(signal.SIGUSR2)
    gw.wait_for(lambda line: line.get("message", "").startswith("upgraded from"))
    assert h3_get(quic, "b.example", "/after", pki[2])["head"] == "beta /after"  # the new program, same port
    assert gw.proc.poll() is None


def test_socket_activation_hands_over_a_udp_socket_named_quic(start_gateway, h3_backends, pki):
    activate = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"
    if not os.access(activate, os.X_OK):
        pytest.skip("systemd-socket-activate not installed (Debian package systemd)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [activate, "--datagram", f"--listen=127.0.0.1:{port}", "--fdname=quic", *gateway_command()]
    started = threading.Event()

    def wake() -> None:  # a datagram starts it, as systemd would: sent until it runs (the gateway drops them)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            deadline = time.monotonic() + TIMEOUT
            while not started.wait(0.1) and time.monotonic() < deadline:
                waker.sendto(b"wake up", ("127.0.0.1", port))

    waking = threading.Thread(target=wake, daemon=True)
    waking.start()
    try:
        gw = start_gateway(
            quic_toml(h3_backends).replace('quic_listen = ["127.0.0.1:0"]', "quic_listen = []"), command=command
        )
    finally:
        started.set()
        waking.join(TIMEOUT)
    assert gw.listening["quic"] == [("127.0.0.1", port)]
    assert h3_get(("127.0.0.1", port), "a.example", "/activated", pki[2])["head"] == "alpha /activated"


def test_a_client_whose_port_changes_keeps_its_connection(start_gateway, h3_backends, pki):
    gw = start_gateway(quic_toml(h3_backends, gateway="quic_idle_timeout = 0.5"))
    got = h3_get(gw.listening["quic"][0], "a.example", "/moved", pki[2], "--port-change")
    assert (got.get("status"), got.get("head")) == (200, "alpha /moved"), got  # the answer found the new port
    line = gw.connection_log(listener="quic", domain="a.example")
    gw.stop()
    assert [entry for entry in gw.seen if entry.get("message") == "connection"] == [line]  # one flow, not two
    assert line["datagrams_down"] >= 4


def spki_hash(cert_pem: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 of the SHA-256 of the key's SPKI."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_chromium_fetches_a_page_over_http3_through_the_gateway(start_gateway, h3_backends, pki, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium not installed (Debian package chromium)")
    gw = start_gateway(quic_toml(h3_backends, gateway="quic_idle_timeout = 0.5"))
    port = gw.listening["quic"][0][1]
    browser = subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-quic",
            "--origin-to-force-quic-on=b.example:443",  # HTTP/3 from the first request: no TCP to fall back to
            f"--host-resolver-rules=MAP b.example:443 127.0.0.1:{port}",
            f"--ignore-certificate-errors-spki-list={spki_hash(pki[0])}",
            "--dump-dom",
            "https://b.example/from-chromium",
        ],
        capture_output=True,
        text=True,
        timeout=90,  # a cold browser on a busy 2-core machine
    )
    assert "beta /from-chromium" in browser.stdout, browser.stderr[-2000:]
    line = gw.connection_log(listener="quic", domain="b.example")
    assert line["outcome"] == "ok" and line["datagrams_down"] >= 3


def test_a_retry_from_the_backend_passes_through(start_gateway, h3_backends, pki):
    retrying = H3Backend("retrying", *pki[:2], "--retry")  # its first answer is a Retry: the client starts again
    try:
        routes = f'"c.example" = "{retrying.address}"'
        gw = start_gateway(quic_toml(h3_backends, routes, gateway="quic_idle_timeout = 0.5"))
        got = h3_get(gw.listening["quic"][0], "c.example", "/retried", pki[2])
        assert (got.get("status"), got.get("head")) == (200, "retrying /retried"), got
        line = gw.connection_log(listener="quic", domain="c.example")
        assert line["outcome"] == "ok"  # the Initial after the Retry stayed in its flow
    finally:
        retrying.close()


def test_a_flood_of_half_hellos_stays_within_max_quic_flows(start_gateway, h3_backends, pki):
    """Chromium's first datagram holds half its ClientHello: each flow holds it until preamble_timeout."""
    from quicpackets import capture

    half = capture("chromium-pq")[0]
    toml = quic_toml(h3_backends, gateway="max_quic_flows = 50\npreamble_timeout = 4.0\nquic_idle_timeout = 0.5")
    gw = start_gateway(toml)
    quic = gw.listening["quic"][0]
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(120)]
    for sock in clients:
        sock.setblocking(False)
    try:
        answered = set()
        for start in range(0, len(clients), 20):  # in bursts a loopback UDP queue takes whole
            for sock in clients[start : start + 20]:
                sock.sendto(half, quic)
            deadline = time.monotonic() + TIMEOUT
            while len(answered) < max(0, start + 20 - 50) and time.monotonic() < deadline:
                for index, sock in enumerate(clients):
                    try:
                        reply = sock.recv(2048)
                    except BlockingIOError:
                        continue
                    assert reply[0] & 0xF0 == 0xC0  # a long-header Initial: the CONNECTION_CLOSE
                    answered.add(index)
                time.sleep(0.01)
        assert answered == set(range(50, 120))  # beyond the 50 flows held, each new one is refused at once
    finally:
        for sock in clients:
            sock.close()
    gw.wait_for(lambda line: sum(entry.get("outcome") == "preamble_timeout" for entry in gw.seen) == 50)
    outcomes = [line["outcome"] for line in gw.seen if line.get("message") == "connection"]
    assert sorted(set(outcomes)) == ["max_flows", "preamble_timeout"] and outcomes.count("max_flows") == 70
    assert h3_get(quic, "a.example", "/after", pki[2])["status"] == 200  # the table has room again
