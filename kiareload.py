"""Reload without a pause, and config watch: load the table off the event loop, hand it over in slices, watch the file.

Its own module because these are a job apart from the rest of the life cycle
(kiaprocess.py sets the process up and serves, kiasupervisor.py runs the
workers); the reload's policy (``Policy``: what a reload may change, what it
tells systemd and the log) sits here beside the code that reads and hands over
the table. Measured with 100,000 routes
on a loaded 2-core machine: validating takes about 4 s of pure Python, and
unpickling a Config whose routes each hold their own Backend takes about 2 s
(a ``__reduce__`` per frozen dataclass); with the backends interned
(kiaconfig does it) the same table unpickles in about 80 ms, still above the
50 ms a connection may wait. So:

- a serving process never validates: a child forked at a low priority reads
  and validates, forked by the lone process itself or, with workers, by the
  supervisor. Not gevent's threadpool: validation is pure Python, and while a
  thread ran it a round trip on the loop went from 0.1 ms to 5.9 ms at p99 and
  23 ms at most (each GIL hand-back waits up to the 5 ms switch interval, and
  a request through the gateway takes several), and the loader was slower too;
- the result travels as slices of at most ``SLICE`` routes, each pickled on
  its own, and the loop runs between two slices; the tables are swapped in at
  once when the last one is in.

The watch uses libev's stat watchers (inotify where there is one, polling
elsewhere) on every link of the symlink chain that leads to the file, so that
an edit in place, a new file renamed over the old one, and a Kubernetes
ConfigMap's ``..data`` swap all count as a change. The supervisor of N workers
has no event loop (it waits in ``select``), so it polls the same chain with
``os.stat`` in its wait's timeout instead.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import stat
import time
import traceback
from typing import Callable

import gevent
import gevent.os

import kiaframe
from kiaconfig import Config, ConfigError, RouteTable, Settings
from kialog import Log

SLICE = 2000  # routes per pickled slice: unpickling one takes 1-5 ms on a loaded core, well inside 50 ms
QUIET = 0.3  # seconds the watched files must stay unchanged before a reload reads them (an editor's writes)
POLL = 0.5  # seconds between stats where libev has no inotify (and in the supervisor): within the 2 s promised
LOADER_NICENESS = 10  # a tenth of a busy core against a worker (not 19: 1.5 %, a big table would take minutes)
LOADER_TIMEOUT = 600  # seconds before the loader ends itself (SIGALRM), failing the reload: 100x+ a big table's
REAP_INTERVAL = 0.05  # seconds between looks at whether the loader child has ended
RECHECK = 1.1  # seconds after arming to compare nanosecond stat times: past the whole second libev compares
MAX_LINKS = 40  # symlinks followed before giving up, as the kernel's ELOOP limit does
_FALLBACK_FDS = 1 << 16  # descriptors closed in the loader child where the limit reads as unlimited
_READ_CHUNK = 1 << 20  # a pipe gives what it holds (64 KiB by default): a bigger read costs nothing


# Used only at start-up.
RESTART_ONLY = (
    "http_listen",
    "https_listen",
    "quic_listen",
    "workers",
    "user",
    "log_format",
    "metrics_listen",
    "watch_config",
)
# Ignored even at start-up while systemd passes the sockets.
LISTEN_KEYS = ("http_listen", "https_listen", "quic_listen")


class Policy:
    """What a reload may change, and who hears of it: the one set of rules for every process that reloads.

    The only process and the supervisor ``reload``; a supervisor's worker only
    says what it applied (``reloaded``). It is handed what it tells the service
    manager with (``notify``, kiaprocess.sd_notify) and what checks the
    descriptor limit against a new max_connections (``check_limits``), as the
    life cycle is handed what it runs: this module imports nothing of it.
    """

    def __init__(self, log: Log, notify: Callable[[str], None], check_limits: Callable[[Settings], None]) -> None:
        self.log = log
        self.notify = notify
        self.check_limits = check_limits

    def begin(self) -> None:
        """A reload begins: the service manager hears so now, with the time, however long the loading takes."""
        self.notify("RELOADING=1")

    def reload(
        self, load: Callable[[], Config], running: Config, systemd: bool = False, begun: bool = False
    ) -> tuple[Config, list[str]] | None:
        """The new config and the changed keys it could not apply, or None (logged) if the running one must stay.

        Run by the process systemd and the operator see: the only one, or the
        supervisor, which hands the result to its workers. What only start-up reads
        keeps its running value in the config returned, so that a change not
        applied is reported again at every reload, never forgotten. With
        ``systemd`` passing the sockets, a restart would not apply the listen
        lists either: the warning says so instead. ``begun``: ``begin`` was
        called when the loading started (the supervisor loads off its loop).
        """
        log = self.log
        if not begun:
            self.begin()
        try:
            new = load()
        except ConfigError as exc:
            for line in exc.errors:
                log.error(f"reload failed, keeping the running config: {line}")
            self.notify("READY=1\nSTATUS=reload failed, running the previous config; see the log")  # done reloading
            return None
        if not len(new.http_routes) and not len(new.https_routes):  # an editor's half-written file, most likely
            log.error(f"reload refused, keeping the running config: {new.source} has no routes at all")
            self.notify("READY=1\nSTATUS=reload refused (no routes), running the previous config; see the log")
            return None
        old = running.settings
        changed = [key for key in RESTART_ONLY if getattr(new.settings, key) != getattr(old, key)]
        ignored = [key for key in changed if not (systemd and key in LISTEN_KEYS)]
        for warning in new.warnings:
            log.warning(warning)
        for key in (key for key in changed if key not in ignored):
            log.warning(
                f"{key} is ignored: systemd passes the listening sockets (the .socket unit's ListenStream= sets them)",
                key=key,
            )
        for key in ignored:
            log.warning(
                f"reload cannot change {key}: restart the gateway to apply it",
                key=key,
                running=_setting_text(getattr(old, key)),
                new=_setting_text(getattr(new.settings, key)),
            )
        if new.settings.max_connections != old.max_connections:
            self.check_limits(new.settings)
        if changed:
            kept = {key: getattr(old, key) for key in changed}
            new = dataclasses.replace(new, settings=dataclasses.replace(new.settings, **kept))
        return new, ignored

    def reloaded(self, cfg: Config, ignored: list[str], main: bool, **fields: object) -> None:
        """Say that a reload is done; ``ignored`` names what it did not change. ``main``: to systemd too."""
        if ignored:
            fields["ignored"] = ignored
        self.log.info("config reloaded", http_routes=len(cfg.http_routes), https_routes=len(cfg.https_routes), **fields)
        if main:
            status = f"config reloaded; a restart would apply {', '.join(ignored)}" if ignored else "config reloaded"
            self.notify(f"READY=1\nSTATUS={status}")

    def file_changed(self, path: str) -> None:
        """watch_config saw the file or a symlink leading to it change: a reload follows, as on SIGHUP."""
        self.log.info("config file changed, reloading", config=path)


def _setting_text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def pack(cfg: Config, *extra: object) -> bytes:
    """``cfg`` (and ``extra``) as one message whose route tables ``unpack`` can take in slice by slice."""
    head = dataclasses.replace(cfg, http_routes=RouteTable(), https_routes=RouteTable())
    slices = []
    for name in ("http_routes", "https_routes"):
        table: RouteTable = getattr(cfg, name)
        for kind in ("exact", "wildcard"):
            items = list(getattr(table, kind).items())
            for start in range(0, len(items), SLICE):
                slices.append((name, kind, pickle.dumps(dict(items[start : start + SLICE]), pickle.HIGHEST_PROTOCOL)))
    defaults = (cfg.http_routes.default, cfg.https_routes.default)
    return pickle.dumps((head, defaults, slices, extra), pickle.HIGHEST_PROTOCOL)


def unpack(message: bytes | memoryview, cooperative: bool = True) -> tuple[Config, tuple]:
    """The Config and extras of a ``pack`` message; lets the event loop run between two slices if ``cooperative``.

    Measured: yielding only one turn of the loop (``sleep(0)``) between slices
    still delayed requests by ~100 ms with 100,000 routes, as a request takes
    several turns (accept, read, connect, relay) and got one per slice. So the
    loop gets as much time as the unpickling: the handover takes twice as long
    (a few hundred ms), and connections see the loop at least half the time.
    Only for messages from our own processes (a pipe no one else holds): it unpickles.
    """
    head, defaults, slices, extra = pickle.loads(message)
    tables: dict[str, dict[str, dict]] = {
        name: {"exact": {}, "wildcard": {}} for name in ("http_routes", "https_routes")
    }
    took = 0.0
    for name, kind, body in slices:
        if cooperative:  # the loop gets as long as the last slice took: a connection needs several turns of it
            gevent.sleep(took)
        start = time.monotonic()
        tables[name][kind].update(pickle.loads(body))
        took = time.monotonic() - start
    http, https = (RouteTable(tables[n]["exact"], tables[n]["wildcard"], d) for n, d in zip(tables, defaults))
    return dataclasses.replace(head, http_routes=http, https_routes=https), extra


def load_in_child(load: Callable[[], Config], cooperative: bool = True) -> Config:
    """``load()`` run in a forked child, so the loop of this process keeps serving while it validates.

    Raises ConfigError as ``load`` does. A fork, not a thread: validation is
    pure Python and would contend for the GIL with the loop (see the module's
    docstring); not a fresh interpreter: the child needs the ``load`` this
    process was handed.
    The child runs at a lower priority, so that on a busy machine the kernel
    gives a core to the processes serving connections first. ``cooperative``
    (a process with a gevent loop) waits for the answer on the loop; otherwise
    it blocks (the supervisor's upgrade; its reloads use ``Loader``).
    """
    pid, read_end = _start_loader(load)
    try:
        if cooperative:
            gevent.os.make_nonblocking(read_end)
        read = gevent.os.nb_read if cooperative else os.read
        data = bytearray()
        while chunk := read(read_end, _READ_CHUNK):
            data += chunk
    finally:
        os.close(read_end)
        if cooperative:
            gevent.spawn(_reap, pid)
        # else the supervisor, whose SIGCHLD handling collects every child that ends
    return _answer(data, cooperative)


class Loader:
    """``load()`` in a loader child, read without blocking: for the supervisor's poll loop, which has no event loop.

    The supervisor answers /healthz in that loop: waiting there for a big
    table's validation (2 s with 100,000 routes) would hold every probe. It
    polls ``fd``, calls ``read`` when it is readable and ``result`` once that
    says the answer is whole; its SIGCHLD handling collects the child.
    """

    def __init__(self, load: Callable[[], Config]) -> None:
        self.pid, self.fd = _start_loader(load)
        os.set_blocking(self.fd, False)
        self.data = bytearray()

    def read(self) -> bool:
        """Take what the pipe holds; True once the loader has ended (end of file): ``result`` may be asked."""
        while True:
            try:
                chunk = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                return False
            if not chunk:
                self.close()
                return True
            self.data += chunk

    def result(self) -> Config:
        """The config read, or ConfigError as ``load`` raised it (or for an answer cut short)."""
        return _answer(self.data, cooperative=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _start_loader(load: Callable[[], Config]) -> tuple[int, int]:
    """Fork the loader child (see load_in_child); return its PID and the read end of the pipe its answer comes by."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no event loop, no log; its answer goes down the pipe, then it ends
        code = 1
        try:
            # Only the pipe and stdio stay: a copy of a listener or a connection here would keep it
            # open after the parent closes it (no refusal at stop, no FIN or reset at a close).
            os.closerange(3, write_end)
            limit = os.sysconf("SC_OPEN_MAX")
            os.closerange(write_end + 1, limit if limit > write_end else _FALLBACK_FDS)
            signal.set_wakeup_fd(-1)  # the supervisor's: a signal here must not wake it
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
                signal.signal(signum, signal.SIG_DFL)  # a Ctrl-C to the group ends the loader too
            signal.pthread_sigmask(signal.SIG_SETMASK, ())  # libev may block those it reads from a signalfd
            signal.alarm(LOADER_TIMEOUT)  # forked from a process with threads, it could hang on a lock they held
            os.nice(LOADER_NICENESS)
            try:
                message = b"C" + pack(load())
            except ConfigError as exc:
                message = b"E" + pickle.dumps(exc.errors, pickle.HIGHEST_PROTOCOL)
            except BaseException as exc:
                traceback.print_exc()
                message = b"E" + pickle.dumps([f"reading the config failed: {exc!r}"], pickle.HIGHEST_PROTOCOL)
            view = memoryview(kiaframe.frame(message))  # framed: a cut answer is told from a whole one
            while view:
                view = view[os.write(write_end, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def _answer(data: bytearray, cooperative: bool) -> Config:
    """The Config of a loader's whole answer; ConfigError for its errors or an answer cut short."""
    messages = kiaframe.take(data)
    if len(messages) != 1 or data:
        raise ConfigError(["reading the config failed: the loader process ended before its whole answer"])
    body = memoryview(messages[0])
    if body[:1] == b"E":
        raise ConfigError(pickle.loads(body[1:]))
    return unpack(body[1:], cooperative)[0]


def _reap(pid: int) -> None:
    """Collect the loader child without waiting on it: a blocking waitpid here stalled the loop ~0.1 s (measured)."""
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # as PID 1, the orphan reaper may have collected it first
            return
        gevent.sleep(REAP_INTERVAL)


def chain(path: str) -> list[str]:
    """Every path to watch for ``path``: each symlink met while resolving it, step by step, then the file.

    A ConfigMap mounts ``servers.toml -> ..data/servers.toml`` and
    ``..data -> ..2026_11_29_...``, and swaps ``..data``: the symlinks change,
    the file's own path does not.
    """
    paths: list[str] = []
    todo = os.path.abspath(path)
    for _ in range(MAX_LINKS):
        link = _first_link(todo)
        if link is None:
            break
        current, rest = link
        try:
            target = os.readlink(current)
        except OSError:  # replaced meanwhile: the watch sees the change and looks again
            break
        paths.append(current)
        todo = os.path.normpath(os.path.join(os.path.dirname(current), target, *rest))
    paths.append(todo)
    return list(dict.fromkeys(paths))


def _first_link(path: str) -> tuple[str, list[str]] | None:
    """The first symlink on an absolute ``path`` and the components after it; None if none (or one is missing)."""
    parts = path.strip("/").split("/")
    current = "/"
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return current, parts[i + 1 :]
        except OSError:  # missing now: the path is watched as it is, its creation is a change
            return None
    return None


def signature(paths: list[str]) -> tuple:
    """What identifies the current state of each path (lstat: a symlink is judged by itself); None if missing."""
    marks = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            marks.append(None)
            continue
        marks.append((st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(marks)


class Watch:
    """libev stat watchers on the chain of ``path``; calls ``changed`` once it has been quiet for ``QUIET`` s."""

    def __init__(self, path: str, changed: Callable[[], None]) -> None:
        self.path = path
        self.changed = changed
        self.loop = gevent.get_hub().loop
        self.watchers: list = []
        self.paths: list[str] = []
        self.mark: tuple = ()
        self.settling: gevent.Greenlet | None = None
        self.last_event = 0.0
        self.recheck = None
        self.arm()

    def arm(self) -> None:
        """Watch the chain as it is now: after a change it may lead elsewhere (a new ``..data``)."""
        self.close()
        self.paths = chain(self.path)
        self.mark = signature(self.paths)
        for path in self.paths:
            watcher = self.loop.stat(path, POLL, ref=False)  # it never keeps the loop alive by itself
            watcher.start(self._event)
            self.watchers.append(watcher)
        self.recheck = self.loop.timer(RECHECK, 0.0, ref=False)
        self.recheck.start(self._recheck)

    def _recheck(self) -> None:
        """Look once more, as libev's manual advises: an edit that fired no watcher shows here.

        libev compares stat times in whole seconds: an edit that keeps the size,
        within the second of the state a watcher first saw, fires nothing.
        """
        if signature(self.paths) != self.mark:
            self._event()

    def _event(self) -> None:
        self.last_event = time.monotonic()
        if self.settling is None:
            self.settling = gevent.spawn(self._settle)

    def _settle(self) -> None:
        """Wait until neither an event came nor the chain changed for QUIET seconds, then re-arm and tell.

        The signature check covers libev without inotify, whose events come
        only every POLL seconds however fast a file is being written.
        """
        try:
            seen = signature(chain(self.path))
            while True:
                gevent.sleep(QUIET)
                now = signature(chain(self.path))
                if now == seen and time.monotonic() - self.last_event >= QUIET:
                    break
                seen = now
        finally:
            self.settling = None
        old = self.mark
        self.arm()
        if self.mark != old:
            self.changed()

    def close(self) -> None:
        for watcher in [*self.watchers, *([self.recheck] if self.recheck else [])]:
            watcher.stop()
            watcher.close()
        self.watchers, self.recheck = [], None


class Poll:
    """The same watch for a process with no event loop: ``due`` says when to look, ``check`` looks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.mark = signature(chain(path))
        self.seen = self.mark  # the state last looked at...
        self.since = 0.0  # ...and since when it has been so
        self.next = time.monotonic() + POLL

    def due(self) -> float:
        return self.next

    def check(self) -> bool:
        """True once the chain differs from what was last reported and has stayed so for QUIET seconds."""
        now = time.monotonic()
        current = signature(chain(self.path))
        if current != self.seen:
            self.seen, self.since = current, now
        quiet = now - self.since >= QUIET
        self.next = now + (POLL if quiet or current == self.mark else QUIET)
        if quiet and current != self.mark:
            self.mark = current
            return True
        return False
