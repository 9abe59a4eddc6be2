"""Why a connection ends early, and what its client is told: the error family and every reply it builds.

Each ``GatewayError`` class carries its answer: ``http_status`` on the HTTP
listener, ``tls_alert`` on the TLS one, ``outcome`` for the log line. The
parsers (sniff.py, httpstream.py, proxyproto.py) raise them, the data path
raises the routing, policy and backend ones, and ``reply`` turns any of them
into bytes in one place. A client is told a fixed text per status; the
``reason`` (backend address, errno, resolver message, the client's own bytes)
goes to the log only. The metrics endpoint's answers (``metrics_response``)
come from the same builder, ``http_answer``. Its own module so that parsers and the data path share
one family without either importing the other, as h11's ``_util.py`` holds
h11's; it imports nothing of the project's.
"""

from __future__ import annotations

__all__ = [
    "BackendTimeout",
    "BackendUnreachable",
    "BadClientHello",
    "BadRequest",
    "ClientLimit",
    "Forbidden",
    "GatewayError",
    "HeadTooLarge",
    "HostChanged",
    "HttpOnTlsPort",
    "LocalShortage",
    "NoRoute",
    "NotTls",
    "PreambleTimeout",
    "QuicProtocolViolation",
    "TlsRecordOverflow",
    "TooManyFlows",
    "UnexpectedTlsMessage",
    "http_answer",
    "http_response",
    "metrics_response",
    "quic_close_code",
    "reply",
    "tls_alert",
]

# TLS alert descriptions, RFC 8446 section 6.
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_RECORD_OVERFLOW = 22
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ACCESS_DENIED = 49
ALERT_DECODE_ERROR = 50
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112  # RFC 6066 section 3

# QUIC transport error codes, RFC 9000 section 20.1.
QUIC_CONNECTION_REFUSED = 0x02
QUIC_PROTOCOL_VIOLATION = 0x0A
QUIC_CRYPTO_ERROR = 0x100  # + the TLS alert


class GatewayError(Exception):
    """A connection ends early; the class says how the client is answered.

    ``http_status`` is the reply on the HTTP listener, ``tls_alert`` the fatal
    alert on the TLS listener (None: close without one), ``outcome`` the word
    in the connection's log line. ``http_status`` None: a clean close on
    either listener (a FIN with nothing sent). ``detail`` replaces the status's
    fixed text where one status has two meanings.
    """

    http_status: int | None = 502
    tls_alert: int | None = ALERT_INTERNAL_ERROR
    outcome: str = "error"
    detail: str | None = None
    answers_in_http = False  # on the TLS listener too
    quic_error: int | None = None  # the QUIC listener's CONNECTION_CLOSE code, if not CRYPTO_ERROR + tls_alert

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def clean_close(self) -> bool:
        """Does a client with no reply get a FIN, its unread bytes drained so that the close sends no reset?"""
        return self.http_status is None


class BadRequest(GatewayError):
    http_status = 400
    tls_alert = ALERT_DECODE_ERROR
    outcome = "bad_request"


class HeadTooLarge(GatewayError):
    http_status = 431
    tls_alert = ALERT_HANDSHAKE_FAILURE
    outcome = "too_large"


class PreambleTimeout(GatewayError):
    http_status = 408
    tls_alert = None  # a client that stalls mid-hello gets a plain close
    outcome = "preamble_timeout"


class NoRoute(GatewayError):
    http_status = 421
    tls_alert = ALERT_UNRECOGNIZED_NAME
    outcome = "no_route"


class HostChanged(GatewayError):
    """A later request of a strict keep-alive connection names a host of another route entry."""

    http_status = 421
    tls_alert = ALERT_UNRECOGNIZED_NAME
    outcome = "host_changed"
    detail = "this connection serves another host; send the request on a new connection"


class BackendUnreachable(GatewayError):
    http_status = 502
    tls_alert = ALERT_INTERNAL_ERROR
    outcome = "backend_unreachable"


class BackendTimeout(GatewayError):
    http_status = 504
    tls_alert = ALERT_INTERNAL_ERROR
    outcome = "backend_timeout"


class LocalShortage(GatewayError):
    """The gateway itself is short of descriptors, buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).

    Not the backend's fault: no pool address cools down for it and the next is
    not tried (it would fail the same way); the client may try again later.
    """

    http_status = 503
    tls_alert = ALERT_INTERNAL_ERROR
    outcome = "local_error"


class Forbidden(GatewayError):
    """The route's allow-list leaves the client out: refused before any backend connect."""

    http_status = 403
    tls_alert = ALERT_ACCESS_DENIED
    outcome = "forbidden"


class ClientLimit(GatewayError):
    """The client has max_connections_per_client open already: 429, or on TLS a clean close."""

    http_status = 429
    tls_alert = None
    outcome = "client_limit"
    clean_close = True
    quic_error = QUIC_CONNECTION_REFUSED


class BadClientHello(BadRequest):
    """TLS framing that is wrong: a decode_error alert, as a TLS server would send."""


class UnexpectedTlsMessage(BadClientHello):
    tls_alert = ALERT_UNEXPECTED_MESSAGE


class TlsRecordOverflow(BadClientHello):
    tls_alert = ALERT_RECORD_OVERFLOW


class TooManyFlows(GatewayError):
    """The QUIC listener holds max_quic_flows flows: a new one is refused with CONNECTION_REFUSED."""

    tls_alert = None
    outcome = "max_flows"
    quic_error = QUIC_CONNECTION_REFUSED


class QuicProtocolViolation(BadRequest):
    """A QUIC client's Initial packet that decrypts but breaks the protocol: PROTOCOL_VIOLATION."""

    quic_error = QUIC_PROTOCOL_VIOLATION


class NotTls(GatewayError):
    """Not TLS at all on the TLS port: close at once, no alert."""

    http_status = 400
    tls_alert = None
    outcome = "not_tls"


class HttpOnTlsPort(NotTls):
    """Plain HTTP sent to the TLS port: the one case the TLS listener answers in HTTP."""

    outcome = "http_on_tls_port"
    detail = "plain HTTP was sent to the TLS port"
    answers_in_http = True


# ---------------------------------------------------------------------------
# The replies

HTTP_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# What a refused client is told: a fixed text per status.
_HTTP_DETAILS = {
    400: "the request head is malformed or names no valid host",
    403: "this client may not use the requested host",
    408: "the request head did not arrive in time",
    421: "this gateway has no route for the requested host",
    429: "too many connections from this client",
    431: "the request head is too large",
    502: "the backend for this host cannot be reached",
    503: "the gateway cannot take this request now; try again later",
    504: "the backend for this host did not answer in time",
}


# The metrics endpoint's short texts (kiametrics.py; DESIGN.md: "/healthz: 200 ok while serving, 503 while
# draining. Anything else: 404."), where /metrics has no text to send.
_METRICS_TEXTS = {
    200: b"ok\n",
    400: b"bad request\n",
    404: b"not found\n",
    500: b"metrics failed\n",
    503: b"draining\n",
}
PLAIN_TEXT = "text/plain; charset=us-ascii"


def http_answer(status: int, body: bytes, content_type: str = PLAIN_TEXT, head: bool = False) -> bytes:
    """A whole answer after which the connection closes: every HTTP reply of the gateway is built here.

    The answer to a HEAD request has no body (RFC 9110 section 9.3.2); its
    Content-Length still gives the size the body would have had.
    """
    fields = (
        f"HTTP/1.1 {status} {HTTP_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return fields.encode("ascii") + (b"" if head else body)


def http_response(status: int, detail: str | None = None, head: bool = False) -> bytes:
    """A refused client's short plain-text answer; ``detail`` defaults to the status's fixed text."""
    body = f"{status} {HTTP_REASONS[status]}: {detail or _HTTP_DETAILS[status]}\n".encode("ascii", "replace")
    return http_answer(status, body, head=head)


def metrics_response(status: int, body: bytes = b"", content_type: str = PLAIN_TEXT, head: bool = False) -> bytes:
    """An answer of the metrics endpoint: ``body`` (the metrics text) or, if empty, the status's short text."""
    return http_answer(status, body or _METRICS_TEXTS[status], content_type if body else PLAIN_TEXT, head)


def tls_alert(description: int) -> bytes:
    """A fatal alert record (RFC 8446 section 6): content type 21, legacy version 3.3, level 2."""
    return bytes((21, 3, 3, 0, 2, 2, description))


def reply(error: GatewayError, listener: str, preamble: bytes | bytearray = b"") -> bytes:
    """The bytes a refused client gets: an HTTP answer, a TLS alert, or nothing (a clean close).

    ``preamble`` is what the client sent so far: a HEAD request gets no body.
    """
    if error.http_status is None:
        return b""
    if listener == "http" or error.answers_in_http:
        return http_response(error.http_status, error.detail, preamble.startswith(b"HEAD "))
    if error.tls_alert is not None:
        return tls_alert(error.tls_alert)
    return b""


def quic_close_code(error: GatewayError) -> int | None:
    """The CONNECTION_CLOSE code a refused QUIC client gets: its own, else CRYPTO_ERROR with the TLS alert; None for
    nothing (the client's own timeout ends it)."""
    if error.quic_error is not None:
        return error.quic_error
    if error.tls_alert is not None:
        return QUIC_CRYPTO_ERROR + error.tls_alert
    return None
