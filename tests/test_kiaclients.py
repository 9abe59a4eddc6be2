"""kiaclients.py is pure policy: addresses and networks in, answers out."""

from __future__ import annotations

import ipaddress

import pytest

import kiaconfig
from kiaclients import Clients, client_key, in_networks
from kiaconfig import validate
from kiaerrors import ClientLimit


@pytest.mark.parametrize(
    ("client", "networks", "expected"),
    [
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.1.2.3", ["10.0.0.0/8"], False),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),  # an IPv4 client of a dual-stack listener
        ("::ffff:11.1.2.3", ["10.0.0.0/8"], False),
        ("::ffff:10.1.2.3", ["::ffff:0:0/96"], True),
        ("2001:db8::1", ["10.0.0.0/8", "2001:db8::/32"], True),
        ("2001:db9::1", ["10.0.0.0/8", "2001:db8::/32"], False),
        ("fe80::1%eth0", ["fe80::/10"], True),  # a link-local client's scope is not part of its address
        ("10.1.2.3", ["2001:db8::/32"], False),
    ],
)
def test_in_networks(client, networks, expected):
    masks = kiaconfig.network_masks(tuple(ipaddress.ip_network(n) for n in networks))
    assert in_networks(client, masks) is expected


def test_client_key_counts_an_ipv4_client_once_on_any_listener():
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"
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
    assert clients.is_trusted("::ffff:10.1.2.3")  # a dual-stack socket's IPv4 peer
    assert clients.is_trusted("fe80::1%eth0")
    assert not clients.is_trusted("11.0.0.1")
    assert not clients.is_trusted("2001:db8::1")
    assert not Clients(validate({}).settings).is_trusted("10.1.2.3")  # no list: nobody


def test_the_per_client_count_is_given_back_and_forgotten():
    clients = Clients(validate({"gateway": {"max_connections_per_client": 2}}).settings)
    first, second = clients.admit("192.0.2.1"), clients.admit("::ffff:192.0.2.1")  # one client, two listeners
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
    assert not clients.may_linger("::ffff:192.0.2.1")
    assert clients.may_linger("192.0.2.2")
    clients.lingered("192.0.2.1")
    assert clients.may_linger("192.0.2.1")
