"""The command line for scripts: ``--check --json`` and ``--route NAME`` (DESIGN.md, "Command line for scripts").

Most cases run main() in this process for speed; one of each goes through the installed script.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from conftest import TIMEOUT, gateway_command

import kiacli
import kiaconfig

# Never bound: --check and --route open no socket. Backend addresses need not exist either.
TABLE = """
[gateway]
http_listen = ["127.0.0.1:8080"]
https_listen = ["127.0.0.1:8443", "[::1]:8443"]
idle_timeout = 60

[http_backends]
"a.example" = "127.0.0.1:8081"
"*.example.org" = "127.0.0.1:8082"
"*.deep.example.org" = "127.0.0.1:8083"
"bücher.example" = "127.0.0.1:8084"
"pool.example" = ["127.0.0.1:8085", "backend.internal:8085", "[::1]:8085"]
"admin.example" = { address = "127.0.0.1:8081", allow = ["10.0.0.0/8", "2001:DB8::/32", "192.0.2.7"] }
"*.pool.example" = { address = ["127.0.0.1:8086", "127.0.0.1:8087"], allow = ["192.168.0.0/16"] }

[https_backends]
"a.example" = { address = "backend.internal:443", proxy_protocol = "v2" }
"*.example.org" = "[::1]:8443"
"*" = { address = ["127.0.0.1:8999", "127.0.0.1:8998"], allow = ["127.0.0.0/8", "::1"], proxy_protocol = "v1" }
"""
DEFAULT = TABLE.splitlines()[-1]  # the https default route: a pool with an allow-list
DEFAULT_ROUTE = {
    "addresses": ["127.0.0.1:8999", "127.0.0.1:8998"],
    "proxy_protocol": "v1",
    "allow": ["127.0.0.0/8", "::1/128"],
    "unicode": None,
    "quic_addresses": None,
}


def route(*addresses: str, proxy_protocol: str | None = None, allow: list | None = None, unicode=None) -> dict:
    return {
        "addresses": list(addresses),
        "proxy_protocol": proxy_protocol,
        "allow": allow,
        "unicode": unicode,
        "quic_addresses": None,
    }


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(TABLE)
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*gateway_command(), *args], capture_output=True, text=True, timeout=TIMEOUT * 2, cwd=cwd)


def main(capfd, *args: str) -> tuple[int, str, str]:
    status = kiacli.main(list(args))
    out = capfd.readouterr()
    return status, out.out, out.err


# --- --check --json ----------------------------------------------------------


def test_check_json_through_the_installed_script_is_the_file(table):
    out = run(
        "--check", "--json", "--http-listen=[::1]:9080", "--http-listen=127.0.0.1:9080", "s.toml", cwd=table.parent
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and doc["source"] == "s.toml"
    assert doc["http_backends"] == {
        "a.example": route("127.0.0.1:8081"),
        "admin.example": route("127.0.0.1:8081", allow=["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]),
        "pool.example": route("127.0.0.1:8085", "backend.internal:8085", "[::1]:8085"),
        "xn--bcher-kva.example": route("127.0.0.1:8084", unicode="bücher.example"),
        "*.deep.example.org": route("127.0.0.1:8083"),
        "*.example.org": route("127.0.0.1:8082"),
        "*.pool.example": route("127.0.0.1:8086", "127.0.0.1:8087", allow=["192.168.0.0/16"]),
    }
    assert doc["https_backends"] == {
        "a.example": route("backend.internal:443", proxy_protocol="v2"),
        "*.example.org": route("[::1]:8443"),
        "*": DEFAULT_ROUTE,
    }
    gateway = doc["gateway"]
    assert set(gateway) == {f.name for f in dataclasses.fields(kiaconfig.Settings)}  # every setting
    assert gateway["http_listen"] == ["[::1]:9080", "127.0.0.1:9080"]  # the command line's, over the file's
    assert gateway["https_listen"] == ["127.0.0.1:8443", "[::1]:8443"]
    assert gateway["idle_timeout"] == 60.0 and gateway["connect_timeout"] == 3.0
    assert (gateway["workers"], gateway["user"], gateway["log_format"]) == (1, "", "text")
    assert gateway["http_strict_host"] is True  # turned on by the http allow-lists, the file leaving it out
    assert out.stderr == ""


def test_check_json_settings_are_the_effective_ones(capfd, table):
    status, out, err = main(capfd, "--check", "--json", "--workers=auto", "--log-format=json", str(table))
    assert status == 0, err
    gateway = json.loads(out)["gateway"]
    assert (gateway["workers"], gateway["log_format"], gateway["http_listen"]) == ("auto", "json", ["127.0.0.1:8080"])


def test_check_json_keeps_warnings_off_stdout(capfd, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[gateway]\nhttp_listen = ["127.0.0.1:8080"]\n[backends]\n"a.example" = "127.0.0.1:1"\n')
    status, out, err = main(capfd, "--check", "--json", str(cfg))
    assert status == 0
    doc = json.loads(out)  # the whole of stdout is the one document
    assert doc["http_backends"] == doc["https_backends"] == {"a.example": route("127.0.0.1:1")}
    assert "[backends] is deprecated" in err


def test_check_json_bad_config_exits_1_with_an_error_object(table):
    table.write_text('[http_backends]\n"a.example" = "127.0.0.1"\n[gateway]\nidle_timout = 3\n')
    out = run("--check", "--json", "s.toml", cwd=table.parent)
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and set(doc) == {"ok", "errors"}
    assert any(e.startswith("s.toml: [http_backends] 'a.example'") for e in doc["errors"])
    assert any("did you mean 'idle_timeout'" in e for e in doc["errors"])
    assert all(e in out.stderr for e in doc["errors"])  # the log has them too, as without --json


def test_check_json_start_up_refusal_is_an_error_object(capfd, table):
    status, out, _ = main(capfd, "--check", "--json", "--user=no-such-user-here", str(table))
    assert status == 1
    assert json.loads(out) == {"ok": False, "errors": ["command line: --user: no such user 'no-such-user-here'"]}


def test_json_without_check_or_route_is_bad_usage(capfd, table):
    status, out, err = main(capfd, "--json", str(table))
    assert status == 2 and out == ""
    assert err.startswith("kiagateway: --json goes with --check or --route (see kiagateway --help)\n")


# --- --route NAME -----------------------------------------------------------


def test_route_through_the_installed_script(table):
    out = run("--route", "WWW.Example.ORG.", "s.toml", cwd=table.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "www.example.org\n"
        "  http   ->  127.0.0.1:8082  (wildcard *.example.org)\n"
        "  https  ->  [::1]:8443  (wildcard *.example.org)\n"
    )


def test_route_no_route_on_either_listener_exits_1(table):
    table.write_text(TABLE.replace(DEFAULT, ""))
    out = run("--route=nowhere.example", "s.toml", cwd=table.parent)
    assert out.returncode == 1
    assert out.stdout == "nowhere.example\n  http   no route\n  https  no route\n"


def route_json(capfd, *args: str) -> tuple[int, dict]:
    status, out, err = main(capfd, "--json", *args)
    assert err == ""
    return status, json.loads(out)


@pytest.mark.parametrize(
    ("name", "http", "https"),
    [
        (
            "a.example",
            {"match": "exact", "pattern": "a.example", **route("127.0.0.1:8081")},
            {"match": "exact", "pattern": "a.example", **route("backend.internal:443", proxy_protocol="v2")},
        ),
        (
            "x.deep.example.org",  # the longest suffix wins
            {"match": "wildcard", "pattern": "*.deep.example.org", **route("127.0.0.1:8083")},
            {"match": "wildcard", "pattern": "*.example.org", **route("[::1]:8443")},
        ),
        (
            "deep.example.org",  # "*.deep.example.org" is not "deep.example.org" itself
            {"match": "wildcard", "pattern": "*.example.org", **route("127.0.0.1:8082")},
            {"match": "wildcard", "pattern": "*.example.org", **route("[::1]:8443")},
        ),
        (
            "x.pool.example",  # a wildcard route with a pool and an allow-list
            {
                "match": "wildcard",
                "pattern": "*.pool.example",
                **route("127.0.0.1:8086", "127.0.0.1:8087", allow=["192.168.0.0/16"]),
            },
            {"match": "default", "pattern": "*", **DEFAULT_ROUTE},
        ),
        (
            "pool.example",
            {
                "match": "exact",
                "pattern": "pool.example",
                **route("127.0.0.1:8085", "backend.internal:8085", "[::1]:8085"),
            },
            {"match": "default", "pattern": "*", **DEFAULT_ROUTE},
        ),
        (
            "example.org",
            {
                "match": "none",
                "pattern": None,
                "addresses": [],
                "proxy_protocol": None,
                "allow": None,
                "unicode": None,
                "quic_addresses": None,
            },
            {"match": "default", "pattern": "*", **DEFAULT_ROUTE},
        ),
    ],
)
def test_route_json_says_how_each_listener_matched(capfd, table, name, http, https):
    status, doc = route_json(capfd, f"--route={name}", str(table))
    assert status == 0
    assert doc == {
        "ok": True,
        "source": str(table),
        "name": name,
        "unicode": None,
        "routed": True,
        "http": http,
        "https": https,
    }


def text_parts(tail: str) -> tuple[list[str], list[str] | None]:
    """The addresses and the allow-list of a text line's ``addr, addr  (note; note)``, read as people read it."""
    addresses, _, notes = tail.partition("  (")
    allow = None
    for note in notes.removesuffix(")").split("; "):
        if note.startswith("allow "):
            allow = note.removeprefix("allow ").split(", ")
    return addresses.split(", "), allow


def test_text_and_json_list_the_same_addresses_and_networks_for_every_route(capfd, table):
    """--check, --check --json, --route and --route --json agree on every route: pools, allow-lists,
    wildcards and a default (issue 17: the JSON showed a pool's first address and never an allow-list)."""
    _, text, _ = main(capfd, "--check", str(table))
    _, out, _ = main(capfd, "--check", "--json", str(table))
    doc = json.loads(out)
    from_json = {
        (listener, pattern): (entry["addresses"], entry["allow"])
        for listener in ("http", "https")
        for pattern, entry in doc[f"{listener}_backends"].items()
    }
    from_text = {}
    listener = None
    for line in text.splitlines():
        if line.startswith(("http listener:", "https listener:")):
            listener = line.split()[0]
        elif "  ->  " in line:
            pattern, _, tail = line.strip().partition("  ->  ")
            from_text[(listener, pattern.split()[0])] = text_parts(tail)  # "xn--... (bücher.example)"
    assert from_text == from_json
    assert {"*.pool.example", "*"} <= {p for (_, p), (a, allow) in from_json.items() if len(a) > 1 and allow}
    for (listener, pattern), (addresses, allow) in from_json.items():
        name = f"probe{pattern[1:]}" if pattern.startswith("*.") else "nothing.invalid" if pattern == "*" else pattern
        _, out, _ = main(capfd, "--route", name, "--json", str(table))
        entry = json.loads(out)[listener]
        assert (entry["pattern"], entry["addresses"], entry["allow"]) == (pattern, addresses, allow)
        _, out, _ = main(capfd, "--route", name, str(table))
        line = next(line for line in out.splitlines() if line.split()[0] == listener)
        assert text_parts(line.partition("  ->  ")[2]) == (addresses, allow), line


def test_route_text_per_listener_differences(capfd, table):
    status, out, _ = main(capfd, "--route", "a.example", str(table))
    assert status == 0
    assert out == (
        "a.example\n"
        "  http   ->  127.0.0.1:8081  (exact a.example)\n"
        "  https  ->  backend.internal:443  (exact a.example; proxy_protocol v2)\n"
    )
    status, out, _ = main(capfd, "--route", "example.org", str(table))
    assert status == 0
    assert out == (
        "example.org\n"
        "  http   no route\n"
        "  https  ->  127.0.0.1:8999, 127.0.0.1:8998"
        "  (default *; pool of 2, round-robin; proxy_protocol v1; allow 127.0.0.0/8, ::1/128)\n"
    )


def test_route_unicode_name_is_looked_up_by_its_a_label(capfd, table):
    status, out, _ = main(capfd, "--route=BÜCHER.example", str(table))
    assert status == 0
    assert out.splitlines()[:2] == [
        "xn--bcher-kva.example (bücher.example)",
        "  http   ->  127.0.0.1:8084  (exact xn--bcher-kva.example)",
    ]
    status, doc = route_json(capfd, "--route=xn--bcher-kva.example", str(table))
    assert (doc["name"], doc["unicode"], doc["http"]["unicode"]) == (
        "xn--bcher-kva.example",
        "bücher.example",
        "bücher.example",
    )


def test_route_listener_without_a_listen_address_routes_nothing(capfd, table):
    table.write_text(TABLE.replace('https_listen = ["127.0.0.1:8443", "[::1]:8443"]', "https_listen = []"))
    status, out, _ = main(capfd, "--route=example.org", str(table))
    assert status == 1
    assert out == "example.org\n  http   no route\n  https  off (no listen address)\n"
    status, doc = route_json(capfd, "--route=example.org", "--https-listen=127.0.0.1:9443", str(table))
    assert status == 0 and doc["https"]["match"] == "default"


def test_route_json_no_route_exits_1(capfd, table):
    status, doc = route_json(capfd, "--route=nowhere.test", "--https-listen=127.0.0.1:0", str(table))
    assert status == 0 and doc["https"]["match"] == "default"  # the default route catches it
    table.write_text(TABLE.replace(DEFAULT, ""))
    status, doc = route_json(capfd, "--route=nowhere.test", str(table))
    assert status == 1
    assert (doc["ok"], doc["routed"], doc["http"]["match"], doc["https"]["match"]) == (True, False, "none", "none")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a..example", "empty label"),
        ("*.example.org", "invalid character"),
        ("a.example:80", "invalid character"),
        ("", "empty name"),
        ("-a.example", "label starts or ends with '-'"),
    ],
)
def test_route_name_that_is_not_a_domain_is_bad_usage(capfd, table, name, why):
    status, out, err = main(capfd, f"--route={name}", "--json", str(table))
    assert status == 2 and out == ""
    first = err.splitlines()[0]
    assert first.startswith(f"kiagateway: --route: {name!r} is not a valid domain (") and why in first


def test_route_bad_config_exits_1(capfd, table):
    table.write_text('[http_backends]\n"a.example" = "127.0.0.1"\n')
    status, out, err = main(capfd, "--route=a.example", "--json", str(table))
    assert status == 1
    doc = json.loads(out)
    assert doc["ok"] is False and "s.toml: [http_backends] 'a.example'" in doc["errors"][0]
    status, out, err = main(capfd, "--route=a.example", str(table))
    assert status == 1 and out == "" and "s.toml: [http_backends] 'a.example'" in err


def test_route_match_agrees_with_lookup(table):
    """--route explains the lookup the data path does: the same backend for every name."""
    cfg = kiaconfig.load(str(table))
    names = ["a.example", "b.a.example", "example.org", "x.example.org", "deep.example.org", "x.deep.example.org"]
    for routes in (cfg.http_routes, cfg.https_routes):
        for name in names:
            found = routes.match(name)
            assert (found[1] if found else None) is routes.lookup(name), name


@pytest.mark.parametrize("args", [("--check", "--json"), ("--check",), ("--route=a.example", "--json")])
def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path, args):
    """``kiagateway --check --json | head -1``: the closed pipe ends the answer quietly, exit 1."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        "[gateway]\nhttps_listen = []\n[http_backends]\n"
        + "".join(f'"n{i}.example" = "127.0.0.1:{i + 1}"\n' for i in range(2000))
    )
    proc = subprocess.Popen(
        [*gateway_command(), *args, "s.toml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # no reader left: the first write fails with EPIPE
    _, err = proc.communicate(timeout=TIMEOUT * 2)
    assert (proc.returncode, err) == (1, b"")


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_to_a_reader_that_leaves_early_get_no_traceback(option):
    """``kiagateway --help | head -1``: as for --check, the closed pipe ends the answer quietly, exit 1."""
    proc = subprocess.Popen([*gateway_command(), option], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader left: the first write fails with EPIPE
    _, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, err.decode()) == (1, "")
