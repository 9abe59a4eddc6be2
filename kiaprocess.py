"""The process life cycle: bind, drop privileges, serve in one process or in supervised workers, signals.

Its own module because the life cycle is a job apart from the data path: it
is handed what it runs (``make_server`` builds the per-worker server, ``load``
re-reads the config, in the one process that reloads) and imports nothing from
kiagateway.py, so the arrows go one way. It never reads a connection's bytes.
It uses only what every Unix Python has (no sigtimedwait, no prctl): OpenBSD
is a target.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Iterable
from typing import Callable, Protocol

import gevent
import gevent.event
import gevent.lock
import gevent.os

import kiaconfig
import kiaframe
import kiametrics
import kiareload
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
    pipes = 2 * relay.PIPES_KEPT if relay.HAVE_SPLICE else 0  # splice pipes in flight: two descriptors each
    listeners = len(settings.http_listen) + len(settings.https_listen)
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
        return serve(cfg, load, make_server, log, policy, listeners, worker=0, upgrade=upgrade, metrics=exporter)
    scrapes = kiametrics.Scrapes(metrics_sock, version, log) if metrics_sock is not None else None
    return supervise(
        workers,
        lambda worker, current, lifeline: serve(
            current,
            load,
            make_server,
            log,
            policy,
            listeners,
            worker,
            lifeline,
            metrics=scrapes.in_worker(worker) if scrapes is not None else None,
        ),
        cfg,
        load,
        log,
        policy,
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


def serve(
    cfg: Config,
    load: Load,
    make_server: MakeServer,
    log: Log,
    policy: kiareload.Policy,
    listeners: list,
    worker: int,
    lifeline: int | None = None,
    upgrade: kiaupgrade.Upgrade | None = None,
    metrics: kiametrics.Exporter | kiametrics.Reporter | None = None,
) -> int:
    """One gevent hub serving every listener until SIGTERM/SIGINT (or, for a worker, its supervisor's end).

    Alone, it reloads the file on SIGHUP (read in a child, see kiareload) and,
    with watch_config, when it changes, and upgrades in place on SIGUSR2; as a
    supervisor's worker it applies the configs the supervisor validated and sends
    down its ``lifeline``, so that all workers serve the same table whatever
    happens to the file meanwhile.
    """
    relay.configure_pipes(kiaconfig.resolve_workers(cfg.settings.workers))  # this process's share of the pipe quota
    gateway = make_server(cfg, log, connection_id_prefix())
    if metrics is not None:
        gateway.metrics = metrics.stats
        metrics.start()
    gateway.serve(listeners)
    stopping = gevent.event.Event()

    fields = {"worker": worker} if worker else {}

    running = cfg
    reloading = gevent.lock.Semaphore()  # one loader child at a time; a SIGHUP meanwhile waits its turn

    def reload() -> None:
        nonlocal running
        with reloading:
            reloaded = policy.reload(
                lambda: kiareload.load_in_child(load), running, upgrade is not None and upgrade.systemd
            )
            if metrics is not None:
                metrics.reloaded(reloaded is not None)
            if reloaded is not None:
                running, ignored = reloaded
                gateway.reload(running)
                policy.reloaded(running, ignored, True)

    def apply(new: Config, ignored: list[str]) -> None:
        nonlocal running
        running = new
        gateway.reload(new)
        policy.reloaded(new, ignored, False, **fields)

    upgrading = False

    def upgrade_in_place() -> None:
        """A forked child keeps the open connections and drains them; this process becomes the new program."""
        nonlocal upgrading, metrics, upgrade
        if upgrading or stopping.is_set() or upgrade is None:
            return
        upgrading = (
            True  # ready() and starts() wait on the loop for their children: a SIGUSR2 meanwhile waits for nothing
        )
        if not upgrade.ready() or stopping.is_set() or not upgrade.starts() or stopping.is_set():
            upgrade.cancel()
            upgrading = False
            return
        log.flush()  # the child starts with an empty queue: what waits is written by hand_over
        child = gevent.os.fork_gevent()
        if child:
            upgrade.hand_over([child, *_still_running(upgrade.previous)])
        upgrade.cancel()  # the new program's metrics socket, if bound for it: only the new program holds it now
        upgrade = None  # the old program's drain: the new one waits for it, and for what it waited for
        if metrics is not None:  # the new program has metrics_listen's socket: let go of our copy
            metrics.close()
            metrics = None
        os.environ.pop("NOTIFY_SOCKET", None)  # the new program speaks for the service now
        fields["pid"] = os.getpid()
        log.info("draining the open connections of the old program", pid=os.getpid())
        stopping.set()

    if lifeline is None:
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(reload))
        gevent.signal_handler(signal.SIGUSR2, lambda: gevent.spawn(upgrade_in_place))
        if cfg.settings.watch_config:

            def changed() -> None:
                policy.file_changed(cfg.source)
                gevent.spawn(reload)

            watch = kiareload.Watch(cfg.source, changed)  # noqa: F841 - kept while serving
    else:  # `pkill -HUP kiagateway` reaches workers too: the supervisor's reload is the one
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # and the supervisor's upgrade, not a worker's death
        gevent.spawn(_follow_supervisor, lifeline, log, stopping, worker, apply)
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    if not worker:  # a container's init gets orphans; after an upgrade, the old program's drain (libev keeps SIGCHLD)
        signal.signal(signal.SIGCHLD, _reap_orphans)
        _reap_orphans()  # any that ended before the handler was in place
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISED)  # a worker's: a SIGTERM sent early is handled now
    if worker:
        log.info("worker started", worker=worker, pid=os.getpid())
    else:
        sd_notify("READY=1")
        log.info("ready")
    stopping.wait()
    if not worker:
        sd_notify("STOPPING=1")
    if metrics is not None:
        metrics.drain()  # /healthz answers 503 until we exit; the metrics server outlives the gateway's
    previous = _stop_previous(upgrade.previous) if upgrade is not None else set()
    until = time.monotonic() + running.settings.drain_timeout + PREVIOUS_MARGIN
    gateway.stop(running.settings.drain_timeout, **fields)
    while previous and time.monotonic() < until:  # the old program's drain, forked before an upgrade: it is ours
        gevent.sleep(PREVIOUS_POLL)
        previous = _still_running(previous)
    _left_running(log, previous)
    if metrics is not None:
        metrics.close()
    log.info("stopped", **fields)
    return 0


_SUPERVISED = kiaupgrade.HELD_SIGNALS  # SIGCHLD, SIGHUP, SIGTERM, SIGINT, SIGUSR2
# Seconds a stop waits for the old program's processes beyond drain_timeout: their drain began at the upgrade,
# so it ends sooner; this covers resetting what is left, logging it and exiting on a loaded machine.
PREVIOUS_MARGIN = 5.0
PREVIOUS_POLL = 0.05  # seconds between looks at whether the old program's drain has ended (no SIGCHLD wait on a loop)
RESPAWN_DELAY = 1.0  # a worker that dies sooner than this after starting is restarted after this long


class _SignalPipe:
    """Signals for a ``select`` loop: handlers only record them, the wakeup pipe ends the wait.

    Built from what every Unix Python has (``set_wakeup_fd``, ``poll``):
    ``sigtimedwait``/``sigwaitinfo`` are missing on OpenBSD and macOS.
    """

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.signums = signums
        self.pending: list[int] = []
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)  # a full pipe must never block a signal handler
        signal.set_wakeup_fd(self.write_fd)
        for signum in signums:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def wait(
        self, timeout: float | None, writers: list[int], readers: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        """The signals received, in order, and the ``writers`` and ``readers`` ready, once any or ``timeout`` came."""
        readable: list[int] = []
        writable: list[int] = []
        if not self.pending:
            readable, writable = _poll(timeout, [self.read_fd, *readers], writers)
        try:
            while os.read(self.read_fd, 512):  # emptied before taking: a signal after this wakes the next wait
                pass
        except BlockingIOError:
            pass
        taken, self.pending = self.pending, []
        return list(dict.fromkeys(taken)), writable, readable  # a signal sent twice before we looked: handled once

    def close(self) -> None:
        """Back to default handling: in a new worker (signals still blocked), or when the supervisor ends."""
        signal.set_wakeup_fd(-1)
        for signum in self.signums:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self.read_fd)
        os.close(self.write_fd)


_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL  # what select() takes for readable
_WRITABLE = select.POLLOUT | select.POLLERR | select.POLLNVAL  # ...and for writable; a bad fd fails at its use


def _poll(timeout: float | None, readers: list[int], writers: list[int]) -> tuple[list[int], list[int]]:
    """``select`` for reading and writing, in poll(): select() refuses descriptors from FD_SETSIZE (1024) up.

    A supervisor started with many descriptors open (a leaky parent, a big
    systemd socket set) gets its pipes above 1023. poll() is on every Unix
    this runs on, OpenBSD included. A negative ``timeout`` waits not at all,
    as select's 0 would: poll's would wait forever.
    """
    events: dict[int, int] = {}
    for fd in readers:
        events[fd] = events.get(fd, 0) | select.POLLIN
    for fd in writers:
        events[fd] = events.get(fd, 0) | select.POLLOUT
    poller = select.poll()
    for fd, mask in events.items():
        poller.register(fd, mask)
    ready = dict(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))
    readable = [fd for fd in readers if ready.get(fd, 0) & _READABLE]
    writable = [fd for fd in writers if ready.get(fd, 0) & _WRITABLE]
    return readable, writable


class _Child:
    """A worker as its supervisor sees it, with the configs still to send down its lifeline."""

    def __init__(self, worker: int, lifeline: int) -> None:
        self.worker = worker
        self.started = time.monotonic()
        self.lifeline = lifeline  # the write end; non-blocking, so a stalled worker never stalls the supervisor
        self.sending = b""  # the message being written...
        self.sent = 0  # ...and how much of it is out
        self.latest = b""  # the one to send after it; a newer config replaces it

    def hand(self, message: bytes) -> None:
        if self.sent:  # a message is half out: it must be finished first
            self.latest = message
        else:
            self.sending = message

    def write(self) -> None:
        """Write what the pipe takes now; called when it is writable."""
        while self.sending:
            try:
                self.sent += os.write(self.lifeline, memoryview(self.sending)[self.sent :])
            except BlockingIOError:
                return
            except BrokenPipeError:  # the worker is gone; its SIGCHLD follows
                self.sending = self.latest = b""
                return
            if self.sent == len(self.sending):
                self.sending, self.sent, self.latest = self.latest, 0, b""


_STOP = kiaframe.frame(b"")  # an empty message on a lifeline: drain and stop, the supervisor is upgrading


def supervise(
    count: int,
    work: Callable[[int, Config, int], int],
    cfg: Config,
    load: Load,
    log: Log,
    policy: kiareload.Policy,
    listeners: list,
    upgrade: kiaupgrade.Upgrade | None = None,
    metrics: kiametrics.Scrapes | None = None,
) -> int:
    """Fork ``count`` workers sharing the listeners; replace any that dies; reload for them; pass signals on.

    The supervisor keeps its copies of the listening sockets to hand to replacement
    workers, and closes them when it stops so that new clients are refused at once.
    Each worker gets the read end of a pipe, its lifeline, whose write end only the
    supervisor holds. On SIGHUP the supervisor validates the file once and sends the
    result down every lifeline (workers never read the file, which may change in
    between); end of file there tells a worker that the supervisor is gone, on every
    Unix and however it died. On SIGUSR2 it tells the workers to drain and stop, and
    execs the new program, which starts its own workers and reaps these. With ``metrics``,
    the supervisor answers the scrapes, asking each worker over a socketpair of its own
    (kiametrics.Scrapes).
    """
    signals = _SignalPipe(_SUPERVISED)
    children: dict[int, _Child] = {}  # by pid
    previous = upgrade.previous if upgrade is not None else set()  # the old program's workers, draining
    previous_until = 0.0  # when a stop gives up waiting for them
    respawn: dict[int, float] = {}  # worker number -> when to start it again
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISED)  # held across an upgrade's exec until now
    _reap(children, respawn, log, False)  # the old program's workers that ended meanwhile

    def start(worker: int) -> None:
        lifeline, held = os.pipe()
        if metrics is not None:
            metrics.prepare(worker)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)  # the worker installs its own first
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later, keep the others serving
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(lifeline)
            os.close(held)
            if metrics is not None:
                metrics.failed(worker)
            log.error("cannot start a worker, retrying", worker=worker, cause=str(exc))
            respawn[worker] = time.monotonic() + RESPAWN_DELAY
            return
        if pid == 0:  # the worker: its own hub, default signal handling
            code = 1
            try:
                signals.close()
                for fd in [held, *(child.lifeline for child in children.values())]:
                    os.close(fd)  # only the supervisor may hold a lifeline's write end
                gevent.reinit()  # signals stay blocked until serve() has its handlers
                code = work(worker, cfg, lifeline)  # the config as last reloaded
            except BaseException:
                traceback.print_exc()
            finally:
                log.close()  # os._exit skips atexit: write what a slow reader has not taken yet
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(lifeline)
        if metrics is not None:
            metrics.started(worker)
        os.set_blocking(held, False)
        children[pid] = _Child(worker, held)

    for worker in range(1, count + 1):
        start(worker)
    sd_notify("READY=1")
    log.info("ready", workers=count)
    stopping = False
    watch = kiareload.Poll(cfg.source) if cfg.settings.watch_config else None  # no event loop here: os.stat polls
    loading: kiareload.Loader | None = None  # a reload's loader child, read as its answer comes: the loop goes on
    load_again = False  # a SIGHUP came while it read: the file may have changed since it began
    while children or (respawn and not stopping) or (previous and stopping):
        due = [*respawn.values(), *([watch.due()] if watch and not stopping else [])]
        due += [previous_until] if previous and stopping else []
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        sending = {child.lifeline: child for child in children.values() if child.sending}
        readers, writers = ([], []) if metrics is None else metrics.wanted()
        if metrics is not None:
            timeout = metrics.timeout(timeout)
        readers += [loading.fd] if loading is not None else []
        received, writable, readable = signals.wait(timeout, [*sending, *writers], readers)
        if watch and not stopping and watch.due() <= time.monotonic() and watch.check():
            policy.file_changed(cfg.source)
            received += [] if signal.SIGHUP in received else [signal.SIGHUP]
        for fd in writable:
            if fd in sending:
                sending[fd].write()
        if metrics is not None:
            metrics.handle(readable, writable)
        if loading is not None and loading.fd in readable and loading.read():
            systemd = upgrade is not None and upgrade.systemd
            reloaded = policy.reload(loading.result, cfg, systemd)
            loading = kiareload.Loader(load) if load_again and not stopping else None
            load_again = False
            if metrics is not None:
                metrics.reloaded(reloaded is not None)
            if reloaded is not None:
                cfg, ignored = reloaded  # replacement workers start with it too
                body = kiareload.pack(cfg, ignored)
                for child in children.values():
                    child.hand(kiaframe.frame(body))
                policy.reloaded(cfg, ignored, True, workers=len(children))
        for signum in received:
            if signum == signal.SIGCHLD:
                for child in _reap(children, respawn, log, stopping):
                    if metrics is not None:
                        metrics.gone(child.worker, restarting=not stopping)
            elif signum == signal.SIGHUP:  # read off the loop, which answers /healthz meanwhile: kiareload.Loader
                if loading is not None:
                    load_again = True
                elif not stopping:
                    loading = kiareload.Loader(load)
            elif signum == signal.SIGUSR2:
                if upgrade is not None and not stopping and upgrade.ready() and upgrade.starts(cooperative=False):
                    _stop_for_upgrade(children, log)
                    if metrics is not None:
                        metrics.finish()  # the scrapes it has taken; the new program takes those still queued
                    # The new supervisor inherits the listeners and these workers, and waits for them at its stop.
                    upgrade.hand_over([*children, *_still_running(previous)])
            elif not stopping:  # SIGTERM or SIGINT: workers stop gracefully, then so do we
                stopping = True
                respawn.clear()
                if loading is not None:  # the reload is moot: its child ends on a broken pipe, SIGCHLD collects it
                    loading.close()
                    loading = None
                for _, sock in listeners:
                    sock.close()
                sd_notify("STOPPING=1")
                if metrics is not None:
                    metrics.drain()  # /healthz answers 503 until the last worker is done
                log.info("stopping workers", workers=len(children))
                _signal_all(children, signal.SIGTERM)
                previous = _stop_previous(previous)
                previous_until = time.monotonic() + cfg.settings.drain_timeout + PREVIOUS_MARGIN
        for worker, due in list(respawn.items()):
            if not stopping and due <= time.monotonic():
                del respawn[worker]
                start(worker)
        if previous:  # those that ended are collected (by _reap, or here), and forgotten before their PID is reused
            previous = _still_running(previous)
            if previous and stopping and time.monotonic() >= previous_until:
                _left_running(log, previous)
                previous = set()
    signals.close()
    if metrics is not None:
        metrics.close()
    log.info("stopped")
    return 0


def _stop_for_upgrade(children: dict[int, _Child], log: Log) -> None:
    """Tell each worker to stop accepting and drain: by its lifeline, so that it never takes the exec for a death."""
    for pid, child in children.items():
        child.hand(_STOP)
        child.write()
        if child.sending:  # a config is half out and the pipe full: the signal says it, if less quietly
            _signal_all({pid: child}, signal.SIGTERM)
    log.info("old workers draining for the upgrade", workers=len(children))


def _still_running(pids: set[int]) -> set[int]:
    """Those of ``pids``, children of this process, that have not ended; those that have are collected."""
    running = set()
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                running.add(pid)
        except ChildProcessError:  # collected already, by a reaper of this process
            pass
    return running


def _stop_previous(pids: set[int]) -> set[int]:
    """Tell the old program's processes still running to stop (they drain already: a second word does no harm).

    Those still running: a PID collected may belong to a stranger by now.
    """
    running = _still_running(pids)
    _signal_all(running, signal.SIGTERM)
    return running


def _left_running(log: Log, pids: set[int]) -> None:
    """Say that the stop gave up waiting for the old program's processes: the service manager may kill them."""
    if pids:
        log.warning(
            "the old program's processes still run past drain_timeout; exiting", pids=",".join(map(str, sorted(pids)))
        )


def _reap(children: dict[int, _Child], respawn: dict[int, float], log: Log, stopping: bool) -> list[_Child]:
    """Collect every exited child; plan the replacement of workers that died; return the workers reaped."""
    reaped: list[_Child] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # none left
            return reaped
        if pid == 0:
            return reaped
        if pid not in children:  # as PID 1 (a container), an orphan reparented to us: reaping is all it needs
            continue
        child = children.pop(pid)
        reaped.append(child)
        os.close(child.lifeline)
        if not stopping:
            log.error("worker died, starting a new one", worker=child.worker, pid=pid, cause=_wait_status(status))
            soon = time.monotonic() - child.started < RESPAWN_DELAY
            respawn[child.worker] = time.monotonic() + (RESPAWN_DELAY if soon else 0.0)


def _follow_supervisor(
    lifeline: int, log: Log, stopping: gevent.event.Event, worker: int, apply: Callable[[Config, list[str]], None]
) -> None:
    """A worker's greenlet: apply each config the supervisor sends; stop when it is gone (end of file)."""
    gevent.os.make_nonblocking(lifeline)
    _read_lifeline(lifeline, stopping, apply)
    os.close(lifeline)
    if not stopping.is_set():
        log.warning("supervisor gone, stopping", worker=worker)
        stopping.set()


def _read_lifeline(lifeline: int, stopping: gevent.event.Event, apply: Callable[[Config, list[str]], None]) -> None:
    """Apply the configs that come down ``lifeline`` until end of file, or set ``stopping`` at a ``_STOP``."""
    buffer = bytearray()
    while chunk := gevent.os.nb_read(lifeline, _READ_CHUNK):
        buffer += chunk
        for message in kiaframe.take(buffer):
            if not message:  # the supervisor execs a new program, which starts new workers
                stopping.set()
                return
            new, (ignored,) = kiareload.unpack(message)  # from our own supervisor, through a pipe no one else holds
            apply(new, ignored)


_READ_CHUNK = 1 << 20  # a pipe holds 64 KiB by default: a bigger read only returns what is there


def _reap_orphans(signum: int = 0, frame: object = None) -> None:
    """Without workers: collect the exit status of orphans (as PID 1) and of an upgrade's drain, so no zombie stays."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:  # none left
        pass


def _signal_all(children: Iterable[int], signum: int) -> None:
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
