"""Install and packaging, as a new operator meets them: the README's set-up commands, the
wheel beside other PyPI packages, the sdist's completeness, and the service files.

The builds here reuse pip's cache and skip build isolation, so they need no network except
where a test says so (and skips, with the reason, without it).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The README's set-up commands, read by the same script CI runs them from."""
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_commands.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.splitlines()


def test_readme_setup_commands_use_a_virtual_environment():
    """A bare `pip install` fails on Debian 12's python3 (PEP 668): both commands make a venv
    with the system python3 and use only that venv's programs after it."""
    commands = readme_commands()
    assert len(commands) == 2, commands
    for command in commands:
        first, *rest = [part.strip() for part in command.split("&&")]
        assert first == "python3 -m venv .venv", command
        assert rest, command
        for part in rest:
            assert part.startswith(".venv/bin/"), f"{part!r} in {command!r} runs outside the venv"
    assert re.fullmatch(r"\.venv/bin/pip install \.", commands[0].split("&&")[1].strip())
    assert commands[0].split("&&")[-1].strip() == ".venv/bin/kiagateway servers.toml"
    assert "-m pytest" in commands[1]


def test_ci_runs_the_readme_commands_with_debians_python():
    """.ci/run takes the commands from the README (not a copy of them) and runs them with
    /usr/bin/python3 first on PATH, after installing python3-venv and the tools the tests use."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/readme_commands.py" in ci
    assert '"${commands[0]}"' in ci and '"${commands[1]}"' in ci
    assert 'PATH="/usr/bin:/bin:$PATH"' in ci
    for package in ("python3-venv", "curl", "openssl", "gnutls-bin", "haproxy"):
        assert re.search(rf"apt-get install[^\n]*(\\\n[^\n]*)*\b{re.escape(package)}\b", ci), package
    assert "python3 -m pip" not in ci and "\npython3 -m pytest" not in ci


# -- the sdist and the wheel ---------------------------------------------------------------

BUILD_TIMEOUT = 300  # seconds for one build or install on 2 loaded cores; usually 2-15
# The part of the test extra the suite imports or its pytest config names; the rest (ruff,
# pytest-cov, the build tools) would only slow the install down.
TEST_RUNTIME = ["pytest", "pytest-timeout", "trustme", "hypothesis", "prometheus_client", "aioquic"]
NOT_REQUIRED = {".gitignore", "bench/.gitignore"}  # version-control files: the sdist may leave them out


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a build step, failing with its output (pip's and setuptools' reasons) when it fails."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kwargs)
    assert out.returncode == 0, f"{command} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def source_files() -> set[str]:
    """The files of the source tree: what git tracks or would (not ignored), or (in a copy without .git, as CI makes)
    every file but caches, build output and virtual environments."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if listed.returncode == 0 and listed.stdout:
        files = set(listed.stdout.splitlines())
    else:
        skip = ("__pycache__", ".venv", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "dist")
        files = {
            str(path.relative_to(ROOT))
            for path in ROOT.rglob("*")
            if path.is_file()
            and not any(part in skip or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)
            and not path.name.startswith(".coverage")
        }
    return {name for name in files if (ROOT / name).exists()}


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> dict:
    """Build the sdist from a copy of this tree with setuptools' PEP 517 hook, unpack it, and build the
    wheel from the unpacked sdist with pip, as a packager would: both without build isolation,
    so no network is needed."""
    out = tmp_path_factory.mktemp("dist")
    # A clean copy of the tree: setuptools also ships whatever a stale *.egg-info/SOURCES.txt
    # in the work tree lists, which would hide a MANIFEST.in that forgets a file.
    checkout = out / "checkout"
    for name in source_files():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", hook, out], cwd=checkout).stdout.split()[-1]
    sdist = out / name
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
        if hasattr(tarfile, "data_filter"):  # Python 3.12 and the 3.8-3.11 security releases
            archive.extractall(out, filter="data")
        else:
            archive.extractall(out)
    tree = out / name.removesuffix(".tar.gz")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, tree])
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "members": members, "tree": tree, "wheel": wheel}


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory, dist) -> Path:
    """A new virtual environment holding the wheel built from the sdist, its dependencies and
    what the suite needs to run, installed by pip from its cache or the index; skipped when
    they cannot be had (no network, no cache)."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", dist["wheel"], *TEST_RUNTIME],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install the wheel's dependencies into a new venv (network?): {install.stderr[-500:]}")
    return venv


def test_sdist_carries_every_source_file_and_the_license(dist):
    """The sdist had no servers.toml, no contrib/, no LICENSE, and tests without conftest.py,
    hellos.py or tests/data: now it ships every file of the source tree."""
    top = dist["tree"].name
    shipped = {member.removeprefix(f"{top}/") for member in dist["members"]}
    missing = source_files() - NOT_REQUIRED - shipped
    assert not missing, f"not in {dist['sdist'].name}: {sorted(missing)}"
    for name in (
        "LICENSE",
        "servers.toml",
        "tests/conftest.py",
        "tests/hellos.py",
        "contrib/systemd/kiagateway.service",
    ):
        assert name in shipped
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        assert any(entry.endswith(".dist-info/LICENSE") for entry in wheel.namelist())


@pytest.mark.timeout(600)  # a venv, an install and two pytest runs: ~30 s, 60 s under load here
def test_the_unpacked_sdist_runs_its_own_tests(dist, fresh_venv):
    """From the unpacked sdist, with the wheel built from it installed in a fresh venv, every
    test module imports and a fast part of the suite passes (the end-to-end tests start the
    venv's console script)."""
    python = fresh_venv / "bin" / "python"
    pytest_cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    collected = run([*pytest_cmd, "--collect-only"], cwd=dist["tree"]).stdout  # exit 2 on an import error
    modules = {line.split("::")[0] for line in collected.splitlines() if "::" in line}
    tree = dist["tree"]
    assert modules == {str(path.relative_to(tree)) for path in (tree / "tests").rglob("test_*.py")}
    fast = ["tests/test_sniff.py", "tests/test_kiaconfig.py", "tests/behaviour/test_cli.py"]
    fast += ["-k", "not cli or check or version"]
    run([*pytest_cmd, *fast], cwd=dist["tree"])


# -- top-level module names ----------------------------------------------------------------

# Top-level modules that packages in use on PyPI install: a module of ours by one of these names
# shadows theirs or is shadowed by it when both are installed (0.2.0's `config` was: kiagateway
# could not start beside PyPI's `config`). Ranks are among PyPI's 15,000 most downloaded
# packages, 2026-11; the list is short on purpose, not a registry copy.
TAKEN = {
    "config": "PyPI config, rank 3,887",
    "supervisor": "PyPI supervisor, rank 1,071",
    "utils": "PyPI utils, rank 5,539",
    "logger": "PyPI logger, rank 8,012",
    "common": "PyPI common, rank 8,787",
    "service": "PyPI service",
    "metrics": "PyPI metrics",
    "lifecycle": "PyPI lifecycle",
    "docopt": "our dependency docopt-ng (docopt: rank 1,016)",
    "gevent": "our dependency gevent, rank 511",
    "greenlet": "gevent's dependency, rank 80",
    "tomli": "our dependency on Python < 3.11, rank 101",
    "idna": "PyPI idna, rank 5",
}


def py_modules() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return [name.strip() for name in parser["options"]["py_modules"].split(",")]


def test_top_level_module_names_are_ours_alone():
    """Every module we install at the top level has a name no package in common use takes,
    and setup.cfg lists every top-level module of the tree (a forgotten one would be missing
    from the wheel)."""
    modules = py_modules()
    clashes = {name: TAKEN[name] for name in modules if name in TAKEN}
    assert not clashes, f"top-level module names taken on PyPI: {clashes}"
    assert set(modules) == {path.stem for path in ROOT.glob("*.py")} - {"setup"}


@pytest.mark.timeout(600)  # shares the fresh venv's set-up: ~30 s, 60 s under load here
def test_the_wheel_starts_beside_pypis_config_package(dist, fresh_venv, tmp_path):
    """Installed next to PyPI's `config`, the wheel's console script starts, checks a config and
    tells its version; the wheel installs only our modules at the top level."""
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {f"{name}.py" for name in py_modules()}

    python = fresh_venv / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "config"], capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install PyPI's config package (network?): {install.stderr[-500:]}")
    where = run([python, "-c", "import config; print(config.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(fresh_venv), where

    kiagateway = fresh_venv / "bin" / "kiagateway"
    version = run([kiagateway, "--version"], cwd=tmp_path).stdout
    assert dist["wheel"].name.split("-")[1] in version
    conf = tmp_path / "servers.toml"
    conf.write_text('[gateway]\nhttp_listen = ["127.0.0.1:0"]\n\n[http_backends]\n"a.example" = "127.0.0.1:9"\n')
    checked = run([kiagateway, "--check", conf], cwd=tmp_path)
    assert "a.example" in checked.stdout + checked.stderr
    run([kiagateway, "--check", dist["tree"] / "servers.toml"], cwd=tmp_path)


# -- service files -------------------------------------------------------------------------

UNIT = ROOT / "contrib" / "systemd" / "kiagateway.service"
VENV_SCRIPT = "/opt/kiagateway/bin/kiagateway"  # where the README's service install puts it


def drain_seconds() -> float:
    """How long a stop lets open relays finish: `drain_timeout`'s default, or the fixed grace."""
    import kiaconfig
    import kiaprocess

    return getattr(kiaconfig.Settings(), "drain_timeout", None) or kiaprocess.SHUTDOWN_GRACE


def unit_entries(text: str) -> list[tuple[str, str]]:
    """The unit's key=value lines in order (a key such as ExecReload may repeat)."""
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(part.strip() for part in line.split("=", 1)) for line in lines if "=" in line and line[0] not in "#;"]


def test_systemd_unit_checks_before_reload_and_outlasts_the_drain():
    """`systemctl reload` checks the file first (so a bad file fails the reload), every command
    runs the /opt venv's script, the stop timeout outlasts the drain, and Documentation= no
    longer points at the Rust project."""
    values: dict[str, list[str]] = {}
    for name, value in unit_entries(UNIT.read_text()):
        values.setdefault(name, []).append(value)
    assert values["ExecStart"] == [f"{VENV_SCRIPT} /etc/kiagateway/servers.toml"]
    assert values["ExecStartPre"] == [f"{VENV_SCRIPT} --check /etc/kiagateway/servers.toml"]
    assert values["ExecReload"] == [f"{VENV_SCRIPT} --check /etc/kiagateway/servers.toml", "/bin/kill -HUP $MAINPID"]
    (stop,) = values["TimeoutStopSec"]
    assert float(stop) >= drain_seconds() + 10, "systemd would kill relays still inside their drain"
    assert not any("jpegleg" in value for value in values.get("Documentation", []))


def test_systemd_analyze_verifies_the_unit(tmp_path):
    """systemd's own parser accepts the unit (the script path pointed at this venv's)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    script = shutil.which("kiagateway", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no kiagateway console script next to this python")
    unit = tmp_path / "kiagateway.service"
    unit.write_text(UNIT.read_text().replace(VENV_SCRIPT, script))
    out = subprocess.run([analyze, "verify", "--man=no", unit], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


RC_SCRIPT = ROOT / "contrib" / "openbsd" / "kiagateway"
LOGIN_CLASS = ROOT / "contrib" / "openbsd" / "login.conf.d" / "kiagateway"
# Stands in for OpenBSD's /etc/rc.d/rc.subr: rc_exec prints the command it would run, and
# rc_cmd shows the variables the real rc.subr would use or runs the script's configtest.
RC_SUBR_STUB = """
rc_exec() { printf '%s\\n' "$*"; }
rc_cmd() {
    case $1 in
    show) printf '%s\\n' "$pexp" "$daemon_timeout" "$(rc_start)" ;;
    configtest) rc_configtest ;;
    esac
}
"""


def rc_script(tmp_path: Path, daemon: str, config: Path) -> Path:
    """A copy of the rc.d script that sources the stub and runs `daemon` on `config`."""
    text = RC_SCRIPT.read_text()
    for old, new in (
        ("/etc/rc.d/rc.subr", str(tmp_path / "rc.subr")),
        ('daemon="/opt/kiagateway/bin/kiagateway"', f'daemon="{daemon}"'),
        ('kiagateway_config="/etc/kiagateway/servers.toml"', f'kiagateway_config="{config}"'),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "rc.subr").write_text(RC_SUBR_STUB)
    script = tmp_path / "kiagateway"
    script.write_text(text)
    return script


@pytest.mark.parametrize("shell", ["sh", "dash", "bash", "ksh", "mksh"])
def test_rc_script_parses(shell):
    """The rc.d script runs under OpenBSD's ksh (mksh is its nearest kin on Debian); it keeps to
    POSIX sh so that every shell here parses it."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    out = subprocess.run([shell, "-n", RC_SCRIPT], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_rc_script_follows_rc_subr(tmp_path):
    """rc.subr's conventions: configtest (not rc_pre) checks the config named by a variable, the
    stop timeout outlasts the drain, rc.subr picks the login class, and pexp finds the gateway
    run by a system python3.X or by a venv's python, but not a `--check` run."""
    text = RC_SCRIPT.read_text()
    assert "rc_configtest()" in text and "rc_pre" not in text and "daemon_class=" not in text
    config = "/etc/kiagateway/servers.toml"
    script = rc_script(tmp_path, "/opt/kiagateway/bin/kiagateway", Path(config))
    pexp, timeout, start = run(["sh", script, "show"]).stdout.splitlines()
    assert float(timeout) >= drain_seconds() + 10
    assert start.startswith("/opt/kiagateway/bin/kiagateway ") and start.endswith(f" {config}")
    assert "--user=_kiagateway" in start
    lines = [f"{python} {start}" for python in ("/opt/kiagateway/bin/python3", "/usr/local/bin/python3.12")]
    lines.append(f"/opt/kiagateway/bin/python3 /opt/kiagateway/bin/kiagateway --check {config}")
    found = subprocess.run(["grep", "-Ex", pexp], input="\n".join(lines) + "\n", capture_output=True, text=True)
    assert found.stdout.splitlines() == lines[:2]  # POSIX extended regex, as pgrep -xf reads pexp


def test_rc_configtest_runs_the_gateways_check(tmp_path):
    """`rcctl configtest` (and so a checked `rcctl reload`) fails on a bad file, passes on a good one."""
    script = shutil.which("kiagateway", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no kiagateway console script next to this python")
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[gateway]\nhttp_listen = ["127.0.0.1:0"]\n\n[http_backends]\n"a.example" = "127.0.0.1:9"\n')
    bad.write_text('[gateway]\nhttp_listen = ["127.0.0.1:0"]\nworkres = 2\n')
    for config, status in ((good, 0), (bad, 1)):
        where = tmp_path / config.stem
        where.mkdir()
        out = subprocess.run(
            ["sh", rc_script(where, script, config), "configtest"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == status, out.stdout + out.stderr


def test_openbsd_login_class_covers_the_default_connections():
    """Each process needs 2 descriptors per relay (no splice pipes on OpenBSD) plus listeners,
    log and spare; 16,384 was below the 20,000 of the default max_connections."""
    import kiaconfig

    text = LOGIN_CLASS.read_text()
    assert re.search(r"^kiagateway:\\$", text, re.M)
    need = 2 * kiaconfig.Settings().max_connections + 1000  # listeners, log, a worker's spare
    for cap in ("openfiles-cur", "openfiles-max"):
        (value,) = re.findall(rf":{cap}=(\d+):", text)
        assert int(value) >= need, cap
    assert ":tc=daemon:" in text


def test_systemd_unit_keeps_every_connection_line_from_journalds_rate_limit():
    """journald's default limit (10,000 lines per 30 s) drops connection lines above a few
    hundred a second; the unit lifts it for the gateway."""
    assert dict(unit_entries(UNIT.read_text())).get("LogRateLimitIntervalSec") == "0"
