"""The deployment artefacts under contrib/, built and run for real where the machine allows.

- contrib/pyz/build-pyz: the one-file archive, run by a bare ``python3 -I`` in an empty directory.
- contrib/kubernetes/: rendered by ``kubectl kustomize``, every object checked against the
  Kubernetes schemas by ``kubernetes-validate``.
- contrib/container/Containerfile: built and run by podman on a locally made base image.

Each test skips, saying why, where its tool is missing; none reaches past the loopback.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, Backend, exchange

REPO = Path(__file__).resolve().parents[1]
CONTRIB = REPO / "contrib"
SYSTEM_PYTHON = "/usr/bin/python3"  # what a small VPS host has: no venv, no pip
BUILD_TIMEOUT = 300  # seconds for a pip/shiv build; downloads on a loaded 2-core machine


def route_toml(backend: Backend) -> str:
    """A config on loopback port 0 (read back from the log) routing a.example to ``backend``."""
    return f"""
[gateway]
http_listen = ["127.0.0.1:0"]
https_listen = []

[http_backends]
"a.example" = "{backend.address}"
"""


class Served:
    """A gateway started by an arbitrary command line, its JSON log read from stderr."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                self.lines.put(json.loads(text))
            except ValueError:
                self.lines.put({"message": "NOT JSON", "text": text})
        self.lines.put(None)

    def wait_for(self, message: str, timeout: float) -> dict:
        """The first log line with this message, or fail with what was seen."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {message!r} line within {timeout}s; seen: {self.seen[-10:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"gateway exited ({self.proc.poll()}); log: {self.seen[-10:]}")
            self.seen.append(line)
            if line.get("message") == message:
                return line

    def http_address(self, timeout: float) -> tuple[str, int]:
        """The HTTP listener's address from the start-up log, once the gateway is ready."""
        self.wait_for("ready", timeout)
        for line in self.seen:
            if line.get("message") == "listening for http":
                host, _, port = line["address"].rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"no 'listening for http' line; log: {self.seen}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(TIMEOUT)

    def close(self) -> None:
        """Kill it if a failed test left it running (by PID), and release the pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        self.proc.stderr.close()


def assert_routes(address: tuple[str, int], backend_name: str) -> None:
    answer = exchange(address, b"GET /whoami HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer[:200]
    assert answer.endswith(f"{backend_name} http a.example".encode()), answer[-200:]


@pytest.fixture
def backend():
    made = Backend("deployed")
    yield made
    made.close()


# --- One file: contrib/pyz/build-pyz -------------------------------------------------------------


def system_python_version() -> str:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} to run the archive with")
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], **_TEXT)
    return out.stdout.strip()


_TEXT = {"capture_output": True, "text": True, "timeout": TIMEOUT, "check": True}


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    """kiagateway.pyz built by the contrib script for the system Python (its version named, as for another host)."""
    try:
        import shiv  # noqa: F401
    except ImportError:
        pytest.skip("shiv is not installed in the test environment (pip install shiv)")
    version = system_python_version()
    out = tmp_path_factory.mktemp("pyz-build") / "kiagateway.pyz"
    build = subprocess.run(
        [sys.executable, str(CONTRIB / "pyz" / "build-pyz"), "--python-version", version, "-o", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out


def test_pyz_alone_routes_under_bare_isolated_python(pyz, backend, tmp_path):
    """Copied alone into an empty directory, run by `python3 -I` with no venv: it routes and stops cleanly."""
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    shutil.copy2(pyz, run_dir / "kiagateway.pyz")
    config = tmp_path / "servers.toml"
    config.write_text(route_toml(backend))
    # A bare environment: no PYTHONPATH, no VIRTUAL_ENV; shiv unpacks the wheels under SHIV_ROOT.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "SHIV_ROOT": str(tmp_path / "shiv")}
    command = [SYSTEM_PYTHON, "-I", "kiagateway.pyz", "--log-format=json", str(config)]
    served = Served(command, env=env, cwd=run_dir)
    try:
        address = served.http_address(timeout=60)  # the first run unpacks ~10 MB of wheels
        assert_routes(address, "deployed")
        served.proc.send_signal(signal.SIGTERM)
        assert served.wait(TIMEOUT) == 0
    finally:
        served.close()
    assert sorted(os.listdir(run_dir)) == ["kiagateway.pyz"]
    assert any((tmp_path / "shiv").iterdir()), "the archive did not unpack under SHIV_ROOT"
