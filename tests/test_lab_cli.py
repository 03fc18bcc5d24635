"""`ras lab up/list/status/exec/down` as a user runs them, from other shells.

A real `ras lab up --detach` of the single-server scenario (the quickest: a firewall, a
client and one server with broker, gateway and RDP host): the commands find it by its state
in /run/ras-lab/<name>/, exec runs in its hosts with the caller's exit code, down tears it
down, and after the supervisor is SIGKILLed down still leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_peers
from labkit import require_lab, wait_until

from ras.lab import lab_namespaces
from ras.lab.supervisor import STATE_ROOT

pytestmark = [pytest.mark.lab, pytest.mark.peers]
RAS = [sys.executable, "-m", "ras"]


def ras(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def name():
    require_lab("iptables")
    require_peers(xrdp=False)
    lab = f"t{os.getpid()}"
    yield lab
    ras("lab", "down", lab)  # whatever the test left


def _state(name: str) -> dict:
    return json.loads((STATE_ROOT / name / "state.json").read_text())


def _gone(name: str, prefix: str) -> None:
    assert not (STATE_ROOT / name).exists()
    assert lab_namespaces(prefix) == []


def test_up_list_status_exec_down(name):
    up = ras("lab", "up", "single-server", "--name", name, "--detach")
    assert up.returncode == 0, up.stderr
    assert f"RAS lab {name} is up" in up.stderr
    assert "launch desktop --listen 127.0.0.1:13389" in up.stderr
    prefix = _state(name)["prefix"]

    listed = ras("lab", "list")
    assert f"{name} " in listed.stdout
    assert "halb-pair" in listed.stdout  # the scenarios too

    status = ras("lab", "status", name)
    assert status.returncode == 0, status.stderr
    assert "server-gateway" in status.stdout
    assert "not running" not in status.stdout
    assert "dropped 0 packets" in status.stdout

    # exec: in the host, with the command's exit code; the client's routes go through fw
    done = ras("lab", "exec", "--lab", name, "client", "--", "ip", "-4", "route")
    assert done.returncode == 0, done.stderr
    assert "10.213.2.0/24 via 10.213.1.1" in done.stdout
    assert "default" not in done.stdout
    assert ras("lab", "exec", "--lab", name, "client", "--", "sh", "-c", "exit 7").returncode == 7
    unknown = ras("lab", "exec", "--lab", name, "nohost", "--", "true")
    assert unknown.returncode == 2
    assert "no host 'nohost'" in unknown.stderr

    again = ras("lab", "up", "single-server", "--name", name, "--detach")
    assert again.returncode == 2
    assert "is up" in again.stderr

    down = ras("lab", "down", name)
    assert down.returncode == 0, down.stderr
    _gone(name, prefix)


def test_down_after_the_supervisor_crashed(name):
    assert ras("lab", "up", "single-server", "--name", name, "--detach").returncode == 0
    state = _state(name)
    daemons = list(state["daemons"].values())
    os.kill(state["pid"], signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{state['pid']}").exists() or _zombie(state["pid"]), 10)
    assert "is gone" in ras("lab", "status", name).stdout
    down = ras("lab", "down", name)
    assert down.returncode == 0, down.stderr
    assert "cleaning up after it" in down.stderr
    _gone(name, state["prefix"])
    assert not [pid for pid in daemons if Path(f"/proc/{pid}").exists() and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_bad_manifest_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[segments]\nlan = "10.213.1.0/24"\n[hosts.a]\nrole = "client"\nsegmnt = 1\n')
    done = ras("lab", "up", str(path))
    assert done.returncode == 2
    assert f"{path}: unknown key 'hosts.a.segmnt'" in done.stderr
