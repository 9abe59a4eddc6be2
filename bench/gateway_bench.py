#!/usr/bin/env python3
"""Benchmark kiagateway on this machine against a DIRECT baseline and HAProxy, side by side.

    python bench/gateway_bench.py [--duration=5] [--workers=1] [--idle-n=2000] [--cmd=kiagateway]

Starts an nginx backend (plain HTTP and TLS, generated config and throw-away
certificate), kiagateway and, when it is installed, HAProxy in TCP mode with
the same route, all on loopback. Each scenario runs against DIRECT (the client
straight to the backend), kiagateway and haproxy in turn, with wrk, h2load and
curl, and reports the figures and their ratios: a markdown table per scenario
(--out-md), the raw numbers (--out-json) and a bar chart of kiagateway's ratios
(--png, needs matplotlib). Every process it starts is stopped at the end, and
its scratch directory is removed.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import ipaddress
import json
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
DOMAIN = "bench.example"
SMALL_BYTES = 128
WARMUP = 1
TIMES = "\N{MULTIPLICATION SIGN}"  # ratio columns: value / reference
PACKAGES = {"wrk": "wrk", "h2load": "nghttp2-client", "curl": "curl"}


@dataclass
class Scenario:
    tool: str | None
    unit: str
    higher_is_better: bool
    cpu_unit: str
    about: str


SCENARIOS = {
    "http_rps_keepalive": Scenario("wrk", "req/s", True, "µs/req", "wrk -t1 -c{conns}, keep-alive, GET /small (128 B)"),
    "http_cps": Scenario(
        "wrk", "conn/s", True, "µs/conn", "wrk -t1 -c{conns}, `Connection: close`: a connection a request"
    ),
    "tls_rps_keepalive": Scenario(
        "h2load", "req/s", True, "µs/req", "h2load --h1 -c{conns} over TLS (SNI), keep-alive"
    ),
    "throughput_http": Scenario(
        "curl", "Gbit/s", True, "s/GiB", "curl downloads of /big.bin ({big_mib} MiB), one at a time"
    ),
    "idle_mem_http": Scenario(
        None, "KiB/conn", False, "µs/conn", "{idle_n} idle keep-alive connections: gateway RSS delta / N"
    ),
}


@dataclass
class Service:
    """A process this script started, in its own session so that it can be stopped as a group."""

    name: str
    cmd: list[str]
    ports: list[tuple[str, int]]
    log: Path
    ready_text: str = ""
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready = not self.ready_text or self.ready_text in self.log.read_text(errors="replace")
            if ready and all(port_open(addr, port) for addr, port in self.ports):
                return
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace").strip().splitlines()[-20:]
        self.stop()
        log(f"{self.name} log tail:\n" + "\n".join(tail))
        raise RuntimeError(f"{self.name} did not start: {tail[-1] if tail else 'no output'}")

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this script created for it: leftover workers
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {proc.pid}) did not exit after SIGKILL")


@dataclass
class Gateway:
    name: str
    http: tuple[str, int]
    tls: tuple[str, int]
    service: Service | None = None  # None for DIRECT

    def pids(self) -> list[int]:
        return self.service.pids() if self.service else []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def require_loopback(addr: str) -> str:
    try:
        loopback = ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing --bind {addr!r}: only loopback addresses (127.0.0.0/8, ::1) are allowed")
    return addr.strip("[]")


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def first_line(cmd: list[str]) -> str:
    try:
        out = run(cmd, 10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def port_open(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(addr: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def process_tree(root: int) -> list[int]:
    """The process and all its descendants, from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return ticks / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- setup


def make_cert(work: Path) -> tuple[Path, Path]:
    """A throw-away ECDSA P-256 self-signed certificate for DOMAIN."""
    cert, key = work / "cert.pem", work / "key.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    cmd += ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={DOMAIN}"]
    out = run([*cmd, "-addext", f"subjectAltName=DNS:{DOMAIN}"], 60)
    if out.returncode != 0:
        raise SystemExit(f"openssl could not make a certificate: {out.stderr.strip()}")
    return cert, key


def make_big_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def nginx_service(work: Path, bind: str, ports: tuple[int, int], nofile: int) -> Service:
    cert, key = make_cert(work)
    www = work / "www"
    www.mkdir()
    user = "user root;" if os.geteuid() == 0 else ""  # else workers run as nobody and cannot read the 0700 dir
    small = "x" * (SMALL_BYTES - 1) + "\\n"
    servers = ""
    for port, tls in ((ports[0], ""), (ports[1], " ssl")):
        servers += f"""
    server {{
        listen {hostport(bind, port)}{tls} backlog=4096;
        server_name {DOMAIN};
        root {www};
        location = /small {{ return 200 "{small}"; }}
        location / {{ }}
    }}"""
    conf = f"""daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {max(1024, nofile - 100)}; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000000;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
{servers}
}}
"""
    (work / "nginx.conf").write_text(conf)
    cmd = ["nginx", "-p", f"{work}/", "-e", str(work / "nginx-error.log"), "-c", str(work / "nginx.conf")]
    return Service("nginx", cmd, [(bind, p) for p in ports], work / "nginx.log")


def kiagateway_service(
    work: Path,
    cmd: list[str],
    workers: int,
    bind: str,
    ports: tuple[int, int],
    backend: tuple[int, int],
    max_conns: int,
    strict: bool = False,
) -> Service:
    conf = work / "servers.toml"
    conf.write_text(f"""# generated by gateway_bench.py
[gateway]
http_listen = ["{hostport(bind, ports[0])}"]
https_listen = ["{hostport(bind, ports[1])}"]
max_connections = {max_conns}
http_strict_host = {"true" if strict else "false"}

[http_backends]
"{DOMAIN}" = "{hostport(bind, backend[0])}"

[https_backends]
"{DOMAIN}" = "{hostport(bind, backend[1])}"
""")
    full = [*cmd, f"--workers={workers}", str(conf)]
    return Service("kiagateway", full, [(bind, p) for p in ports], work / "kiagateway.log", ready_text="ready")


def haproxy_service(
    work: Path, workers: int, bind: str, ports: tuple[int, int], backend: tuple[int, int], max_conns: int
) -> Service:
    conf = work / "haproxy.cfg"
    conf.write_text(f"""# generated by gateway_bench.py
global
    maxconn {max_conns}
    nbthread {workers}
defaults
    mode tcp
    maxconn {max_conns}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend fe_http
    bind {hostport(bind, ports[0])}
    tcp-request inspect-delay 5s
    tcp-request content accept if HTTP
    use_backend be_http if {{ req.hdr(host),field(1,:),lower -m str {DOMAIN} }}
frontend fe_tls
    bind {hostport(bind, ports[1])}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend be_tls if {{ req.ssl_sni,lower -m str {DOMAIN} }}
backend be_http
    server s0 {hostport(bind, backend[0])}
backend be_tls
    server s0 {hostport(bind, backend[1])}
""")
    return Service("haproxy", ["haproxy", "-db", "-f", str(conf)], [(bind, p) for p in ports], work / "haproxy.log")


def http_get(addr: str, port: int, path: str, tls: bool) -> tuple[str, bytes]:
    """One GET with Host/SNI DOMAIN and `Connection: close`; the status line and the body."""
    sock = socket.create_connection((addr, port), timeout=5)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=DOMAIN)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(errors="replace"), body


def check_routes(gw: Gateway) -> None:
    for (addr, port), tls in ((gw.http, False), (gw.tls, True)):
        try:
            status, body = http_get(addr, port, "/small", tls)
        except OSError as exc:
            raise RuntimeError(f"{gw.name}: GET /small over {'TLS' if tls else 'HTTP'} failed: {exc}") from exc
        if " 200 " not in status or len(body) != SMALL_BYTES:
            raise RuntimeError(f"{gw.name}: GET /small answered {status!r} with {len(body)} bytes")


# --------------------------------------------------------------------------- scenarios


def parse_wrk(text: str) -> dict:
    out: dict = {"ops": 0, "rate": None, "errors": 0}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            out["rate"] = float(line.split()[1])
        elif " requests in " in line:
            out["ops"] = int(line.split()[0])
        elif line.startswith("Socket errors:"):
            out["errors"] += sum(int(part.split()[1]) for part in line.split(":", 1)[1].split(","))
        elif line.startswith("Non-2xx or 3xx responses:"):
            out["errors"] += int(line.split(":")[1])
    return out


def parse_h2load(text: str) -> dict:
    out: dict = {"ops": 0, "rate": None, "errors": 0}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            out["rate"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            words = line.replace(",", "").split()
            counts = {words[i + 1]: int(words[i]) for i in range(1, len(words) - 1, 2)}
            out["ops"] = counts.get("succeeded", 0)
            out["errors"] += counts.get("failed", 0) + counts.get("errored", 0) + counts.get("timeout", 0)
    return out


def measured(gw: Gateway, work: Callable[[], dict]) -> dict:
    """Run work() and add the CPU time the gateway's process tree used meanwhile."""
    pids = gw.pids()
    before, start = cpu_seconds(pids), time.monotonic()
    result = work()
    result["wall_s"] = time.monotonic() - start
    if pids:
        result["gw_cpu_s"] = round(cpu_seconds(gw.pids() or pids) - before, 2)
    return result


# --vary-paths: a new target per request (/small?n=1, 2, ...), as browsing clients send, rather than one head repeated
VARY_PATHS_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/small?n=" .. n)
end
"""


def sc_wrk(gw: Gateway, args: argparse.Namespace, close: bool) -> dict:
    addr, port = gw.http
    extra = ["-H", "Connection: close"] if close else []
    if args.vary_paths:
        extra += ["-s", str(args.vary_paths_script)]

    def once(seconds: int) -> dict:
        cmd = ["wrk", "-t1", f"-c{args.conns}", f"-d{seconds}s", "--timeout", "5s", "-H", f"Host: {DOMAIN}", *extra]
        return parse_wrk(run([*cmd, f"http://{hostport(addr, port)}/small"], seconds + 30).stdout)

    once(WARMUP)
    return measured(gw, lambda: once(args.duration))


def sc_http_rps_keepalive(gw: Gateway, args: argparse.Namespace) -> dict:
    return sc_wrk(gw, args, close=False)


def sc_http_cps(gw: Gateway, args: argparse.Namespace) -> dict:
    return sc_wrk(gw, args, close=True)


def sc_tls_rps_keepalive(gw: Gateway, args: argparse.Namespace) -> dict:
    addr, port = gw.tls

    def once(seconds: int) -> dict:
        cmd = ["h2load", "--h1", "-t1", f"-c{args.conns}", "-D", str(seconds), f"--connect-to={hostport(addr, port)}"]
        return parse_h2load(run([*cmd, f"https://{DOMAIN}/small"], seconds + 30).stdout)

    once(WARMUP)
    return measured(gw, lambda: once(args.duration))


def sc_throughput_http(gw: Gateway, args: argparse.Namespace) -> dict:
    """Download /big.bin one stream at a time until the duration is up (at least once)."""
    addr, port = gw.http
    max_time = max(60, 4 * args.duration)
    cmd = ["curl", "-q", "-sS", "-o", "/dev/null", "--noproxy", "*", "--max-time", str(max_time)]
    cmd += ["--connect-to", f"{DOMAIN}:80:{hostport(addr, port)}", "-w", "%{http_code} %{size_download} %{time_total}"]
    cmd.append(f"http://{DOMAIN}/big.bin")

    def loop(seconds: float) -> dict:
        out = {"ops": 0, "bytes": 0, "seconds": 0.0, "errors": 0}
        deadline = time.monotonic() + seconds
        while out["ops"] == 0 or time.monotonic() < deadline:
            fields = run(cmd, max_time + 10).stdout.split()
            out["ops"] += 1
            if len(fields) != 3 or fields[0] != "200" or int(fields[1]) != args.big_mib << 20:
                out["errors"] += 1
                break
            out["bytes"] += int(fields[1])
            out["seconds"] += float(fields[2])
        out["rate"] = out["bytes"] * 8 / 1e9 / out["seconds"] if out["bytes"] else None
        return out

    loop(WARMUP)
    return measured(gw, lambda: loop(args.duration))


def open_idle(addr: str, port: int, n: int, timeout: float = 30.0) -> tuple[list[socket.socket], int]:
    """N keep-alive connections that each did one GET /small; the open ones and the failure count."""
    request = f"GET /small HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    held, failed = [], 0
    for start in range(0, n, 250):
        for _ in range(min(250, n - start)):
            sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
            sock.setblocking(False)
            if sock.connect_ex((addr, port)) not in (0, errno.EINPROGRESS):
                failed += 1
                sock.close()
                continue
            sel.register(sock, selectors.EVENT_WRITE, "connect")
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                sock = key.fileobj
                try:
                    if key.data == "connect":
                        sock.send(request)
                        sel.modify(sock, selectors.EVENT_READ, "read")
                        continue
                    ok = bool(sock.recv(65536))
                except OSError:
                    ok = False
                sel.unregister(sock)
                if ok:
                    held.append(sock)
                else:
                    failed += 1
                    sock.close()
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
            key.fileobj.close()
            failed += 1
    sel.close()
    return held, failed


def sc_idle_mem_http(gw: Gateway, args: argparse.Namespace) -> dict:
    """On a freshly started gateway: RSS after N idle keep-alive connections minus RSS after one request."""
    gw.service.stop()
    gw.service.start()
    http_get(*gw.http, "/small", tls=False)  # lazy set-up is not per connection
    time.sleep(0.5)
    base = rss_kib(gw.pids())
    held: list[socket.socket] = []

    def work() -> dict:
        nonlocal held
        held, failed = open_idle(*gw.http, args.idle_n)
        return {"ops": len(held), "errors": failed}

    try:
        out = measured(gw, work)
        time.sleep(1.0)
        out["rss_before_kib"], out["rss_after_kib"] = base, rss_kib(gw.pids())
        if out["ops"]:
            out["rate"] = (out["rss_after_kib"] - base) / out["ops"]
    finally:
        for sock in held:
            sock.close()
    return out


def per_unit_cpu(name: str, result: dict, gib: float = 1 << 30) -> float | None:
    """Gateway CPU time per unit of work: µs per request/connection, or s per GiB."""
    cpu = result.get("gw_cpu_s")
    if cpu is None:
        return None
    if name == "throughput_http":
        return cpu / (result["bytes"] / gib) if result.get("bytes") else None
    return 1e6 * cpu / result["ops"] if result.get("ops") else None


def run_scenarios(gw: Gateway, scenarios: list[str], args: argparse.Namespace, results: dict) -> None:
    """Start the gateway, check its routes, run each scenario into ``results``, stop it."""
    try:
        if gw.service:
            gw.service.start()
        check_routes(gw)
        for name in scenarios:
            if name == "idle_mem_http" and not gw.service:
                continue
            log(f"{gw.name}: {name}")
            try:
                res = globals()[f"sc_{name}"](gw, args)
            except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                log(f"  failed: {exc!r}")
                res = {"error": repr(exc)[:300]}
            res["cpu_per_unit"] = per_unit_cpu(name, res)
            results[name] = res
            if gw.service and gw.service.proc and gw.service.proc.poll() is not None:
                res["error"] = "gateway exited"
                raise RuntimeError(f"{gw.name} exited; log tail:\n{gw.service.log.read_text(errors='replace')[-1500:]}")
            log(f"  {SCENARIOS[name].unit}: {fmt(res.get('rate'))}, errors: {res.get('errors', 0)}")
            time.sleep(0.5)
    except (OSError, RuntimeError) as exc:
        log(str(exc))
        for name in scenarios:
            results.setdefault(name, {"error": f"not run: {exc}"[:300]})
    finally:
        if gw.service:
            gw.service.stop()


# --------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def tool_versions(kiagateway_cmd: list[str]) -> dict:
    found = {
        "kiagateway": first_line([*kiagateway_cmd, "--version"]),
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": " ".join(first_line(["haproxy", "-v"]).split()[:3]),
        "wrk": " ".join(first_line(["wrk", "-v"]).split()[:2]),
        "h2load": first_line(["h2load", "--version"]),
        "curl": " ".join(first_line(["curl", "-V"]).split()[:2]),
        "openssl": " ".join(first_line(["openssl", "version"]).split()[:2]),
    }
    return {
        tool: version if tool in version.lower() else f"{tool} {version}" for tool, version in found.items() if version
    }


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def render_md(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    m, p = meta["machine"], meta["params"]
    lines = [
        "# kiagateway benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu']} {TIMES} {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
        f"load average at start {' / '.join(map(str, m['loadavg_at_start']))}",
        "- tools: " + "; ".join(meta["tools"].values()),
        f"- each figure: one {p['duration']} s run after a {WARMUP} s warm-up; gateway workers/threads {p['workers']}; "
        f"{p['conns']} connections; big.bin {p['big_mib']} MiB; idle N {p['idle_n']}; all on {p['bind']}",
        "- gateway, backend (nginx) and load tools share the same cores: compare the ratios, not the absolute figures",
        f"- gateways: {', '.join(meta['gateways'])}" + "".join(f"; {note}" for note in meta["notes"]),
    ]
    for name in meta["scenarios"]:
        sc = SCENARIOS[name]
        arrow = "↑" if sc.higher_is_better else "↓"
        lines += ["", f"## {name}", "", sc.about.format(**p), ""]
        cols = [f"{sc.unit} {arrow}", f"{TIMES}DIRECT", f"{TIMES}haproxy", f"gw CPU {sc.cpu_unit} ↓", f"{TIMES}haproxy"]
        lines.append("| gateway | " + " | ".join(cols) + " | errors |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        per_gw = {gw: results.get(gw, {}).get(name) for gw in meta["gateways"]}
        direct, haproxy = per_gw.get("DIRECT") or {}, per_gw.get("haproxy") or {}
        for gw, res in per_gw.items():
            label = f"**{gw}**" if gw == "kiagateway" else gw
            if res is None:
                why = "n/a (no gateway)" if gw == "DIRECT" and name == "idle_mem_http" else "not run"
                lines.append(f"| {label} | {why} | | | | | |")
                continue
            if res.get("error"):
                error = res["error"].splitlines()[0][:80].replace("|", "/")
                lines.append(f"| {label} | error: {error} | | | | | |")
                continue
            value, cpu = res.get("rate"), res.get("cpu_per_unit")
            cells = [
                fmt(value),
                fmt(ratio(value, direct.get("rate"))),
                fmt(ratio(value, haproxy.get("rate"))),
                fmt(cpu),
                fmt(ratio(cpu, haproxy.get("cpu_per_unit"))),
                str(res.get("errors", 0)),
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{TIMES}DIRECT, {TIMES}haproxy: the row's figure / DIRECT's, / haproxy's (↑ higher is better, ↓ lower).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed, so no chart: pip install matplotlib (or pip install -e '.[bench]')")
        return
    results = report["results"]
    ours = results.get("kiagateway", {})
    names, bars = [], {"DIRECT": [], "haproxy": []}
    for name in report["meta"]["scenarios"]:
        if name not in ours or ours[name].get("rate") is None:
            continue
        names.append(name + ("" if SCENARIOS[name].higher_is_better else "\n(lower is better)"))
        for key, ref in (("DIRECT", "DIRECT"), ("haproxy", "haproxy")):
            bars[key].append(ratio(ours[name]["rate"], results.get(ref, {}).get(name, {}).get("rate")) or 0.0)
    if not names:
        log("no kiagateway figures to chart")
        return
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4.5))
    width = 0.38
    for i, (key, values) in enumerate(bars.items()):
        xs = [x + (i - 0.5) * width for x in range(len(names))]
        rects = ax.bar(xs, values, width, label=f"kiagateway {TIMES}{key}")
        ax.bar_label(rects, labels=[f"{v:.2f}" if v else "n/a" for v in values], fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("ratio")
    ax.set_title(f"kiagateway ratios ({report['meta']['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    log(f"wrote {png}")


# --------------------------------------------------------------------------- main


def default_cmd() -> str:
    beside = Path(sys.executable).parent / "kiagateway"
    return str(beside) if beside.exists() else (shutil.which("kiagateway") or "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cmd", default=default_cmd(), help="kiagateway command (default: next to python, or PATH)")
    parser.add_argument("--workers", type=int, default=1, help="kiagateway --workers and haproxy nbthread")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--idle-n", type=int, default=2000, help="idle connections for idle_mem_http")
    parser.add_argument("--big-mib", type=int, default=256, help="size of /big.bin in MiB")
    parser.add_argument("--conns", type=int, default=32, help="connections for wrk and h2load")
    parser.add_argument("--strict", action="store_true", help="run kiagateway with http_strict_host = true")
    parser.add_argument("--vary-paths", action="store_true", help="wrk asks for another path in each request")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--bind", default="127.0.0.1", help="loopback address for every listener")
    parser.add_argument("--port-base", type=int, default=19500, help="first of the 6 ports this script uses")
    parser.add_argument("--out-md", type=Path, default=HERE / "results.md")
    parser.add_argument("--out-json", type=Path, default=HERE / "results.json")
    parser.add_argument("--png", type=Path, default=HERE / "ratios.png")
    args = parser.parse_args()
    args.bind = require_loopback(args.bind)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.duration < 1 or args.idle_n < 1 or args.big_mib < 1 or args.workers < 1:
        parser.error("--duration, --idle-n, --big-mib and --workers must be at least 1")
    return args


def usable_scenarios(requested: list[str], notes: list[str]) -> list[str]:
    usable = []
    for name in requested:
        tool = SCENARIOS[name].tool
        if tool and not shutil.which(tool):
            note = f"{name} skipped: {tool} not found (apt-get install {PACKAGES[tool]})"
            log(note)
            notes.append(note)
        else:
            usable.append(name)
    return usable


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    for tool, package in (("nginx", "nginx-light"), ("openssl", "openssl")):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed for the backend: apt-get install {package}")
    kia_cmd = shlex.split(args.cmd)
    if not kia_cmd:
        raise SystemExit("kiagateway not found: pip install -e . in the project, or pass --cmd")
    notes: list[str] = []
    scenarios = usable_scenarios(args.scenarios.split(","), notes)
    nofile = raise_nofile()
    max_conns = max(1024, (nofile - 600) // 2)  # a relayed connection takes 2 fds in the gateway
    if args.idle_n > max_conns - 100:
        args.idle_n = max_conns - 100
        notes.append(f"idle N capped to {args.idle_n} by RLIMIT_NOFILE {nofile}")
    base = args.port_base
    ports = {"backend": (base, base + 1), "kiagateway": (base + 10, base + 11), "haproxy": (base + 20, base + 21)}
    if not shutil.which("haproxy"):
        del ports["haproxy"]
        notes.append(f"haproxy not found (apt-get install haproxy): no {TIMES}haproxy column")
    busy = [p for pair in ports.values() for p in pair if not port_free(args.bind, p)]
    if busy:
        raise SystemExit(f"ports in use on {args.bind}: {busy}; choose another --port-base")

    report = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(),
            "tools": tool_versions(kia_cmd),
            "params": {
                k: getattr(args, k)
                for k in ("duration", "workers", "conns", "big_mib", "idle_n", "bind", "strict", "vary_paths")
            },
            "kiagateway_cmd": args.cmd,
            "gateways": ["DIRECT", *(name for name in ports if name != "backend")],
            "scenarios": scenarios,
            "notes": notes,
        },
        "results": {},
    }
    signal.signal(signal.SIGTERM, interrupt)
    work = Path(tempfile.mkdtemp(prefix="kiagateway-bench-"))
    args.vary_paths_script = work / "vary_paths.lua"
    args.vary_paths_script.write_text(VARY_PATHS_LUA)
    backend = None
    try:
        backend = nginx_service(work, args.bind, ports["backend"], nofile)
        make_big_file(work / "www" / "big.bin", args.big_mib)
        backend.start()
        gateways = [Gateway("DIRECT", (args.bind, ports["backend"][0]), (args.bind, ports["backend"][1]))]
        for name in report["meta"]["gateways"][1:]:
            pair = ports[name]
            if name == "kiagateway":
                svc = kiagateway_service(
                    work, kia_cmd, args.workers, args.bind, pair, ports["backend"], max_conns, args.strict
                )
            else:
                svc = haproxy_service(work, args.workers, args.bind, pair, ports["backend"], max_conns)
            gateways.append(Gateway(name, (args.bind, pair[0]), (args.bind, pair[1]), svc))
        for gw in gateways:
            run_scenarios(gw, scenarios, args, report["results"].setdefault(gw.name, {}))
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        if backend:
            backend.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out_md.write_text(render_md(report))
    args.out_json.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out_md} and {args.out_json}")
    plot(report, args.png)
    print(render_md(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
