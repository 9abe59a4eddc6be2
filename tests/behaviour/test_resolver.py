"""Backend names under a slow resolver: one slow name must not starve the lookups of every other route.

The resolver is a getaddrinfo() preloaded into the gateway: names under
``.slow.test`` take SLOW_SECONDS and find nothing, names under ``.none.test``
find nothing at once, both without a packet sent; every other name goes to
the C library's own getaddrinfo (here only ``localhost``, from /etc/hosts).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import pytest
from conftest import TIMEOUT, exchange, read_all, routes_toml

SLOW_SECONDS = 5  # far beyond connect_timeout, so lookups still hold their threads when the fast request comes
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <string.h>
#include <unistd.h>

typedef int lookup(const char *, const char *, const struct addrinfo *, struct addrinfo **);
static const char SLOW[] = ".slow.test", NONE[] = ".none.test";

static int under(const char *node, const char *suffix, size_t s) {
    size_t n = node ? strlen(node) : 0;
    return n > s && strcmp(node + n - s, suffix) == 0;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    static lookup *real;
    if (under(node, SLOW, sizeof SLOW - 1)) {
        sleep(SLOW_SECONDS);
        return EAI_NONAME;
    }
    if (under(node, NONE, sizeof NONE - 1))
        return EAI_NONAME;
    if (!real)
        real = (lookup *)dlsym(RTLD_NEXT, "getaddrinfo");
    return real(node, service, hints, res);
}
""".replace("SLOW_SECONDS", str(SLOW_SECONDS))


@pytest.fixture(scope="module")
def slow_resolver(tmp_path_factory) -> str:
    """Path of the preloadable shim, or skip where no C compiler is at hand."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the getaddrinfo shim")
    workdir = tmp_path_factory.mktemp("shim")
    (workdir / "slow.c").write_text(SHIM)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(workdir / "slow.so"), str(workdir / "slow.c"), "-ldl"],
        check=True,
        timeout=60,
    )
    return str(workdir / "slow.so")


def test_a_slow_name_does_not_starve_the_lookups_of_other_routes(start_gateway, backends, slow_resolver):
    toml = routes_toml(backends, extra_gateway="connect_timeout = 0.5").replace(
        "[http_backends]",
        '[http_backends]\n"slow.example" = "backend.slow.test:80"\n'
        f'"named.example" = "localhost:{backends["beta"].port}"',
    )
    gw = start_gateway(toml, env={"LD_PRELOAD": slow_resolver})
    answers: list[bytes] = []

    def slow_client() -> None:
        answers.append(exchange(gw.http, b"GET / HTTP/1.1\r\nHost: slow.example\r\n\r\n"))

    clients = [threading.Thread(target=slow_client, daemon=True) for _ in range(16)]  # more than the 10 threads
    for client in clients:
        client.start()
    for client in clients:
        client.join(TIMEOUT)
    assert len(answers) == 16 and all(a.startswith(b"HTTP/1.1 504") for a in answers), answers
    # The slow lookups still run: a name from /etc/hosts must resolve meanwhile.
    with socket.create_connection(gw.http, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: named.example\r\nConnection: close\r\n\r\n")
        response = read_all(sock)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"beta http named.example"), response


def test_an_unresolvable_name_is_a_502_that_names_nothing_inside(start_gateway, backends, slow_resolver):
    toml = routes_toml(backends).replace(
        "[http_backends]", '[http_backends]\n"gone.example" = "billing-db.none.test:5432"'
    )
    gw = start_gateway(toml, env={"LD_PRELOAD": slow_resolver})
    response = exchange(gw.http, b"GET / HTTP/1.1\r\nHost: gone.example\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 502 ")
    for inside in (b"billing", b"none.test", b"5432", b"resolve", b"known"):
        assert inside not in response
    line = gw.connection_log(domain="gone.example")
    assert line["outcome"] == "backend_unreachable"
    assert line["reason"].startswith("cannot resolve billing-db.none.test for gone.example")
