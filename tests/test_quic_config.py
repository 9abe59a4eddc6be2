"""The QUIC listener's keys: validated, refused where start-up would fail, and shown by --check and --route."""

from __future__ import annotations

import io
import sys

import pytest

import kiareport
from kiaconfig import ConfigError, validate
from kiapreflight import QUIC_EXTRA, check_serving

ROUTES = {
    "a.example": "127.0.0.1:8443",
    "b.example": {"address": "10.0.0.5:443", "quic_address": ["10.0.0.5:8443", "10.0.0.6:8443"]},
}


def quic(gateway: dict) -> dict:
    return {"gateway": {"http_listen": [], "https_listen": [], **gateway}, "https_backends": ROUTES}


def test_off_by_default_with_the_contract_defaults():
    s = validate({}).settings
    assert (s.quic_listen, s.quic_idle_timeout, s.max_quic_flows) == ((), 60.0, 10000)


def test_keys_and_quic_address():
    cfg = validate(quic({"quic_listen": ["127.0.0.1:4433", "[::1]:4433"], "quic_idle_timeout": 5, "max_quic_flows": 7}))
    s = cfg.settings
    assert [str(a) for a in s.quic_listen] == ["127.0.0.1:4433", "[::1]:4433"]
    assert (s.quic_idle_timeout, s.max_quic_flows) == (5.0, 7)
    assert [str(a) for a in cfg.https_routes.lookup("a.example").udp_addresses] == ["127.0.0.1:8443"]
    assert [str(a) for a in cfg.https_routes.lookup("b.example").udp_addresses] == ["10.0.0.5:8443", "10.0.0.6:8443"]
    assert check_serving(cfg) == []  # QUIC alone is something to listen on


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (quic({"quic_listen": "0.0.0.0:443"}), "quic_listen: must be a list"),
        (quic({"quic_listen": ["example.com:443"]}), "quic_listen"),
        (quic({"quic_idle_timeout": 0}), "quic_idle_timeout: must be a positive number"),
        (quic({"max_quic_flows": 0}), "max_quic_flows: must be a whole number from 1"),
        ({"https_backends": {"a.example": {"address": "127.0.0.1:1", "quic_address": []}}}, "quic_address"),
        ({"https_backends": {"a.example": {"address": "127.0.0.1:1", "quic_adress": "x:1"}}}, "did you mean"),
    ],
)
def test_bad_values_are_refused(data, expected):
    with pytest.raises(ConfigError) as info:
        validate(data, "s.toml")
    assert any(expected in error for error in info.value.errors), info.value.errors


def test_a_port_listed_twice_is_refused_but_a_tcp_listener_on_it_is_not():
    cfg = validate(
        {
            "gateway": {
                "https_listen": ["0.0.0.0:443"],
                "http_listen": [],
                "quic_listen": ["0.0.0.0:443", "127.0.0.1:443"],
            }
        }
    )
    assert check_serving(cfg) == ["<config>: [gateway] quic_listen: 127.0.0.1:443 overlaps 0.0.0.0:443"]


def test_without_cryptography_the_check_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)  # what a core install without the extra has
    assert check_serving(validate(quic({"quic_listen": ["127.0.0.1:4433"]}))) == [f"<config>: {QUIC_EXTRA}"]


def test_check_and_route_show_the_quic_listener():
    cfg = validate(quic({"quic_listen": ["127.0.0.1:4433"]}))
    out = io.StringIO()
    kiareport.print_routes(cfg, out)
    assert "quic listener (UDP, the same routes): 127.0.0.1:4433" in out.getvalue()
    assert "QUIC to 10.0.0.5:8443, 10.0.0.6:8443" in out.getvalue()
    report = kiareport.route_report(cfg, "b.example")
    assert report["quic"]["quic_addresses"] == ["10.0.0.5:8443", "10.0.0.6:8443"]
    assert report["https"] == "off" or report["https"]["match"] == "off"
    assert "quic" not in kiareport.route_report(validate({}), "b.example")  # off by default: not shown
    assert kiareport.plain_config(cfg)["gateway"]["quic_listen"] == ["127.0.0.1:4433"]
