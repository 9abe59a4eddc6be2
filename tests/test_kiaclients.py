"""kiaclients.py is pure policy: addresses and networks in, answers out."""

from __future__ import annotations

import pytest

import kiaconfig
from kiaclients import Clients, client_address, client_key, in_networks
from kiaconfig import validate
from kiaerrors import ClientLimit


@pytest.mark.parametrize(
    ("client", "networks", "expected"),
    [
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.1.2.3", ["10.0.0.0/8"], False),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),  # an IPv4 client of a dual-stack listener
        ("::ffff:11.1.2.3", ["10.0.0.0/8"], False),
        ("::ffff:10.1.2.3", ["::ffff:0:0/96"], True),  # a mapped network is its IPv4 network: 0.0.0.0/0
        ("::ffff:10.1.2.3", ["::ffff:10.0.0.0/104"], True),
        ("10.1.2.3", ["::ffff:10.0.0.0/104"], True),
        ("11.1.2.3", ["::ffff:10.0.0.0/104"], False),
        ("10.1.2.3", ["::/0"], False),  # an IPv4 client matches IPv4 networks only, on any listener
        ("::ffff:10.1.2.3", ["::/0"], False),
        ("2001:db8::1", ["10.0.0.0/8", "2001:db8::/32"], True),
        ("2001:db9::1", ["10.0.0.0/8", "2001:db8::/32"], False),
        ("fe80::1%eth0", ["fe80::/10"], True),  # a link-local client's scope is not part of its address
        ("10.1.2.3", ["2001:db8::/32"], False),
    ],
)
def test_in_networks(client, networks, expected):
    """The path of a connection: the config's networks, the client address made final, then the match."""
    allow = kiaconfig.validate({"http_backends": {"a.test": {"address": "127.0.0.1:1", "allow": networks}}})
    masks = allow.http_routes.lookup("a.test").allow_masks
    assert in_networks(client_address((client, 1))[0], masks) is expected


def test_mapped_networks_are_their_ipv4_networks_in_the_config():
    cfg = kiaconfig.validate(
        {
            "gateway": {"trusted_proxies": ["::ffff:10.0.0.0/104", "::ffff:192.0.2.1", "::fffe:0:0/95", "::/0"]},
            "http_backends": {"a.test": {"address": "127.0.0.1:1", "allow": ["::ffff:0:0/96", "2001:db8::/32"]}},
        }
    )
    assert [str(n) for n in cfg.settings.trusted_proxies] == ["10.0.0.0/8", "192.0.2.1/32", "::fffe:0:0/95", "::/0"]
    assert [str(n) for n in cfg.http_routes.lookup("a.test").allow] == ["0.0.0.0/0", "2001:db8::/32"]


@pytest.mark.parametrize(
    ("address", "final"),
    [
        (("::ffff:192.0.2.1", 5, 0, 0), ("192.0.2.1", 5)),  # a dual-stack socket's IPv4 peer
        (("::ffff:c000:201", 5), ("192.0.2.1", 5)),  # as ipaddress writes it (a PROXY v2 header)
        (("192.0.2.1", 5), ("192.0.2.1", 5)),
        (("::ffff:1:2:3", 5, 0, 0), ("::ffff:1:2:3", 5, 0, 0)),  # ffff in the wrong place: not mapped
        (("2001:db8::1", 5, 0, 0), ("2001:db8::1", 5, 0, 0)),
        (("fe80::1%eth0", 5, 0, 2), ("fe80::1%eth0", 5, 0, 2)),
    ],
)
def test_client_address_makes_a_mapped_address_its_ipv4_address(address, final):
    assert client_address(address) == final


def test_client_key_counts_an_ipv4_client_once_on_any_listener():
    final = client_address(("::ffff:192.0.2.1", 1, 0, 0))[0]
    assert client_key(final) == client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("::ffff:1") == "::/64"  # not a mapped IPv4 address


def test_client_key_counts_an_ipv6_client_by_its_64():
    """One IPv6 host is given a whole /64: keyed by full address, it would have no limit at all."""
    key = client_key
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert key("2001:DB8:0:0:0:0:0:1") == "2001:db8::/64"  # the same address however it is written
    assert key("fe80::1%eth0") == key("fe80::2") == "fe80::/64"


def test_trusted_proxies_are_matched_as_allow_lists_are():
    clients = Clients(validate({"gateway": {"trusted_proxies": ["10.0.0.0/8", "fe80::/10"]}}).settings)
    assert clients.is_trusted("10.1.2.3")
    assert clients.is_trusted(client_address(("::ffff:10.1.2.3", 1, 0, 0))[0])  # a dual-stack socket's IPv4 peer
    assert clients.is_trusted("fe80::1%eth0")
    assert not clients.is_trusted("11.0.0.1")
    assert not clients.is_trusted("2001:db8::1")
    assert not Clients(validate({}).settings).is_trusted("10.1.2.3")  # no list: nobody


def test_the_per_client_count_is_given_back_and_forgotten():
    clients = Clients(validate({"gateway": {"max_connections_per_client": 2}}).settings)
    first = clients.admit("192.0.2.1")
    second = clients.admit(client_address(("::ffff:192.0.2.1", 1, 0, 0))[0])  # one client, two listeners
    assert first == second == "192.0.2.1"
    with pytest.raises(ClientLimit):
        clients.admit("192.0.2.1")
    assert clients.admit("192.0.2.2") == "192.0.2.2"  # another client has its own count
    clients.release(first)
    assert clients.admit("192.0.2.1") == "192.0.2.1"
    for key in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        clients.release(key)
    assert clients._open == {}  # a client with nothing open leaves the table
    assert Clients(validate({}).settings).admit("192.0.2.1") is None  # no limit: nothing counted


def test_one_refusal_per_client_lingers_at_a_time():
    clients = Clients(validate({}).settings)
    assert clients.may_linger("192.0.2.1")
    assert not clients.may_linger("192.0.2.1")
    assert clients.may_linger("192.0.2.2")
    clients.lingered("192.0.2.1")
    assert clients.may_linger("192.0.2.1")
