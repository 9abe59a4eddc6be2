"""Install and packaging, as a new operator meets them: the README's set-up commands, the
wheel beside other PyPI packages, the sdist's completeness, and the service files.

The builds here reuse pip's cache and skip build isolation, so they need no network except
where a test says so (and skips, with the reason, without it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
