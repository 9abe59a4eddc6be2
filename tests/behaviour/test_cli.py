"""The command line: --check, --version, --help, exit codes, start-up errors and signals."""

from __future__ import annotations

import concurrent.futures
import grp
import json
import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TIMEOUT, Gateway, free_closed_port, gateway_command, routes_toml

import kiacli
import kiagateway

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*gateway_command(), *args], capture_output=True, text=True, timeout=TIMEOUT * 2, cwd=cwd)


def test_check_shipped_config():
    out = run("--check")
    assert out.returncode == 0, out.stderr
    assert "servers.toml: OK" in out.stdout
    assert "example.com" in out.stdout and "->  127.0.0.1:8001" in out.stdout


def test_shipped_config_examples_are_valid_once_uncommented(tmp_path):
    text = (ROOT / "servers.toml").read_text()
    uncommented = "\n".join(
        line[2:] if line.startswith(('# "', "# ")) and " = " in line else line for line in text.split("\n")
    )
    (tmp_path / "all.toml").write_text(uncommented)
    out = run("--check", str(tmp_path / "all.toml"))
    assert out.returncode == 0, out.stderr
    assert "(pool of 2, round-robin; allow 192.0.2.0/24)" in out.stdout


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


USAGE_ERRORS = [
    (["--bogus"], "unknown option --bogus"),
    (["--check", "-x"], "unknown option -x"),
    (["--workers"], "--workers requires argument"),
    (["--check=yes"], "--check must not have an argument"),
    (["a.toml", "b.toml"], "one CONFIG file at most, got 'a.toml', 'b.toml'"),
    (["--workers=2", "--work", "3"], "--workers given more than once"),
    (["--workers", "2", "a.toml", "b.toml"], "one CONFIG file at most, got 'a.toml', 'b.toml'"),
    (["--workers=0"], "--workers must be a whole number from 1 to 1024 or auto, got '0'"),
    (["--check", "--workers=zero"], "--workers must be a whole number from 1 to 1024 or auto, got 'zero'"),
    (["--log-format=yaml"], "--log-format must be text or json, got 'yaml'"),
    (["--check", "--route=a.example"], "--check or --route, not both: --route checks the config too"),
    (["--http-listen=localhost:80"], "--http-listen: 'localhost:80': 'localhost' is not an IP address"),
    (["--https-listen=127.0.0.1"], "--https-listen: '127.0.0.1' has no port (write 'host:port')"),
]


@pytest.mark.parametrize(("args", "sentence"), USAGE_ERRORS)
def test_bad_usage_exits_2_with_the_usage_and_one_plain_sentence(tmp_path, monkeypatch, capsys, args, sentence):
    monkeypatch.chdir(tmp_path)  # no servers.toml here: nothing could start by mistake
    assert kiacli.main(args) == 2
    out = capsys.readouterr()
    assert out.out == ""
    _assert_one_sentence_and_the_usage(out.err, sentence)


def test_bad_usage_through_the_installed_script(tmp_path):
    out = run("--bogus", "--workers=0", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    _assert_one_sentence_and_the_usage(out.stderr, "unknown option --bogus")


def _assert_one_sentence_and_the_usage(stderr: str, sentence: str) -> None:
    first, *usage = stderr.splitlines()
    assert first == f"kiagateway: {sentence} (see kiagateway --help)"
    assert usage[0] == "Usage:" and usage[1].startswith("  kiagateway ") and "Options:" not in stderr
    assert "Option(" not in stderr and "Argument(" not in stderr and "Warning" not in stderr


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
def test_user_drops_privileges_after_binding_and_still_reloads(searchable_dir, backends):
    nobody = pwd.getpwnam("nobody")
    gw = Gateway(searchable_dir, routes_toml(backends), ("--user=nobody",))  # a file nobody can read again
    try:
        status = Path(f"/proc/{gw.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            assert b"alpha http" in b"".join(iter(lambda: sock.recv(65536), b""))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for(lambda line: line.get("message") == "config reloaded")
    finally:
        gw.stop()


def test_unknown_user_is_a_fatal_error(tmp_path, backends):
    cfg = tmp_path / "s.toml"
    cfg.write_text(routes_toml(backends))
    out = run("--user=no-such-user-here", str(cfg))
    assert out.returncode == 1
    assert "command line: --user: no such user 'no-such-user-here'" in out.stderr


def error_messages(*args: str) -> tuple[int, list[str]]:
    """Exit status and the error lines of a run with JSON logs."""
    out = run("--log-format=json", *args)
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    return out.returncode, [line["message"] for line in lines if line["level"] == "error"]


def _refusals(port: int) -> list[tuple[str, dict, tuple[str, ...], str]]:
    """(id, routes_toml's arguments, options, what the error says) for each start-up refusal."""
    here = f'"127.0.0.1:{port}"'
    return [
        (
            "user-in-file",
            {"extra_gateway": 'user = "no-such-user-here"'},
            (),
            "s.toml: [gateway] user: no such user 'no-such-user-here'",
        ),
        ("user-option", {}, ("--user=no-such-user-here",), "command line: --user: no such user 'no-such-user-here'"),
        (
            "listed-twice",
            {"listen_http": f"{here}, {here}"},
            (),
            f"s.toml: [gateway] http_listen: 127.0.0.1:{port} is listed twice",
        ),
        (
            "http-and-https",
            {"listen_http": here, "listen_https": here},
            (),
            f"s.toml: [gateway] https_listen: 127.0.0.1:{port} overlaps 127.0.0.1:{port} of [gateway] http_listen",
        ),
        (
            "options-overlap",
            {},
            (f"--http-listen=127.0.0.1:{port}", f"--https-listen=127.0.0.1:{port}"),
            f"command line: --https-listen: 127.0.0.1:{port} overlaps 127.0.0.1:{port} of --http-listen",
        ),
        ("no-listeners", {"listen_http": "", "listen_https": ""}, (), "s.toml: [gateway] http_listen and https_listen"),
        ("bad-key", {"extra_gateway": "idle_timout = 3"}, (), "s.toml: [gateway] unknown key 'idle_timout'"),
    ]


@pytest.mark.parametrize("case", range(len(_refusals(1))), ids=[r[0] for r in _refusals(1)])
def test_check_catches_every_start_up_refusal_with_the_same_message(tmp_path, backends, case):
    port = free_closed_port()  # loopback only; start-up must refuse before binding it
    _, toml, options, expected = _refusals(port)[case]
    (tmp_path / "s.toml").write_text(routes_toml(backends, **toml))
    messages = []
    for check in (("--check",), ()):  # --check first, then start-up, on the same file and options
        out = subprocess.run(
            [*gateway_command(), "--log-format=json", *check, *options, "s.toml"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
            cwd=tmp_path,
        )
        assert out.returncode == 1, out.stderr
        lines = [json.loads(line) for line in out.stderr.splitlines()]
        messages.append([line["message"] for line in lines if line["level"] == "error"])
    assert messages[0] == messages[1]
    assert any(expected in message for message in messages[0]), messages[0]


def test_check_catches_overlapping_wildcard_listeners(tmp_path):
    """Never started: a wildcard address is not loopback, so only --check runs this one."""
    cfg = tmp_path / "s.toml"
    cfg.write_text('[gateway]\nhttp_listen = ["0.0.0.0:8080", "127.0.0.1:8080"]\nhttps_listen = ["[::]:8080"]\n')
    out = run("--check", str(cfg))
    assert out.returncode == 1 and out.stdout == ""
    assert f"{cfg}: [gateway] http_listen: 127.0.0.1:8080 overlaps 0.0.0.0:8080 of [gateway] http_listen" in out.stderr
    assert "[::]:8080" not in out.stderr  # IPv6 listeners are bound IPV6_V6ONLY


@pytest.mark.skipif(os.geteuid() != 0, reason="files that only root can read need root")
def test_config_the_serving_user_could_not_read_again_is_refused(searchable_dir, backends):
    cfg = searchable_dir / "servers.toml"
    cfg.write_text(routes_toml(backends, extra_gateway='user = "nobody"'))
    cfg.chmod(0o600)
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    for args in (("--check",), ()):
        status, errors = error_messages(*args, str(cfg))
        assert status == 1
        assert errors == [
            f"{cfg}: [gateway] user: user nobody could not read {cfg} again (mode 0600, owner root), "
            f"so every reload (SIGHUP) would fail: make it readable by user nobody, "
            f"e.g. chgrp {group} {cfg} && chmod 640 {cfg}"
        ]
    cfg.chmod(0o640)
    os.chown(cfg, 0, pwd.getpwnam("nobody").pw_gid)
    assert run("--check", str(cfg)).returncode == 0
    searchable_dir.chmod(0o700)  # the file is readable, the way to it is not
    status, errors = error_messages("--check", "--user=nobody", str(cfg))
    assert status == 1
    assert errors[0].startswith(f"command line: --user: user nobody could not read {cfg} again (directory ")
    assert f"chmod o+x {searchable_dir}" in errors[0]


def test_check_prints_unicode_keys_with_their_a_label(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[http_backends]\n"bücher.example" = "127.0.0.1:1"\n"*.bücher.example" = "127.0.0.1:2"\n')
    out = run("--check", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "  xn--bcher-kva.example (bücher.example)      ->  127.0.0.1:1\n" in out.stdout
    assert "  *.xn--bcher-kva.example (*.bücher.example)  ->  127.0.0.1:2\n" in out.stdout


def test_check_takes_repeated_listen_options_once_each(tmp_path, monkeypatch, capsys):
    """docopt-ng re-appends a repeated option's values for each usage line it tries (jazzband/docopt-ng#60)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "servers.toml").write_text('[http_backends]\n"a.example" = "127.0.0.1:1"\n')
    args = ("--http-listen=127.0.0.1:8080", "--http-listen=[::1]:8080", "--https-listen=127.0.0.1:8443")
    assert kiacli.main(["--check", *args]) == 0, capsys.readouterr().err
    assert "http listener: 127.0.0.1:8080, [::1]:8080; 1 route\n" in capsys.readouterr().out


def test_check_prints_pools_and_allow_lists(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        "[http_backends]\n"
        '"a.example" = ["127.0.0.1:1", "127.0.0.1:2"]\n'
        '"b.example" = { address = ["127.0.0.1:3"], allow = ["10.0.0.0/8", "2001:db8::/32"], proxy_protocol = "v1" }\n'
    )
    out = run("--check", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "  a.example  ->  127.0.0.1:1, 127.0.0.1:2  (pool of 2, round-robin)\n" in out.stdout
    assert "  b.example  ->  127.0.0.1:3  (proxy_protocol v1; allow 10.0.0.0/8, 2001:db8::/32)\n" in out.stdout
