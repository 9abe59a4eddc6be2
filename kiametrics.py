"""Metrics and health: counted in plain Python in each process, summed and rendered only when scraped.

Why the counting is not prometheus_client's: measured on this machine, the
eight updates one short connection makes cost about 22 µs with its
Counter/Gauge/Histogram in one process and 37 µs in its multiprocess mode (a
lock and a write to an mmap'ed file per update), against about 1.3 µs as the
dict and list increments of ``Stats``. A short HTTP connection costs the
gateway about 90 µs of CPU, and metrics may take under 3 % of it
(bench/metrics_cost.py measures the whole gateway both ways). prometheus_client
still writes the text (its escaping, number format, TYPE and HELP lines), on a
scrape only: hence the ``metrics`` extra.

Who answers. One process: a small gevent server beside the gateway
(``Exporter``). With workers, the supervisor (``Scrapes``, driven by its select
loop, non-blocking I/O only): a scrape asks every worker for a snapshot over a
socketpair made before the fork (``Reporter`` answers in the worker), waits at
most SNAPSHOT_WAIT and sums. A worker that does not answer in time counts with
its last snapshot, and the counts of a worker that died stay in the sum, so no
counter goes down while the supervisor lives (an upgrade in place starts them
again from zero).

It reads no connection's bytes and imports nothing from kiagateway.py.
"""

from __future__ import annotations

import bisect
import pickle
import selectors
import socket
import struct
import time
import traceback
import types
from typing import Callable

import gevent
import gevent.server
import gevent.socket

import kiaerrors
import kiaframe
from kialog import Log

LISTENERS = ("http", "https")
RELOAD_RESULTS = ("ok", "error")
# Seconds. From a backend on the same host or LAN (half a millisecond) to past the
# default preamble_timeout (5 s) and connect_timeout (3 s): a healthy stage and one
# that times out both show.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SUM = len(BUCKETS) + 1  # a histogram is a list: a count per bucket (the last one +Inf), then the sum

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format DESIGN.md promises
MAX_HEAD = 8192  # bytes of request head a scraper may send; Prometheus and probes send a few hundred
HEAD_TIMEOUT = 2.0  # seconds from accept to a whole request head: one packet from Prometheus or a probe
REQUEST_TIMEOUT = 5.0  # seconds a scraper gets from its whole request to its answer taken
SNAPSHOT_WAIT = 1.0  # seconds a scrape waits for the workers; Prometheus' default scrape timeout is 10 s
# Connections still without a whole request: Prometheus, a probe or two, and room for retries. The port is
# always accepting: one more evicts the oldest of them (one that sent part of a request first), so that clients
# that connect and send little can never hold /healthz off (DESIGN.md: answered within 1 s whatever they do).
MAX_WAITING = 16
FINISH_WAIT = 0.5  # seconds the supervisor gives the scrapers it has taken before it execs an upgrade
ACCEPT_BATCH = 8  # scrapers the supervisor accepts per turn of its loop: then it reads those it has (a probe's)
RENDER_EVERY = 1.0  # seconds a rendered /metrics text is served again: a scrape flood costs one render a second

_ROUND = struct.Struct("!Q")  # a snapshot request, framed as the answer is: the scrape round it answers


class Stats:
    """One process's counts, updated on the data path with dict and list increments only."""

    __slots__ = ("bytes", "connect", "connections", "open", "preamble")

    def __init__(self) -> None:
        # Keyed by listener first, with no tuple to build per update.
        self.connections: dict[str, dict[str, int]] = {listener: {} for listener in LISTENERS}  # outcome -> finished
        self.open = dict.fromkeys(LISTENERS, 0)
        self.bytes = {listener: [0, 0] for listener in LISTENERS}  # up, down
        self.preamble = {listener: [0] * (_SUM + 1) for listener in LISTENERS}  # accept to preamble read
        self.connect = {listener: [0] * (_SUM + 1) for listener in LISTENERS}  # route found to backend connected

    def opened(self, listener: str) -> None:
        self.open[listener] += 1

    def preamble_read(self, listener: str, accepted: float) -> float:
        """Observe the time from accept until now, when the preamble is read; return now."""
        now = time.monotonic()
        histogram = self.preamble[listener]
        histogram[bisect.bisect_left(BUCKETS, now - accepted)] += 1  # le: a value on a bound goes in its bucket
        histogram[_SUM] += now - accepted
        return now

    def connected(self, listener: str, begun: float) -> None:
        """Observe the time since ``begun`` (the preamble read): route lookup and backend connect."""
        seconds = time.monotonic() - begun
        histogram = self.connect[listener]
        histogram[bisect.bisect_left(BUCKETS, seconds)] += 1
        histogram[_SUM] += seconds

    def finished(self, listener: str, outcome: str, up: int, down: int) -> None:
        self.open[listener] -= 1
        connections = self.connections[listener]
        connections[outcome] = connections.get(outcome, 0) + 1
        counted = self.bytes[listener]
        counted[0] += up
        counted[1] += down

    def add(self, other: Stats, gauges: bool = True) -> None:
        """Add ``other``'s counts to these; ``gauges`` False leaves out the open connections (a worker gone)."""
        for listener, outcomes in other.connections.items():
            mine = self.connections[listener]
            for outcome, count in outcomes.items():
                mine[outcome] = mine.get(outcome, 0) + count
        if gauges:
            for listener, count in other.open.items():
                self.open[listener] += count
        for listener, (up, down) in other.bytes.items():
            self.bytes[listener] = [self.bytes[listener][0] + up, self.bytes[listener][1] + down]
        for mine, theirs in ((self.preamble, other.preamble), (self.connect, other.connect)):
            for listener, histogram in theirs.items():
                mine[listener] = [a + b for a, b in zip(mine[listener], histogram)]


def render(stats: Stats, reloads: dict[str, int], restarts: int, version: str) -> bytes:
    """The text exposition format 0.0.4 of DESIGN.md's names, written by prometheus_client."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    connections = CounterMetricFamily(
        "kiagateway_connections", "Connections finished, by their log line's outcome.", labels=("listener", "outcome")
    )
    for listener in LISTENERS:
        for outcome, count in sorted(stats.connections[listener].items()):
            connections.add_metric((listener, outcome), count)
    open_ = GaugeMetricFamily("kiagateway_connections_open", "Connections open now.", labels=("listener",))
    for listener in LISTENERS:
        open_.add_metric((listener,), stats.open[listener])
    bytes_ = CounterMetricFamily(
        "kiagateway_bytes", "Bytes relayed: up from clients, down from backends.", labels=("listener", "direction")
    )
    for listener in LISTENERS:
        for direction, count in zip(("up", "down"), stats.bytes[listener]):
            bytes_.add_metric((listener, direction), count)
    families = [connections, open_, bytes_]
    for name, text, histograms in (
        ("kiagateway_preamble_seconds", "Accept to preamble read (connections that sent one).", stats.preamble),
        ("kiagateway_connect_seconds", "Preamble read to backend connected (connections that got one).", stats.connect),
    ):
        family = HistogramMetricFamily(name, text, labels=("listener",))
        for listener in LISTENERS:
            histogram = histograms[listener]
            cumulative = 0
            buckets = []
            for bound, count in zip((*BUCKETS, float("inf")), histogram):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric((listener,), buckets, histogram[_SUM])
        families.append(family)
    reloaded = CounterMetricFamily("kiagateway_reloads", "Config reloads, by result.", labels=("result",))
    for result in RELOAD_RESULTS:
        reloaded.add_metric((result,), reloads[result])
    families.append(reloaded)
    families.append(CounterMetricFamily("kiagateway_worker_restarts", "Workers died and started again.", restarts))
    build = GaugeMetricFamily("kiagateway_build_info", "The running version; always 1.", labels=("version",))
    build.add_metric((version,), 1)
    families.append(build)
    return generate_latest(types.SimpleNamespace(collect=lambda: families))  # what it asks of a registry


# ---------------------------------------------------------------------------
# HTTP: one request per connection, answered and closed.


def classify(head: bytes) -> str:
    """What a whole request head asks for: "metrics", "healthz", "other" (404) or "bad" (400)."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) != 3 or not line[2].startswith(b"HTTP/1."):
        return "bad"
    method, path = line[0], line[1].split(b"?", 1)[0]
    if method == b"GET" and path in (b"/metrics", b"/healthz"):
        return path[1:].decode()
    return "other"


def respond(kind: str, healthy: bool, text: bytes = b"", request: bytes | bytearray = b"") -> bytes:
    """The whole answer for a request of ``kind``, built by kiaerrors; ``text`` is the rendered metrics.

    ``request`` is the request head: a HEAD request gets no body.
    """
    if kind == "metrics" and text:
        return kiaerrors.metrics_response(200, text, CONTENT_TYPE)
    status = {"metrics": 500, "healthz": 200 if healthy else 503, "bad": 400}.get(kind, 404)
    return kiaerrors.metrics_response(status, head=request.startswith(b"HEAD "))


# ---------------------------------------------------------------------------
# One process: the gateway's own hub serves the scrapes.


class Exporter:
    """/metrics and /healthz served by the only process, on the gevent hub beside the gateway.

    It accepts whatever comes (gevent spawns a greenlet per connection) and
    bounds what waits instead: past MAX_WAITING connections without a whole
    request, the oldest is closed (see _Waiting).
    """

    def __init__(self, sock: socket.socket, version: str, log: Log) -> None:
        import prometheus_client.exposition  # noqa: F401 - now, so that a broken install shows at start-up

        self.stats = Stats()
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        self.version = version
        self.log = log
        self.healthy = True
        self._waiting = _Waiting()
        self._rendered = _Rendered()
        self._server = gevent.server.StreamServer(sock, self._handle)

    def start(self) -> None:
        self._server.start()

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "error"] += 1

    def drain(self) -> None:
        """/healthz answers 503 from now on: the gateway drains until it exits."""
        self.healthy = False

    def close(self) -> None:
        self._server.close()

    def _handle(self, client: gevent.socket.socket, address: tuple) -> None:
        for evicted in self._waiting.add(client):
            evicted.close()  # its greenlet, waiting in recv, ends with an OSError
        try:
            head = bytearray()
            with gevent.Timeout(HEAD_TIMEOUT, False):
                while b"\r\n\r\n" not in head and len(head) <= MAX_HEAD:
                    data = client.recv(MAX_HEAD)
                    if not data:
                        return
                    head += data
                    self._waiting.heard(client)
            if not self._waiting.remove(client) or (b"\r\n\r\n" not in head and len(head) <= MAX_HEAD):
                return  # evicted, or too slow: closed with no answer
            kind = classify(bytes(head)) if len(head) <= MAX_HEAD else "bad"
            text = self._rendered.get(self._render) if kind == "metrics" else b""
            with gevent.Timeout(REQUEST_TIMEOUT, False):
                client.sendall(respond(kind, self.healthy, text, head))
        except OSError:  # the scraper left, or was evicted: nothing to answer
            pass
        finally:
            self._waiting.remove(client)
            client.close()

    def _render(self) -> bytes:
        return _render_logged(self.log, self.stats, self.reloads, 0, self.version)


class _Waiting:
    """The connections still without a whole request, oldest first, and who to evict when there are too many.

    The one to go is the oldest that has sent part of a request (a client that
    trickles or stalls), else the oldest: a probe that has just connected and
    sends its request in one packet is the youngest, and is answered.
    """

    def __init__(self) -> None:
        self._partial: dict[object, bool] = {}  # connection -> sent some of its request; in accept order

    def add(self, conn: object) -> list:
        """Count ``conn`` in; return those to close for it (the oldest past MAX_WAITING), already counted out."""
        self._partial[conn] = False
        evicted = []
        while len(self._partial) > MAX_WAITING:
            victim = next((c for c, partial in self._partial.items() if partial), next(iter(self._partial)))
            del self._partial[victim]
            evicted.append(victim)
        return evicted

    def heard(self, conn: object) -> None:
        if conn in self._partial:
            self._partial[conn] = True

    def remove(self, conn: object) -> bool:
        """Count ``conn`` out: its request is whole, or it is closed. False if it was not counted (evicted)."""
        return self._partial.pop(conn, None) is not None

    def __len__(self) -> int:
        return len(self._partial)


class _Rendered:
    """The /metrics text rendered last and when: served again for RENDER_EVERY seconds, so a flood renders little."""

    def __init__(self) -> None:
        self.text = b""
        self.at = 0.0

    def fresh(self) -> bytes:
        """The text rendered less than RENDER_EVERY seconds ago, or b\"\" if there is none."""
        return self.text if self.text and time.monotonic() - self.at < RENDER_EVERY else b""

    def keep(self, text: bytes) -> bytes:
        if text:  # a failed render (b"") is tried again at the next scrape
            self.text, self.at = text, time.monotonic()
        return text

    def get(self, render: Callable[[], bytes]) -> bytes:
        return self.fresh() or self.keep(render())


def _render_logged(log: Log, stats: Stats, reloads: dict[str, int], restarts: int, version: str) -> bytes:
    """``render``, or b"" (a 500) with the traceback logged: a failed scrape must not end the process serving."""
    try:
        return render(stats, reloads, restarts, version)
    except Exception:
        log.error("rendering the metrics failed", cause=traceback.format_exc())
        return b""


# ---------------------------------------------------------------------------
# Workers: each counts for itself; the supervisor asks and sums.


class Reporter:
    """A worker's side: its counts, sent to the supervisor whenever it asks over the socketpair."""

    def __init__(self, channel: socket.socket) -> None:
        self.stats = Stats()
        self.channel = channel

    def start(self) -> None:
        gevent.spawn(self._answer)

    def reloaded(self, ok: bool) -> None:
        """The supervisor counts reloads: it is the one that reloads."""

    def drain(self) -> None:
        """The supervisor answers /healthz."""

    def close(self) -> None:
        """The socketpair ends with the worker."""

    def _answer(self) -> None:
        channel = gevent.socket.socket(fileno=self.channel.detach())
        try:
            buffer = bytearray()
            while chunk := channel.recv(1024):  # end of file: the supervisor is gone; the lifeline stops the worker
                buffer += chunk
                for request in kiaframe.take(buffer):
                    body = pickle.dumps((_ROUND.unpack(request)[0], self.stats), pickle.HIGHEST_PROTOCOL)
                    channel.sendall(kiaframe.frame(body))
        except OSError:  # the supervisor is gone
            pass
        finally:
            channel.close()


class _Channel:
    """The supervisor's end of one worker's socketpair, and what it last heard from it."""

    __slots__ = ("asked", "buffer", "ended", "last", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.last: Stats | None = None
        self.asked = False  # a request is out: never a second, so a stuck worker's socket never fills
        self.ended = False  # end of file: the worker is gone, its SIGCHLD comes


class _Scraper:
    """One HTTP client of the supervisor."""

    __slots__ = ("deadline", "head", "out", "round", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()
        self.out = b""  # the answer still to send
        self.round: int | None = None  # waiting for metrics: the round that answers it, 0 for the next one
        self.deadline = time.monotonic() + HEAD_TIMEOUT  # then REQUEST_TIMEOUT from the whole request


class Scrapes:
    """The supervisor's /metrics and /healthz, driven by its select loop: it never blocks.

    The supervisor calls ``prepare`` before each fork, ``started`` or ``failed``
    after it, ``gone`` when it reaps a worker, and ``wanted``/``handle`` around
    each select; the new worker calls ``in_worker``.
    """

    def __init__(self, sock: socket.socket, version: str, log: Log) -> None:
        import prometheus_client.exposition  # noqa: F401 - before the fork: loaded once, and a broken install shows

        self.listener = sock
        self.version = version
        self.log = log
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        self.restarts = 0
        self.healthy = True
        self.retired = Stats()  # what workers that are gone had counted when last heard
        self.channels: dict[int, _Channel] = {}  # by worker number
        self._theirs: dict[int, socket.socket] = {}  # the worker's ends, between prepare and the fork
        self.scrapers: dict[int, _Scraper] = {}  # by file descriptor
        self._waiting = _Waiting()  # the scrapers still without a whole request
        self._rendered = _Rendered()
        self.finishing = False  # the supervisor execs once the scrapers taken are answered: ask no worker
        self.round = 0
        self.round_deadline: float | None = None  # a round is waiting for snapshots until then

    # The life cycle's hooks.

    def prepare(self, worker: int) -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.channels[worker] = _Channel(ours)
        self._theirs[worker] = theirs

    def started(self, worker: int) -> None:
        self._theirs.pop(worker).close()

    def failed(self, worker: int) -> None:
        self._theirs.pop(worker).close()
        self.channels.pop(worker).sock.close()

    def in_worker(self, worker: int) -> Reporter:
        """In the new worker: close what only the supervisor may hold; the worker's end goes to its Reporter."""
        theirs = self._theirs.pop(worker)
        for sock in [self.listener, *(c.sock for c in self.channels.values()), *self._theirs.values()]:
            sock.close()
        for scraper in self.scrapers.values():
            scraper.sock.close()
        return Reporter(theirs)

    def gone(self, worker: int, restarting: bool) -> None:
        """A worker was reaped: its counts as last heard stay in the sum; its open connections are gone."""
        channel = self.channels.pop(worker, None)
        if channel is not None:
            if channel.last is not None:
                self.retired.add(channel.last, gauges=False)
            channel.sock.close()
        if restarting:
            self.restarts += 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "error"] += 1

    def drain(self) -> None:
        self.healthy = False

    def finish(self, within: float = FINISH_WAIT) -> None:
        """Before the supervisor execs: answer the scrapers already accepted, within ``within`` seconds.

        Those still in the listener's queue are the new program's; those taken
        would otherwise be closed unanswered by the exec. No worker is asked:
        /metrics gets what they said last.
        """
        self.finishing = True
        deadline = time.monotonic() + within
        with selectors.DefaultSelector() as selector:  # any descriptor number, unlike select()
            while self.scrapers and time.monotonic() < deadline:
                if self.round_deadline is not None:
                    self._finish_round()
                for key in list(selector.get_map().values()):
                    selector.unregister(key.fileobj)
                for fd, scraper in self.scrapers.items():
                    if scraper.out:
                        selector.register(fd, selectors.EVENT_WRITE)
                    elif scraper.round is None:
                        selector.register(fd, selectors.EVENT_READ)
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    scraper = self.scrapers.get(key.fd)
                    if scraper is not None and scraper.out:
                        self._send(scraper)
                    elif scraper is not None:
                        self._read_request(scraper)

    def close(self) -> None:
        for sock in [self.listener, *(c.sock for c in self.channels.values())]:
            sock.close()
        for scraper in self.scrapers.values():
            scraper.sock.close()

    # The select loop's side.

    def wanted(self) -> tuple[list[int], list[int]]:
        """The descriptors to wait on: (readable, writable)."""
        readers = [channel.sock.fileno() for channel in self.channels.values() if not channel.ended]
        readers += [fd for fd, scraper in self.scrapers.items() if scraper.round is None and not scraper.out]
        readers.append(self.listener.fileno())  # always: too many waiting scrapers evict the oldest (_Waiting)
        return readers, [fd for fd, scraper in self.scrapers.items() if scraper.out]

    def timeout(self, timeout: float | None) -> float | None:
        """``timeout`` or less: the select must end in time for the next deadline here."""
        deadlines = [scraper.deadline for scraper in self.scrapers.values()]
        if self.round_deadline is not None:
            deadlines.append(self.round_deadline)
        if not deadlines:
            return timeout
        mine = max(0.0, min(deadlines) - time.monotonic())
        return mine if timeout is None else min(timeout, mine)

    def handle(self, readable: list[int], writable: list[int]) -> None:
        """Do what the select found ready, then what is due."""
        channels = {channel.sock.fileno(): channel for channel in self.channels.values()}
        for fd in readable:
            if fd in channels:
                self._read_snapshot(channels[fd])
            elif fd in self.scrapers:
                self._read_request(self.scrapers[fd])
            elif fd == self.listener.fileno():
                self._accept()
        for fd in writable:
            if fd in self.scrapers:
                self._send(self.scrapers[fd])
        now = time.monotonic()
        if self.round_deadline is not None and now >= self.round_deadline:
            self._finish_round()
        for scraper in [s for s in self.scrapers.values() if s.deadline <= now]:
            self._drop(scraper)

    def _accept(self) -> None:
        """Take up to ACCEPT_BATCH new scrapers; read each at once: a request whole already is answered now."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors: the next select tries again
                self.log.error("metrics: accept failed", cause=str(exc))
                return
            sock.setblocking(False)
            scraper = _Scraper(sock)
            self.scrapers[sock.fileno()] = scraper
            for evicted in self._waiting.add(scraper):
                self._drop(evicted)
            self._read_request(scraper)

    def _read_request(self, scraper: _Scraper) -> None:
        try:
            data = scraper.sock.recv(MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(scraper)
            return
        scraper.head += data
        self._waiting.heard(scraper)
        if len(scraper.head) <= MAX_HEAD and b"\r\n\r\n" not in scraper.head:
            return
        self._waiting.remove(scraper)
        scraper.deadline = time.monotonic() + REQUEST_TIMEOUT
        if len(scraper.head) > MAX_HEAD:
            self._answer(scraper, respond("bad", self.healthy, request=scraper.head))
        else:
            kind = classify(bytes(scraper.head))
            text = self._rendered.fresh() if kind == "metrics" else b""
            if kind != "metrics" or text:
                self._answer(scraper, respond(kind, self.healthy, text, scraper.head))
            else:
                scraper.round = 0
                if self.round_deadline is None:
                    self._start_round()

    def _start_round(self) -> None:
        """Ask every worker not already asked for a snapshot; answer at once if none can be asked."""
        self.round += 1
        self.round_deadline = time.monotonic() + SNAPSHOT_WAIT
        for scraper in self.scrapers.values():
            if scraper.round == 0:
                scraper.round = self.round
        request = kiaframe.frame(_ROUND.pack(self.round))
        for channel in self.channels.values() if not self.finishing else ():
            if not channel.asked:
                try:
                    channel.asked = channel.sock.send(request) == len(request)  # an empty socket takes these 16 bytes
                except OSError:  # the worker is gone: its SIGCHLD comes
                    pass
        if not any(channel.asked for channel in self.channels.values()):
            self._finish_round()

    def _read_snapshot(self, channel: _Channel) -> None:
        try:
            data = channel.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone: stop reading; gone() takes its last snapshot when it is reaped
            channel.asked = False
            channel.ended = True
            self._finish_if_answered()
            return
        channel.buffer += data
        for body in kiaframe.take(channel.buffer):
            _, channel.last = pickle.loads(body)  # from our own worker, through a socketpair no one else holds
            channel.asked = False
        self._finish_if_answered()

    def _finish_if_answered(self) -> None:
        if self.round_deadline is not None and not any(channel.asked for channel in self.channels.values()):
            self._finish_round()

    def _finish_round(self) -> None:
        """Sum what the workers said (the latest of each), answer this round's scrapers; start the next if due."""
        self.round_deadline = None
        total = Stats()
        total.add(self.retired)
        for channel in self.channels.values():
            if channel.last is not None:
                total.add(channel.last)
        text = self._rendered.keep(_render_logged(self.log, total, self.reloads, self.restarts, self.version))
        for scraper in list(self.scrapers.values()):
            if scraper.round == self.round:
                scraper.round = None
                self._answer(scraper, respond("metrics", self.healthy, text))
        if any(scraper.round == 0 for scraper in self.scrapers.values()):
            self._start_round()

    def _answer(self, scraper: _Scraper, reply: bytes) -> None:
        scraper.out = reply
        self._send(scraper)

    def _send(self, scraper: _Scraper) -> None:
        try:
            scraper.out = scraper.out[scraper.sock.send(scraper.out) :]
        except BlockingIOError:
            return
        except OSError:  # the scraper left
            scraper.out = b""
        if not scraper.out:
            self._drop(scraper)

    def _drop(self, scraper: _Scraper) -> None:
        self._waiting.remove(scraper)
        self.scrapers.pop(scraper.sock.fileno(), None)
        scraper.sock.close()
