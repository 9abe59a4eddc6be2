"""Connecting to a route's backend: pools in turn, cooldown of failed addresses, names resolved at connect time.

Its own module because it is the one part of the data path that keeps state
across connections (where each pool's turn is, which addresses failed
lately, which lookups are in flight), and the one that decides whose fault a
failed connect is: the backend's (``BackendUnreachable``, ``BackendTimeout``,
and a pool address cools down) or the gateway's own shortage of descriptors,
buffers or memory (``LocalShortage``: no cooldown, no next address). It never
logs: the caller's log line names the addresses tried.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import time

import gevent
import gevent.event
import gevent.socket

from kiaconfig import Address, Backend
from kiaerrors import BackendTimeout, BackendUnreachable, LocalShortage
from kiasocket import WRITE, TimedOut, wait

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # non-blocking from birth: one syscall fewer where supported
# The gateway's own shortage, not the backend's: no descriptor (per process, system-wide), no buffer, no memory.
_SHORTAGE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class Backends:
    """The backends of one process's route table: connect to a route's address, or to its pool's."""

    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown  # backend_cooldown: seconds a pool address that failed is tried last
        self._pools: dict[int, _Pool] = {}  # round-robin state of the pools used, by id() of their Backend
        self._cooling: dict[Address, float] = {}  # pool addresses that failed -> monotonic time they are tried again
        self._lookups: dict[tuple[str, int], gevent.event.AsyncResult] = {}  # backend names being resolved

    def reload(self, cooldown: float) -> None:
        """A new table: its pools are new objects, so round-robin starts over; cooldowns still running stay."""
        self.cooldown = cooldown
        self._pools = {}
        now = time.monotonic()
        self._cooling = {address: until for address, until in self._cooling.items() if until > now}

    def connect(self, backend: Backend, domain: str | None, timeout: float, tried: list[Address]) -> socket.socket:
        """Connect to the route's address, or to its pool's; each address tried is appended to ``tried``."""
        addresses = backend.addresses
        if len(addresses) == 1:
            tried.append(addresses[0])
            return self._connect_to(addresses[0], domain, timeout)
        return self._connect_pool(backend, domain, timeout, tried)

    def _connect_pool(
        self, backend: Backend, domain: str | None, timeout: float, tried: list[Address]
    ) -> socket.socket:
        """Try a pool's addresses, each once with its own ``timeout``, until one connects.

        The order starts one further round the pool at each connection
        (round-robin, per route entry and worker); addresses that failed within
        ``backend_cooldown`` go last, so they are tried only when every other has
        failed too. All failed: the last attempt's error is the answer. The
        gateway's own shortage ends the attempts at once: the next address would
        fail the same way, and neither is at fault.
        """
        order = self.order(backend, backend.addresses)
        for address in order:
            tried.append(address)
            try:
                sock = self._connect_to(address, domain, timeout)
            except (BackendUnreachable, BackendTimeout) as exc:
                self.failed(address)
                error = exc
                continue
            self.answered(address)
            return sock
        raise type(error)(f"{error.reason} (the last of {len(order)} pool addresses tried)")

    def order(self, backend: Backend, addresses: tuple[Address, ...]) -> list[Address]:
        """The order to try ``addresses`` of ``backend`` in: one further round the pool each time (round-robin, per
        route entry and worker), addresses that failed within ``backend_cooldown`` last."""
        if len(addresses) == 1:
            return list(addresses)
        pool = self._pools.get(id(backend))
        if pool is None or pool.backend is not backend:  # a new entry, or a dead one's id reused
            pool = self._pools[id(backend)] = _Pool(backend)
        start = pool.next
        pool.next = (start + 1) % len(addresses)
        order = addresses[start:] + addresses[:start]
        cooling = self._cooling
        if cooling:
            now = time.monotonic()
            for address in order:
                if cooling.get(address, now) < now:  # cooled down: forget it
                    del cooling[address]
            order = tuple(a for a in order if a not in cooling) + tuple(a for a in order if a in cooling)
        return list(order)

    def failed(self, address: Address) -> None:
        """``address`` did not answer: try it last for ``backend_cooldown``."""
        if self.cooldown:
            self._cooling[address] = time.monotonic() + self.cooldown

    def answered(self, address: Address) -> None:
        """``address`` answers again: no longer last."""
        if self._cooling:
            self._cooling.pop(address, None)

    def connect_at_once(self, backend: Backend, domain: str | None, first: bytes) -> tuple[socket.socket, int] | None:
        """The connect of most connections, with no wait: a route's one IP address, ``first`` sent with it.

        Sending is how the connect is checked: a connect still in progress takes
        nothing (EAGAIN), a refused one fails the send, so no syscall asks. Returns
        the socket and how many bytes of ``first`` it took; fewer than all and
        ``finish_connect`` waits for the connect. None when it would need a wait
        of another kind (a pool's failover, a name to resolve): then ``connect``.
        Raises as ``connect`` does.
        """
        addresses = backend.addresses
        if len(addresses) != 1 or addresses[0].ip is None:
            return None
        address = addresses[0]
        try:
            sock = _socket.socket(
                socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM | _NONBLOCK
            )
        except OSError as exc:
            raise _connect_failed(address, domain, exc) from None
        try:
            if not _NONBLOCK:
                sock.setblocking(False)
            error = sock.connect_ex((address.host, address.port))
            if error and error != errno.EINPROGRESS:
                raise OSError(error, os.strerror(error))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sent = sock.send(first)
            except BlockingIOError:
                sent = 0
        except OSError as exc:
            sock.close()
            raise _connect_failed(address, domain, exc) from None
        except BaseException:
            sock.close()
            raise
        return sock, sent

    def finish_connect(self, sock: socket.socket, backend: Backend, domain: str | None, timeout: float) -> None:
        """Wait up to ``timeout`` for the connect ``connect_at_once`` left in progress; raises as ``connect`` does."""
        address = backend.addresses[0]
        try:
            with gevent.Timeout(timeout, TimedOut):
                wait(sock, WRITE)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        except TimedOut:
            raise BackendTimeout(f"connect to {address} for {domain} timed out after {timeout:g}s") from None
        except OSError as exc:
            raise _connect_failed(address, domain, exc) from None

    def _connect_to(self, address: Address, domain: str | None, timeout: float) -> socket.socket:
        """Connect to one address within ``timeout``; BackendUnreachable or BackendTimeout says why not,
        LocalShortage if the gateway itself lacks a descriptor, a buffer or memory for it."""
        try:
            if address.ip is not None:  # no resolver round-trip for IP literals
                family = socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET
                return open_connection(family, (address.host, address.port), timeout)
            # Names resolve at connect time, so DNS changes need no restart; the
            # lookup and every address tried share the one connect_timeout.
            with gevent.Timeout(timeout, TimedOut):
                error: OSError = OSError("no address")
                for family, _, _, _, sockaddr in self._resolve(address.host, address.port):
                    try:
                        return open_connection(family, sockaddr, None)
                    except OSError as exc:
                        if exc.errno in _SHORTAGE:
                            raise
                        error = exc
                raise error
        except TimedOut:
            raise BackendTimeout(f"connect to {address} for {domain} timed out after {timeout:g}s") from None
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_MEMORY:
                raise LocalShortage(f"cannot resolve {address.host} for {domain}: {exc.strerror}") from None
            raise BackendUnreachable(f"cannot resolve {address.host} for {domain}: {exc.strerror}") from None
        except OSError as exc:
            raise _connect_failed(address, domain, exc) from None

    def _resolve(self, host: str, port: int) -> list:
        """getaddrinfo for a backend name, with one lookup in flight per name that later callers join.

        gevent resolves in a pool of about ten threads, and a lookup that outlives
        connect_timeout keeps its thread to the end. Without sharing, a burst of
        connections to one name whose resolver is slow filled the pool, and every
        other route given by name, even one in /etc/hosts, timed out behind it.
        Nothing is cached: a lookup that ends is forgotten. Ten slow names at once
        still fill the pool. gevent's c-ares resolver would need no threads, but it
        ignores nsswitch.conf and is not in every build, so the system's stays.
        """
        key = (host, port)
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = gevent.event.AsyncResult()
            gevent.spawn_raw(self._lookup, key, lookup)
        return lookup.get()

    def _lookup(self, key: tuple[str, int], lookup: gevent.event.AsyncResult) -> None:
        """One lookup; its result goes to whoever still waits for it, even after the first one gave up."""
        try:
            lookup.set(gevent.socket.getaddrinfo(key[0], key[1], 0, socket.SOCK_STREAM))
        except OSError as exc:  # gaierror included: each waiter turns it into its reply
            lookup.set_exception(exc)
        finally:
            del self._lookups[key]


def _connect_failed(address: Address, domain: str | None, exc: OSError) -> LocalShortage | BackendUnreachable:
    """Whose fault a failed connect is: the gateway's own shortage, or the backend's."""
    if exc.errno in _SHORTAGE:
        return LocalShortage(
            f"connect to {address} for {domain}: {errno.errorcode[exc.errno]} ({exc.strerror}): "
            "the gateway's own shortage, not the backend's"
        )
    return BackendUnreachable(f"connect to {address} for {domain}: {exc.strerror or exc}")


class _Pool:
    """A pool's state in one worker: where its next connection starts round the addresses."""

    __slots__ = ("backend", "next")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend  # held, so that its id() is not reused while this is in the table
        self.next = 0


def open_connection(family: int, sockaddr: tuple, timeout: float | None) -> socket.socket:
    """Connect; wait (under ``timeout`` if given, else the caller's) only if the connect is still in progress."""
    sock = _socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
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
                    wait(sock, WRITE)
                else:
                    with gevent.Timeout(timeout, TimedOut):
                        wait(sock, WRITE)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise
