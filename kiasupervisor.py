"""The supervisor of N workers and their lifelines: fork them, replace any that dies, reload for them, pass signals on.

Its own module because it is a process of its own, with no event loop: it
waits in ``poll`` on its signals, its workers' lifelines, a reload's loader
child and the metrics port, where the only process and each worker run a gevent
hub (kiaprocess.py). It is handed what it runs, as ``supervise`` is handed
``work`` (one worker's life: kiaprocess.Process), the reload policy and
``notify`` (sd_notify), and imports nothing of kiaprocess.py, so the arrows go
one way. The worker's side of a lifeline (``follow_supervisor``) and the wait
for an upgrade's previous generation, which the only process needs too, are
here beside the supervisor's side. It uses only what every Unix Python has
(no sigtimedwait, no prctl): OpenBSD is a target.
"""

from __future__ import annotations

import os
import select
import signal
import time
import traceback
from collections.abc import Iterable
from typing import Callable

import gevent
import gevent.event
import gevent.os

import kiaframe
import kiametrics
import kiareload
import kiaupgrade
from kiaconfig import Config
from kialog import Log

SUPERVISED = kiaupgrade.HELD_SIGNALS  # SIGCHLD, SIGHUP, SIGTERM, SIGINT, SIGUSR2
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
    load: Callable[[], Config],
    log: Log,
    policy: kiareload.Policy,
    notify: Callable[[str], None],
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
    signals = _SignalPipe(SUPERVISED)
    children: dict[int, _Child] = {}  # by pid
    previous = upgrade.previous if upgrade is not None else set()  # the old program's workers, draining
    previous_until = 0.0  # when a stop gives up waiting for them
    respawn: dict[int, float] = {}  # worker number -> when to start it again
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED)  # held across an upgrade's exec until now
    _reap(children, respawn, log, False)  # the old program's workers that ended meanwhile

    def start(worker: int) -> None:
        lifeline, held = os.pipe()
        if metrics is not None:
            metrics.prepare(worker)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED)  # the worker installs its own first
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
    notify("READY=1")
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
            reloaded = policy.reload(loading.result, cfg, systemd, begun=True)
            loading = None
            if metrics is not None:
                metrics.reloaded(reloaded is not None)
            if reloaded is not None:
                cfg, ignored = reloaded  # replacement workers start with it too
                body = kiareload.pack(cfg, ignored)
                for child in children.values():
                    child.hand(kiaframe.frame(body))
                policy.reloaded(cfg, ignored, True, workers=len(children))
            if load_again and not stopping:  # a SIGHUP came while it loaded: the file may have changed since
                policy.begin()
                loading = kiareload.Loader(load)
            load_again = False
        for signum in received:
            if signum == signal.SIGCHLD:
                for child in _reap(children, respawn, log, stopping):
                    if metrics is not None:
                        metrics.gone(child.worker, restarting=not stopping)
            elif signum == signal.SIGHUP:  # read off the loop, which answers /healthz meanwhile: kiareload.Loader
                if loading is not None:
                    load_again = True
                elif not stopping:
                    policy.begin()
                    loading = kiareload.Loader(load)
            elif signum == signal.SIGUSR2:
                if upgrade is not None and not stopping and upgrade.ready() and upgrade.starts(cooperative=False):
                    _stop_for_upgrade(children, log)
                    if metrics is not None:
                        metrics.finish()  # the scrapes it has taken; the new program takes those still queued
                    # The new supervisor inherits the listeners and these workers, and waits for them at its stop.
                    upgrade.hand_over([*children, *still_running(previous)])
            elif not stopping:  # SIGTERM or SIGINT: workers stop gracefully, then so do we
                stopping = True
                respawn.clear()
                if loading is not None:  # the reload is moot: its child ends on a broken pipe, SIGCHLD collects it
                    loading.close()
                    loading = None
                for _, sock in listeners:
                    sock.close()
                notify("STOPPING=1")
                if metrics is not None:
                    metrics.drain()  # /healthz answers 503 until the last worker is done
                log.info("stopping workers", workers=len(children))
                _signal_all(children, signal.SIGTERM)
                previous = stop_previous(previous)
                previous_until = time.monotonic() + cfg.settings.drain_timeout + PREVIOUS_MARGIN
        for worker, due in list(respawn.items()):
            if not stopping and due <= time.monotonic():
                del respawn[worker]
                start(worker)
        if previous:  # those that ended are collected (by _reap, or here), and forgotten before their PID is reused
            previous = still_running(previous)
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


def still_running(pids: set[int]) -> set[int]:
    """Those of ``pids``, children of this process, that have not ended; those that have are collected."""
    running = set()
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                running.add(pid)
        except ChildProcessError:  # collected already, by a reaper of this process
            pass
    return running


def stop_previous(pids: set[int]) -> set[int]:
    """Tell the old program's processes still running to stop (they drain already: a second word does no harm).

    Those still running: a PID collected may belong to a stranger by now.
    """
    running = still_running(pids)
    _signal_all(running, signal.SIGTERM)
    return running


def wait_previous(log: Log, pids: set[int], until: float) -> None:
    """On the event loop: wait for the old program's processes to end, until ``until``; say so of any still running."""
    while pids and time.monotonic() < until:
        gevent.sleep(PREVIOUS_POLL)
        pids = still_running(pids)
    _left_running(log, pids)


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


def follow_supervisor(
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


def reap_orphans(signum: int = 0, frame: object = None) -> None:
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
