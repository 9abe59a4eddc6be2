"""kiaconfig.py: the pure validator and the route lookup."""

from __future__ import annotations

import pytest
from conftest import exchange

import kiaconfig
from kiaconfig import ConfigError, validate


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data, "servers.toml")
    return info.value.errors


def test_defaults():
    cfg = validate({}, "servers.toml")
    s = cfg.settings
    assert [str(a) for a in s.http_listen] == ["0.0.0.0:80"]
    assert [str(a) for a in s.https_listen] == ["0.0.0.0:443"]
    assert (s.preamble_timeout, s.connect_timeout, s.idle_timeout) == (5.0, 3.0, 300.0)
    assert (s.max_preamble, s.max_connections, s.workers, s.user, s.log_format) == (32768, 10000, 1, "", "text")


def test_lookup_order():
    cfg = validate(
        {
            "https_backends": {
                "Example.COM.": "127.0.0.1:1",
                "*.example.com": "127.0.0.1:2",
                "*.deep.example.com": "127.0.0.1:3",
                "*": "127.0.0.1:9",
            }
        }
    )
    table = cfg.https_routes
    port = lambda name: table.lookup(name).address.port  # noqa: E731
    assert port("example.com") == 1  # exact, normalised key
    assert port("www.example.com") == 2  # wildcard
    assert port("a.b.example.com") == 2  # any depth
    assert port("x.deep.example.com") == 3  # longest suffix
    assert port("deep.example.com") == 2  # *.deep.example.com does not match its apex
    assert port("other.org") == 9  # default
    assert table.lookup(None).address.port == 9  # no name at all
    assert [pattern for pattern, _ in table.rows()] == ["example.com", "*.deep.example.com", "*.example.com", "*"]
    assert validate({"https_backends": {"a.b": "127.0.0.1:1"}}).https_routes.lookup("c.d") is None


def test_wildcard_apex_not_matched_without_exact():
    table = validate({"http_backends": {"*.example.com": "127.0.0.1:2"}}).http_routes
    assert table.lookup("example.com") is None
    assert table.lookup("notexample.com") is None


def test_backend_forms():
    cfg = validate(
        {
            "https_backends": {
                "a.example": "10.0.0.5:443",
                "b.example": {"address": "[2001:db8::1]:8443", "proxy_protocol": "v2"},
                "c.example": "backend.internal:443",
            }
        }
    )
    a, b, c = (cfg.https_routes.lookup(n) for n in ("a.example", "b.example", "c.example"))
    assert (str(a), a.address.ip is not None, a.proxy_protocol) == ("10.0.0.5:443", True, None)
    assert (str(b), b.proxy_protocol) == ("[2001:db8::1]:8443", "v2")
    assert (c.address.host, c.address.ip) == ("backend.internal", None)  # resolved at connect time


def test_legacy_backends_table_applies_to_both_with_warning():
    cfg = validate({"backends": {"a.example": "127.0.0.1:1"}}, "old.toml")
    assert cfg.http_routes.lookup("a.example") is cfg.https_routes.lookup("a.example") or (
        cfg.http_routes.lookup("a.example") == cfg.https_routes.lookup("a.example")
    )
    assert any("deprecated" in w and "old.toml" in w for w in cfg.warnings)
    assert "cannot be combined" in errors_of({"backends": {}, "http_backends": {}})[0]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"http_backend": {}}, "servers.toml: unknown table [http_backend] (did you mean 'http_backends'?)"),
        (
            {"gateway": {"idle_timout": 5}},
            "servers.toml: [gateway] unknown key 'idle_timout' (did you mean 'idle_timeout'?)",
        ),
        (
            {"http_backends": {"a.example": "127.0.0.1"}},
            "servers.toml: [http_backends] 'a.example': '127.0.0.1' has no port",
        ),
        ({"http_backends": {"a.example": "127.0.0.1:0"}}, "bad port '0'"),
        ({"http_backends": {"a.example": "127.0.0.1:70000"}}, "bad port '70000'"),
        ({"http_backends": {"a.example": "::1:80"}}, "put an IPv6 address in brackets"),
        ({"http_backends": {"a.example": 80}}, "expected a string 'host:port'"),
        ({"http_backends": {"bad_name!": "127.0.0.1:1"}}, "[http_backends] 'bad_name!': not a valid domain"),
        ({"http_backends": {"a..b": "127.0.0.1:1"}}, "not a valid domain"),
        ({"http_backends": {"a.*.b": "127.0.0.1:1"}}, "not a valid domain"),
        ({"http_backends": {"A.example": "127.0.0.1:1", "a.example.": "127.0.0.1:2"}}, "same domain as 'A.example'"),
        (
            {"https_backends": {"a.example": {"adress": "127.0.0.1:1"}}},
            "unknown key 'adress' (did you mean 'address'?)",
        ),
        (
            {"https_backends": {"a.example": {"address": "127.0.0.1:1", "proxy_protocol": "v3"}}},
            "proxy_protocol must be",
        ),
        ({"gateway": {"preamble_timeout": 0}}, "[gateway] preamble_timeout: must be a positive number"),
        ({"gateway": {"idle_timeout": "5"}}, "[gateway] idle_timeout: must be a positive number"),
        ({"gateway": {"max_preamble": True}}, "[gateway] max_preamble: must be a whole number"),
        ({"gateway": {"workers": 0}}, "[gateway] workers: must be a whole number from 1"),
        ({"gateway": {"log_format": "xml"}}, "[gateway] log_format: must be one of text, json"),
        ({"gateway": {"http_listen": "0.0.0.0:80"}}, "[gateway] http_listen: must be a list"),
        ({"gateway": {"https_listen": ["example.com:443"]}}, "is not an IP address"),
        ({"gateway": {"user": 5}}, "[gateway] user: must be a string"),
        ({"gateway": []}, "[gateway] must be a table"),
        ({"http_backends": []}, "[http_backends] must be a table"),
    ],
)
def test_errors_name_file_table_and_key(data, expected):
    errors = errors_of(data)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("servers.toml: ") for e in errors)


def test_every_error_is_reported_at_once():
    errors = errors_of({"gateway": {"idle_timeout": -1, "workers": "many"}, "http_backends": {"x": "nope"}})
    assert len(errors) == 3


def test_listen_accepts_ipv6_and_port_zero():
    s = validate({"gateway": {"http_listen": ["[::]:80", "127.0.0.1:0"], "https_listen": []}}).settings
    assert [str(a) for a in s.http_listen] == ["[::]:80", "127.0.0.1:0"]
    assert s.https_listen == ()


def test_listener_without_routes_warns():
    cfg = validate({"gateway": {"https_listen": []}, "http_backends": {}})
    assert any("http listener has no routes" in w for w in cfg.warnings)


def test_workers_auto():
    assert kiaconfig.resolve_workers("auto") >= 1
    assert kiaconfig.resolve_workers(3) == 3


def test_load_reports_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        kiaconfig.load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[http_backends\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        kiaconfig.load(str(bad))


# ---------------------------------------------------------------------------
# Unicode domain keys: converted to the A-labels clients send (IDNA 2008, UTS 46).


def test_unicode_keys_become_a_labels():
    cfg = validate(
        {
            "http_backends": {
                "Bücher.Example.": "127.0.0.1:1",
                "*.bücher.example": "127.0.0.1:2",
                "_acme.bücher.example": "127.0.0.1:3",  # an ASCII label IDNA would refuse stays as it is
            }
        }
    )
    table = cfg.http_routes
    assert table.lookup("xn--bcher-kva.example").address.port == 1
    assert table.lookup("www.xn--bcher-kva.example").address.port == 2
    assert table.lookup("_acme.xn--bcher-kva.example").address.port == 3
    assert [pattern for pattern, _ in table.rows()] == [
        "_acme.xn--bcher-kva.example",
        "xn--bcher-kva.example",
        "*.xn--bcher-kva.example",
    ]
    assert kiaconfig.unicode_form("*.xn--bcher-kva.example") == "*.bücher.example"
    assert kiaconfig.unicode_form("plain.example") is None
    assert kiaconfig.unicode_form("xn--zz.example") is None  # not valid punycode: nothing to show


def test_unicode_key_same_as_its_a_label_is_a_duplicate():
    errors = errors_of({"http_backends": {"xn--bcher-kva.example": "127.0.0.1:1", "bücher.example": "127.0.0.1:2"}})
    assert errors == ["servers.toml: [http_backends] 'bücher.example': same domain as 'xn--bcher-kva.example'"]


@pytest.mark.parametrize("key", ["☃.example", "bü cher.example", "*.☃.example", "ü" * 64 + ".example"])
def test_invalid_unicode_key_is_a_clear_error(key):
    errors = errors_of({"https_backends": {key: "127.0.0.1:1"}})
    assert len(errors) == 1
    assert errors[0].startswith(f"servers.toml: [https_backends] {key!r}: not a valid internationalized domain name (")
    assert "b'" not in errors[0]  # no bytes repr with '?' for every non-ASCII letter


def test_unicode_backend_host_name_is_resolved_as_its_a_label():
    backend = validate({"http_backends": {"a.example": "bücher.internal:80"}}).http_routes.lookup("a.example")
    assert backend.address.host == "xn--bcher-kva.internal"


def test_unicode_keys_route_a_client_sending_the_a_label(start_gateway, backends):
    """End to end: the client (like every client) sends the A-label in Host."""
    toml = f"""
[gateway]
http_listen = ["127.0.0.1:0"]
https_listen = []
[http_backends]
"bücher.example" = "{backends["alpha"].address}"
"*.bücher.example" = "{backends["beta"].address}"
"""
    gw = start_gateway(toml)
    for host, expected in (
        (b"xn--bcher-kva.example", b"alpha http xn--bcher-kva.example"),
        (b"WWW.xn--bcher-kva.example", b"beta http WWW.xn--bcher-kva.example"),
    ):
        answer = exchange(gw.http, b"GET /whoami HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(expected), answer


def test_log_connections_is_a_boolean_on_by_default():
    assert validate({}, "servers.toml").settings.log_connections is True
    assert validate({"gateway": {"log_connections": False}}, "servers.toml").settings.log_connections is False
    assert any(
        "[gateway] log_connections: must be true or false" in e
        for e in errors_of({"gateway": {"log_connections": "no"}})
    )


def test_pools_and_allow_lists():
    cfg = validate(
        {
            "http_backends": {
                "a.example": ["10.0.0.1:80", "[2001:db8::2]:80", "backend.internal:80"],
                "b.example": {"address": ["10.0.0.1:80"], "proxy_protocol": "v2", "allow": ["10.0.0.0/8", "::1"]},
                "c.example": {"address": "10.0.0.3:80", "allow": ["2001:db8::/32"]},
            }
        }
    )
    a, b, c = (cfg.http_routes.lookup(n) for n in ("a.example", "b.example", "c.example"))
    assert [str(x) for x in a.addresses] == ["10.0.0.1:80", "[2001:db8::2]:80", "backend.internal:80"]
    assert (str(a), a.address, a.allow) == ("10.0.0.1:80, [2001:db8::2]:80, backend.internal:80", a.addresses[0], None)
    assert (str(b), b.proxy_protocol, [str(n) for n in b.allow]) == ("10.0.0.1:80", "v2", ["10.0.0.0/8", "::1/128"])
    assert (len(c.addresses), [str(n) for n in c.allow]) == (1, ["2001:db8::/32"])
    s = validate({}).settings
    assert (s.backend_cooldown, s.max_connections_per_client) == (10.0, 0)  # a 0.2 config behaves as before
    s = validate({"gateway": {"backend_cooldown": 0, "max_connections_per_client": 20}}).settings
    assert (s.backend_cooldown, s.max_connections_per_client) == (0.0, 20)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "[http_backends] 'a.example': the address list is empty"),
        ({"address": []}, "[http_backends] 'a.example': the address list is empty"),
        (["10.0.0.1:80", "10.0.0.2"], "[http_backends] 'a.example' address[1]: '10.0.0.2' has no port"),
        (["10.0.0.1:80", 5], "[http_backends] 'a.example' address[1]: expected a string"),
        (["10.0.0.1:80", "Backend.Internal:80", "backend.internal.:80"], "address[2]: backend.internal:80 is already"),
        ({"address": "10.0.0.1:80", "allow": []}, "'a.example' allow: must be a non-empty list of networks"),
        ({"address": "10.0.0.1:80", "allow": "10.0.0.0/8"}, "'a.example' allow: must be a non-empty list"),
        ({"address": "10.0.0.1:80", "allow": ["10.0.0.0/8", 10]}, "'a.example' allow[1]: expected a string"),
        ({"address": "10.0.0.1:80", "allow": ["10.0.0.0/33"]}, "'a.example' allow[0]: '10.0.0.0/33' is not a network"),
        ({"address": "10.0.0.1:80", "allow": ["10.1.2.3/8"]}, "has host bits set (did you mean '10.0.0.0/8'?)"),
        ({"address": "10.0.0.1:80", "alow": ["10.0.0.0/8"]}, "unknown key 'alow' (did you mean 'allow'?)"),
    ],
)
def test_pool_and_allow_errors_name_the_key_and_index(value, expected):
    errors = errors_of({"http_backends": {"a.example": value}})
    assert any(e.startswith("servers.toml: ") and expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("key", "value"),
    [("backend_cooldown", -1), ("backend_cooldown", "10"), ("max_connections_per_client", -1)],
)
def test_traffic_settings_are_checked(key, value):
    assert any(f"servers.toml: [gateway] {key}: must be" in e for e in errors_of({"gateway": {key: value}}))


def test_http_strict_host_is_a_boolean_off_by_default():
    assert validate({}, "servers.toml").settings.http_strict_host is False
    assert validate({"gateway": {"http_strict_host": True}}, "servers.toml").settings.http_strict_host is True
    assert any(
        "[gateway] http_strict_host: must be true or false" in e
        for e in errors_of({"gateway": {"http_strict_host": 1}})
    )


ADMIN = {"address": "10.0.0.1:80", "allow": ["10.0.0.0/8"]}


@pytest.mark.parametrize(
    ("data", "strict", "warned"),
    [
        ({"http_backends": {"www.test": "10.0.0.1:80", "admin.test": ADMIN}}, True, False),  # left out: on
        ({"http_backends": {"*.admin.test": ADMIN}, "gateway": {"http_strict_host": True}}, True, False),
        ({"http_backends": {"*": ADMIN}, "gateway": {"http_strict_host": False}}, False, True),  # written: warned
        ({"backends": {"admin.test": ADMIN}}, True, False),  # v0.1.0's table applies to the http listener too
        ({"https_backends": {"admin.test": ADMIN}}, False, False),  # inside TLS there is no later Host to check
        ({"http_backends": {"www.test": "10.0.0.1:80"}}, False, False),  # no allow-list: 0.2's default
    ],
)
def test_an_http_allow_list_turns_strict_host_on_unless_false_is_written(data, strict, warned):
    """Issue 17 item 1: an allow-list is checked on every request only in strict mode."""
    cfg = validate(data, "servers.toml")
    assert cfg.settings.http_strict_host is strict
    assert any("http_strict_host = false" in w for w in cfg.warnings) is warned
    assert ("http_strict_host" in cfg.gateway_keys) is ("http_strict_host" in data.get("gateway", {}))


def test_the_warning_for_http_strict_host_false_names_the_allow_listed_routes():
    routes = {f"n{i}.test": ADMIN for i in range(8)} | {"www.test": "10.0.0.1:80", "*.admin.test": ADMIN}
    cfg = validate({"http_backends": routes, "gateway": {"http_strict_host": False}}, "servers.toml")
    (warning,) = [w for w in cfg.warnings if "http_strict_host" in w]
    assert warning.startswith(
        "servers.toml: [gateway] http_strict_host = false, yet [http_backends] "
        "'n0.test', 'n1.test', 'n2.test', 'n3.test', 'n4.test' and 4 more have allow-lists: "
    )
    assert "www.test" not in warning
    cfg = validate({"backends": {"admin.test": ADMIN}, "gateway": {"http_strict_host": False}}, "servers.toml")
    assert any("yet [backends] 'admin.test' has an allow-list: " in w for w in cfg.warnings)
