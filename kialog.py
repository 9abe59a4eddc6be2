"""The operator log: start-up lines, one line per finished connection, errors with their cause.

Its own module because both the data path (kiagateway.py) and the process life
cycle (kiaprocess.py) write it, and neither should import the other for it.
It writes text or JSON lines to stderr and knows nothing of sockets or routes.
"""

from __future__ import annotations

import json
import select
import sys
import time
from typing import TextIO

import gevent


class Log:
    """Operator log: start-up lines, one line per finished connection, errors with their cause."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        self.json = fmt == "json"
        self.stream = stream or sys.stderr
        self._second = -1
        self._stamp = ""
        self._batch: list[str] = []  # connection lines waiting for the end of this event-loop turn
        self._batched = 0  # their length, newlines included

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
        self.stream.write(line + "\n")
        self.stream.flush()

    def connection(self, fields: dict) -> None:
        """The per-connection line: formatted directly, since it is written for every connection.

        Lines finished in one event-loop turn go out in one write of at most
        PIPE_BUF bytes, so workers sharing a pipe never interleave inside a line.
        """
        f = fields
        if self.json:
            line = json.dumps({"time": self._time(), "level": "info", "message": "connection", **f})
        else:
            line = (
                f"{self._time()} info connection id={f['id']} listener={f['listener']} client={f['client']}"
                f" domain={f['domain'] or '-'} backend={f['backend'] or '-'} outcome={f['outcome']}"
                f" bytes_up={f['bytes_up']} bytes_down={f['bytes_down']} duration_ms={f['duration_ms']}"
            )
            if "reason" in f:  # the only field that may hold spaces or client bytes
                line += f" reason={_text_value(f['reason'])}"
        size = (len(line) if line.isascii() else len(line.encode())) + 1
        if self._batched + size > select.PIPE_BUF:
            self.flush()
        if not self._batch:
            gevent.get_hub().loop.run_callback(self.flush)
        self._batch.append(line)
        self._batched += size

    def flush(self) -> None:
        """Write the batched connection lines."""
        if self._batch:
            self._batch.append("")
            text = "\n".join(self._batch)
            self._batch.clear()
            self._batched = 0
            self.stream.write(text)
            self.stream.flush()

    def info(self, message: str, **fields: object) -> None:
        self.write("info", message, **fields)

    def warning(self, message: str, **fields: object) -> None:
        self.write("warning", message, **fields)

    def error(self, message: str, **fields: object) -> None:
        self.write("error", message, **fields)


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def format_address(address: tuple) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
