"""The operator log: start-up lines, one line per finished connection, errors with their cause.

Its own module because both the data path (kiagateway.py) and the process life
cycle (kiaprocess.py) write it, and neither should import the other for it.
It writes text or JSON lines to stderr and knows nothing of sockets or routes.

Logging never changes control flow: a broken or slow reader of stderr costs
lost lines, counted in ``Log.lost``, never an exception, a stalled event loop
or a skipped drain.

- Lines go to fd 2 with ``os.write``, not through ``sys.stderr``'s buffer. A
  pipe or a tty is opened again (Linux: ``/proc/self/fd/2``) in non-blocking
  mode, and the new open file description, this process's own (its workers'
  too, which inherit it), takes fd 2's place: O_NONBLOCK is a property of the
  description, and the one we were given is shared with the shell, a tee, a
  container runtime, which must not find it changed, during or after.
  Where that cannot be (no /proc, as on OpenBSD; a pipe made by another user
  we dropped privileges from), a pipe's own description is made non-blocking
  and put back at exit by the process that set it, and a tty is written as it
  is: a terminal suspended with Ctrl-S there stalls the gateway. A socket
  (journald's stream), which cannot be opened again, is written with
  ``MSG_DONTWAIT`` and keeps its mode. A file is written as it is: it never
  blocks for long, and a second description would write at an offset of its own.
  For a pipe, tty or socket ``sys.stderr`` is replaced by a stream into this
  log, so that what Python writes there itself (gevent's tracebacks, warnings)
  neither meets a non-blocking fd nor cuts into a waiting line.
- What the reader cannot take now waits in a queue of at most QUEUE_LIMIT
  bytes, written when the fd becomes writable (a gevent watcher), before the
  next line, or by ``close()`` at exit within a bounded wait. Lines beyond the
  bound, and lines a broken stderr refuses (EPIPE, EBADF...), are dropped and
  counted; once the queue empties again a warning says how many were lost.
- Lines stay whole: every write holds whole lines and at most PIPE_BUF bytes,
  which a pipe takes all or nothing, so workers sharing it never interleave
  inside a line. A longer line (rare: a long error) or a full socket may be
  taken in part; the rest is written next, before anything else this process
  writes.
- Under journald (``JOURNAL_STREAM`` names stderr's device and inode, the check
  systemd documents) each line starts with its syslog priority, ``<3>`` error,
  ``<4>`` warning, ``<6>`` info, so that ``journalctl -p`` sees errors as errors.
  JSON lines get it too: journald strips it, and the journal's MESSAGE is the
  JSON object. Anywhere else (a pipe, a file, a tty, even a child that inherits
  the variable with stderr redirected) nothing is prefixed.
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import io
import json
import os
import select
import socket
import stat
import sys
import time
import weakref

import gevent

from kiasocket import WRITE

QUEUE_LIMIT = 1 << 20  # bytes waiting for a slow reader, per process: ~4,000 connection lines, 16 pipe buffers
# Connection lines are written together this long after the first of them (sooner when they fill PIPE_BUF): one
# write per batch, not per connection. What a process killed outright had batched is lost, as with a syslog socket.
FLUSH_SECONDS = 0.05
CLOSE_TIMEOUT = 1.0  # seconds close() waits at exit for a slow reader to take what is queued
PRIORITIES = {"error": "<3>", "warning": "<4>", "info": "<6>"}  # syslog severities journald reads at line start
_REOPEN = "/proc/self/fd/{}"  # Linux: opening it opens fd's file anew, with an open file description of its own


class Log:
    """Operator log: start-up lines, one line per finished connection, errors with their cause."""

    def __init__(self, fmt: str = "text", fd: int = 2) -> None:
        self.json = fmt == "json"
        self.fd = fd
        self.lost = 0  # lines dropped: the reader was gone, too far behind, or still behind at exit
        self._reported = 0  # self.lost when the last "log lines lost" warning was written
        self._broken = False  # a write failed otherwise than "would block": no warning would get through
        self._second = -1
        self._stamp = ""
        self._batch: list[str] = []  # connection lines waiting for the flush timer
        self._batched = 0  # their length, newlines included
        self._timer = None  # gevent timer: flushes the batch FLUSH_SECONDS after its first line
        self._queue: collections.deque[bytes] = collections.deque()  # whole lines the fd could not take yet
        self._queued = 0  # their length
        self._watcher = None  # gevent io watcher, started while the queue holds lines
        self._socket: socket.socket | None = None  # a dup of fd when it is a socket, for MSG_DONTWAIT
        self._ready = False  # the fd's kind has been looked at (at the first write)
        self._prefix = dict.fromkeys(PRIORITIES, "")
        if _is_journal(fd):
            self._prefix = dict(PRIORITIES)
        _logs.add(self)

    def _time(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # one strftime per second, however many lines
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def write(self, level: str, message: str, **fields: object) -> None:
        if self.json:
            line = json.dumps({"time": self._time(), "level": level, "message": message, **fields})
        else:
            extra = "".join(f" {k}={_text_value(v)}" for k, v in fields.items())
            line = f"{self._time()} {level} {message}{extra}"
        self.flush()  # connection lines that came first are written first
        self._send(f"{self._prefix.get(level, self._prefix['info'])}{line}\n".encode(errors="backslashreplace"))

    def connection(self, fields: dict) -> None:
        """The per-connection line: formatted directly, since it is written for every connection.

        Lines finished within FLUSH_SECONDS go out in one write of at most
        PIPE_BUF bytes, so workers sharing a pipe never interleave inside a line.
        """
        f = fields
        if self.json:
            line = json.dumps({"time": self._time(), "level": "info", "message": "connection", **f})
        else:
            line = (
                f"{self._time()} info connection id={f['id']} listener={f['listener']} client={f['client']}"
                + (f" proxy={f['proxy']}" if "proxy" in f else "")  # the trusted proxy the connection came from
                + f" domain={f['domain'] or '-'} backend={f['backend'] or '-'} outcome={f['outcome']}"
                f" bytes_up={f['bytes_up']} bytes_down={f['bytes_down']} duration_ms={f['duration_ms']}"
            )
            if "datagrams_up" in f:  # a QUIC flow's
                line += f" datagrams_up={f['datagrams_up']} datagrams_down={f['datagrams_down']}"
            if "tried" in f:  # a pool's addresses, when more than one was tried
                line += f" tried={','.join(f['tried'])}"
            if "reason" in f:  # the only field that may hold spaces or client bytes
                line += f" reason={_text_value(f['reason'])}"
        line = self._prefix["info"] + line
        size = (len(line) if line.isascii() else len(line.encode())) + 1
        if self._batched + size > select.PIPE_BUF:
            self.flush()
        if not self._batch:  # a timer of its own: libev restarts an expired one at its old, past due time
            self._timer = gevent.get_hub().loop.timer(FLUSH_SECONDS, ref=False)
            self._timer.start(self.flush)
        self._batch.append(line)
        self._batched += size

    def flush(self) -> None:
        """Write the batched connection lines."""
        if self._batch:
            self._timer.close()
            self._batch.append("")
            text = "\n".join(self._batch)
            self._batch.clear()
            self._batched = 0
            self._send(text.encode(errors="backslashreplace"))

    def info(self, message: str, **fields: object) -> None:
        self.write("info", message, **fields)

    def warning(self, message: str, **fields: object) -> None:
        self.write("warning", message, **fields)

    def error(self, message: str, **fields: object) -> None:
        self.write("error", message, **fields)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Before the process exits: write what is left, waiting at most ``timeout`` seconds for a slow reader.

        What the reader has not taken by then is counted lost. Blocks the
        event loop while it waits, which is why it is for the exit only.
        """
        self.flush()
        deadline = time.monotonic() + timeout
        while not self._drain():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                select.select([], [self.fd], [], remaining)
            except (OSError, ValueError):  # fd closed under us: the lines are lost below
                break
        self._drop_queue()
        self._reported = self.lost  # nothing more to say: the process is exiting
        atexit.unregister(self.close)

    def setup(self) -> None:
        """Look at the fd and make it writable without blocking now, rather than at the first line.

        For the life cycle, before it drops privileges: as another user this
        process may no longer open its own stderr again.
        """
        if not self._ready:
            self._setup()

    def _send(self, data: bytes) -> None:
        """Write whole lines now if the fd takes them, else queue them. Never raises, never blocks on a pipe."""
        if not self._ready:
            self._setup()
        if self._queue:  # lines before these are waiting: keep the order
            self._enqueue(data)
            self._drain()
            return
        written = self._write(data)
        if written < len(data):
            self._enqueue(data[written:], whole=not written)

    def _write(self, data: bytes) -> int:
        """How much of ``data`` the fd took now: 0 if it would block; all of it, counted lost, if it is broken."""
        try:
            if self._socket is not None:
                return self._socket.send(data, socket.MSG_DONTWAIT)
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE (the reader is gone), EBADF (no stderr), EIO...: the lines are lost, not the process
            self.lost += data.count(b"\n")
            self._broken = True
            return len(data)

    def _enqueue(self, data: bytes, whole: bool = True) -> None:
        """Keep lines for later, within QUEUE_LIMIT; the rest of a line already begun is always kept."""
        if whole and self._queued + len(data) > QUEUE_LIMIT:
            self.lost += data.count(b"\n")
            return
        self._queue.append(data)
        self._queued += len(data)
        self._watch()

    def _drain(self) -> bool:
        """Write the queue, whole lines at most PIPE_BUF bytes a write, until the fd would block; True once empty."""
        queue = self._queue
        while queue:
            data = queue.popleft()
            size = len(data)
            if size < select.PIPE_BUF and queue and size + len(queue[0]) <= select.PIPE_BUF:
                parts = [data]
                while queue and size + len(queue[0]) <= select.PIPE_BUF:
                    parts.append(queue.popleft())
                    size += len(parts[-1])
                data = b"".join(parts)
            written = self._write(data)
            self._queued -= written
            if written < size:
                queue.appendleft(data[written:])
                return False
        if self.lost > self._reported and not self._broken:  # the reader caught up: say what it missed
            self._reported = self.lost
            self.warning("log lines lost: the reader of stderr fell behind", lost=self.lost)
        return not queue  # that warning may be waiting in turn

    def _drop_queue(self) -> None:
        for data in self._queue:
            self.lost += data.count(b"\n")
        self._queue.clear()
        self._queued = 0
        if self._watcher is not None:
            self._watcher.stop()

    def _watch(self) -> None:
        """Have the event loop drain the queue once the fd is writable."""
        try:
            if self._watcher is None:
                self._watcher = gevent.get_hub().loop.io(self.fd, WRITE)
            if not self._watcher.active:
                self._watcher.start(self._writable)
        except (OSError, ValueError):  # an fd the loop cannot watch: the next line or close() drains instead
            self._watcher = None

    def _writable(self) -> None:
        if self._drain() and self._watcher is not None:
            self._watcher.stop()

    def _setup(self) -> None:
        """At the first write: how to write the fd without blocking, and a flush at exit."""
        self._ready = True
        atexit.register(self.close)
        try:
            mode = os.fstat(self.fd).st_mode
        except OSError:  # no stderr at all: every line will be counted lost
            return
        if stat.S_ISSOCK(mode) and hasattr(socket, "MSG_DONTWAIT"):
            try:
                self._socket = socket.socket(fileno=os.dup(self.fd))
            except OSError:
                self._socket = None
        elif stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(self.fd)):
            if not _reopen_nonblocking(self.fd):
                if not stat.S_ISFIFO(mode):
                    return  # a tty's description is also its shell's: written as it is, blocking
                _set_nonblocking(self.fd)
        elif stat.S_ISSOCK(mode):
            _set_nonblocking(self.fd)
        else:
            return
        if self.fd == 2 and _fileno(sys.stderr) == 2:
            # What Python writes there itself (gevent's tracebacks, warnings) would now meet a non-blocking
            # pipe and raise: it goes through this log's queue instead, in order with the lines.
            sys.stderr = io.TextIOWrapper(_Raw(self), encoding="utf-8", errors="backslashreplace", line_buffering=True)


class _Raw(io.RawIOBase):
    """The bytes of a text stream, written as log lines are: never raising, never blocking."""

    def __init__(self, log: Log) -> None:
        self._log = log

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._log.fd

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._log.flush()
        self._log._send(bytes(data))
        return len(data)


def _fileno(stream: object) -> int:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # None, closed, or not backed by a descriptor
        return -1


_logs: weakref.WeakSet[Log] = weakref.WeakSet()
_restore: dict[int, tuple[int, int, tuple]] = {}  # fd -> (its flags before, pid that changed them, its identity)


def _reopen_nonblocking(fd: int) -> bool:
    """Put in ``fd``'s place the same file opened anew, non-blocking; False where it cannot be opened again.

    The old description is left as it was, for everyone else who holds it.
    """
    try:
        private = os.open(_REOPEN.format(fd), os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:  # no /proc (OpenBSD), not ours to open (made by the user we were), a FIFO's reader gone
        return False
    try:
        if _identity(private) != _identity(fd):  # a /proc not the kind we know: keep what we have
            return False
        os.dup2(private, fd, inheritable=os.get_inheritable(fd))  # fd 2: workers, loaders, an upgrade write it too
        return True
    finally:
        os.close(private)


def _set_nonblocking(fd: int) -> None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            _restore.setdefault(fd, (flags, os.getpid(), _identity(fd)))
    except OSError:  # then writes may block, as they always did
        pass


@atexit.register  # registered at import, before any Log's close(), so it runs after them all
def _restore_blocking() -> None:
    """Give the pipe back as it was, for whoever writes to it after us (say, a shell's next command)."""
    for fd, (flags, pid, identity) in _restore.items():
        if pid != os.getpid():  # a worker's exit must not change the mode under its supervisor
            continue
        try:
            if _identity(fd) == identity:  # still the same pipe, not another file under a reused number
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        except OSError:  # closed meanwhile: nothing left to give back
            continue


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _after_fork_in_child() -> None:
    """A new worker starts with empty queues: its parent still holds those lines and writes them."""
    for log in _logs:
        log._batch.clear()
        log._batched = 0
        log._timer = None  # the parent's event loop's
        log._queue.clear()
        log._queued = 0
        log._reported = log.lost  # the parent reports its own losses


os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_journal(fd: int) -> bool:
    """stderr is the journal's stream: JOURNAL_STREAM holds its device and inode (systemd.exec(5))."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def format_address(address: tuple) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
