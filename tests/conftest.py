"""Real parts for the end-to-end tests: a trustme CA, HTTP and TLS backends, and the
gateway as a subprocess of the installed console script, listening on port 0.

Every server here runs in a daemon thread, is bounded by socket timeouts, and is
closed by its fixture; the gateway process is stopped by its own PID.
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import resource
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trustme

DOMAINS = ("a.example", "b.example", "deep.sub.b.example", "c.example")
TIMEOUT = 10.0  # upper bound for any single wait in a test


def gateway_command() -> list[str]:
    script = shutil.which("kiagateway", path=os.path.dirname(sys.executable)) or shutil.which("kiagateway")
    return [script] if script else [sys.executable, "-m", "kiacli"]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca):
    return ca.issue_cert(*DOMAINS, "*.b.example", "localhost")


@pytest.fixture(scope="session")
def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class _WhoAmI(http.server.BaseHTTPRequestHandler):
    """/whoami answers '<backend name> <scheme>'; POST echoes the body back."""

    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT

    def do_GET(self) -> None:
        self._reply(f"{self.server.name} {self.server.scheme} {self.headers.get('Host', '-')}".encode())

    def do_POST(self) -> None:
        self._reply(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _HTTPBackend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False


class Backend:
    """A threaded HTTP(S) server on 127.0.0.1:0 named ``name``."""

    def __init__(self, name: str, tls_context: ssl.SSLContext | None = None) -> None:
        self.server = _HTTPBackend(("127.0.0.1", 0), _WhoAmI)
        self.server.name = name
        self.server.scheme = "https" if tls_context else "http"
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="session")
def tls_server_context(server_cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def backends(tls_server_context):
    """Named HTTP and TLS backends shared by the session: {name: Backend}."""
    made = {}
    for name in ("alpha", "beta", "wild", "default"):
        made[name] = Backend(name)
        made[name + "-tls"] = Backend(name, tls_server_context)
    yield made
    for backend in made.values():
        backend.close()


def free_closed_port() -> int:
    """A loopback port with nothing listening on it (connect is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gateway:
    """The gateway as a real subprocess; logs come as JSON lines on stderr."""

    def __init__(
        self,
        workdir: Path,
        toml: str,
        args: tuple[str, ...] = (),
        env: dict | None = None,
        max_fds: int = 0,
        command: list[str] | None = None,
        start_timeout: float = TIMEOUT,
    ) -> None:
        self.config = workdir / "servers.toml"
        self.config.write_text(toml)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self.proc = subprocess.Popen(
            [*(command or gateway_command()), "--log-format=json", *args, str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))) if max_fds else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.listening: dict[str, list[tuple[str, int]]] = {"http": [], "https": []}
        self.wait_for(
            lambda line: line.get("message") == "ready" or line.get("message", "").startswith("listening"),
            start_timeout,
        )
        self._collect_listeners()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                line = json.loads(text)
            except ValueError:
                line = {"message": "NOT JSON", "text": text}
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> dict:
        """Return the first log line (new or already seen) that matches, or fail."""
        for line in self.seen:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching log line within {timeout}s; seen: {self.seen[-10:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"gateway exited ({self.proc.poll()}); log: {self.seen[-10:]}")
            self.seen.append(line)
            if predicate(line):
                return line

    def _collect_listeners(self) -> None:
        # Start-up prints one "listening" line per listener before "ready".
        self.wait_for(lambda line: line.get("message") == "ready")
        for line in self.seen:
            if line.get("message", "").startswith("listening for "):
                name = line["message"].split()[-1]
                host, _, port = line["address"].rpartition(":")
                self.listening.setdefault(name, []).append((host.strip("[]"), int(port)))

    @property
    def http(self) -> tuple[str, int]:
        return self.listening["http"][0]

    @property
    def https(self) -> tuple[str, int]:
        return self.listening["https"][0]

    def connection_log(self, **match) -> dict:
        """The finished-connection line whose fields include ``match``."""
        return self.wait_for(
            lambda line: line.get("message") == "connection" and all(line.get(k) == v for k, v in match.items())
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(TIMEOUT)
        finally:
            self._reader.join(TIMEOUT)
            self.proc.stderr.close()
            while not self.lines.empty():  # keep every line for assertions after the stop
                line = self.lines.get()
                if line is not None:
                    self.seen.append(line)


def routes_toml(
    backends: dict, extra_gateway: str = "", listen_http: str = '"127.0.0.1:0"', listen_https: str = '"127.0.0.1:0"'
) -> str:
    b = backends
    return f"""
[gateway]
http_listen = [{listen_http}]
https_listen = [{listen_https}]
{extra_gateway}

[http_backends]
"a.example" = "{b["alpha"].address}"
"b.example" = "{b["beta"].address}"
"*.b.example" = "{b["wild"].address}"
"deep.sub.b.example" = "{b["alpha"].address}"

[https_backends]
"a.example" = "{b["alpha-tls"].address}"
"b.example" = "{b["beta-tls"].address}"
"*.b.example" = "{b["wild-tls"].address}"
"*.sub.b.example" = "{b["alpha-tls"].address}"
"""


@pytest.fixture
def start_gateway(tmp_path):
    """Start gateways with a given TOML text; all are stopped at teardown."""
    started: list[Gateway] = []

    def start(
        toml: str,
        *args: str,
        env: dict | None = None,
        max_fds: int = 0,
        under: Path | None = None,
        command: list[str] | None = None,
    ) -> Gateway:
        """``under``: a directory for the config other than pytest's 0700 one, for a gateway that drops privileges;
        ``command``: what runs instead of the console script (arguments are added after it)."""
        workdir = (under or tmp_path) / f"gw{len(started)}"
        workdir.mkdir(mode=0o755)
        gateway = Gateway(workdir, toml, args, env, max_fds, command)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def searchable_dir():
    """A directory every user can search, outside pytest's own 0700 base directory."""
    path = Path(tempfile.mkdtemp(prefix="kiagateway-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def gateway(start_gateway, backends) -> Gateway:
    """A gateway with the standard routes and no default route."""
    return start_gateway(routes_toml(backends))


def read_all(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Read until EOF (or a reset) within ``timeout``."""
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def exchange(address: tuple[str, int], payload: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send raw bytes, half-close, and return everything that comes back."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_all(sock, timeout)
