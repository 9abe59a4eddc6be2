"""kiametrics.py: /metrics and /healthz on metrics_listen, scraped by a real client from the installed gateway."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kiaconfig
import kiametrics
import kiapreflight
import kiareport
from kiaconfig import validate


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize(
    ("kind", "healthy", "text", "request_head", "status", "body"),
    [
        ("metrics", True, b"metric 1\n", b"GET /metrics HTTP/1.1\r\n\r\n", 200, b"metric 1\n"),
        ("metrics", True, b"", b"GET /metrics HTTP/1.1\r\n\r\n", 500, b"metrics failed\n"),
        ("healthz", True, b"", b"GET /healthz HTTP/1.1\r\n\r\n", 200, b"ok\n"),
        ("healthz", False, b"", b"GET /healthz HTTP/1.1\r\n\r\n", 503, b"draining\n"),
        ("other", True, b"", b"GET / HTTP/1.1\r\n\r\n", 404, b"not found\n"),
        ("other", True, b"", b"HEAD /healthz HTTP/1.1\r\n\r\n", 404, b""),  # a HEAD request: no body
        ("bad", True, b"", b"GET /metrics\r\n\r\n", 400, b"bad request\n"),
    ],
)
def test_each_kind_of_request_gets_its_answer(kind, healthy, text, request_head, status, body):
    answer = kiametrics.respond(kind, healthy, text, request_head)
    fields, _, sent = answer.partition(b"\r\n\r\n")
    assert fields.startswith(b"HTTP/1.1 %d " % status) and sent == body
    content_type = kiametrics.CONTENT_TYPE if status == 200 and kind == "metrics" else "text/plain; charset=us-ascii"
    assert f"\r\nContent-Type: {content_type}\r\n".encode() in fields


# The pure parts.


def test_metrics_listen_is_checked():
    assert validate({}, "servers.toml").settings.metrics_listen == ""
    settings = validate({"gateway": {"metrics_listen": "[::1]:9880"}}, "s.toml").settings
    assert settings.metrics_listen == "[::1]:9880"
    with pytest.raises(kiaconfig.ConfigError) as info:
        validate({"gateway": {"metrics_listen": "localhost:9880"}}, "s.toml")
    assert info.value.errors[0].startswith("s.toml: [gateway] metrics_listen: ")
    cfg = validate({"gateway": {"http_listen": ["0.0.0.0:80"], "metrics_listen": "127.0.0.1:80"}}, "s.toml")
    assert kiapreflight.check_serving(cfg) == [
        "s.toml: [gateway] metrics_listen: 127.0.0.1:80 overlaps 0.0.0.0:80 of [gateway] http_listen:"
        " the metrics need a port of their own"
    ]
    assert "metrics_listen" in kiareport.plain_config(cfg)["gateway"]


def test_histogram_buckets_are_le_and_sums_add_up(monkeypatch):
    monkeypatch.setattr(kiametrics.time, "monotonic", lambda: 100.0)
    one, two = kiametrics.Stats(), kiametrics.Stats()
    assert one.preamble_read("http", 99.0) == 100.0  # 1.0 s: on a bound, so in that bound's bucket (le)
    two.opened("https")
    two.connected("https", 0.0)  # 100 s: past the last bound, +Inf only
    two.finished("https", "ok", 3, 4)
    total = kiametrics.Stats()
    for stats in (one, two, one):
        total.add(stats)
    text = kiametrics.render(total, {"ok": 1, "error": 0}, 2, "9.9").decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert value(samples, "kiagateway_preamble_seconds_bucket", listener="http", le="0.5") == 0
    assert value(samples, "kiagateway_preamble_seconds_bucket", listener="http", le="1.0") == 2
    assert value(samples, "kiagateway_preamble_seconds_sum", listener="http") == 2.0
    assert value(samples, "kiagateway_connect_seconds_bucket", listener="https", le="10.0") == 0
    assert value(samples, "kiagateway_connect_seconds_bucket", listener="https", le="+Inf") == 1
    assert value(samples, "kiagateway_connect_seconds_sum", listener="https") == 100.0
    assert value(samples, "kiagateway_bytes_total", listener="https", direction="down") == 4
    assert value(samples, "kiagateway_connections_total", listener="https", outcome="ok") == 1
    assert value(samples, "kiagateway_connections_open", listener="https") == 0
    assert value(samples, "kiagateway_reloads_total", result="ok") == 1
    assert value(samples, "kiagateway_worker_restarts_total") == 2
    assert value(samples, "kiagateway_build_info", version="9.9") == 1


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "metrics"),
        (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", "metrics"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", "healthz"),
        (b"HEAD /healthz HTTP/1.1\r\n\r\n", "other"),
        (b"GET / HTTP/1.1\r\n\r\n", "other"),
        (b"GET /metrics\r\n\r\n", "bad"),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", "bad"),
    ],
)
def test_requests_are_classified(head, kind):
    assert kiametrics.classify(head) == kind
