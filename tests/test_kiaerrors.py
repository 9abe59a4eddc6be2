"""The reply builders of kiaerrors.py: one ``http_answer`` under the gateway's refusals and the metrics endpoint."""

import ast
import pathlib

import pytest

import kiaerrors


def test_http_answer_is_the_whole_answer_that_closes():
    assert kiaerrors.http_answer(200, b"ok\n") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
    )


def test_http_answer_to_a_head_request_keeps_the_length_and_drops_the_body():
    full = kiaerrors.http_answer(200, b"x" * 10, "text/html")
    assert kiaerrors.http_answer(200, b"x" * 10, "text/html", head=True) == full[:-10]
    assert b"Content-Type: text/html\r\nContent-Length: 10\r\n" in full


def test_a_refusal_is_the_same_bytes_as_in_0_3():
    assert kiaerrors.http_response(502) == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Length: 61\r\n"
        b"Connection: close\r\n\r\n502 Bad Gateway: the backend for this host cannot be reached\n"
    )


def test_metrics_text_goes_out_with_its_content_type():
    text = b"# HELP kiagateway_build_info x\n"
    answer = kiaerrors.metrics_response(200, text, "text/plain; version=0.0.4; charset=utf-8")
    fields, _, body = answer.partition(b"\r\n\r\n")
    assert body == text
    assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in fields
    assert b"\r\nContent-Length: %d\r\n" % len(text) in fields


@pytest.mark.parametrize(
    ("status", "reason", "text"),
    [
        (200, b"OK", b"ok\n"),
        (400, b"Bad Request", b"bad request\n"),
        (404, b"Not Found", b"not found\n"),
        (500, b"Internal Server Error", b"metrics failed\n"),
        (503, b"Service Unavailable", b"draining\n"),
    ],
)
def test_the_metrics_endpoint_says_its_short_texts(status, reason, text):
    answer = kiaerrors.metrics_response(status)
    assert answer == (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, reason, len(text), text)
    )
    assert kiaerrors.metrics_response(status, head=True) == answer[: -len(text)]


def test_kiaerrors_imports_nothing_of_the_project():
    root = pathlib.Path(kiaerrors.__file__).parent
    ours = {path.stem for path in root.glob("*.py")}
    tree = ast.parse(pathlib.Path(kiaerrors.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not (imported - {"__future__"}) & ours


@pytest.mark.parametrize(
    ("error", "http_status", "tls_alert", "outcome_word"),
    [
        (kiaerrors.BadRequest, 400, 50, "bad_request"),
        (kiaerrors.BadClientHello, 400, 50, "bad_request"),
        (kiaerrors.UnexpectedTlsMessage, 400, 10, "bad_request"),
        (kiaerrors.TlsRecordOverflow, 400, 22, "bad_request"),
        (kiaerrors.HeadTooLarge, 431, 40, "too_large"),
        (kiaerrors.PreambleTimeout, 408, None, "preamble_timeout"),
        (kiaerrors.NoRoute, 421, 112, "no_route"),
        (kiaerrors.BackendUnreachable, 502, 80, "backend_unreachable"),
        (kiaerrors.BackendTimeout, 504, 80, "backend_timeout"),
        (kiaerrors.LocalShortage, 503, 80, "local_error"),
        (kiaerrors.NotTls, 400, None, "not_tls"),
        (kiaerrors.HttpOnTlsPort, 400, None, "http_on_tls_port"),
    ],
)
def test_error_replies(error, http_status, tls_alert, outcome_word):
    exc = error("why")
    assert isinstance(exc, kiaerrors.GatewayError)
    assert (exc.http_status, exc.tls_alert, exc.outcome, exc.reason) == (http_status, tls_alert, outcome_word, "why")
