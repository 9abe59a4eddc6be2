"""Process life: graceful stop with open relays, workers, the max_connections cap, descriptor exhaustion."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, read_all
from test_relaying import HEAD, RawBackend, recv_exactly


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_stops_accepting_but_lets_open_relays_finish(start_gateway, workers):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"hello")
        assert recv_exactly(conn, 3) == b"bye"
        conn.sendall(b"ok")

    be = RawBackend(backend)
    gw = start_gateway(
        f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\n'
        f'[http_backends]\n"raw.example" = "{be.address}"\n',
        f"--workers={workers}",
    )
    try:
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(HEAD)
            assert recv_exactly(sock, 5) == b"hello"
            gw.proc.send_signal(signal.SIGTERM)
            for worker in range(1, int(workers) + 1) if workers != "1" else [None]:  # every process closed
                gw.wait_for(
                    lambda line, w=worker: (
                        line.get("message") == "stopping: no new connections" and line.get("worker") == w
                    )
                )
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(gw.http, timeout=TIMEOUT).close()
            assert gw.proc.poll() is None  # still serving the open relay
            sock.sendall(b"bye")
            assert read_all(sock) == b"ok"
        assert gw.proc.wait(TIMEOUT) == 0
        be.check()
    finally:
        be.close()
    gw.stop()
    assert gw.connection_log(domain="raw.example")["outcome"] == "ok"


def test_max_connections_pauses_accepting(start_gateway):
    def backend(conn):
        recv_exactly(conn, len(HEAD))
        conn.sendall(b"first")
        assert read_all(conn) == b""

    be = RawBackend(backend)
    gw = start_gateway(
        f'[gateway]\nhttp_listen = ["127.0.0.1:0"]\nhttps_listen = []\nmax_connections = 1\n'
        f'[http_backends]\n"raw.example" = "{be.address}"\n"*" = "127.0.0.1:1"\n'
    )
    try:
        first = socket.create_connection(gw.http, timeout=TIMEOUT)
        first.sendall(HEAD)
        assert recv_exactly(first, 5) == b"first"
        second = socket.create_connection(gw.http, timeout=TIMEOUT)  # the kernel's backlog holds it
        second.sendall(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
        second.settimeout(0.5)
        with pytest.raises(socket.timeout):
            second.recv(1)  # not accepted while the first connection is open
        first.close()
        second.settimeout(TIMEOUT)
        assert read_all(second).startswith(b"HTTP/1.1 502")  # accepted once a slot freed
        second.close()
        be.check()
    finally:
        be.close()


def test_sigterm_right_after_start_stops_every_worker_gracefully(start_gateway, backends):
    from conftest import routes_toml

    gw = start_gateway(routes_toml(backends), "--workers=2")  # returns as soon as the supervisor is ready
    gw.proc.send_signal(signal.SIGTERM)  # likely before the workers have their handlers
    assert gw.stop() == 0
    assert sum(line.get("message") == "stopped" for line in gw.seen) == 3
    assert not any("died" in line.get("message", "") for line in gw.seen)


def test_out_of_descriptors_is_survived_without_a_traceback(start_gateway, backends):
    from conftest import routes_toml

    gw = start_gateway(routes_toml(backends), max_fds=48)
    request = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\n\r\n"
    held = []
    try:
        for _ in range(40):  # two descriptors a relay: the gateway runs out long before 40
            sock = socket.create_connection(gw.http, timeout=TIMEOUT)
            sock.sendall(request)
            held.append(sock)
        answers = []
        for sock in held:
            sock.settimeout(0.5)
            try:
                answers.append(sock.recv(65536))
            except (socket.timeout, ConnectionResetError):
                answers.append(b"")
        # Each got its answer, a 503 (the gateway's own shortage; the cause in the log only), or (not accepted
        # yet) nothing; never a traceback.
        assert all(a.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")) or not a for a in answers), answers
        assert not any(b"Too many open files" in a for a in answers)
        assert any(a.startswith(b"HTTP/1.1 503") for a in answers) or any(
            line.get("message") == "accept failed, pausing this listener" for line in gw.seen
        )
        if any(a.startswith(b"HTTP/1.1 503") for a in answers):
            assert "Too many open files" in gw.connection_log(outcome="local_error")["reason"]
    finally:
        for sock in held:
            sock.close()
    # The held relays end as their clients' FINs reach them: until then a connect may still find no descriptor.
    deadline = time.monotonic() + TIMEOUT
    while b"alpha http" not in read_all_request(gw.http):
        assert time.monotonic() < deadline, "not serving again after the descriptors were freed"
    for _ in range(3):  # with the descriptors back, it serves again
        assert b"alpha http" in read_all_request(gw.http)
    assert gw.proc.poll() is None
    assert gw.stop() == 0
    assert all(line.get("message") != "NOT JSON" for line in gw.seen), [
        line for line in gw.seen if line.get("message") == "NOT JSON"
    ][:5]


def read_all_request(address) -> bytes:
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        return read_all(sock)


def test_workers_stop_when_the_supervisor_is_killed(start_gateway, backends):
    from conftest import routes_toml

    gw = start_gateway(routes_toml(backends), "--workers=2")
    pids = [
        gw.wait_for(lambda line, n=n: line.get("message") == "worker started" and line["worker"] == n)["pid"]
        for n in (1, 2)
    ]
    gw.proc.kill()
    gw.proc.wait(TIMEOUT)
    for worker in (1, 2):  # each worker is told, and stops gracefully on its own
        gw.wait_for(lambda line, w=worker: line.get("message") == "stopped" and line.get("worker") == w)
    deadline = time.monotonic() + TIMEOUT
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "orphaned workers still running"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "(zombie)" not in status


@pytest.mark.parametrize("workers", ["1", "2"])
def test_systemd_notify_ready_reloading_and_stopping(start_gateway, backends, tmp_path, workers):
    """Type=notify(-reload): READY=1 once listening, RELOADING=1 then READY=1 per reload, STOPPING=1 on SIGTERM."""
    from conftest import routes_toml

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(TIMEOUT)
        gw = start_gateway(routes_toml(backends), f"--workers={workers}", env={"NOTIFY_SOCKET": path})
        assert notify.recv(256) == b"READY=1"
        for good in (True, False):  # a failed reload still ends with READY=1: the old config serves on
            if not good:
                gw.config.write_text("[gateway]\nbogus = 1\n")
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            gw.proc.send_signal(signal.SIGHUP)
            reloading = notify.recv(256).decode().split("\n")
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
            assert before <= int(reloading[1].removeprefix("MONOTONIC_USEC=")) <= after  # the same clock as ours
            ready = dict(field.split("=", 1) for field in notify.recv(256).decode().split("\n"))
            assert ready["READY"] == "1"
            assert ready["STATUS"].startswith("config reloaded" if good else "reload failed")
        gw.proc.send_signal(signal.SIGTERM)
        assert notify.recv(256) == b"STOPPING=1"
        assert gw.proc.wait(TIMEOUT) == 0
