"""The README's farm: `ras farm up` as a user runs it, then `ras client` against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ras.lab.etcdcluster import free_ports

RAS = [sys.executable, "-m", "ras"]


@pytest.fixture
def farm_up(tmp_path: Path):
    plain, tls, rdp, brk, agt, adm = free_ports(6)
    state = tmp_path / "state"
    log = tmp_path / "farm.log"
    args = [
        *RAS,
        "farm",
        "up",
        "--state-dir",
        str(state),
        "--rdp",
        "127.0.0.1:3389",
        "--gateway-port",
        str(plain),
        "--gateway-tls-port",
        str(tls),
        "--gateway-rdp-port",
        str(rdp),
        "--broker-port",
        str(brk),
        "--agent-port",
        str(agt),
        "--admin-port",
        str(adm),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while b"RAS farm is up" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield state, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def _client(state: Path, *args: str, password_file: Path | None = None):
    pw = password_file or state / "demo.password"
    return subprocess.run(
        [*RAS, "client", "--config", str(state / "client.toml"), "--password-file", str(pw), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAS_PASSWORD": ""},
    )


def test_farm_up_serves_the_demo_user(farm_up, tmp_path):
    state, proc, log = farm_up
    listed = _client(state, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["desktop", "desktop", "Desktop"]
    assert "logged in as demo" in listed.stderr

    bad = tmp_path / "bad.password"
    bad.write_text("not it\n")
    refused = _client(state, "list", password_file=bad)
    assert refused.returncode == 3
    assert "wrong user name or password" in refused.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    text = log.read_text()
    assert "auth ok user=demo" in text
    assert "auth failed user=demo" in text
    password = (state / "demo.password").read_text().strip()
    assert password not in text
    for name in (
        "broker.toml",
        "gateway.toml",
        "agent.toml",
        "client.toml",
        "broker.sqlite3",
        "pki/ca.pem",
        "pki/gateway-public.pem",
    ):
        assert (state / name).exists(), name
    assert (state / "demo.password").stat().st_mode & 0o777 == 0o600
    assert (state / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600


def test_farm_up_prints_ras_admin_commands_that_work(farm_up):
    state, _, log = farm_up
    printed = [line.strip() for line in log.read_text().splitlines() if " admin --url " in line]
    assert printed, log.read_text()
    words = printed[0].split()
    command = [*RAS, *words[words.index("admin") :]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=state.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:3] == ["host1", "rdsh", "yes"]
    # The admin user logs on with its password too; the demo user is no admin.
    for user, pw_file, code in (("admin", "admin.password", 0), ("demo", "demo.password", 3)):
        result = subprocess.run(
            [*command[: command.index("--cert")], "--user", user, "--password-file",
             str(state / pw_file), "status"],
            capture_output=True, text=True, timeout=60, cwd=state.parent,
        )  # fmt: skip
        assert result.returncode == code, result.stderr


def test_farm_up_twice_reuses_its_state(tmp_path):
    state = tmp_path / "state"
    subprocess.run([*RAS, "farm", "init", "--state-dir", str(state)], check=True, timeout=60)
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.suffix != ".sqlite3"}
    subprocess.run([*RAS, "farm", "init", "--state-dir", str(state)], check=True, timeout=60)
    after = {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.suffix != ".sqlite3"}
    assert before == after
