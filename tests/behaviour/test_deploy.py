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
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TIMEOUT, Backend, exchange

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib"
SYSTEM_PYTHON = "/usr/bin/python3"  # what a small VPS host has: no venv, no pip
BUILD_TIMEOUT = 300  # seconds for a pip/shiv build; downloads on a loaded 2-core machine
_TEXT = {"capture_output": True, "text": True, "timeout": TIMEOUT, "check": True}
_BUILD = {"capture_output": True, "text": True, "timeout": BUILD_TIMEOUT}


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
        """Its exit code, once it has exited and every log line it wrote is in ``seen``."""
        code = self.proc.wait(timeout)
        self._reader.join(TIMEOUT)
        while (line := self.lines.get_nowait()) is not None:
            self.seen.append(line)
        return code

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


@pytest.mark.timeout(BUILD_TIMEOUT + 60)  # the archive is built within the test's time
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
        # -I still reads the system's dist-packages: the C extensions in use must be the archive's.
        maps = Path(f"/proc/{served.proc.pid}/maps")
        if maps.exists():
            loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "greenlet" in line}
            assert loaded and all(path.startswith(str(tmp_path / "shiv")) for path in loaded), loaded
        served.proc.send_signal(signal.SIGTERM)
        assert served.wait(TIMEOUT) == 0
    finally:
        served.close()
    assert sorted(os.listdir(run_dir)) == ["kiagateway.pyz"]
    assert any((tmp_path / "shiv").iterdir()), "the archive did not unpack under SHIV_ROOT"


# --- Kubernetes: contrib/kubernetes/ ---------------------------------------------------------------

KUBERNETES = CONTRIB / "kubernetes"
OLDEST_KUBERNETES = (1, 30)  # preStop `sleep` is on by default from 1.30; older releases are out of support
PENDING_SETTINGS = ("drain_timeout", "watch_config", "metrics_listen")  # 0.3 keys the configs use


def render(directory: Path) -> dict[str, dict]:
    """``kubectl kustomize DIR`` (offline), as {kind: object}; each directory has one object per kind."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate) reads the rendered objects")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomization")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = {}
    for obj in yaml.safe_load_all(out.stdout):
        assert obj["kind"] not in objects, f"two {obj['kind']} objects in {directory}"
        objects[obj["kind"]] = obj
    return objects


def mounted_config(objects: dict[str, dict], workload: str) -> dict:
    """The servers.toml that ``workload``'s pods read, parsed: the ConfigMap they mount."""
    import tomllib  # the test suite runs on 3.11+; the package itself supports 3.9

    spec = objects[workload]["spec"]["template"]["spec"]
    (volume,) = spec["volumes"]
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    return tomllib.loads(objects["ConfigMap"]["data"]["servers.toml"])


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


@pytest.mark.parametrize(
    ("directory", "kinds"),
    [
        (KUBERNETES, {"ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service"}),
        (KUBERNETES / "daemonset", {"ConfigMap", "DaemonSet"}),
    ],
    ids=["deployment", "daemonset"],
)
def test_kubernetes_objects_pass_schema_validation(directory, kinds):
    """Every rendered object is valid, unknown fields refused, for each supported Kubernetes release shipped."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import all_versions

    objects = render(directory)
    assert set(objects) == kinds
    versions = sorted({v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= OLDEST_KUBERNETES})
    assert versions, f"kubernetes-validate ships no schema for Kubernetes {OLDEST_KUBERNETES} or newer"
    for version in versions:
        for obj in objects.values():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{obj['kind']} invalid for Kubernetes {version}: {exc.message}") from None


def test_kubernetes_deployment_holds_the_operations_contract():
    objects = render(KUBERNETES)
    config = mounted_config(objects, "Deployment")
    deployment, service, budget = objects["Deployment"], objects["Service"], objects["PodDisruptionBudget"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items() and budget["spec"]["minAvailable"] == 1
    assert service["spec"]["selector"].items() <= labels.items()

    # Non-root, read-only, no capability: ports above 1024 inside, 80/443 on the Service.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port_of(config["gateway"]["http_listen"][0]) == 8080
    assert ports["https"] == port_of(config["gateway"]["https_listen"][0]) == 8443
    assert ports["metrics"] == port_of(config["gateway"]["metrics_listen"])
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {(80, "http"), (443, "https")}

    # Ready on /healthz (503 while draining), alive on an endpoint that stays 200 while draining.
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert container["livenessProbe"]["httpGet"]["path"] != "/healthz"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() and container["resources"]["limits"]

    # The kubelet's SIGKILL comes only after the preStop delay and a whole drain_timeout.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config["gateway"]["drain_timeout"]

    # The ConfigMap reloads in place: a fixed name, the directory mounted (a subPath never updates).
    assert config["gateway"]["watch_config"] is True
    assert objects["ConfigMap"]["metadata"]["name"] == "kiagateway-config"
    (mount,) = container["volumeMounts"]
    assert "subPath" not in mount and container["args"][-1] == mount["mountPath"] + "/servers.toml"


def test_kubernetes_metrics_port_is_open_to_prometheus_only_and_the_probe_timeouts_fit():
    """Any pod could otherwise hold the metrics port; /healthz answers within 1 s, the readiness probe waits 2."""
    objects = render(KUBERNETES)
    policy, deployment = objects["NetworkPolicy"], objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_to = {}  # port name -> the peers it admits ([] for every one)
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            open_to[port["port"]] = rule.get("from", [])
    assert set(open_to) == {p["name"] for p in container["ports"]} == {"http", "https", "metrics"}
    assert open_to["http"] == open_to["https"] == []
    (peer,) = open_to["metrics"]  # one peer: Prometheus in its namespace, both selectors in one entry
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}
    ]
    assert "matchLabels" not in peer["podSelector"]  # kustomize would have added the gateway's own label
    # /healthz within 1 s (DESIGN.md); /metrics waits up to 1 s for the workers' counts, then renders.
    assert container["readinessProbe"]["timeoutSeconds"] >= 2
    assert container["livenessProbe"]["timeoutSeconds"] >= 3


def test_kubernetes_daemonset_binds_the_node_ports():
    objects = render(KUBERNETES / "daemonset")
    config = mounted_config(objects, "DaemonSet")
    pod = objects["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port_of(config["gateway"]["http_listen"][0]), "https": 443}
    assert ports["http"] == 80 and port_of(config["gateway"]["https_listen"][0]) == 443
    # Root only until bound: the capabilities to bind and switch user, then --user for good.
    assert container["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_BIND_SERVICE", "SETUID", "SETGID"],
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "--user=kiagateway" in container["args"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    metrics = config["gateway"]["metrics_listen"]
    assert container["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": port_of(metrics)}
    assert metrics.startswith("127.0.0.1:")
    assert pod["terminationGracePeriodSeconds"] > config["gateway"]["drain_timeout"]
    assert config["gateway"]["watch_config"] is True and "subPath" not in container["volumeMounts"][0]


@pytest.mark.parametrize(
    "config", [KUBERNETES / "servers.toml", KUBERNETES / "daemonset" / "servers.toml"], ids=["deployment", "daemonset"]
)
def test_kubernetes_configs_pass_check(config):
    """The shipped route tables are valid for the gateway itself (once it knows the 0.3 settings)."""
    from conftest import gateway_command

    out = subprocess.run([*gateway_command(), "--check", str(config)], capture_output=True, text=True, timeout=TIMEOUT)
    errors = [line for line in out.stderr.splitlines() if " error " in line]
    # Not landed yet: an unknown key; or landed without its optional extra (metrics_listen needs
    # kiagateway[metrics]). Any other error is the shipped table's own.
    pending = [line for line in errors if any(key in line for key in PENDING_SETTINGS) and _PENDING_WHY.search(line)]
    if out.returncode == 1 and errors and pending == errors:
        keys = [key for key in PENDING_SETTINGS if key in out.stderr]
        first = pending[0].split(" error ")[-1]
        pytest.skip(f"this gateway cannot run the 0.3 settings {', '.join(keys)} yet: {first}")
    assert out.returncode == 0, out.stderr


_PENDING_WHY = re.compile(r"unknown key|\[metrics\]|prometheus", re.IGNORECASE)


# --- Container: contrib/container/Containerfile ----------------------------------------------------

# No image registry is reachable here: the base is a minimal Debian with python3 made by mmdebstrap
# (from the same archive as apt-get), kept between runs; rebuilt when missing.
BASE_TAR = Path("/var/tmp/kiagateway-base.tar")
BASE_IMAGE = "localhost/kiagateway-base:latest"
TEST_IMAGE = "localhost/kiagateway-test:latest"  # kept: its layers make the next build quick
TEST_LABEL = "kiagateway-test=1"  # marks this test's images, so that it prunes only its own leftovers
BASE_BUILD_TIMEOUT = 900  # seconds for mmdebstrap: ~45 s here, a slow mirror on a loaded machine more
# Podman works here only with runc, the host's network and explicit limits (its defaults exceed ours).
PODMAN_GLOBAL = ("--runtime", "runc")
PODMAN_LIMITS = ("--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *PODMAN_GLOBAL, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:2])} failed ({out.returncode}): {out.stderr[-3000:]}")
    return out


def make_base_image() -> None:
    """Import the cached base image, building the tar with mmdebstrap first when it is missing."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    if not BASE_TAR.exists():
        if shutil.which("mmdebstrap") is None:
            pytest.skip("no image registry here and no mmdebstrap to make a base image (apt-get install mmdebstrap)")
        codename = subprocess.run(
            ["sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME"], capture_output=True, text=True
        ).stdout.strip()
        partial = BASE_TAR.with_name(f"kiagateway-base.{os.getpid()}.tar")  # mmdebstrap needs the .tar suffix
        command = ["mmdebstrap", "--variant=minbase", "--include=python3-venv", codename or "stable", str(partial)]
        # Its own process group, so that a timeout ends apt and dpkg under it too.
        made = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = made.communicate(timeout=BASE_BUILD_TIMEOUT)
            if made.returncode != 0:
                pytest.skip(f"mmdebstrap could not make a base image: {err.decode(errors='replace').strip()[-500:]}")
            os.replace(partial, BASE_TAR)
        except subprocess.TimeoutExpired:
            os.killpg(made.pid, signal.SIGKILL)
            made.communicate()
            pytest.skip(f"mmdebstrap did not make a base image within {BASE_BUILD_TIMEOUT}s")
        finally:
            partial.unlink(missing_ok=True)
    imported = podman("import", str(BASE_TAR), BASE_IMAGE, check=False)
    if imported.returncode != 0:
        pytest.skip(f"podman cannot import an image here: {imported.stderr.strip()[-500:]}")


def offline_wheelhouse(directory: Path, python_version: str) -> Path:
    """kiagateway's dependencies (and the build's setuptools) as wheels, for a build with no network."""
    wheels = directory / "wheels"
    pip = [sys.executable, "-m", "pip", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], **_BUILD)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("kiagateway-*.whl")
    target = ["--only-binary=:all:", f"--python-version={python_version}", "-d", str(wheels)]
    fetched = subprocess.run([*pip, "download", *target, str(wheel), "setuptools>=61", "wheel"], **_BUILD)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    wheel.unlink()  # the image builds kiagateway from the source it copies, as a user's build does
    (directory / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    return wheels


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The Containerfile built from this work tree, FROM the local base, installing from local wheels only."""
    if os.environ.get("KIAGATEWAY_CONTAINER_TESTS") == "0":
        pytest.skip("KIAGATEWAY_CONTAINER_TESTS=0")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc)")
    make_base_image()
    probe = podman(
        "run", "--rm", *PODMAN_LIMITS, BASE_IMAGE, "python3", "-c", "import sys; print(sys.version)", check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    python_version = ".".join(probe.stdout.split()[0].split(".")[:2])
    work = tmp_path_factory.mktemp("image")
    wheels = offline_wheelhouse(work, python_version)
    # Build-time mounts only: pip in the build reads this pip.conf and wheelhouse; the image keeps neither.
    podman(
        "build", *PODMAN_LIMITS, "--format", "docker", "--label", TEST_LABEL,
        "--build-arg", f"BASE={BASE_IMAGE}",
        "--volume", f"{wheels}:/wheels:ro", "--volume", f"{work / 'pip.conf'}:/etc/pip.conf:ro",
        "--file", str(CONTRIB / "container" / "Containerfile"), "--tag", TEST_IMAGE, str(REPO),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    # Replaced builds of this test, but not the last day's: those are the build cache of the next run.
    podman("image", "prune", "--force", "--filter", f"label={TEST_LABEL}", "--filter", "until=24h", check=False)
    return TEST_IMAGE


CONTAINER_TEST_TIMEOUT = BASE_BUILD_TIMEOUT + 2 * BUILD_TIMEOUT  # whichever test comes first builds the image


@pytest.mark.timeout(CONTAINER_TEST_TIMEOUT)
def test_container_image_declares_the_runtime_contract(image):
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) >= {"8080/tcp", "8443/tcp"}
    assert config["Entrypoint"] == ["/opt/kiagateway/bin/kiagateway"]  # exec form: the gateway is PID 1
    assert config["Cmd"] == ["/etc/kiagateway/servers.toml"]
    test = inspected["Healthcheck"]["Test"]  # podman shows it beside Config, not in it
    assert test[0] == "CMD" and "/healthz" in test[-1]  # (/healthz itself comes with metrics_listen, 0.3)


@pytest.mark.timeout(CONTAINER_TEST_TIMEOUT)
def test_container_routes_as_non_root_and_stops_cleanly_on_sigterm(image, backend, tmp_path):
    """Run the way Kubernetes runs it (read-only root, no capability) on the host's loopback."""
    config = tmp_path / "servers.toml"
    config.write_text(route_toml(backend))
    config.chmod(0o644)  # read by the image's user
    name = f"kiagateway-test-{os.getpid()}"
    command = [
        "podman", *PODMAN_GLOBAL, "run", "--rm", "--name", name, *PODMAN_LIMITS, "--no-healthcheck",
        "--read-only", "--cap-drop=all", "--security-opt=no-new-privileges",
        "--volume", f"{config}:/etc/kiagateway/servers.toml:ro",
        image, "--log-format=json", "/etc/kiagateway/servers.toml",
    ]  # fmt: skip
    served = Served(command)
    try:
        address = served.http_address(timeout=60)
        assert_routes(address, "deployed")
        probe = "import os, importlib.util as u; print(os.getuid(), os.getgid(), u.find_spec('pip'))"
        inside = podman("exec", name, "python", "-c", probe).stdout.split()
        assert inside == ["10001", "10001", "None"]  # non-root, and no pip: only the package installed
        ps = podman("top", name, "pid", "huser", "args").stdout
        assert any(line.split()[:2] == ["1", "10001"] and "kiagateway" in line for line in ps.splitlines()), ps
        podman("stop", "--time", "30", name, timeout=60)
        assert served.wait(60) == 0
        assert any(line.get("message") == "stopped" for line in served.seen), served.seen[-5:]
    finally:
        served.close()
        podman("rm", "--force", "--ignore", name, check=False)
