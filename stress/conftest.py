"""The stress suite's parts: the ordinary suite's fixtures, raw backends, process probes, and the figures table.

``pytest stress/`` runs a short version of every scenario (CI, under 3 minutes on 2 cores);
``pytest -m stress stress/`` or ``pytest --stress-long stress/`` runs the long one (under 30 minutes).
Every scenario prints its figures into one table at the end of the session and into
``stress/results.md``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # hellos.py, and conftest.py loaded below under a name of its own

_spec = importlib.util.spec_from_file_location("kiagateway_tests_conftest", ROOT / "tests" / "conftest.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

# The ordinary suite's fixtures, shared as they are.
ca = base.ca
server_cert = base.server_cert
client_context = base.client_context
tls_server_context = base.tls_server_context
backends = base.backends
start_gateway = base.start_gateway

TIMEOUT = base.TIMEOUT
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_FIGURES: list[tuple[str, str, str]] = []  # (scenario, figure, value), in the order the tests ran
_LONG = {"on": False}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress-long", action="store_true", help="run the long version of the stress scenarios")


def pytest_configure(config: pytest.Config) -> None:
    _LONG["on"] = bool(config.getoption("--stress-long")) or "stress" in (config.option.markexpr or "")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.fspath).startswith(str(HERE)):
            item.add_marker(pytest.mark.stress)
            item.add_marker(pytest.mark.timeout(1800 if _LONG["on"] else 240))


def is_long() -> bool:
    return _LONG["on"]


def pick(short, long):
    """The figure of the version running: long with -m stress or --stress-long, else short."""
    return long if _LONG["on"] else short


def record(scenario: str, figure: str, value: object) -> None:
    """One row of the table printed at the end and written to results.md."""
    _FIGURES.append((scenario, figure, str(value)))


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), kernel {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _FIGURES:
        return
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = "long" if _LONG["on"] else "short"
    rows = ["| scenario | figure | value |", "|---|---|---:|"]
    rows += [f"| {s} | {f} | {v} |" for s, f, v in _FIGURES]
    stats = terminalreporter.stats
    counts = f"{len(stats.get('passed', []))} passed, {len(stats.get('failed', []))} failed"
    head = f"Stress suite, {version} version, {when}; {machine()}; {counts}."
    terminalreporter.section("stress figures")
    terminalreporter.write_line(head)
    for row in rows:
        terminalreporter.write_line(row)
    write_results(version, head, rows)


RESULTS_INTRO = (
    "# Stress figures\n\nWritten by `pytest stress/` (the short version, run by CI) and `pytest -m stress stress/`"
    " (the long one): each run replaces its own version's section. See stress/conftest.py.\n"
)


def write_results(version: str, head: str, rows: list[str]) -> None:
    """Replace this version's section of results.md, keeping the other version's last figures."""
    path = HERE / "results.md"
    sections = {}
    if path.exists():
        for part in path.read_text().split("\n## ")[1:]:
            title, _, body = part.partition("\n")
            sections[title.strip()] = body.strip()
    sections[f"{version.capitalize()} version"] = head + "\n\n" + "\n".join(rows)
    order = [t for t in ("Long version", "Short version") if t in sections]
    path.write_text(RESULTS_INTRO + "".join(f"\n## {t}\n\n{sections[t]}\n" for t in order))


@pytest.fixture(scope="session", autouse=True)
def _many_descriptors() -> None:
    """Thousands of sockets at once in this process, and in the gateways it starts (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))  # root may raise the hard limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------------
# Probes of a running gateway, from /proc (Linux).


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(p) for p in text.split()]
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """The gateway and its workers."""
    return [pid, *children(pid)]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE // 1024
        except (OSError, IndexError):
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            pass
    return total


def fds(pids: list[int]) -> dict[str, int]:
    """Open descriptors of these processes by kind: socket, pipe, other."""
    counts = {"socket": 0, "pipe": 0, "other": 0}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            kind = target.split(":", 1)[0]
            counts[kind if kind in counts else "other"] += 1
    return counts


def _has_loop(pid: int) -> bool:
    try:
        return any("eventpoll" in os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def baseline(gw) -> tuple[list[int], dict[str, int]]:
    """The gateway's processes and their descriptors once every serving process has its event loop."""
    pids = tree(gw.proc.pid)
    serving = pids[1:] or pids
    assert wait_until(lambda: all(_has_loop(pid) for pid in serving)), "a worker never started its event loop"
    return pids, fds(pids)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# Pooled pipes: the relay keeps up to 64 empty pipes for reuse (relay.py), two descriptors each.
POOLED_PIPE_FDS = 128


def assert_back_to_baseline(pids: list[int], baseline: dict[str, int], timeout: float = TIMEOUT) -> dict[str, int]:
    """Sockets return exactly to the baseline; pipes to at most the baseline plus the pools kept for reuse.

    Each serving process keeps a pool of its own: with workers, that is every process but the supervisor.
    """
    serving = len(pids) - 1 if len(pids) > 1 else 1
    now: dict[str, int] = {}

    def back() -> bool:
        now.update(fds(pids))
        return (
            now["socket"] == baseline["socket"]
            and now["other"] == baseline["other"]
            and now["pipe"] <= baseline["pipe"] + POOLED_PIPE_FDS * serving
        )

    assert wait_until(back, timeout), f"descriptors {now} did not return to the baseline {baseline}"
    return dict(now)


def drain_log(gw) -> list[dict]:
    """Every log line the gateway wrote so far, read or not."""
    while not gw.lines.empty():
        line = gw.lines.get()
        if line is not None:
            gw.seen.append(line)
    return gw.seen


def tracebacks(gw) -> list[dict]:
    """Lines that are not the operator log's JSON (a traceback on stderr), or that carry one."""
    return [
        line
        for line in drain_log(gw)
        if line.get("message") == "NOT JSON" or "Traceback" in str(line) or line.get("outcome") == "error"
    ]


def served(gw, host: str = "a.example", timeout: float = TIMEOUT) -> bool:
    """A normal client is served: a request through the HTTP listener gets its backend's 200."""
    reply = base.exchange(
        gw.http, f"GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(), timeout
    )
    return reply.startswith(b"HTTP/1.1 200")


def timed_request(address: tuple[str, int], host: str = "a.example", timeout: float = TIMEOUT) -> float:
    """Seconds for one new connection's request and full answer through the gateway."""
    started = time.monotonic()
    reply = base.exchange(
        address, f"GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(), timeout
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
    return time.monotonic() - started


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a reset, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------
# A raw backend: a thread per connection running a behaviour.


class RawBackend:
    """A TCP server on 127.0.0.1:0 that runs ``behaviour(sock)`` in a thread per connection.

    Every connection and thread is closed at ``close``; the behaviours are bounded by
    socket timeouts.
    """

    def __init__(self, behaviour: Callable[[socket.socket], None], backlog: int = 4096) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._closing.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(TIMEOUT * 6)
            self.accepted += 1
            self.conns.append(sock)
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.behaviour(sock)
        except OSError:
            pass
        except BaseException as exc:  # an assertion in a behaviour: the test reports it
            self.errors.append(exc)
        finally:
            sock.close()

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        for sock in self.conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(TIMEOUT)
        for thread in self._threads:
            thread.join(TIMEOUT)


@pytest.fixture
def raw_backend():
    """Start raw backends with a behaviour; all are closed at teardown."""
    made: list[RawBackend] = []

    def start(behaviour: Callable[[socket.socket], None], backlog: int = 4096) -> RawBackend:
        made.append(RawBackend(behaviour, backlog))
        return made[-1]

    yield start
    for backend in made:
        backend.close()


def stress_toml(backends: dict, http: dict[str, str], https: dict[str, str], extra: str = "") -> str:
    """The standard routes (a.example to a real HTTP backend) plus the scenario's own, raw ones."""
    http_lines = "\n".join(f'"{name}" = "{address}"' for name, address in http.items())
    https_lines = "\n".join(f'"{name}" = "{address}"' for name, address in https.items())
    return f"""
[gateway]
http_listen = ["127.0.0.1:0"]
https_listen = ["127.0.0.1:0"]
{extra}

[http_backends]
"a.example" = "{backends["alpha"].address}"
{http_lines}

[https_backends]
"a.example" = "{backends["alpha-tls"].address}"
{https_lines}
"""
