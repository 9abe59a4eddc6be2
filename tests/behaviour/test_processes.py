"""The process life cycle (kiaprocess.py): PID 1 in a container, supervisor and workers, reload, limits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
from conftest import TIMEOUT, read_all, routes_toml

REQUEST = b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]  # killed with unshare, never left over


def ask(address: tuple[str, int], request: bytes = REQUEST, timeout: float = TIMEOUT) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        return read_all(sock, timeout)


def children(pid: int) -> set[int]:
    """The children of ``pid``, zombies included (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(word) for word in text.split()}


@pytest.fixture
def in_pid_namespace(monkeypatch):
    """Start gateways as PID 1 of a new PID namespace, as a container's entrypoint is."""
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=TIMEOUT)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"unshare unavailable: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid needs root or user namespaces: {probe.stderr.decode().strip()}")
    plain = conftest.gateway_command
    monkeypatch.setattr(conftest, "gateway_command", lambda: [*UNSHARE, *plain()])


def namespace_init(gw: conftest.Gateway) -> int:
    """The PID, as seen from here, of the gateway that is PID 1 inside the namespace (unshare's child)."""
    (pid,) = children(gw.proc.pid)
    return pid


@pytest.mark.parametrize("workers", [1, 2])
def test_pid_1_serves_and_reaps_orphans(in_pid_namespace, start_gateway, backends, workers):
    gw = start_gateway(routes_toml(backends), f"--workers={workers}")
    started = [
        gw.wait_for(lambda line, n=n: line.get("message") == "worker started" and line["worker"] == n)
        for n in range(1, workers + 1)
        if workers > 1
    ]
    assert gw.wait_for(lambda line: line.get("message", "").startswith("kiagateway "))["pid"] == 1
    for i in range(60):  # each worker took itself for an orphan and stopped: 7 of 60 were served
        assert ask(gw.http, timeout=3.0).endswith(b"alpha http a.example"), f"request {i}"
    init = namespace_init(gw)
    outer_workers = children(init)
    assert len(outer_workers) == len(started)

    # An orphan inside the container is reparented to PID 1, which must reap it when it exits.
    subprocess.run(
        ["nsenter", f"--target={init}", "--pid", "--mount", "sh", "-c", "sleep 2 & exit 0"],
        check=True,
        timeout=TIMEOUT,
    )
    orphans = children(init) - outer_workers
    assert len(orphans) == 1, "the orphaned sleep was not reparented to the gateway"
    (orphan,) = orphans
    deadline = time.monotonic() + TIMEOUT
    while Path(f"/proc/{orphan}").exists():  # a zombie keeps its /proc entry until reaped
        assert time.monotonic() < deadline, Path(f"/proc/{orphan}/status").read_text()
        time.sleep(0.05)

    os.kill(init, signal.SIGTERM)  # unshare itself ignores SIGTERM
    assert gw.proc.wait(TIMEOUT) == 0
    gw.stop()
    assert not [line for line in gw.seen if "died" in line.get("message", "")]
    assert sum(line.get("message") == "stopped" for line in gw.seen) == len(started) + 1


PORTABLE = str(Path(__file__).parents[1] / "portable")  # its sitecustomize deletes the Linux-only calls
PORTABLE_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [PORTABLE, os.environ.get("PYTHONPATH")]))}


def test_the_portable_harness_hides_linux_only_calls_from_the_gateway_interpreter():
    script = conftest.gateway_command()[0]
    interpreter = Path(script).read_text().splitlines()[0].removeprefix("#!").split()  # the console script's
    probe = "import os, signal, socket; print(hasattr(os, 'splice'), hasattr(signal, 'sigtimedwait'))"
    out = subprocess.run(
        [*interpreter, "-c", probe], env={**os.environ, **PORTABLE_ENV}, capture_output=True, timeout=TIMEOUT
    )
    assert out.stdout.split() == [b"False", b"False"], out


def test_workers_run_without_linux_only_calls(start_gateway, backends):
    """OpenBSD's Python has no sigtimedwait/sigwaitinfo: the supervisor crashed with an AttributeError."""
    gw = start_gateway(routes_toml(backends), "--workers=2", env=PORTABLE_ENV)
    for n in (1, 2):
        gw.wait_for(lambda line, n=n: line.get("message") == "worker started" and line["worker"] == n)
    for _ in range(10):
        assert ask(gw.http).endswith(b"alpha http a.example")
    gw.proc.send_signal(signal.SIGHUP)
    for n in (1, 2):
        gw.wait_for(lambda line, n=n: line.get("message") == "config reloaded" and line.get("worker") == n)
    assert ask(gw.http).endswith(b"alpha http a.example")
    assert gw.stop() == 0
    assert not [line for line in gw.seen if line.get("message") == "NOT JSON" or "died" in line.get("message", "")]
    assert sum(line.get("message") == "stopped" for line in gw.seen) == 3


def reloaded(gw: conftest.Gateway, workers: int, count: int = 1) -> list[dict]:
    """Wait until every process logged its ``count``-th "config reloaded" line; return the latest of each."""
    lines = []
    for worker in [None, *range(1, workers + 1)] if workers > 1 else [None]:  # the supervisor too

        def nth(line: dict, worker=worker) -> bool:
            if line.get("message") != "config reloaded" or line.get("worker") != worker:
                return False
            seen = [old for old in gw.seen if old.get("message") == "config reloaded" and old.get("worker") == worker]
            return len(seen) >= count and line is seen[count - 1]

        lines.append(gw.wait_for(nth))
    return lines


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_warns_of_each_change_that_needs_a_restart(start_gateway, backends, workers):
    gw = start_gateway(routes_toml(backends, f"workers = {workers}"))
    elsewhere = conftest.free_closed_port()
    alpha, beta = backends["alpha"].address, backends["beta"].address
    changed = routes_toml(backends, f"workers = {workers + 1}", listen_http=f'"127.0.0.1:{elsewhere}"')
    gw.config.write_text(changed.replace(f'"a.example" = "{alpha}"', f'"a.example" = "{beta}"', 1))
    for count in (1, 2):  # what was not applied is still not applied at the next reload
        gw.proc.send_signal(signal.SIGHUP)
        for line in reloaded(gw, workers, count):
            assert line["ignored"] == ["http_listen", "workers"]
        assert ask(gw.http).endswith(b"beta http a.example")  # the routes did change
    warnings = [line for line in gw.seen if line.get("level") == "warning" and "key" in line]
    assert [w["key"] for w in warnings] == ["http_listen", "workers"] * 2  # once per reload, not per worker
    assert "restart" in warnings[0]["message"]
    assert warnings[0]["running"] == "127.0.0.1:0" and warnings[0]["new"] == f"127.0.0.1:{elsewhere}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", elsewhere), timeout=TIMEOUT).close()


@pytest.mark.parametrize("max_connections, enough", [(10000, False), (20, True)])
def test_descriptor_limit_is_raised_and_checked_against_max_connections(
    start_gateway, backends, monkeypatch, max_connections, enough
):
    if subprocess.run(["prlimit", "--nofile=32:256", "true"], capture_output=True).returncode != 0:
        pytest.skip("prlimit cannot set the limits here")
    plain = conftest.gateway_command
    monkeypatch.setattr(conftest, "gateway_command", lambda: ["prlimit", "--nofile=32:256", *plain()])
    gw = start_gateway(routes_toml(backends, f"max_connections = {max_connections}"))
    assert gw.wait_for(lambda line: line.get("message", "").startswith("kiagateway "))["nofile"] == 256
    warnings = [line for line in gw.seen if line.get("level") == "warning"]
    if enough:
        assert warnings == []
    else:
        (warning,) = warnings
        assert "max_connections" in warning["message"] and warning["nofile"] == 256
        assert warning["needed"] > 2 * max_connections
    assert ask(gw.http).endswith(b"alpha http a.example")


def wait_stopped(pid: int) -> None:
    """Wait until ``pid`` is stopped (SIGSTOP), so that it accepts no more connections."""
    deadline = time.monotonic() + TIMEOUT
    while "\nState:\tT" not in Path(f"/proc/{pid}/status").read_text():
        assert time.monotonic() < deadline, f"{pid} did not stop"
        time.sleep(0.01)


def worker_pid(gw: conftest.Gateway, worker: int, count: int = 1) -> int:
    """The PID of the ``count``-th start of ``worker``."""

    def nth(line: dict) -> bool:
        starts = [old for old in gw.seen if old.get("message") == "worker started" and old["worker"] == worker]
        return line.get("message") == "worker started" and len(starts) >= count and line is starts[count - 1]

    return gw.wait_for(nth)["pid"]


def test_connection_ids_stay_unique_across_a_worker_respawn(start_gateway, backends):
    gw = start_gateway(routes_toml(backends), "--workers=2")
    first, other = worker_pid(gw, 1), worker_pid(gw, 2)
    os.kill(other, signal.SIGSTOP)  # worker 1 alone accepts: the ids before and after its respawn are its own
    try:
        wait_stopped(other)
        for _ in range(3):
            assert ask(gw.http).endswith(b"alpha http a.example")
        gw.wait_for(lambda _: sum(line.get("message") == "connection" for line in gw.seen) == 3)  # logged first
        os.kill(first, signal.SIGKILL)
        second = worker_pid(gw, 1, count=2)
        for _ in range(3):
            assert ask(gw.http).endswith(b"alpha http a.example")
    finally:
        os.kill(other, signal.SIGCONT)
    assert gw.stop() == 0
    ids = [line["id"] for line in gw.seen if line.get("message") == "connection"]
    assert len(ids) == len(set(ids)) == 6, ids
    assert [i.split(".")[0] for i in ids] == [str(first)] * 3 + [str(second)] * 3


def with_routes(backends: dict, extra: dict[str, str]) -> str:
    """The standard config with ``extra`` HTTP routes (domain -> backend name) added."""
    toml = routes_toml(backends)
    added = "".join(f'"{domain}" = "{backends[name].address}"\n' for domain, name in extra.items())
    return toml.replace("[http_backends]\n", "[http_backends]\n" + added, 1)


def test_workers_apply_the_table_the_supervisor_validated_not_the_file_as_it_is_later(start_gateway, backends):
    """Workers used to re-read the file on their own SIGHUP: an edit in between split them over two tables."""
    gw = start_gateway(with_routes(backends, {}), "--workers=2")
    late = worker_pid(gw, 2)
    os.kill(late, signal.SIGSTOP)  # worker 2 takes its time to look at the reload
    try:
        wait_stopped(late)
        gw.config.write_text(with_routes(backends, {"new.example": "beta"}))  # table A
        gw.proc.send_signal(signal.SIGHUP)
        applied = gw.wait_for(lambda line: line.get("message") == "config reloaded" and line.get("worker") == 1)
        gw.config.write_text(with_routes(backends, {"new.example": "alpha", "other.example": "alpha"}))  # B, no HUP
    finally:
        os.kill(late, signal.SIGCONT)
    late_applied = gw.wait_for(lambda line: line.get("message") == "config reloaded" and line.get("worker") == 2)
    assert late_applied["http_routes"] == applied["http_routes"] == 5  # both on table A, none on B's 6
    for _ in range(10):
        assert ask(gw.http, REQUEST.replace(b"a.example", b"new.example")).endswith(b"beta http new.example")


def test_a_big_table_is_handed_to_every_worker(start_gateway, backends):
    """20,000 routes pickle to about 1.5 MB, many times what a pipe holds at once."""
    gw = start_gateway(with_routes(backends, {}), "--workers=2")
    gw.config.write_text(with_routes(backends, {f"host{i}.example": "beta" for i in range(20000)}))
    gw.proc.send_signal(signal.SIGHUP)
    for line in reloaded(gw, 2):
        assert line["http_routes"] == 20004
    for _ in range(10):
        assert ask(gw.http, REQUEST.replace(b"a.example", b"host19999.example")).endswith(
            b"beta http host19999.example"
        )


INHERITED_FDS = 1030  # enough to put the supervisor's own descriptors above select()'s FD_SETSIZE (1024)
OPEN_INHERITED = f"""
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
for _ in range({INHERITED_FDS}):
    os.set_inheritable(os.open("/dev/null", os.O_RDONLY), True)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_supervisor_runs_with_descriptors_above_fd_setsize(start_gateway, backends, monkeypatch):
    """A parent that leaks many descriptors: the supervisor's select() raised ValueError and it exited 1."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < INHERITED_FDS + 256:
        pytest.skip("the hard descriptor limit is too low to inherit that many")
    plain = conftest.gateway_command
    monkeypatch.setattr(conftest, "gateway_command", lambda: [sys.executable, "-c", OPEN_INHERITED, *plain()])
    gw = start_gateway(routes_toml(backends), "--workers=2")
    for n in (1, 2):
        gw.wait_for(lambda line, n=n: line.get("message") == "worker started" and line["worker"] == n)
    assert ask(gw.http).endswith(b"alpha http a.example")
    gw.config.write_text(with_routes(backends, {"new.example": "beta"}))
    gw.proc.send_signal(signal.SIGHUP)
    reloaded(gw, 2)
    for _ in range(4):
        assert ask(gw.http, REQUEST.replace(b"a.example", b"new.example")).endswith(b"beta http new.example")
    assert gw.stop() == 0
