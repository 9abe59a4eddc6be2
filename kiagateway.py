"""kiagateway: route TCP connections by domain, TLS by SNI and plain HTTP by Host.

It reads only the first bytes of each connection, never decrypts TLS and
never rewrites HTTP: the bytes it read are forwarded as they came, then the
relay moves the rest both ways.

Usage:
  kiagateway [--http-listen=ADDR]... [--https-listen=ADDR]... [--workers=N]
             [--log-format=FORMAT] [--user=NAME] [CONFIG]
  kiagateway --check [CONFIG]
  kiagateway -h | --help
  kiagateway --version

Arguments:
  CONFIG                The TOML route table [default: servers.toml].

Options:
  --http-listen=ADDR    Listen for plain HTTP on ADDR, e.g. 0.0.0.0:80 or [::]:80.
                        Repeatable; replaces the config's http_listen.
  --https-listen=ADDR   Listen for TLS on ADDR. Repeatable; replaces https_listen.
  --workers=N           Worker processes sharing the listeners, or "auto".
  --log-format=FORMAT   text or json.
  --user=NAME           Drop privileges to this user after binding.
  --check               Validate CONFIG, print its route table, exit 0 or 1.
  -h --help             Show this text.
  --version             Print the version.

Exit status: 0 after a graceful stop or a good --check, 1 for a bad config,
a listener that cannot be bound or a fatal error, 2 for bad usage.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import socket
import struct
import sys
import time
from typing import TextIO

import docopt
import gevent
import gevent.event
import gevent.server
import gevent.socket

import kiaconfig
import kiaprocess
import relay
import sniff
from kiaconfig import Backend, Config, ConfigError, Settings
from kialog import Log, format_address
from kiaprocess import FatalError

__version__ = "0.2.0"

READ_SIZE = 16384  # one recv while reading the preamble; most heads and hellos fit whole
REPLY_TIMEOUT = 2.0  # seconds to hand an error reply to a client before giving up on it
LINGER_SECONDS = 1.0  # after an error reply, read and drop what the client still sends...
LINGER_BYTES = 65536  # ...up to this much, so that closing does not reset the reply away
IDLE_GREENLETS = 64  # connection greenlets kept parked for reuse


# ---------------------------------------------------------------------------
# Replies for refused connections, one place for every GatewayError.

_HTTP_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


def http_response(status: int, detail: str) -> bytes:
    body = f"{status} {_HTTP_REASONS[status]}: {detail}\n".encode("ascii", "replace")
    head = (
        f"HTTP/1.1 {status} {_HTTP_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def tls_alert(description: int) -> bytes:
    """A fatal alert record (RFC 8446 section 6): content type 21, legacy version 3.3, level 2."""
    return bytes((21, 3, 3, 0, 2, 2, description))


def error_reply(error: sniff.GatewayError, listener: str) -> bytes:
    """The bytes a refused client gets: an HTTP answer, a TLS alert, or nothing."""
    if listener == "http" or isinstance(error, sniff.HttpOnTlsPort):
        return http_response(error.http_status, error.reason)
    if error.tls_alert is not None:
        return tls_alert(error.tls_alert)
    return b""


# ---------------------------------------------------------------------------
# PROXY protocol header for backends that ask for the client's address
# (haproxy.org/download/2.6/doc/proxy-protocol.txt).

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client: tuple, local: tuple) -> bytes:
    """PROXY v1 or v2 header for a TCP connection from ``client`` to ``local``."""
    v6 = ":" in client[0]
    if version == "v1":
        return f"PROXY TCP{6 if v6 else 4} {client[0]} {local[0]} {client[1]} {local[1]}\r\n".encode("ascii")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    addresses = (
        socket.inet_pton(family, client[0])
        + socket.inet_pton(family, local[0])
        + struct.pack("!HH", client[1], local[1])
    )
    # version 2, command PROXY; TCP over IPv6 (0x21) or IPv4 (0x11)
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21 if v6 else 0x11, len(addresses)) + addresses


# ---------------------------------------------------------------------------
# Accepting: the listeners' StreamServers.


class _AcceptPaused(Exception):
    """Raised from accept when the process is out of descriptors: gevent backs off and retries."""


class _Server(gevent.server.StreamServer):
    """StreamServer that pauses accepting while the gateway is full and logs accept failures."""

    def __init__(self, listener: socket.socket, name: str, gateway: Gateway) -> None:
        super().__init__(listener, gateway.dispatch)  # called by do_handle below, with the listener's name
        self.name = name
        self.family = listener.family  # read once: the property builds an enum each time
        self.gateway = gateway

    def full(self) -> bool:
        """Asked before each accept; True pauses accepting until ``Gateway._closed`` resumes it."""
        gateway = self.gateway
        if gateway.open >= gateway.config.settings.max_connections:
            gateway.paused = True
        return gateway.paused

    def do_read(self) -> tuple[socket.socket, tuple] | None:
        """Accept one client as a plain non-blocking socket: the gateway waits on it itself."""
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None  # the client left before we accepted it
            self.gateway.log.error(
                "accept failed, pausing this listener", address=format_address(self.address), cause=str(exc)
            )
            raise _AcceptPaused() from exc
        client = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gateway = self.gateway
        gateway.open += 1  # counted here, before the next accept asks full()
        if gateway.open == 1:
            gateway.drained.clear()
        return client, address

    def do_handle(self, client: socket.socket, address: tuple) -> None:
        self.gateway.dispatch(client, address, self.name)

    def do_close(self, *args: object) -> None:
        """The gateway closes each client itself, or hands it to a relay that does."""


# ---------------------------------------------------------------------------
# The gateway: a greenlet per connection until the backend is connected, then
# a callback-driven relay (relay.py) that holds no greenlet.


class Gateway:
    """Serves the listeners; ``reload`` swaps the route table without dropping a connection."""

    def __init__(self, cfg: Config, log: Log, worker: int = 0) -> None:
        self.config = cfg
        self.log = log
        self.routes = {"http": cfg.http_routes, "https": cfg.https_routes}
        self.servers: list[_Server] = []
        self.open = 0  # connections accepted and not yet closed, relays included
        self.paused = False  # accepting stopped at max_connections
        self.drained = gevent.event.Event()
        self._ids = itertools.count(1)
        self._id_prefix = f"{worker}." if worker else ""
        self._idle: list = []  # connection greenlets parked between connections
        relay.configure_pipes(kiaconfig.resolve_workers(cfg.settings.workers))  # this process's share of the pipe quota

    def serve(self, listeners: list[tuple[str, socket.socket]]) -> None:
        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, _AcceptPaused)  # logged once by _Server, not as a traceback
        for name, sock in listeners:
            server = _Server(sock, name, self)
            server.start()
            self.servers.append(server)

    def dispatch(self, client: socket.socket, address: tuple, listener: str) -> None:
        """Give the new connection a greenlet: a parked one if there is one, else a new one."""
        if self._idle:
            gevent.get_hub().loop.run_callback(self._idle.pop().switch, (client, address, listener))
        else:
            gevent.spawn_raw(self._serve_connections, (client, address, listener))

    def _serve_connections(self, connection: tuple) -> None:
        """Body of a connection greenlet: handle one connection, then park for the next.

        A greenlet used again saves creating one and, on Python 3.11+, mapping and
        unmapping its frame stack (with its page faults): measured here, about a
        quarter of the CPU a short connection costs.
        """
        hub = gevent.get_hub()
        while True:
            self.handle(*connection)
            if len(self._idle) >= IDLE_GREENLETS:
                return
            self._idle.append(gevent.getcurrent())
            connection = hub.switch()

    def reload(self, cfg: Config) -> None:
        self.config = cfg
        self.routes = {"http": cfg.http_routes, "https": cfg.https_routes}

    def stop(self, grace: float, **fields: object) -> None:
        """Stop accepting, give open connections ``grace`` seconds, then leave them to the exit."""
        for server in self.servers:
            server.close()
        self.log.info("stopping: no new connections", open=self.open, **fields)
        if self.open and not self.drained.wait(timeout=grace):
            self.log.warning("grace period over, closing open connections", open=self.open, **fields)

    def _closed(self) -> None:
        """One connection fewer: resume accepting if that frees a slot, wake a waiting stop."""
        self.open -= 1
        if self.paused and self.open < self.config.settings.max_connections:
            self.paused = False
            for server in self.servers:
                server._start_accepting_if_started()
        if not self.open:
            self.drained.set()

    def handle(self, client: socket.socket, address: tuple, listener: str) -> None:
        conn = _Connection(self, listener, address)
        settings = self.config.settings
        backend_sock = None
        try:
            preamble, buffered = self._read_preamble(client, listener, settings, conn.started)
            conn.domain = preamble.domain
            backend = self.routes[listener].lookup(preamble.domain)
            if backend is None:
                name = preamble.domain or ("no SNI" if listener == "https" else "no Host")
                raise sniff.NoRoute(f"no route for {name}")
            conn.backend = backend
            backend_sock = self._connect(backend, preamble.domain, settings.connect_timeout)
            if backend.proxy_protocol:
                try:
                    local = client.getsockname()
                except OSError:
                    raise _ClientGone("client_reset") from None
                buffered = proxy_header(backend.proxy_protocol, address, local) + buffered
            try:
                _sendall(backend_sock, buffered, settings.connect_timeout)
            except _ConnectTimedOut:
                raise sniff.BackendTimeout(
                    f"backend {backend} took no data for {settings.connect_timeout:g}s"
                ) from None
            conn.result.bytes_up = len(buffered)
        except sniff.GatewayError as exc:
            conn.result.outcome = exc.outcome
            conn.reason = exc.reason
            _answer(client, error_reply(exc, listener))
        except _ClientGone as exc:
            conn.result.outcome = exc.outcome
        except OSError as exc:  # the backend broke before the relay began
            conn.result.outcome = "backend_reset"
            conn.reason = str(exc)
        except BaseException:
            conn.result.outcome = "error"
            _close(client, backend_sock)
            conn.done(conn.result)
            raise
        else:
            try:
                relay.Relay(client, backend_sock, settings.idle_timeout, conn.done, conn.result)
            except BaseException:
                conn.result.outcome = "error"
                _close(client, backend_sock)
                conn.done(conn.result)
                raise
            return
        _close(client, backend_sock)
        conn.done(conn.result)

    def _read_preamble(
        self, client: socket.socket, listener: str, settings: Settings, accepted: float
    ) -> tuple[sniff.Preamble, bytes]:
        """Read until the sniffer decides, under one deadline counted from accept.

        The deadline's timer is started only if a read would block: most preambles
        are whole in the first read.
        """
        sniffer = (sniff.HttpSniffer if listener == "http" else sniff.TlsSniffer)(settings.max_preamble)
        deadline = None
        try:
            result = sniff.NEED_MORE
            while result is sniff.NEED_MORE:
                try:
                    data = client.recv(READ_SIZE)
                except BlockingIOError:
                    if deadline is None:
                        deadline = gevent.Timeout(max(0.0, settings.preamble_timeout - (time.monotonic() - accepted)))
                        deadline.start()
                    _wait(client, _READ)
                    continue
                except OSError:
                    raise _ClientGone("client_reset") from None
                if not data:
                    raise _ClientGone("client_closed")
                result = sniffer.feed(data)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise sniff.PreambleTimeout(
                f"no complete {'request head' if listener == 'http' else 'ClientHello'} "
                f"within {settings.preamble_timeout:g}s"
            ) from None
        finally:
            if deadline is not None:
                deadline.close()
        return result, bytes(sniffer.buffer)

    def _connect(self, backend: Backend, domain: str | None, timeout: float) -> socket.socket:
        address = backend.address
        try:
            if address.ip is not None:  # no resolver round-trip for IP literals
                family = socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET
                return _open_connection(family, (address.host, address.port), timeout)
            # Names resolve at connect time, so DNS changes need no restart; the
            # lookup and every address tried share the one connect_timeout.
            with gevent.Timeout(timeout, _ConnectTimedOut):
                error: OSError = OSError("no address")
                for family, _, _, _, sockaddr in gevent.socket.getaddrinfo(
                    address.host, address.port, 0, socket.SOCK_STREAM
                ):
                    try:
                        return _open_connection(family, sockaddr, None)
                    except OSError as exc:
                        error = exc
                raise error
        except _ConnectTimedOut:
            raise sniff.BackendTimeout(f"connect to {address} for {domain} timed out after {timeout:g}s") from None
        except socket.gaierror as exc:
            raise sniff.BackendUnreachable(f"cannot resolve {address.host} for {domain}: {exc.strerror}") from None
        except OSError as exc:
            raise sniff.BackendUnreachable(f"connect to {address} for {domain}: {exc.strerror or exc}") from None


class _ConnectTimedOut(Exception):
    """Raised by the connect deadline's timer."""


# Blocking-style I/O on plain non-blocking sockets: try the call, and only when
# it would block, park this greenlet on a one-off io watcher.

_READ, _WRITE = 1, 2  # libev event masks


def _wait(sock: socket.socket, event: int) -> None:
    hub = gevent.get_hub()
    watcher = hub.loop.io(sock.fileno(), event)
    try:
        hub.wait(watcher)
    finally:
        watcher.close()


def _recv(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            _wait(sock, _READ)


def _sendall(sock: socket.socket, data: bytes, timeout: float | None = None) -> None:
    """Send all of ``data``; if it has to wait, give up after ``timeout`` with _ConnectTimedOut."""
    view = memoryview(data)
    deadline = None
    try:
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                if deadline is None and timeout is not None:
                    deadline = gevent.Timeout(timeout, _ConnectTimedOut)
                    deadline.start()
                _wait(sock, _WRITE)
    finally:
        if deadline is not None:
            deadline.close()


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # non-blocking from birth: one syscall fewer where supported


def _open_connection(family: int, sockaddr: tuple, timeout: float | None) -> socket.socket:
    """Connect; wait (under ``timeout`` if given, else the caller's) only if the connect is still in progress."""
    sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        error = sock.connect_ex(sockaddr)
        if error == errno.EINPROGRESS:
            try:
                sock.getpeername()  # a local backend is usually connected already: no need to wait
                error = 0
            except OSError:
                if timeout is None:
                    _wait(sock, _WRITE)
                else:
                    with gevent.Timeout(timeout, _ConnectTimedOut):
                        _wait(sock, _WRITE)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


class _Connection:
    """What the log line of one connection needs, kept until the connection ends."""

    __slots__ = ("backend", "domain", "gateway", "id", "listener", "peer", "reason", "result", "started")

    def __init__(self, gateway: Gateway, listener: str, address: tuple) -> None:
        self.gateway = gateway
        self.id = gateway._id_prefix + str(next(gateway._ids))
        self.listener = listener
        self.peer = address
        self.started = time.monotonic()
        self.domain: str | None = None
        self.backend: Backend | None = None
        self.reason: str | None = None
        self.result = relay.RelayResult()

    def done(self, result: relay.RelayResult) -> None:
        gateway = self.gateway
        gateway._closed()
        fields = {
            "id": self.id,
            "listener": self.listener,
            "client": format_address(self.peer),
            "domain": self.domain,
            "backend": str(self.backend) if self.backend else None,
            "outcome": result.outcome,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if self.reason:
            fields["reason"] = self.reason
        gateway.log.connection(fields)


class _ClientGone(Exception):
    """The client closed or reset before the preamble was in: nothing to answer."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _close(*socks: socket.socket | None) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def _answer(client: socket.socket, reply: bytes) -> None:
    """Send an error reply, then drain briefly so that closing does not reset it away."""
    if not reply:
        return
    try:
        with gevent.Timeout(REPLY_TIMEOUT, False):  # a client too slow to take it gets the close alone
            _sendall(client, reply)
            client.shutdown(socket.SHUT_WR)
            drained = 0
            with gevent.Timeout(LINGER_SECONDS, False):
                while drained < LINGER_BYTES:
                    data = _recv(client, READ_SIZE)
                    if not data:
                        break
                    drained += len(data)
    except OSError:  # the client is gone: the close is all it gets
        pass


# ---------------------------------------------------------------------------
# Command line: config with the options over it, --check, main.


def load_config(path: str, args: dict) -> Config:
    """The file, with the command line's options put over its [gateway] table."""
    cfg = kiaconfig.load(path)
    overrides: dict = {}
    try:
        if args.get("--http-listen"):
            overrides["http_listen"] = tuple(kiaconfig.parse_address(a, listen=True) for a in args["--http-listen"])
        if args.get("--https-listen"):
            overrides["https_listen"] = tuple(kiaconfig.parse_address(a, listen=True) for a in args["--https-listen"])
    except ValueError as exc:
        raise ConfigError([f"command line: listen address {exc}"]) from None
    if args.get("--workers"):
        workers = args["--workers"]
        if workers != "auto" and not (workers.isdigit() and 0 < int(workers) <= 1024):
            raise ConfigError(
                [f"command line: --workers must be a whole number from 1 to 1024 or auto, got {workers!r}"]
            )
        overrides["workers"] = workers if workers == "auto" else int(workers)
    if args.get("--log-format"):
        if args["--log-format"] not in kiaconfig.LOG_FORMATS:
            raise ConfigError([f"command line: --log-format must be text or json, got {args['--log-format']!r}"])
        overrides["log_format"] = args["--log-format"]
    if args.get("--user"):
        overrides["user"] = args["--user"]
    if overrides:
        cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, **overrides))
    return cfg


def print_routes(cfg: Config, out: TextIO) -> None:
    s = cfg.settings
    out.write(f"{cfg.source}: OK\n")
    for name, table, listen in (
        ("http", cfg.http_routes, s.http_listen),
        ("https", cfg.https_routes, s.https_listen),
    ):
        where = ", ".join(map(str, listen)) or "off"
        out.write(f"{name} listener: {where}; {len(table)} route{'s' if len(table) != 1 else ''}\n")
        rows = table.rows()
        width = max((len(pattern) for pattern, _ in rows), default=0)
        for pattern, backend in rows:
            extra = f"  (proxy_protocol {backend.proxy_protocol})" if backend.proxy_protocol else ""
            out.write(f"  {pattern.ljust(width)}  ->  {backend}{extra}\n")


def main(argv: list[str] | None = None) -> int:
    try:
        args = docopt.docopt(__doc__, argv=argv, version=f"kiagateway {__version__}")
    except docopt.DocoptExit as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    except SystemExit as exc:  # --help and --version print and exit
        return 0 if exc.code in (None, 0) else 2
    path = args["CONFIG"] or "servers.toml"
    log = Log("json" if args["--log-format"] == "json" else "text")
    try:
        cfg = load_config(path, args)
    except ConfigError as exc:
        for line in exc.errors:
            log.error(line)
        return 1
    if args["--check"]:
        for warning in cfg.warnings:
            log.warning(warning)
        print_routes(cfg, sys.stdout)
        return 0
    log = Log(cfg.settings.log_format)
    try:
        return kiaprocess.run(cfg, lambda: load_config(path, args), Gateway, log, __version__)
    except FatalError as exc:
        log.error(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
