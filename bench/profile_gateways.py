"""The gateways conn_profile.py compares: each one's config, command and version, written here.

Every gateway listens on 127.0.0.1 with one worker (one process, one thread
doing the work), routes DOMAIN by the Host header on its HTTP port and by the
SNI on its TLS port to the two backends, and is configured as a user would
write it, logging as shipped: kiagateway with its own TOML (log_connections
on, to a file); HAProxy in mode tcp with an inspect-delay; sniproxy with a
table per listener; nginx's stream module with ssl_preread, TLS only (stream
cannot route plain HTTP by Host). The peers log no line per connection unless
told to, and are not told here.

This module writes files and builds command lines; it starts nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "profile.example"
PEERS = ("haproxy", "sniproxy", "nginx")
NGINX_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/local/nginx/modules")


@dataclass
class Gateway:
    """One gateway to profile: how to start it and which port serves each mode."""

    name: str
    argv: list[str]
    ports: dict[str, int]  # mode ("http" or "tls") -> listening port
    version: str
    log: Path
    extra: dict = field(default_factory=dict)


def output(argv: list[str]) -> str:
    """What a command prints, stdout then stderr ('' when it cannot run)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + "\n" + done.stderr


def first_line(argv: list[str]) -> str:
    """The first non-empty line a command prints, or '?'."""
    return next((line.strip() for line in output(argv).splitlines() if line.strip()), "?")


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None when it can."""
    if shutil.which(peer) is None:
        return f"{peer} is not installed"
    if peer == "nginx" and nginx_stream_module() is None:
        built_in = re.search(r"--with-stream(\s|$)", output(["nginx", "-V"]))
        if not built_in:
            return "nginx has no stream module (Debian: libnginx-mod-stream)"
    return None


def nginx_stream_module() -> str | None:
    for directory in NGINX_MODULE_DIRS:
        path = os.path.join(directory, "ngx_stream_module.so")
        if os.path.exists(path):
            return path
    return None


def ours(label: str, template: str, workdir: Path, ports: dict[str, int], backends: dict[str, int]) -> Gateway:
    """kiagateway run by ``template`` (``{config}`` stands for its TOML), 1 worker, logging as shipped."""
    config = workdir / f"{label}.toml"
    config.write_text(
        "[gateway]\n"
        f'http_listen = ["127.0.0.1:{ports["http"]}"]\n'
        f'https_listen = ["127.0.0.1:{ports["tls"]}"]\n'
        "workers = 1\n"
        f'[http_backends]\n"{DOMAIN}" = "127.0.0.1:{backends["http"]}"\n'
        f'[https_backends]\n"{DOMAIN}" = "127.0.0.1:{backends["tls"]}"\n'
    )
    argv = [part.replace("{config}", str(config)) for part in shlex.split(template)]
    version = first_line([part.replace("{config}", "--version") for part in shlex.split(template)])
    return Gateway(label, argv, dict(ports), version, workdir / f"{label}.log", {"template": template})


def haproxy(workdir: Path, ports: dict[str, int], backends: dict[str, int]) -> Gateway:
    """HAProxy, mode tcp, one thread: Host by req.hdr(host), SNI by req.ssl_sni, after an inspect-delay."""
    config = workdir / "haproxy.cfg"
    config.write_text(f"""global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend http_in
    bind 127.0.0.1:{ports["http"]}
    tcp-request inspect-delay 5s
    tcp-request content accept if HTTP
    use_backend http_out if {{ req.hdr(host),field(1,:),lower -m str {DOMAIN} }}
frontend tls_in
    bind 127.0.0.1:{ports["tls"]}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend tls_out if {{ req.ssl_sni,lower -m str {DOMAIN} }}
backend http_out
    server http1 127.0.0.1:{backends["http"]}
backend tls_out
    server tls1 127.0.0.1:{backends["tls"]}
""")
    version = first_line(["haproxy", "-v"])
    match = re.search(r"version (\S+)", version)
    return Gateway(
        "haproxy",
        ["haproxy", "-db", "-f", str(config)],
        dict(ports),
        f"HAProxy {match.group(1) if match else version}",
        workdir / "haproxy.log",
    )


def sniproxy(workdir: Path, ports: dict[str, int], backends: dict[str, int]) -> Gateway:
    """sniproxy (one process): a table per listener, the pattern a regular expression of the name."""
    pattern = "^" + re.escape(DOMAIN) + "$"
    config = workdir / "sniproxy.conf"
    config.write_text(f"""pidfile {workdir}/sniproxy.pid
error_log {{
    filename {workdir}/sniproxy-error.log
    priority notice
}}
listener 127.0.0.1:{ports["http"]} {{
    protocol http
    table http_routes
}}
listener 127.0.0.1:{ports["tls"]} {{
    protocol tls
    table tls_routes
}}
table http_routes {{
    {pattern} 127.0.0.1:{backends["http"]}
}}
table tls_routes {{
    {pattern} 127.0.0.1:{backends["tls"]}
}}
""")
    return Gateway(
        "sniproxy",
        ["sniproxy", "-f", "-c", str(config)],
        dict(ports),
        first_line(["sniproxy", "-V"]),
        workdir / "sniproxy.log",
    )


def nginx(workdir: Path, ports: dict[str, int], backends: dict[str, int]) -> Gateway:
    """nginx stream with ssl_preread and one worker process (plus its master): TLS only."""
    module = nginx_stream_module()
    config = workdir / "nginx.conf"
    config.write_text(f"""{f"load_module {module};" if module else ""}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections 4000;
}}
stream {{
    map $ssl_preread_server_name $route {{
        {DOMAIN} 127.0.0.1:{backends["tls"]};
        default 127.0.0.1:9;
    }}
    server {{
        listen 127.0.0.1:{ports["tls"]};
        ssl_preread on;
        proxy_pass $route;
    }}
}}
""")
    version = first_line(["nginx", "-v"]).replace("nginx version: ", "")
    return Gateway(
        "nginx",
        ["nginx", "-p", str(workdir), "-e", str(workdir / "nginx-error.log"), "-c", str(config)],
        {"tls": ports["tls"]},
        version,
        workdir / "nginx.log",
    )


PEER_MAKERS = {"haproxy": haproxy, "sniproxy": sniproxy, "nginx": nginx}
