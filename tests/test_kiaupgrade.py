"""Handed-over listeners (kiaupgrade.py): socket activation, and the upgrade in place on SIGUSR2."""

from __future__ import annotations

import os
import socket
import subprocess

import conftest
import pytest
from conftest import TIMEOUT

# ---------------------------------------------------------------------------
# Socket activation


def activated(tmp_path, toml: str, names: str | None, listener: socket.socket | None = None):
    """Run the gateway with a listening socket at fd 3 and LISTEN_* set as systemd would; return when it exits."""
    config = tmp_path / "servers.toml"
    config.write_text(toml)
    listener = listener or socket.create_server(("127.0.0.1", 0))
    env = {**os.environ, "LISTEN_FDS": "1"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    with listener:
        return subprocess.run(
            ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *conftest.gateway_command(), str(config)],
            env=env,
            pass_fds=(3,),
            preexec_fn=lambda: os.dup2(listener.fileno(), 3),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )


@pytest.mark.parametrize(("names", "said"), [("web", "is named 'web'"), (None, "has no name"), ("", "has no name")])
def test_socket_activation_refuses_a_socket_not_named_http_or_https(tmp_path, names, said):
    done = activated(tmp_path, '[http_backends]\n"a.example" = "127.0.0.1:1"\n', names)
    assert done.returncode == 1
    assert f"inherited socket fd 3 {said}" in done.stderr


def test_socket_activation_refuses_a_socket_that_does_not_listen(tmp_path):
    done = activated(tmp_path, '[http_backends]\n"a.example" = "127.0.0.1:1"\n', "http", socket.socket())
    assert done.returncode == 1
    assert "inherited socket fd 3 (http) is not a listening TCP socket" in done.stderr


# ---------------------------------------------------------------------------
# Upgrade in place


# ---------------------------------------------------------------------------
# metrics_listen across an upgrade: handed over as the listeners are, or bound before the old program lets go
