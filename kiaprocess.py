"""The process life cycle: bind, drop privileges, serve in one process or in supervised workers, signals.

Its own module because the life cycle is a job apart from the data path: it
is handed what it runs (``make_server`` builds the per-worker server, ``load``
re-reads the config) and imports nothing from kiagateway.py, so the arrows go
one way. It never reads a connection's bytes.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
import traceback
from typing import Callable, Protocol

import gevent
import gevent.event

import kiaconfig
from kiaconfig import Address, Config, ConfigError
from kialog import Log, format_address

SHUTDOWN_GRACE = 30.0  # seconds open relays get to finish after SIGTERM


class Server(Protocol):
    """What a worker serves with: the gateway of kiagateway.py."""

    def serve(self, listeners: list[tuple[str, socket.socket]]) -> None: ...

    def reload(self, cfg: Config) -> None: ...

    def stop(self, grace: float, **fields: object) -> None: ...


MakeServer = Callable[[Config, Log, int], Server]
Load = Callable[[], Config]


class FatalError(Exception):
    """Start-up cannot go on; the message says why. main() turns it into exit status 1."""


_BIND_HINTS = {
    errno.EADDRINUSE: "another process is listening there",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "no interface on this host has that address",
}


def bind_listener(address: Address) -> socket.socket:
    family = socket.AF_INET6 if address.ip and address.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # "[::]:80" and "0.0.0.0:80" may both be listed
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = _BIND_HINTS.get(exc.errno)
        raise FatalError(f"cannot listen on {address}: {exc.strerror}" + (f" ({hint})" if hint else "")) from None
    return sock


def drop_privileges(user: str) -> None:
    """Become ``user`` for good. What is imported lazily is imported first, while it is still readable."""
    import pwd

    hub = gevent.get_hub()  # the event loop, resolver and thread pool load modules on first use
    hub.resolver  # noqa: B018
    hub.threadpool  # noqa: B018
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise FatalError(f"--user {user}: no such user") from None
    if os.getuid() == entry.pw_uid:
        return
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise FatalError(f"cannot switch to user {user}: only root can (running as uid {os.getuid()})") from None


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), path)
        except OSError:
            pass


def run(cfg: Config, load: Load, make_server: MakeServer, log: Log, version: str) -> int:
    """Bind once, drop privileges, then serve in this process or in supervised workers."""
    s = cfg.settings
    for warning in cfg.warnings:
        log.warning(warning)
    listeners = [("http", bind_listener(a)) for a in s.http_listen]
    listeners += [("https", bind_listener(a)) for a in s.https_listen]
    if not listeners:
        raise FatalError("no listeners: http_listen and https_listen are both empty")
    if s.user:
        drop_privileges(s.user)
    workers = kiaconfig.resolve_workers(s.workers)
    log.info(
        f"kiagateway {version} starting",
        config=cfg.source,
        http_routes=len(cfg.http_routes),
        https_routes=len(cfg.https_routes),
        workers=workers,
        pid=os.getpid(),
    )
    for name, sock in listeners:
        log.info(f"listening for {name}", address=format_address(sock.getsockname()))
    if workers == 1:
        return serve(cfg, load, make_server, log, listeners, worker=0)
    return supervise(
        workers,
        lambda worker, current: serve(current, load, make_server, log, listeners, worker),
        cfg,
        load,
        log,
        listeners,
    )


def _reload(load: Load, log: Log) -> Config | None:
    """The new config, or None (logged) if it is bad and the running one must stay."""
    try:
        new = load()
    except ConfigError as exc:
        for line in exc.errors:
            log.error(f"reload failed, keeping the running config: {line}")
        return None
    for warning in new.warnings:
        log.warning(warning)
    return new


def serve(cfg: Config, load: Load, make_server: MakeServer, log: Log, listeners: list, worker: int) -> int:
    """One gevent hub serving every listener until SIGTERM/SIGINT; SIGHUP reloads."""
    gateway = make_server(cfg, log, worker)
    gateway.serve(listeners)
    stopping = gevent.event.Event()

    fields = {"worker": worker} if worker else {}

    def reload() -> None:
        new = _reload(load, log)
        if new is not None:
            gateway.reload(new)
            log.info("config reloaded", http_routes=len(new.http_routes), https_routes=len(new.https_routes), **fields)

    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(reload))
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    if os.getpid() == 1:  # a container's init: orphans in it are reparented to us (libev keeps SIGCHLD)
        signal.signal(signal.SIGCHLD, _reap_orphans)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISED)  # a worker's: a SIGTERM sent early is handled now
    if worker:
        log.info("worker started", worker=worker, pid=os.getpid())
    else:
        sd_notify("READY=1")
        log.info("ready")
    stopping.wait()
    if not worker:
        sd_notify("STOPPING=1")
    gateway.stop(SHUTDOWN_GRACE, **fields)
    log.info("stopped", **fields)
    return 0


_SUPERVISED = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
RESPAWN_DELAY = 1.0  # a worker that dies sooner than this after starting is restarted after this long


def supervise(
    count: int, work: Callable[[int, Config], int], cfg: Config, load: Load, log: Log, listeners: list
) -> int:
    """Fork ``count`` workers sharing the listeners; replace any that dies; pass signals on.

    The supervisor keeps its copies of the listening sockets to hand to replacement
    workers, and closes them when it stops so that new clients are refused at once.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)
    supervisor = os.getpid()  # as PID 1 (a container) every worker's parent is 1: compare with this instead
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, start time)
    respawn: dict[int, float] = {}  # worker number -> when to start it again

    def start(worker: int) -> None:
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later, keep the others serving
            log.error("cannot start a worker, retrying", worker=worker, cause=str(exc))
            respawn[worker] = time.monotonic() + RESPAWN_DELAY
            return
        if pid == 0:  # the worker: its own hub, default signal handling
            code = 1
            try:
                _stop_with_parent(supervisor)
                gevent.reinit()  # signals stay blocked until serve() has its handlers
                code = work(worker, cfg)  # the config as last reloaded
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children[pid] = (worker, time.monotonic())

    for worker in range(1, count + 1):
        start(worker)
    sd_notify("READY=1")
    log.info("ready", workers=count)
    stopping = False
    while children or (respawn and not stopping):
        timeout = max(0.0, min(respawn.values()) - time.monotonic()) if respawn else None
        info = signal.sigtimedwait(_SUPERVISED, timeout) if timeout is not None else signal.sigwaitinfo(_SUPERVISED)
        if info is None or info.si_signo == signal.SIGCHLD:
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                worker, started = children.pop(pid, (0, 0.0))  # 0: an orphan reparented to us as PID 1
                if not stopping and worker:
                    log.error(
                        "worker died, starting a new one",
                        worker=worker,
                        pid=pid,
                        cause=_wait_status(status),
                    )
                    soon = time.monotonic() - started < RESPAWN_DELAY
                    respawn[worker] = time.monotonic() + (RESPAWN_DELAY if soon else 0.0)
            for worker, due in list(respawn.items()):
                if not stopping and due <= time.monotonic():
                    del respawn[worker]
                    start(worker)
        elif info.si_signo == signal.SIGHUP:
            new = _reload(load, log)
            if new is not None:
                cfg = new  # replacement workers start with it too
                _signal_all(children, signal.SIGHUP)
        elif not stopping:  # SIGTERM or SIGINT: workers stop gracefully, then so do we
            stopping = True
            respawn.clear()
            for _, sock in listeners:
                sock.close()
            sd_notify("STOPPING=1")
            log.info("stopping workers", workers=len(children))
            _signal_all(children, signal.SIGTERM)
    log.info("stopped")
    return 0


def _stop_with_parent(supervisor: int) -> None:
    """Linux: get SIGTERM if the supervisor dies, so orphaned workers never keep the ports."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers outlive a killed supervisor
        pass
    if os.getppid() != supervisor:  # the supervisor died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def _reap_orphans(signum: int = 0, frame: object = None) -> None:
    """As PID 1 without workers: collect the exit status of orphans handed to us, so no zombie stays."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:  # none left
        pass


def _signal_all(children: dict, signum: int) -> None:
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
