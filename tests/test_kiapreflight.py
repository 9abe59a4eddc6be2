"""kiapreflight.py: what start-up refuses beyond the file's syntax (listeners that overlap, the user, file modes)."""

from __future__ import annotations

import pytest

import kiaconfig
from kiaconfig import validate
from kiapreflight import check_serving, may_access


def serving_errors(gateway: dict, source: str = "servers.toml") -> list[str]:
    return check_serving(validate({"gateway": gateway}, source))


@pytest.mark.parametrize(
    ("http", "https", "expected"),
    [
        (["0.0.0.0:8080", "0.0.0.0:8080"], [], "[gateway] http_listen: 0.0.0.0:8080 is listed twice"),
        (
            ["0.0.0.0:8080", "127.0.0.1:8080"],
            [],
            "[gateway] http_listen: 127.0.0.1:8080 overlaps 0.0.0.0:8080 of [gateway] http_listen",
        ),
        (
            ["127.0.0.1:8080"],
            ["0.0.0.0:8080"],
            "[gateway] https_listen: 0.0.0.0:8080 overlaps 127.0.0.1:8080 of [gateway] http_listen",
        ),
        (["0.0.0.0:80"], ["0.0.0.0:80"], "[gateway] https_listen: 0.0.0.0:80 overlaps 0.0.0.0:80 of [gateway] http"),
        (["[::]:80", "[::1]:80"], [], "[gateway] http_listen: [::1]:80 overlaps [::]:80 of [gateway] http_listen"),
    ],
)
def test_overlapping_listeners_are_refused(http, https, expected):
    errors = serving_errors({"http_listen": http, "https_listen": https})
    assert len(errors) == 1 and errors[0].startswith("servers.toml: ") and expected in errors[0], errors


@pytest.mark.parametrize(
    ("http", "https"),
    [
        (["[::]:80", "0.0.0.0:80"], ["[::]:443", "0.0.0.0:443"]),  # IPv6 listeners are bound IPV6_V6ONLY
        (["127.0.0.1:0", "127.0.0.1:0"], ["127.0.0.1:0"]),  # port 0: a free port each
        (["127.0.0.1:80", "127.0.0.2:80"], ["[::1]:80"]),
    ],
)
def test_listeners_that_do_not_overlap(http, https):
    assert serving_errors({"http_listen": http, "https_listen": https}) == []


def test_no_listeners_at_all_is_refused():
    errors = serving_errors({"http_listen": [], "https_listen": []})
    assert errors == [
        "servers.toml: [gateway] http_listen and https_listen are both empty: nothing to listen on"
        " (only a gateway started by systemd socket activation, which passes the sockets, may leave them so)"
    ]
    cfg = validate({"gateway": {"http_listen": [], "https_listen": []}})
    assert check_serving(cfg, sockets_given=True) == []  # systemd passes them: the lists are ignored


def test_command_line_values_are_named_as_options():
    cfg = validate({"gateway": {"user": "no-such-user-here", "http_listen": ["127.0.0.1:81"]}}, "s.toml")
    assert check_serving(cfg) == ["s.toml: [gateway] user: no such user 'no-such-user-here'"]
    twice = (kiaconfig.parse_address("127.0.0.1:82", listen=True),) * 2
    cfg = kiaconfig.override(cfg, {"user": "no-such-user-either", "https_listen": twice})
    assert check_serving(cfg) == [
        "command line: --https-listen: 127.0.0.1:82 is listed twice",
        "command line: --user: no such user 'no-such-user-either'",
    ]


R, X = 4, 1  # the permission bits asked for: read a file, search a directory


@pytest.mark.parametrize(
    ("mode", "owner", "group", "uid", "gids", "want", "allowed"),
    [
        (0o600, 0, 0, 65534, {65534}, R, False),  # root's own file
        (0o640, 0, 65534, 65534, {65534}, R, True),  # through the group
        (0o604, 0, 0, 65534, {65534}, R, True),  # through "other"
        (0o064, 65534, 65534, 65534, {65534}, R, False),  # the owner gets the owner bits only
        (0o604, 0, 65534, 65534, {65534}, R, False),  # the group gets the group bits only
        (0o000, 1, 1, 0, {0}, R, True),  # root reads anything
        (0o700, 0, 0, 65534, {65534}, X, False),  # a directory it cannot search
        (0o711, 0, 0, 65534, {65534}, X, True),
    ],
)
def test_may_access_computes_for_another_user(mode, owner, group, uid, gids, want, allowed):
    assert may_access(mode, owner, group, uid, frozenset(gids), want) is allowed
