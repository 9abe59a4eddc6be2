"""kiareport.py: the text and the JSON of --check and --route are written from one row per route."""

from __future__ import annotations

from kiaconfig import validate
from kiareport import route_row


def test_route_row_lists_every_address_and_network():
    cfg = validate({"http_backends": {"*.a.test": {"address": ["10.0.0.1:80", "b.test:80"], "allow": ["::1"]}}})
    (pattern, backend), *_ = cfg.http_routes.rows()
    row = route_row(pattern, backend)
    assert (row.match, row.pattern, row.addresses, row.allow) == (
        "wildcard",
        "*.a.test",
        ("10.0.0.1:80", "b.test:80"),
        ("::1/128",),
    )
    assert row.plain() == {
        "addresses": ["10.0.0.1:80", "b.test:80"],
        "proxy_protocol": None,
        "allow": ["::1/128"],
        "unicode": None,
        "quic_addresses": None,
    }
