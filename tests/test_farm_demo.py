"""`ras farm up` as a new user runs it: a farm with a demo desktop, and the commands it prints
log in to that desktop through the gateway.

The real `ras farm up` process (broker, gateway, agent and the demo RDP host: Xvfb mirrored by
freerdp-shadow-cli with NLA) on free loopback ports in a temporary directory; the printed
`ras client ... launch --listen` and `xfreerdp ...` lines are run as printed, through a shell.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_peers
from rdp_peers import free_port

pytestmark = pytest.mark.peers
RAS = [sys.executable, "-m", "ras"]


def _ports() -> list[str]:
    flags = ["--gateway-port", "--gateway-tls-port", "--broker-port", "--agent-port",
             "--admin-port", "--demo-rdp-port"]  # fmt: skip
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if re.search(pattern, text, re.M):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n{path.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_the_printed_commands_log_in_to_the_demo_desktop(tmp_path, display):
    require_peers(xrdp=False)
    env = {**os.environ, "HOME": str(tmp_path), "DISPLAY": display}
    farm_log = tmp_path / "farm.log"
    with open(farm_log, "wb") as out:
        farm = subprocess.Popen(
            [*RAS, "farm", "up", *_ports()], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    procs = [farm]
    try:
        text = _wait_for(farm_log, r"^Stop with Ctrl-C", farm, 60)
        lines = text.splitlines()
        at = lines.index("Log in to the desktop through the gateway, in another shell:")
        launch, login = lines[at + 1].strip(), lines[at + 2].strip()
        assert launch.endswith("launch desktop --listen 127.0.0.1:13389")
        assert login.startswith("xfreerdp /v:127.0.0.1:13389 /u:demo ")
        # the listen port may be taken on a shared machine: the same command on a free one
        port = str(free_port())
        launch = launch.replace(":13389", f":{port}")
        login = login.replace(":13389", f":{port}")
        client_log = tmp_path / "client.log"
        with open(client_log, "wb") as out:
            client = subprocess.Popen(
                ["bash", "-c", launch], cwd=tmp_path, env=env, stdout=out, stderr=out
            )
        procs.append(client)
        _wait_for(client_log, "point an RDP client at", client, 30)
        right = subprocess.run(
            ["bash", "-c", login + " +auth-only"], cwd=tmp_path, env=env, capture_output=True,
            timeout=60, check=False,
        )  # fmt: skip
        wrong = subprocess.run(
            ["bash", "-c", re.sub(r'/p:"[^"]*"', "/p:wrong", login) + " +auth-only"],
            cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert right.returncode == 0, right.stdout.decode(errors="replace")[-2000:]
        assert wrong.returncode == 147, wrong.stdout.decode(errors="replace")[-2000:]
        assert "tunnel closed" in farm_log.read_text()  # through the gateway, not around it
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert farm.returncode == 0
    # the demo host's X server and RDP server went with the farm
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, check=False)
    assert leftovers.stdout == b""


def test_flags_that_differ_from_the_state_are_refused(tmp_path):
    ports = _ports()
    made = subprocess.run(
        [*RAS, "farm", "init", *ports], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, made.stderr
    again = subprocess.run(
        [*RAS, "farm", "init", *ports], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr  # the same flags: fine
    other = str(free_port())
    refused = subprocess.run(
        [*RAS, "farm", "up", "--gateway-port", other, "--rdp", "10.0.0.5:3389"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert f"--gateway-port {other}: gateway.toml has plain_port = " in refused.stderr
    assert "--rdp 10.0.0.5:3389: agent.toml has rdp_host = '127.0.0.1'" in refused.stderr
