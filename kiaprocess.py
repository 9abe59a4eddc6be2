"""The process set-up and one serving process: bind, drop privileges, raise nofile, then serve alone or as a worker.

Its own module because the life cycle is a job apart from the data path: it
is handed what it runs (``make_server`` builds the per-worker server, ``load``
re-reads the config, in the one process that reloads) and imports nothing from
kiagateway.py, so the arrows go one way. It never reads a connection's bytes.
With workers, ``run`` hands kiasupervisor.py one worker's life to run (the
supervisor never imports this module); the reload's policy is kiareload.py's.
It uses only what every Unix Python has (no sigtimedwait, no prctl): OpenBSD
is a target.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from typing import Callable, Protocol

import gevent
import gevent.event
import gevent.lock
import gevent.os

import kiaconfig
import kiametrics
import kiapipes
import kiareload
import kiasupervisor
import kiaupgrade
import relay
from kiaconfig import Address, Config, ConfigError
from kialog import Log, format_address


class Server(Protocol):
    """What a worker serves with: the gateway of kiagateway.py."""

    def serve(self, listeners: list[tuple[str, socket.socket]]) -> None: ...

    def reload(self, cfg: Config) -> None: ...

    def stop(self, grace: float, **fields: object) -> None: ...

    metrics: kiametrics.Stats | None  # what the data path counts in, when metrics_listen is set


MakeServer = Callable[[Config, Log, str], Server]  # the config, the log, the prefix of connection ids
Load = Callable[[], Config]


class FatalError(Exception):
    """Start-up cannot go on; the message says why. main() turns it into exit status 1."""


_BIND_HINTS = {
    errno.EADDRINUSE: "another process is listening there",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "no interface on this host has that address",
}


QUIC_RECEIVE_BUFFER = 8 << 20  # bytes asked for the QUIC socket's receive queue


def bind_listener(address: Address, udp: bool = False) -> socket.socket:
    """A listening TCP socket, or with ``udp`` the QUIC listener's UDP socket."""
    family = socket.AF_INET6 if address.ip and address.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        if udp:  # every flow's client datagrams queue here: as much as net.core.rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, QUIC_RECEIVE_BUFFER)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # "[::]:80" and "0.0.0.0:80" may both be listed
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        if not udp:
            sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = _BIND_HINTS.get(exc.errno)
        where = f"{address} (UDP)" if udp else str(address)
        raise FatalError(f"cannot listen on {where}: {exc.strerror}" + (f" ({hint})" if hint else "")) from None
    return sock


def _bind_for_upgrade(metrics_listen: str) -> socket.socket:
    """Bind the metrics_listen of the program an upgrade runs, in the old one: ConfigError (abort) if it cannot."""
    try:
        return bind_listener(kiaconfig.parse_address(metrics_listen, listen=True))
    except (FatalError, ValueError) as exc:
        raise ConfigError([f"metrics_listen: {exc}"]) from None


def drop_privileges(user: str) -> None:
    """Become ``user`` for good. What is imported lazily is imported first, while it is still readable."""
    import pwd

    hub = gevent.get_hub()  # the event loop, resolver and thread pool load modules on first use
    hub.resolver  # noqa: B018
    hub.threadpool  # noqa: B018
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise FatalError(f"no such user {user!r}") from None  # checked before by kiaconfig.check_serving
    if os.getuid() == entry.pw_uid:
        return
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise FatalError(f"cannot switch to user {user}: only root can (running as uid {os.getuid()})") from None


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd.

    ``RELOADING=1`` gets the ``MONOTONIC_USEC`` that systemd asks for beside it.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if message == "RELOADING=1":
        message += f"\nMONOTONIC_USEC={_monotonic_usec()}"
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), path)
        except OSError:
            pass


SPARE_FDS = 32  # descriptors a worker needs besides relays: log, event loop, resolver threads, a few in flight


def raise_nofile() -> int | None:
    """Raise the soft descriptor limit to the hard one (a process may); return the soft limit now in force.

    Each relay holds two descriptors: the default soft limit of 1024 (or an rc
    login class's) caps a worker near 500 connections whatever max_connections says.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # macOS: an unlimited hard limit cannot be the soft one
            pass
    return None if soft == getattr(resource, "RLIM_INFINITY", -1) else soft


def check_nofile(log: Log, settings: kiaconfig.Settings, nofile: int | None) -> None:
    """Warn when the descriptor limit, which counts per process, is below what max_connections needs in a worker."""
    pipes = 2 * kiapipes.PIPES_KEPT if relay.HAVE_SPLICE else 0  # splice pipes in flight: two descriptors each
    listeners = len(settings.http_listen) + len(settings.https_listen) + len(settings.quic_listen)
    if settings.quic_listen:
        listeners += settings.max_quic_flows  # a socket per flow
    needed = 2 * settings.max_connections + pipes + listeners + SPARE_FDS
    if nofile is not None and nofile < needed:
        log.warning(
            "the descriptor limit is below what max_connections needs: raise the hard limit"
            " (LimitNOFILE=, ulimit -Hn, the login class's openfiles) or lower max_connections",
            nofile=nofile,
            needed=needed,
            max_connections=settings.max_connections,
        )


def run(cfg: Config, load: Load, make_server: MakeServer, log: Log, version: str) -> int:
    """Bind once, drop privileges, then serve in this process or in supervised workers."""
    s = cfg.settings
    nofile = raise_nofile()  # before the first descriptor we open
    for warning in cfg.warnings:
        log.warning(warning)
    systemd = kiaupgrade.sockets_from_systemd()  # asked first: inherited_listeners() removes what tells
    try:
        inherited = kiaupgrade.inherited_listeners()
    except kiaupgrade.ActivationError as exc:
        raise FatalError(str(exc)) from None
    handed_metrics = None  # metrics_listen's socket, from the program that upgraded into this one
    if inherited is not None:
        listeners = [(name, sock) for name, sock in inherited if name != kiaupgrade.METRICS]
        handed_metrics = next((sock for name, sock in inherited if name == kiaupgrade.METRICS), None)
    else:
        listeners = [("http", bind_listener(a)) for a in s.http_listen]
        listeners += [("https", bind_listener(a)) for a in s.https_listen]
        listeners += [("quic", bind_listener(a, udp=True)) for a in s.quic_listen]
    if not listeners:
        said = "LISTEN_FDS passed none" if inherited is not None else "http_listen and https_listen are both empty"
        raise FatalError(f"no listeners: {said}")
    if handed_metrics is not None and not s.metrics_listen:  # not in the config read now: not ours to serve
        handed_metrics.close()
        handed_metrics = None
    metrics_sock = handed_metrics
    if metrics_sock is None and s.metrics_listen:
        metrics_sock = bind_listener(kiaconfig.parse_address(s.metrics_listen, listen=True))
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
        nofile=nofile,
    )
    _say_where_listeners_come_from(log, version, inherited is not None, systemd)
    check_nofile(log, s, nofile)
    for name, sock in listeners:
        log.info(f"listening for {name}", address=format_address(sock.getsockname()))
    if metrics_sock is not None:
        log.info("listening for metrics", address=format_address(metrics_sock.getsockname()))
    upgrade = kiaupgrade.Upgrade(
        version,
        lambda: kiareload.load_in_child(load, cooperative=workers == 1),  # as a reload reads it: off the loop
        log,
        listeners,
        lambda: sd_notify("RELOADING=1"),
        systemd,
        (s.metrics_listen, metrics_sock) if metrics_sock is not None else None,
        _bind_for_upgrade,
    )
    policy = kiareload.Policy(log, sd_notify, lambda settings: check_nofile(log, settings, raise_nofile()))
    if workers == 1:
        exporter = kiametrics.Exporter(metrics_sock, version, log) if metrics_sock is not None else None
        return Process(cfg, load, make_server, log, policy, listeners, upgrade=upgrade, metrics=exporter).serve()
    scrapes = kiametrics.Scrapes(metrics_sock, version, log) if metrics_sock is not None else None
    return kiasupervisor.supervise(
        workers,
        lambda worker, current, lifeline: Process(
            current,
            load,
            make_server,
            log,
            policy,
            listeners if worker == 0 else [(name, sock) for name, sock in listeners if name != "quic"],
            worker,
            metrics=scrapes.in_worker(worker) if scrapes is not None else None,
        ).serve(lifeline),
        cfg,
        load,
        log,
        policy,
        sd_notify,
        listeners,
        upgrade,
        scrapes,
    )


def _say_where_listeners_come_from(log: Log, version: str, inherited: bool, systemd: bool) -> None:
    """Log that the listen lists were ignored for handed-over sockets, and who handed them: an upgrade or systemd."""
    if not inherited:
        return
    old = kiaupgrade.upgraded_from()
    if old is not None:
        log.info(f"upgraded from kiagateway {old} to {version}", from_version=old, version=version, pid=os.getpid())
        if systemd:
            log.info("listening on the sockets handed over, systemd's: http_listen and https_listen are ignored")
        else:
            log.info("listening on the sockets handed over: a changed http_listen or https_listen needs a restart")
    else:
        log.info("socket activation: listening on the sockets passed in, http_listen and https_listen are ignored")


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in MONOTONIC_USEC."""
    clock = getattr(time, "CLOCK_MONOTONIC", None)
    return (time.clock_gettime_ns(clock) if clock is not None else time.monotonic_ns()) // 1000


def connection_id_prefix() -> str:
    """What this process's connection ids start with: unique across respawned workers and restarts.

    An upgrade in place keeps the PID, so it adds its count.
    """
    upgrades = kiaupgrade.generation()
    return f"{os.getpid()}-{upgrades}." if upgrades else f"{os.getpid()}."


class Process:
    """One gevent hub serving every listener until SIGTERM/SIGINT (or, for a worker, its supervisor's end).

    Alone, it reloads the file on SIGHUP (read in a child, see kiareload) and,
    with watch_config, when it changes, and upgrades in place on SIGUSR2; as a
    supervisor's worker it applies the configs the supervisor validated and sends
    down its lifeline, so that all workers serve the same table whatever
    happens to the file meanwhile. ``worker`` is 0 for the only process.
    """

    def __init__(
        self,
        cfg: Config,
        load: Load,
        make_server: MakeServer,
        log: Log,
        policy: kiareload.Policy,
        listeners: list,
        worker: int = 0,
        upgrade: kiaupgrade.Upgrade | None = None,
        metrics: kiametrics.Exporter | kiametrics.Reporter | None = None,
    ) -> None:
        self.running = cfg  # the config as last reloaded or applied
        self.load = load
        self.log = log
        self.policy = policy
        self.listeners = listeners
        self.worker = worker
        self.upgrade = upgrade  # None once upgraded in place: this process is the old program's drain
        self.metrics = metrics
        self.fields: dict[str, object] = {"worker": worker} if worker else {}  # in the log lines of its end
        self.stopping = gevent.event.Event()
        self.reloading = gevent.lock.Semaphore()  # one loader child at a time; a SIGHUP meanwhile waits its turn
        self.upgrading = False  # ready() and starts() wait on the loop for their children: a SIGUSR2 then waits not
        self.watch: kiareload.Watch | None = None  # kept while serving
        kiapipes.configure_pipes(kiaconfig.resolve_workers(cfg.settings.workers))  # this process's share of the pipes
        self.gateway = make_server(cfg, log, connection_id_prefix())

    def serve(self, lifeline: int | None = None) -> int:
        """Serve until told to stop, then drain and return the exit status; a worker follows its ``lifeline``."""
        if self.metrics is not None:
            self.gateway.metrics = self.metrics.stats
            self.metrics.start()
        self.gateway.serve(self.listeners)
        if lifeline is None:
            gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
            gevent.signal_handler(signal.SIGUSR2, lambda: gevent.spawn(self.upgrade_in_place))
            if self.running.settings.watch_config:
                self.watch = kiareload.Watch(self.running.source, self._file_changed)
        else:  # `pkill -HUP kiagateway` reaches workers too: the supervisor's reload is the one
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # and the supervisor's upgrade, not a worker's death
            gevent.spawn(kiasupervisor.follow_supervisor, lifeline, self.log, self.stopping, self.worker, self.apply)
        gevent.signal_handler(signal.SIGTERM, self.stopping.set)
        gevent.signal_handler(signal.SIGINT, self.stopping.set)
        if not self.worker:  # a container's init gets orphans; after an upgrade, the old program's drain
            signal.signal(signal.SIGCHLD, kiasupervisor.reap_orphans)  # (libev keeps SIGCHLD)
            kiasupervisor.reap_orphans()  # any that ended before the handler was in place
        signal.pthread_sigmask(signal.SIG_UNBLOCK, kiasupervisor.SUPERVISED)  # a SIGTERM sent early is handled now
        if self.worker:
            self.log.info("worker started", worker=self.worker, pid=os.getpid())
        else:
            sd_notify("READY=1")
            self.log.info("ready")
        self.stopping.wait()
        self.stop()
        return 0

    def reload(self) -> None:
        """Read the file in a loader child and serve what it holds, if the policy takes it (SIGHUP, watch_config)."""
        with self.reloading:
            systemd = self.upgrade is not None and self.upgrade.systemd
            reloaded = self.policy.reload(lambda: kiareload.load_in_child(self.load), self.running, systemd)
            if self.metrics is not None:
                self.metrics.reloaded(reloaded is not None)
            if reloaded is not None:
                self.running, ignored = reloaded
                self.gateway.reload(self.running)
                self.policy.reloaded(self.running, ignored, True)

    def apply(self, new: Config, ignored: list[str]) -> None:
        """Serve a config the supervisor validated (a worker's reload)."""
        self.running = new
        self.gateway.reload(new)
        self.policy.reloaded(new, ignored, False, **self.fields)

    def upgrade_in_place(self) -> None:
        """A forked child keeps the open connections and drains them; this process becomes the new program."""
        upgrade = self.upgrade
        if self.upgrading or self.stopping.is_set() or upgrade is None:
            return
        self.upgrading = True
        if not upgrade.ready() or self.stopping.is_set() or not upgrade.starts() or self.stopping.is_set():
            upgrade.cancel()
            self.upgrading = False
            return
        self.log.flush()  # the child starts with an empty queue: what waits is written by hand_over
        try:
            child = gevent.os.fork_gevent()
        except OSError as exc:  # no process or memory to spare for the drain: nothing is handed over yet
            self.log.error("upgrade aborted, the running program goes on: cannot fork the drain", cause=str(exc))
            upgrade.cancel()
            self.upgrading = False
            return
        if child:
            upgrade.hand_over([child, *kiasupervisor.still_running(upgrade.previous)])
        upgrade.cancel()  # the new program's metrics socket, if bound for it: only the new program holds it now
        self.upgrade = None  # the old program's drain: the new one waits for it, and for what it waited for
        if self.metrics is not None:  # the new program has metrics_listen's socket: let go of our copy
            self.metrics.close()
            self.metrics = None
        os.environ.pop("NOTIFY_SOCKET", None)  # the new program speaks for the service now
        self.fields["pid"] = os.getpid()
        self.log.info("draining the open connections of the old program", pid=os.getpid())
        self.stopping.set()

    def stop(self) -> None:
        """Drain: stop accepting, let the open connections finish within drain_timeout, wait for an old program's."""
        settings = self.running.settings
        if not self.worker:
            sd_notify("STOPPING=1")
        if self.metrics is not None:
            self.metrics.drain()  # /healthz answers 503 until we exit; the metrics server outlives the gateway's
        previous = kiasupervisor.stop_previous(self.upgrade.previous) if self.upgrade is not None else set()
        until = time.monotonic() + settings.drain_timeout + kiasupervisor.PREVIOUS_MARGIN
        self.gateway.stop(settings.drain_timeout, **self.fields)
        kiasupervisor.wait_previous(self.log, previous, until)  # the old program's drain, forked before an upgrade
        if self.metrics is not None:
            self.metrics.close()
        self.log.info("stopped", **self.fields)

    def _file_changed(self) -> None:
        self.policy.file_changed(self.running.source)
        gevent.spawn(self.reload)
