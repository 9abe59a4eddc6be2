"""Handed-over listeners (kiaupgrade.py): socket activation, and the upgrade in place on SIGUSR2."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import conftest
import pytest
from conftest import TIMEOUT, read_all, routes_toml
from test_drain import read_until_cut
from test_processes import children
from test_relaying import HEAD, RawBackend, recv_exactly
from test_reload import ADDED_LATENCY, RELOAD_TIMEOUT, big_toml
from test_routing import tls_get

REQUEST = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"


def free_port() -> int:
    """A loopback port free a moment ago: bound to port 0 and closed; the caller binds it again soon."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def activator() -> str:
    for path in (shutil.which("systemd-socket-activate"), "/lib/systemd/systemd-socket-activate"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("systemd-socket-activate not installed (Debian package systemd)")


def start_activated(start_gateway, toml: str, *names: str) -> tuple[conftest.Gateway, FirstClient, list[int]]:
    """The gateway under systemd-socket-activate, a loopback port per fd name, started by a first client's connect."""
    for attempt in range(2):  # another process may take a port between our probe and the bind: once more then
        ports = [free_port() for _ in names]
        listen = [f"--listen=127.0.0.1:{port}" for port in ports]
        command = [activator(), *listen, f"--fdname={':'.join(names)}", *conftest.gateway_command()]
        first = FirstClient(("127.0.0.1", ports[0]))
        try:
            return start_gateway(toml, command=command), first, ports
        except AssertionError as exc:
            if attempt or "Address already in use" not in str(exc):
                raise
        finally:
            first.thread.join(TIMEOUT)


def endless_download(streaming: threading.Event) -> RawBackend:
    """A backend whose answer has no end until ``streaming`` is set: only the drain's reset ends it."""

    def backend(conn):
        recv_exactly(conn, len(HEAD))
        try:
            while not streaming.wait(0.05):
                conn.sendall(b"." * 100)
        except OSError:
            pass

    return RawBackend(backend)


def started_with(gw: conftest.Gateway, pid: int) -> list[dict]:
    """The start-up lines of the program run by ``pid``: one per program run in that process."""
    return [line for line in gw.seen if line.get("message", "").startswith("kiagateway ") and line["pid"] == pid]


def ask(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(REQUEST)
        return read_all(sock)


# ---------------------------------------------------------------------------
# Socket activation


def test_socket_activation_serves_both_listeners(start_gateway, backends, client_context):
    gw, first, ports = start_activated(
        start_gateway, routes_toml(backends, extra_gateway="workers = 2"), "http", "https"
    )
    assert first.answer.endswith(b"alpha http a.example")  # the connection that started it was served
    assert gw.listening == {"http": [("127.0.0.1", ports[0])], "https": [("127.0.0.1", ports[1])]}
    assert gw.wait_for(lambda line: line.get("message", "").startswith("socket activation"))
    for _ in range(4):  # both workers serve both listeners
        assert ask(gw.http).endswith(b"alpha http a.example")
        assert tls_get(gw.https, "a.example", client_context).endswith(b"alpha https a.example")
    assert gw.stop() == 0
    with pytest.raises(ConnectionRefusedError):  # the listeners were ours alone, and are closed
        socket.create_connection(gw.http, timeout=TIMEOUT).close()


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_takes_a_config_without_listen_addresses(start_gateway, backends, workers):
    """The listen lists are ignored under socket activation: empty ones start, and a reload says they are ignored."""
    toml = routes_toml(backends, f"workers = {workers}", listen_http="", listen_https="")
    gw, first, (port,) = start_activated(start_gateway, toml, "http")
    assert first.answer.endswith(b"alpha http a.example")
    assert gw.listening == {"http": [("127.0.0.1", port)], "https": []}
    gw.config.write_text(toml.replace("http_listen = []", f'http_listen = ["127.0.0.1:{free_port()}"]'))
    gw.proc.send_signal(signal.SIGHUP)
    reloaded = gw.wait_for(lambda line: line.get("message") == "config reloaded")
    assert "ignored" not in reloaded  # no restart would apply it: systemd keeps passing its sockets
    assert [line["message"] for line in gw.seen if line.get("key") == "http_listen"] == [
        "http_listen is ignored: systemd passes the listening sockets (the .socket unit's ListenStream= sets them)"
    ]
    gw.config.write_text(toml)  # the program it upgrades to takes empty lists too: systemd's sockets go with it
    pid = gw.proc.pid
    gw.proc.send_signal(signal.SIGUSR2)
    gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
    assert gw.wait_for(lambda line: line.get("message", "").startswith("listening on the sockets handed over"))[
        "message"
    ].endswith("systemd's: http_listen and https_listen are ignored")
    assert ask(gw.http).endswith(b"alpha http a.example")
    assert gw.stop() == 0


class FirstClient:
    """A thread that connects as soon as the port listens, and keeps the answer to one request."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.answer = b""
        self.thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self.thread.start()

    def _run(self, address: tuple[str, int]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                self.answer = ask(address)
                return
            except ConnectionRefusedError:  # not listening yet
                time.sleep(0.05)


def test_socket_activation_leaves_sockets_meant_for_another_process(start_gateway, backends):
    gw = start_gateway(routes_toml(backends), env={"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "http"})
    assert not any(line.get("message", "").startswith("socket activation") for line in gw.seen)
    assert gw.http[1] != 0
    assert ask(gw.http).endswith(b"alpha http a.example")  # on the config's listener


@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_queued_before_the_gateway_ran_is_reset_when_cut(start_gateway, workers):
    """Its handshake ended in the listener's queue before the gateway armed the listener, so the client did not
    inherit the reset-on-close from it (Linux): the gateway arms it itself, and a cut is still a reset."""
    streaming = threading.Event()
    be = endless_download(streaming)
    port = free_port()
    command = [activator(), f"--listen=127.0.0.1:{port}", "--fdname=http", *conftest.gateway_command()]
    queued: list[socket.socket] = []

    def first_client() -> None:  # its connect starts the gateway: the handshake is done before the gateway runs
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            except ConnectionRefusedError:
                time.sleep(0.05)
                continue
            sock.sendall(HEAD)
            queued.append(sock)
            return

    thread = threading.Thread(target=first_client, daemon=True)
    thread.start()
    try:
        gw = start_gateway(
            f"[gateway]\nhttp_listen = []\nhttps_listen = []\ndrain_timeout = 0.5\nworkers = {workers}\n"
            f'[http_backends]\n"raw.example" = "{be.address}"\n',
            command=command,
        )
        thread.join(TIMEOUT)
        with queued[0] as sock:
            assert sock.recv(100)
            gw.proc.send_signal(signal.SIGTERM)
            assert read_until_cut(sock) is ConnectionResetError  # not a clean EOF
        assert gw.stop() == 0
        assert gw.connection_log(domain="raw.example")["outcome"] == "drain_timeout"
    finally:
        streaming.set()
        be.close()


# ---------------------------------------------------------------------------
# Upgrade in place


class ClientLoop:
    """A thread making requests through the gateway one after another until stopped, keeping every failure."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.done = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def ask(self) -> bytes:
        return ask(self.address)

    def answered(self, answer: bytes) -> bool:
        return answer.endswith(b"alpha http a.example")

    def _run(self) -> None:
        deadline = time.monotonic() + 6 * TIMEOUT  # bounded even if stop() is never called
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                answer = self.ask()
            except OSError as exc:
                self.failures.append(repr(exc))
                time.sleep(0.01)
                continue
            if self.answered(answer):
                self.done += 1
            else:
                self.failures.append(repr(answer[:80]))

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.done < count:
            assert time.monotonic() < deadline, f"only {self.done} requests done; failures {self.failures[:3]}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


UPLOAD = 32 << 20  # bytes sent through a relay that the upgrade must not cut
CHUNK = 1 << 16


def upload_backend(conn: socket.socket) -> None:
    """Take HEAD and UPLOAD bytes, then answer their sha256."""
    recv_exactly(conn, len(HEAD))
    digest = hashlib.sha256()
    left = UPLOAD
    while left:
        data = conn.recv(min(CHUNK, left))
        assert data, f"EOF with {left} bytes still to come"
        digest.update(data)
        left -= len(data)
    conn.sendall(digest.hexdigest().encode())


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_in_place_under_traffic(start_gateway, backends, workers):
    be = RawBackend(upload_backend)
    toml = routes_toml(backends, listen_https="").replace(
        "[http_backends]\n", f'workers = {workers}\n[http_backends]\n"raw.example" = "{be.address}"\n'
    )
    gw = start_gateway(toml)
    pid = gw.proc.pid
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    payload = random.Random(7).randbytes(UPLOAD)
    loop = ClientLoop(gw.http)
    try:
        upload = socket.create_connection(gw.http, timeout=TIMEOUT)
        upload.sendall(HEAD + payload[: UPLOAD // 4])  # under way before the upgrade...
        loop.wait_for(5)
        gw.proc.send_signal(signal.SIGUSR2)
        gw.wait_for(lambda line: line.get("message", "").startswith("upgraded from kiagateway"))
        gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
        upload.sendall(payload[UPLOAD // 4 :])  # ...and ends after it, through the old program
        assert upload.recv(64).decode() == hashlib.sha256(payload).hexdigest()
        upload.close()
        before = loop.done
        loop.wait_for(before + 5)  # served by the new program
    finally:
        loop.stop()
        be.close()
    assert loop.failures == []
    assert gw.proc.poll() is None
    assert [line["pid"] for line in started_with(gw, pid)] == [pid, pid]  # the program ran afresh, in the same PID
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == command_line  # as ps and rc.d's pgrep see it
    # The old generation (the forked child, or the old workers) drained and stopped, and the new program reaped it.
    gw.wait_for(lambda _: sum(line.get("message") == "stopped" for line in gw.seen) == workers)
    upgraded = next(i for i, line in enumerate(gw.seen) if line.get("message", "").startswith("upgraded from"))
    new_workers = {line["pid"] for line in gw.seen[upgraded:] if line.get("message") == "worker started"}
    deadline = time.monotonic() + TIMEOUT
    while children(pid) != new_workers:
        assert time.monotonic() < deadline, f"children {children(pid)}, workers {new_workers}"
        time.sleep(0.05)
    assert gw.stop() == 0
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_hands_the_metrics_address_to_the_new_program(start_gateway, backends, workers):
    """No process of the old program keeps metrics_listen, or the new one could not bind it."""
    pytest.importorskip("prometheus_client")
    port = free_port()
    toml = routes_toml(backends, listen_https="").replace(
        "[http_backends]\n", f'workers = {workers}\nmetrics_listen = "127.0.0.1:{port}"\n[http_backends]\n'
    )
    gw = start_gateway(toml)
    pid = gw.proc.pid
    with socket.create_connection(gw.http, timeout=TIMEOUT) as held:  # the old program drains it after the upgrade
        held.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
        gw.proc.send_signal(signal.SIGUSR2)
        gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as scrape:
            scrape.sendall(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
            assert read_all(scrape).startswith(b"HTTP/1.1 200")
    assert not [line for line in gw.seen if line.get("level") == "error"]
    assert gw.stop() == 0


def test_upgrade_with_a_bad_config_is_aborted_and_the_old_program_serves_on(start_gateway, backends):
    gw = start_gateway(routes_toml(backends))
    gw.config.write_text("[gateway]\nbogus = 1\n")
    gw.proc.send_signal(signal.SIGUSR2)
    gw.wait_for(lambda line: line.get("message", "").startswith("upgrade aborted"))
    assert ask(gw.http).endswith(b"alpha http a.example")
    assert len(started_with(gw, gw.proc.pid)) == 1
    assert gw.stop() == 0


def test_the_upgrade_reads_a_big_config_without_stalling_connections(tmp_path, backends):
    """The upgrade's check reads the file in a child (kiareload), as a reload does: the loop serves meanwhile."""
    gw = conftest.Gateway(tmp_path, big_toml(backends, "workers = 1"))
    timings: list[tuple[float, float]] = []  # (start, end) of each request
    done = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + RELOAD_TIMEOUT + TIMEOUT
        while not done.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                ask(gw.http)
            except OSError:
                pass
            timings.append((start, time.monotonic()))

    thread = threading.Thread(target=client, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while len(timings) < 50 and time.monotonic() < deadline:  # a baseline under the same load
            time.sleep(0.01)
        baseline = max(end - start for start, end in timings)
        sent = time.monotonic()
        gw.proc.send_signal(signal.SIGUSR2)
        gw.wait_for(lambda line: line.get("message", "").startswith("upgrading"), RELOAD_TIMEOUT)
        handed_over = time.monotonic()  # the new program then reads the file before it serves: not measured
        done.set()
        thread.join(TIMEOUT)
        during = [end - start for start, end in timings if start >= sent and end <= handed_over]
        assert during, "no request ran while the upgrade checked the config"
        assert max(during) < baseline + ADDED_LATENCY, (max(during), baseline, len(during))
        gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, gw.proc.pid)) == 2, 60)
    finally:
        done.set()
        gw.stop()


def test_upgrade_resets_old_relays_still_open_when_drain_timeout_ends(start_gateway):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        read_all(conn)  # until the gateway cuts it

    be = RawBackend(backend)
    gw = start_gateway(
        '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\ndrain_timeout = 1.0\n'
        f'[http_backends]\n"raw.example" = "{be.address}"\n'
    )
    try:
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(HEAD)
            assert recv_exactly(sock, 5) == b"hello"
            gw.proc.send_signal(signal.SIGUSR2)
            gw.wait_for(lambda line: line.get("message", "").startswith("upgraded from"))
            assert read_until_cut(sock) is ConnectionResetError  # not a clean EOF
        be.check()
    finally:
        be.close()
    assert gw.connection_log(domain="raw.example")["outcome"] == "drain_timeout"
    assert gw.proc.poll() is None


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_tells_systemd_reloading_then_ready_and_only_the_main_process_speaks(
    start_gateway, backends, tmp_path, workers
):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        assert recv_exactly(conn, 3) == b"bye"

    be = RawBackend(backend)
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(TIMEOUT)
        gw = start_gateway(
            '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n'
            f'workers = {workers}\n[http_backends]\n"raw.example" = "{be.address}"\n',
            env={"NOTIFY_SOCKET": path},
        )
        assert notify.recv(256) == b"READY=1"
        try:
            with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:  # the old program drains it
                sock.sendall(HEAD)
                assert recv_exactly(sock, 5) == b"hello"
                gw.proc.send_signal(signal.SIGUSR2)
                assert notify.recv(256).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
                assert notify.recv(256) == b"READY=1"  # from the new program, in the same PID
                sock.sendall(b"bye")
            gw.wait_for(lambda _: sum(line.get("message") == "stopped" for line in gw.seen) == workers)
            be.check()
        finally:
            be.close()
        gw.proc.send_signal(signal.SIGTERM)
        assert notify.recv(256) == b"STOPPING=1"  # the first word since: the old program stopped without a word
        assert gw.proc.wait(TIMEOUT) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_into_a_program_that_cannot_start_is_aborted_and_the_old_program_serves_on(
    start_gateway, backends, tmp_path, workers
):
    """A partial ``pip install -U`` (an ImportError at start-up): the upgrade checks the new program itself first."""
    site = tmp_path / "site"  # on the gateway's path from the start, empty until the "upgrade" is installed
    site.mkdir()
    gw = start_gateway(routes_toml(backends, extra_gateway=f"workers = {workers}"), env={"PYTHONPATH": str(site)})
    pid = gw.proc.pid
    assert ask(gw.http).endswith(b"alpha http a.example")
    # Only a program started from now on imports it: the running one read its site modules at start-up.
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["kiaconfig"] = None  # a module gone\n')
    gw.proc.send_signal(signal.SIGUSR2)
    aborted = gw.wait_for(lambda line: line.get("message", "").startswith("upgrade aborted"))
    assert "kiaconfig" in aborted["message"]  # the new program's own complaint, its last line
    for _ in range(2 * workers):
        assert ask(gw.http).endswith(b"alpha http a.example")
    assert gw.proc.poll() is None
    assert len(started_with(gw, pid)) == 1
    assert not [line for line in gw.seen if "drain" in line.get("message", "")]  # no worker was told to stop
    assert gw.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_after_an_upgrade_waits_for_the_old_program_to_drain(start_gateway, workers):
    """The main process outlives the old generation: else systemd (KillMode=mixed) kills it mid-drain, with a FIN."""
    streaming = threading.Event()
    be = endless_download(streaming)
    gw = start_gateway(
        '[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\ndrain_timeout = 3.0\n'
        f'workers = {workers}\n[http_backends]\n"raw.example" = "{be.address}"\n'
    )
    pid = gw.proc.pid
    try:
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(HEAD)
            assert sock.recv(100)
            old = children(pid)
            gw.proc.send_signal(signal.SIGUSR2)
            gw.wait_for(lambda line: line.get("message", "").startswith("upgraded from"))
            gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
            # The old workers (the one with the download at least), or the forked child that keeps it.
            draining = (
                old
                if workers > 1
                else {gw.wait_for(lambda line: line.get("message", "").startswith("draining the open"))["pid"]}
            )
            assert any(alive(p) for p in draining), "the old program ended before the test could stop it"
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(TIMEOUT) == 0
            left = [p for p in draining if alive(p)]
            for p in left:  # what systemd's KillMode=mixed does next
                os.kill(p, signal.SIGKILL)
            assert left == []
            assert read_until_cut(sock) is ConnectionResetError  # not a clean EOF
        streaming.set()
    finally:
        streaming.set()
        be.close()
    assert gw.connection_log(domain="raw.example")["outcome"] == "drain_timeout"


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie not yet collected counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_connection_ids_stay_unique_across_an_upgrade(start_gateway, backends):
    """The upgrade keeps the PID, which ids start with: the new program must not count from 1 again under it."""
    gw = start_gateway(routes_toml(backends, listen_https=""))
    pid = gw.proc.pid

    def ids() -> list[str]:
        return [line["id"] for line in gw.seen if line.get("message") == "connection"]

    for _ in range(2):
        assert ask(gw.http).endswith(b"alpha http a.example")
    gw.wait_for(lambda _: len(ids()) == 2)
    gw.proc.send_signal(signal.SIGUSR2)
    gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
    for _ in range(2):
        assert ask(gw.http).endswith(b"alpha http a.example")
    gw.wait_for(lambda _: len(ids()) == 4)
    before, after = ids()[:2], ids()[2:]
    assert not set(before) & set(after), f"ids {before} then {after}"
    assert all(i.startswith(f"{pid}.") for i in before) and all(i.startswith(str(pid)) for i in after)
    assert gw.stop() == 0


# ---------------------------------------------------------------------------
# metrics_listen across an upgrade: handed over as the listeners are, or bound before the old program lets go


def healthz(port: int, timeout: float = TIMEOUT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        return read_all(sock, timeout)


class HealthLoop(ClientLoop):
    """A thread asking /healthz on ``port`` one request after another until stopped, keeping every failure."""

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port))

    def ask(self) -> bytes:
        return healthz(self.address[1])

    def answered(self, answer: bytes) -> bool:
        return answer.startswith(b"HTTP/1.1 200")


def metrics_upgrade_toml(backends: dict, workers: int, port: int) -> str:
    return routes_toml(backends, listen_https="").replace(
        "[http_backends]\n", f'workers = {workers}\nmetrics_listen = "127.0.0.1:{port}"\n[http_backends]\n'
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_to_a_metrics_address_someone_holds_is_aborted_and_nothing_is_refused(start_gateway, backends, workers):
    """The new program could not bind metrics_listen: the old one tries it first, says so, and serves on."""
    pytest.importorskip("prometheus_client")
    first = free_port()
    toml = metrics_upgrade_toml(backends, workers, first)
    gw = start_gateway(toml)
    pid = gw.proc.pid
    with socket.create_server(("127.0.0.1", 0)) as holder:  # another process's port, as far as the gateway knows
        taken = holder.getsockname()[1]
        gw.config.write_text(toml.replace(f"127.0.0.1:{first}", f"127.0.0.1:{taken}"))
        check = subprocess.run(
            [*conftest.gateway_command(), "--check", str(gw.config)], capture_output=True, timeout=TIMEOUT
        )
        assert check.returncode == 0, check.stderr  # a port held by someone else is a matter of the moment
        loop = ClientLoop(gw.http)
        try:
            loop.wait_for(5)
            gw.proc.send_signal(signal.SIGUSR2)
            aborted = gw.wait_for(lambda line: line.get("message", "").startswith("upgrade aborted"))
            before = loop.done
            loop.wait_for(before + 5)
        finally:
            loop.stop()
        assert f"127.0.0.1:{taken}" in aborted["message"]
        assert "Address already in use" in aborted["message"]
        assert loop.failures == []
        assert gw.proc.poll() is None
        assert len(started_with(gw, pid)) == 1
        assert healthz(first).startswith(b"HTTP/1.1 200")  # the running metrics address still answers
        assert not [line for line in gw.seen if "drain" in line.get("message", "")]  # no worker was told to stop
    assert gw.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_to_a_free_metrics_address_is_served_by_the_new_program(start_gateway, backends, workers):
    pytest.importorskip("prometheus_client")
    first = free_port()
    toml = metrics_upgrade_toml(backends, workers, first)
    gw = start_gateway(toml)
    pid = gw.proc.pid
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port: ours until just before the upgrade
        second = probe.getsockname()[1]
    gw.config.write_text(toml.replace(f"127.0.0.1:{first}", f"127.0.0.1:{second}"))
    gw.proc.send_signal(signal.SIGUSR2)
    gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
    assert healthz(second).startswith(b"HTTP/1.1 200")
    upgraded = next(i for i, line in enumerate(gw.seen) if line.get("message", "").startswith("upgraded from"))
    assert [line["address"] for line in gw.seen[upgraded:] if line.get("message") == "listening for metrics"] == [
        f"127.0.0.1:{second}"
    ]
    deadline = time.monotonic() + TIMEOUT
    while True:  # the old address goes with the old program (its drain may hold a copy for a moment)
        try:
            healthz(first, timeout=1.0)
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the old metrics address still answers"
        time.sleep(0.05)
    assert ask(gw.http).endswith(b"alpha http a.example")
    assert not [line for line in gw.seen if line.get("level") == "error"]
    assert gw.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unchanged_metrics_address_answers_all_through_the_upgrade(start_gateway, backends, workers):
    """The socket is handed over as the listeners are: no probe is refused while the new program starts."""
    pytest.importorskip("prometheus_client")
    port = free_port()
    gw = start_gateway(metrics_upgrade_toml(backends, workers, port))
    pid = gw.proc.pid
    probes = HealthLoop(port)
    try:
        probes.wait_for(5)
        gw.proc.send_signal(signal.SIGUSR2)
        gw.wait_for(lambda line: line.get("message") == "ready" and len(started_with(gw, pid)) == 2)
        probes.wait_for(probes.done + 5)  # answered by the new program
    finally:
        probes.stop()
    assert probes.failures == []
    assert gw.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_upgrade_aborted_for_an_interpreter_out_of_reach_names_the_directory_and_the_cause(
    start_gateway, backends, searchable_dir
):
    """A Python under a 0700 home (pyenv's, say) that the gateway's user cannot reach once it has dropped to it."""
    import pwd
    import sys
    import sysconfig

    home = searchable_dir / "home"  # root's, mode 0700: nobody may not search it
    home.mkdir(mode=0o700)
    venv = home / "venv"  # this test's virtualenv seen from inside that home: its python and its site-packages
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    site = venv / Path(sysconfig.get_path("purelib")).relative_to(sys.prefix)
    site.parent.mkdir(parents=True)
    site.symlink_to(sysconfig.get_path("purelib"))
    python = venv / "bin" / "python"
    gw = start_gateway(
        routes_toml(backends, extra_gateway='user = "nobody"'),
        under=searchable_dir,
        command=[str(python), "-m", "kiagateway"],
    )
    assert pwd.getpwuid(os.stat(f"/proc/{gw.proc.pid}").st_uid).pw_name == "nobody"
    gw.proc.send_signal(signal.SIGUSR2)
    aborted = gw.wait_for(lambda line: line.get("message", "").startswith("upgrade aborted"))["message"]
    assert f"cannot run the interpreter {python}: permission denied on {home}" in aborted
    assert "mode 0700, owner root" in aborted and "user nobody" in aborted
    assert ask(gw.http).endswith(b"alpha http a.example")
    assert gw.proc.poll() is None
    assert gw.stop() == 0
