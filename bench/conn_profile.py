#!/usr/bin/env python3
"""What one new connection costs a gateway: its user and kernel CPU, and its syscalls.

    python bench/conn_profile.py [--n=3000] [--m=1000] [--rounds=3] [--modes=http,tls]
                                 [--gateways=ours,haproxy,sniproxy,nginx] [--ours=LABEL=TEMPLATE]...
                                 [--json=PATH] [--no-strace] [--port-base=PORT]

For kiagateway and for each peer installed (HAProxy, sniproxy, nginx with its
stream module; a peer missing is skipped, and the output says so), each with
one worker, it runs one client making N sequential connections through the
gateway, each a new TCP connection carrying one small request with
``Connection: close``: plain HTTP routed by Host, and TLS routed by SNI (a full
handshake with the backend every time, no session resumed). The gateway's
user and kernel CPU come from /proc/PID/stat (utime, stime: the whole process
tree), read before and after, divided by N. Then ``strace -c -f`` attached to
the gateway's processes counts the syscalls of a separate run of M
connections. A warm-up of --warmup connections precedes every measurement.

The rounds are interleaved (round 1: every gateway and mode, round 2: every
one again...) so that a drift of a busy machine touches them all; the table
shows the median and, with more than one round, the spread [min-max]. The
client and the backends (bench/profile_load.py) run in processes of their
own, so their CPU is not counted. ``--ours LABEL=TEMPLATE`` (repeatable; the
TEMPLATE's ``{config}`` stands for the TOML written here) runs kiagateway from
another tree or interpreter, for an A/B in one run; the default is the
``kiagateway`` script beside this Python, else on PATH.

Linux only (/proc). Every process it starts is stopped at the end by its PID
and its scratch directory removed; every wait is bounded (a stuck connection
fails the run after a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import profile_gateways as gateways

HERE = Path(__file__).resolve().parent
LOAD = HERE / "profile_load.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 15.0  # seconds for a gateway or the backends to listen
STOP_TIMEOUT = 10.0  # seconds a process has to stop on SIGTERM before SIGKILL
TOP = 6  # syscalls named in the table


class Processes:
    """Every process this run starts, so that all of them are stopped at the end, each by its PID."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.seen: dict[int, str] = {}  # descendants met while measuring: pid -> start time

    def start(self, argv: list[str], log: Path | None = None, **options) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed right after the fork)
        try:
            proc = subprocess.Popen(argv, stdout=options.pop("stdout", out), stderr=out, **options)
        finally:
            if log:
                out.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        for pid, started in self.seen.items():  # a worker its parent left behind
            if start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile
                    pass


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_ticks(pid: int, processes: Processes) -> tuple[int, int]:
    """(utime, stime) in clock ticks summed over the process tree of ``pid`` (all threads of each)."""
    user = system = 0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
        if member != pid:
            processes.seen[member] = fields[19]
    return user, system


class PortSource:
    """Ports from ``base`` upwards, or free ephemeral ones (asked of the kernel) when base is 0."""

    def __init__(self, base: int) -> None:
        self.next = base

    def take(self) -> int:
        if self.next:
            self.next += 1
            return self.next - 1
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def wait_listening(proc: subprocess.Popen, ports: list[int], name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise SystemExit(f"{name} did not listen on 127.0.0.1:{port}\n{tail}") from None
                time.sleep(0.05)


def start_backends(processes: Processes, workdir: Path, ports: PortSource) -> dict[str, int]:
    wanted = [f"--http-port={ports.take()}", f"--tls-port={ports.take()}"]
    log = workdir / "backends.log"
    proc = processes.start(
        [sys.executable, str(LOAD), "backend", str(workdir), *wanted],
        log,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise SystemExit(f"the backends did not start\n{log.read_text(errors='replace')[-2000:]}")
    return json.loads(line)


def run_client(mode: str, port: int, count: int) -> dict:
    """Run the client process for ``count`` connections; its result, or SystemExit with its complaint."""
    argv = [sys.executable, str(LOAD), "client", mode, str(port), gateways.DOMAIN, str(count)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60 + count * 0.1)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the client ({mode}, port {port}) did not finish in time") from None
    if done.returncode != 0:
        raise SystemExit(f"the client ({mode}, port {port}) failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def measure(gateway: gateways.Gateway, proc: subprocess.Popen, mode: str, args, processes: Processes) -> dict:
    """µs of user and kernel CPU per connection of ``gateway`` for one run of args.n connections."""
    port = gateway.ports[mode]
    run_client(mode, port, args.warmup)
    user0, system0 = cpu_ticks(proc.pid, processes)
    result = run_client(mode, port, args.n)
    user1, system1 = cpu_ticks(proc.pid, processes)
    scale = 1e6 / CLK_TCK / args.n
    user, kernel = (user1 - user0) * scale, (system1 - system0) * scale
    return {"user_us": user, "kernel_us": kernel, "total_us": user + kernel, "conn_per_s": args.n / result["seconds"]}


STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace(summary: str) -> dict[str, int]:
    """Calls per syscall from ``strace -c``'s table (failed calls included), without its total row."""
    calls = {}
    for line in summary.splitlines():
        match = STRACE_ROW.match(line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return calls


def traced(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing left to wait for
    return not re.search(r"^TracerPid:\s+0$", status, re.MULTILINE)


def count_syscalls(gateway: gateways.Gateway, proc: subprocess.Popen, mode: str, args, workdir: Path) -> dict:
    """Syscalls per connection of ``gateway`` over args.m connections, by ``strace -c -f`` on its processes."""
    port = gateway.ports[mode]
    run_client(mode, port, args.warmup)
    pids = tree(proc.pid)
    out = workdir / f"strace-{gateway.name}-{mode}.txt"
    argv = ["strace", "-c", "-f", "-o", str(out)] + [arg for pid in pids for arg in ("-p", str(pid))]
    log = workdir / "strace.log"
    with open(log, "ab") as errors:
        strace = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(traced(pid) for pid in pids):
            if strace.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"strace could not attach to {gateway.name}: {log.read_text(errors='replace')}")
            time.sleep(0.02)
        run_client(mode, port, args.m)
    finally:
        if strace.poll() is None:
            strace.send_signal(signal.SIGINT)  # detach and write the summary
        try:
            strace.wait(STOP_TIMEOUT * 3)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait(STOP_TIMEOUT)
    calls = parse_strace(out.read_text() if out.exists() else "")
    total = sum(calls.values())
    return {
        "per_conn": total / args.m,
        "top": [[name, count / args.m] for name, count in sorted(calls.items(), key=lambda kv: -kv[1])[:TOP]],
        "calls": calls,
        "connections": args.m,
    }


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine(versions: dict[str, str], load_before: str) -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    peers = "; ".join(f"{name}: {version}" for name, version in versions.items())
    return (
        f"Machine: {model}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {load_before} before, {load_average()} after; {peers}"
    )


def cell(values: list[float]) -> str:
    text = f"{statistics.median(values):.1f}"
    return text + (f" [{min(values):.0f}-{max(values):.0f}]" if len(values) > 1 else "")


def table(results: list[dict], args) -> str:
    lines = [
        "| gateway | mode | user µs/conn | kernel µs/conn | total µs/conn | syscalls/conn | top syscalls per conn |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        rounds = row["rounds"]
        syscalls = row.get("syscalls")
        count = f"{syscalls['per_conn']:.1f}" if syscalls else "-"
        top = ", ".join(f"{name} {per:.1f}" for name, per in syscalls["top"]) if syscalls else "-"
        lines.append(
            f"| {row['gateway']} | {row['mode']} | {cell([r['user_us'] for r in rounds])} "
            f"| {cell([r['kernel_us'] for r in rounds])} | {cell([r['total_us'] for r in rounds])} "
            f"| {count} | {top} |"
        )
    tick = 1e6 / CLK_TCK / args.n
    lines.append("")
    lines.append(
        f"N={args.n} connections per measurement after {args.warmup} of warm-up, {args.rounds} round(s) "
        f"interleaved: median [min-max]; CPU from /proc/PID/stat in ticks of {1000 / CLK_TCK:.0f} ms "
        f"(±{tick:.1f} µs/conn)"
        + ("." if args.no_strace else f"; syscalls by strace -c -f over M={args.m} connections.")
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="connections per CPU measurement (default 3000)")
    parser.add_argument("--m", type=int, default=1000, help="connections under strace (default 1000)")
    parser.add_argument("--warmup", type=int, default=200, help="connections before each measurement (200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--modes", default="http,tls", help="http, tls or both (default http,tls)")
    parser.add_argument(
        "--gateways",
        default="ours," + ",".join(gateways.PEERS),
        help="which to run: 'ours' (every --ours), an --ours label, haproxy, sniproxy, nginx",
    )
    parser.add_argument(
        "--ours",
        "--ours-cmd",
        action="append",
        default=[],
        metavar="LABEL=TEMPLATE",
        help="a kiagateway to run, e.g. base='python -m kiacli {config}' (repeatable, for an A/B)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--no-strace", action="store_true", help="skip the syscall counts")
    parser.add_argument("--port-base", type=int, default=0, help="use ports from here up (default: ephemeral)")
    args = parser.parse_args(argv)
    args.modes = [mode for mode in args.modes.split(",") if mode]
    if not set(args.modes) <= {"http", "tls"} or min(args.n, args.m, args.rounds) < 1 or args.warmup < 0:
        parser.error("--modes takes http and/or tls; --n, --m and --rounds at least 1")
    ours = []
    for spec in args.ours or [f"kiagateway={default_ours()}"]:
        label, sep, template = spec.partition("=")
        if not sep or not label or "{config}" not in template:
            parser.error(f"--ours {spec!r}: LABEL=TEMPLATE, the TEMPLATE naming {{config}}")
        ours.append((label, template))
    args.ours = ours
    return args


def default_ours() -> str:
    script = shutil.which("kiagateway", path=os.path.dirname(sys.executable)) or shutil.which("kiagateway")
    return f"{script} {{config}}" if script else f"{sys.executable} -m kiacli {{config}}"


def selected(args) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """The gateways to run, as (name, ours template or None), and the peers skipped with the reason."""
    names = [name.strip() for name in args.gateways.split(",") if name.strip()]
    labels = dict(args.ours)
    chosen, skipped = [], {}
    for name in names:
        if name == "ours":
            chosen += [(label, template) for label, template in args.ours]
        elif name in labels:
            chosen.append((name, labels[name]))
        elif name in gateways.PEERS:
            why = gateways.missing(name)
            if why:
                skipped[name] = why
            else:
                chosen.append((name, None))
        else:
            raise SystemExit(f"--gateways: unknown {name!r} (ours, an --ours label, {', '.join(gateways.PEERS)})")
    return list(dict.fromkeys(chosen)), skipped


def run(args, workdir: Path, processes: Processes) -> dict:
    load_before = load_average()
    chosen, skipped = selected(args)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    if not args.no_strace and shutil.which("strace") is None:
        raise SystemExit("strace is not installed (Debian: apt-get install strace), or run with --no-strace")
    ports = PortSource(args.port_base)
    backends = start_backends(processes, workdir, ports)
    started = []
    for name, template in chosen:
        own = {"http": ports.take(), "tls": ports.take()}
        if template is not None:
            gateway = gateways.ours(name, template, workdir, own, backends)
        else:
            gateway = gateways.PEER_MAKERS[name](workdir, own, backends)
        try:
            proc = processes.start(gateway.argv, gateway.log, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SystemExit(f"{name}: cannot run {gateway.argv[0]}: {exc}") from None
        wait_listening(proc, list(gateway.ports.values()), name, gateway.log)
        started.append((gateway, proc))
    plan = [(gw, proc, mode) for gw, proc in started for mode in args.modes if mode in gw.ports]
    for gateway, _ in started:
        if "http" in args.modes and "http" not in gateway.ports:
            skipped[f"{gateway.name} http"] = "its stream module cannot route plain HTTP by Host"
    rows = {(gw.name, mode): {"gateway": gw.name, "mode": mode, "rounds": []} for gw, _, mode in plan}
    for number in range(args.rounds):
        for gateway, proc, mode in plan:
            figures = measure(gateway, proc, mode, args, processes)
            rows[gateway.name, mode]["rounds"].append(figures)
            print(
                f"round {number + 1}: {gateway.name} {mode}: user {figures['user_us']:.1f} "
                f"kernel {figures['kernel_us']:.1f} µs/conn, {figures['conn_per_s']:.0f} conn/s",
                file=sys.stderr,
            )
    if not args.no_strace:
        for gateway, proc, mode in plan:
            rows[gateway.name, mode]["syscalls"] = count_syscalls(gateway, proc, mode, args, workdir)
            print(
                f"strace: {gateway.name} {mode}: {rows[gateway.name, mode]['syscalls']['per_conn']:.1f} syscalls/conn",
                file=sys.stderr,
            )
    for row in rows.values():
        for key in ("user_us", "kernel_us", "total_us"):
            row[key] = statistics.median(r[key] for r in row["rounds"])
    versions = {gw.name: gw.version for gw, _ in started}
    return {
        "machine": machine(versions, load_before),
        "versions": versions,
        "skipped": skipped,
        "results": list(rows.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="conn-profile-"))
    try:
        report = run(args, workdir, processes)
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(report["results"], args))
    for name, why in report["skipped"].items():
        print(f"Skipped {name}: {why}.")
    print(report["machine"])
    if args.json:
        settings = {key: getattr(args, key) for key in ("n", "m", "warmup", "rounds", "modes", "ours")}
        args.json.write_text(json.dumps({**report, "settings": settings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
