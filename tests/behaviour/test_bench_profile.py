"""bench/conn_profile.py runs with one command and prints sane figures for the installed kiagateway.

A short run (kiagateway only, HTTP and TLS, one round) through the real script:
the gateway, its backends and its client are real processes on loopback. 300
connections rather than fewer: the CPU figures come in ticks of 10 ms, and
both the user and the kernel share must show. The syscall counts need strace,
and are left out (--no-strace) where it is not installed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import gateway_command

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "conn_profile.py"


def test_profile_of_ours_has_sane_figures_for_http_and_tls(tmp_path):
    report = tmp_path / "profile.json"
    ours = shlex.join(gateway_command()) + " {config}"
    strace = shutil.which("strace") is not None
    argv = [sys.executable, str(SCRIPT), "--gateways=ours", f"--ours=kiagateway={ours}", "--modes=http,tls"]
    argv += ["--n=300", "--m=50", "--warmup=50", "--rounds=1", f"--json={report}"]
    if not strace:
        argv.append("--no-strace")
    scratch = tmp_path / "scratch"  # the script makes its scratch directory in TMPDIR
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr

    rows = [line for line in done.stdout.splitlines() if line.startswith("| kiagateway |")]
    assert [row.split("|")[2].strip() for row in rows] == ["http", "tls"]
    assert "Machine:" in done.stdout
    results = json.loads(report.read_text())["results"]
    assert [(row["gateway"], row["mode"]) for row in results] == [("kiagateway", "http"), ("kiagateway", "tls")]
    for row in results:
        assert row["user_us"] > 0 and row["kernel_us"] > 0, row
        assert row["total_us"] == row["user_us"] + row["kernel_us"]
        if strace:
            assert 5 <= row["syscalls"]["per_conn"] <= 200, row["syscalls"]
            assert len(row["syscalls"]["top"]) == 6
        else:
            assert "syscalls" not in row
    assert list(scratch.iterdir()) == []  # the certificate, configs and logs are gone
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and str(scratch) in cmdline(pid)]


def test_the_floor_yardstick_serves_http_and_tls_under_the_profile(tmp_path):
    """floor_proxy.py relays real requests (the profile fails on a wrong answer or one stuck for 5 s)."""
    floor = shlex.join([sys.executable, str(SCRIPT.with_name("floor_proxy.py"))]) + " {config}"
    argv = [sys.executable, str(SCRIPT), "--gateways=floor", f"--ours=floor={floor}", "--modes=http,tls"]
    argv += ["--n=300", "--warmup=50", "--rounds=1", "--no-strace", f"--json={tmp_path / 'floor.json'}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "floor.json").read_text())["results"]
    assert [(row["gateway"], row["mode"]) for row in results] == [("floor", "http"), ("floor", "tls")]
    assert all(row["user_us"] > 0 for row in results), results


def cmdline(pid: str) -> str:
    """The command line of a process, '' once it is gone: every process the script started named its scratch."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
