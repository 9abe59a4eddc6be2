"""The command line: --check, --version, --help, exit codes, start-up errors and signals."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TIMEOUT, gateway_command, routes_toml

import kiagateway

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*gateway_command(), *args], capture_output=True, text=True, timeout=TIMEOUT * 2, cwd=cwd)


def test_check_shipped_config():
    out = run("--check")
    assert out.returncode == 0, out.stderr
    assert "servers.toml: OK" in out.stdout
    assert "example.com" in out.stdout and "->  127.0.0.1:8001" in out.stdout


def test_check_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[http_backends]\n"a.example" = "127.0.0.1"\n[gateway]\nidle_timout = 3\n')
    out = run("--check", str(bad))
    assert out.returncode == 1
    assert f"{bad}: [http_backends] 'a.example'" in out.stderr
    assert "did you mean 'idle_timeout'" in out.stderr


def test_check_missing_file(tmp_path):
    out = run("--check", str(tmp_path / "nope.toml"))
    assert out.returncode == 1
    assert "cannot read" in out.stderr


def test_version_and_help():
    out = run("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"kiagateway {kiagateway.__version__}")
    out = run("--help")
    assert out.returncode == 0 and "Usage:" in out.stdout and "--check" in out.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--workers"], ["a.toml", "b.toml"]])
def test_bad_usage_exits_2(args):
    assert run(*args).returncode == 2


def test_bad_option_value_exits_1(tmp_path):
    out = run("--workers=zero", "--check")
    assert out.returncode in (1, 2)
    out = run("--log-format=xml")
    assert out.returncode == 1 and "--log-format" in out.stderr


def test_python_dash_m(tmp_path):
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kiagateway", "--version"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.stdout.startswith("kiagateway ")


def test_cannot_bind_exits_1_naming_the_address(tmp_path, backends):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = tmp_path / "s.toml"
        cfg.write_text(routes_toml(backends, listen_http=f'"127.0.0.1:{port}"'))
        out = run("--log-format=json", str(cfg))
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert any(f"cannot listen on 127.0.0.1:{port}" in line["message"] for line in lines)


def test_listen_options_replace_the_config(start_gateway, backends):
    gw = start_gateway(
        routes_toml(backends, listen_http='"127.0.0.1:1"'), "--http-listen=127.0.0.1:0", "--http-listen=127.0.0.1:0"
    )
    assert len(gw.listening["http"]) == 2 and all(port != 1 for _, port in gw.listening["http"])


def test_json_logs_every_line_is_an_object(gateway):
    with socket.create_connection(gateway.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    line = gateway.connection_log(domain="a.example")
    for key in (
        "time",
        "id",
        "listener",
        "client",
        "domain",
        "backend",
        "outcome",
        "bytes_up",
        "bytes_down",
        "duration_ms",
    ):
        assert key in line
    assert line["outcome"] == "ok" and line["bytes_down"] > 0
    assert gateway.stop() == 0
    assert all(line.get("message") != "NOT JSON" for line in gateway.seen)
    assert any(line.get("message", "").startswith("kiagateway ") for line in gateway.seen)


def test_log_lines_stay_whole_and_none_is_lost_with_two_workers(start_gateway, backends):
    """Both workers write batches of connection lines to one pipe at the same time."""
    gw = start_gateway(routes_toml(backends), "--workers=2")
    request = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"

    def ask(_: int) -> bytes:
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(request)
            return b"".join(iter(lambda: sock.recv(65536), b""))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(400), timeout=TIMEOUT * 4))
    assert all(answer.endswith(b"alpha http a.example") for answer in answers)
    assert gw.stop() == 0
    assert [line for line in gw.seen if line.get("message") == "NOT JSON"] == []
    ids = [line["id"] for line in gw.seen if line.get("message") == "connection" and line["outcome"] == "ok"]
    assert len(ids) == len(set(ids)) == 400
    workers = {str(line["pid"]) for line in gw.seen if line.get("message") == "worker started"}
    assert {i.split(".")[0] for i in ids} == workers  # both workers served and logged, ids prefixed by their pid


def test_text_logs(tmp_path, backends):
    cfg = tmp_path / "s.toml"
    cfg.write_text(routes_toml(backends))
    proc = subprocess.Popen([*gateway_command(), str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if " ready" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert "listening for http address=127.0.0.1:" in "".join(lines)
    assert f"kiagateway {kiagateway.__version__} starting" in lines[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_and_keeps_old_table_on_error(start_gateway, backends, workers):
    gw = start_gateway(routes_toml(backends), f"--workers={workers}")
    request = b"GET /whoami HTTP/1.1\r\nHost: new.example\r\nConnection: close\r\n\r\n"

    def ask() -> bytes:
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(request)
            return b"".join(iter(lambda: sock.recv(65536), b""))

    assert ask().startswith(b"HTTP/1.1 421")
    gw.config.write_text(
        routes_toml(backends).replace(
            "[http_backends]", f'[http_backends]\n"new.example" = "{backends["beta"].address}"'
        )
    )
    gw.proc.send_signal(signal.SIGHUP)
    for worker in [None] if workers == 1 else [1, 2]:  # every worker has the new table
        gw.wait_for(lambda line, w=worker: line.get("message") == "config reloaded" and line.get("worker") == w)
    for _ in range(4):
        assert b"beta http" in ask()
    gw.config.write_text("[http_backends]\nbroken = 1\n")
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(lambda line: "reload failed" in line.get("message", ""))
    for _ in range(4):
        assert b"beta http" in ask()  # the old table stays


def test_workers_share_the_listeners_and_a_dead_one_is_replaced(start_gateway, backends):
    gw = start_gateway(routes_toml(backends), "--workers=2")
    started = [
        gw.wait_for(lambda line, n=n: line.get("message") == "worker started" and line["worker"] == n) for n in (1, 2)
    ]
    request = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"

    def ask() -> bytes:
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(request)
            return b"".join(iter(lambda: sock.recv(65536), b""))

    for _ in range(10):
        assert b"alpha http" in ask()
    os.kill(started[0]["pid"], signal.SIGKILL)
    died = gw.wait_for(lambda line: line.get("message") == "worker died, starting a new one")
    assert (died["worker"], died["cause"]) == (1, "killed by signal 9")
    gw.wait_for(
        lambda line: (
            line.get("message") == "worker started" and line["pid"] != started[0]["pid"] and line["worker"] == 1
        )
    )
    for _ in range(10):
        assert b"alpha http" in ask()
    # A worker started after a reload serves the reloaded table, not the one from start-up.
    gw.config.write_text(
        routes_toml(backends).replace(
            f'"a.example" = "{backends["alpha"].address}"', f'"a.example" = "{backends["beta"].address}"'
        )
    )
    gw.proc.send_signal(signal.SIGHUP)
    for n in (1, 2):
        gw.wait_for(lambda line, n=n: line.get("message") == "config reloaded" and line.get("worker") == n)
    replaced = gw.wait_for(
        lambda line: (
            line.get("message") == "worker started" and line["pid"] != started[0]["pid"] and line["worker"] == 1
        )
    )
    os.kill(replaced["pid"], signal.SIGKILL)
    gw.wait_for(
        lambda line: (
            line.get("message") == "worker started"
            and line["pid"] not in (started[0]["pid"], replaced["pid"])
            and line["worker"] == 1
        )
    )
    for _ in range(10):
        assert b"beta http" in ask()
    assert gw.stop() == 0
    assert sum(line.get("message") == "stopped" for line in gw.seen) == 3  # two workers and the supervisor


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_drops_privileges_after_binding(start_gateway, backends):
    import pwd

    nobody = pwd.getpwnam("nobody")
    gw = start_gateway(routes_toml(backends), "--user=nobody")
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        assert b"alpha http" in b"".join(iter(lambda: sock.recv(65536), b""))


def test_unknown_user_is_a_fatal_error(tmp_path, backends):
    cfg = tmp_path / "s.toml"
    cfg.write_text(routes_toml(backends))
    out = run("--user=no-such-user-here", str(cfg))
    assert out.returncode == 1
    assert "no such user" in out.stderr
