"""Single sign-on, as a user runs it: `ras client launch` asks the password once, and xfreerdp
logs in to the host with it through NLA, the password given on its standard input.

The real peers: freerdp-shadow-cli with NLA knows the farm user, with the farm's password (the
host trusts the farm's directory: exit 0) or with another one (the directory's password
differs: 147, NLA refused). While xfreerdp runs, every process's command line and environment
is read again and again; afterwards the client's home, the new files of /tmp, the terminal
transcript and the farm's log records are searched for the password.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from conftest import require_peers
from farmkit import PASSWORD, USER, farm
from rdp_peers import ShadowServer

pytestmark = pytest.mark.peers

PROMPT = f"password for {USER}: ".encode()


def _scan_processes(secret: bytes, seen: list[str]) -> None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry.name}/{what}", "rb") as f:
                    if secret in f.read():
                        seen.append(f"pid {entry.name} {what}")
            except OSError:
                continue


def _run_cli(argv: list[str], env: dict[str, str], secret: bytes) -> tuple[int, bytes, list[str]]:
    """Run ``argv`` on a terminal (script(1) gives it a pty), type the password at the first
    prompt, and watch /proc until it exits. Returns (exit code, transcript, where the secret
    was seen)."""
    proc = subprocess.Popen(
        ["script", "-qfec", shlex.join(argv), "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    transcript = b""
    seen: list[str] = []
    typed = 0
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        chunk = proc.stdout.read() or b""
        transcript += chunk
        if transcript.count(PROMPT) > typed:  # a prompt on the terminal: the user types
            proc.stdin.write(secret + b"\n")
            proc.stdin.flush()
            typed += 1
        _scan_processes(secret, seen)
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    transcript += proc.stdout.read() or b""
    proc.stdin.close()
    proc.stdout.close()
    return proc.returncode, transcript, seen


def _files_holding(secret: bytes, roots: list[Path], since: float) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            try:
                if not path.is_file() or path.stat().st_mtime < since:
                    continue
                if path.stat().st_size < 50_000_000 and secret in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


@pytest.mark.parametrize(
    ("host_password", "code"),
    [(PASSWORD, 0), ("the directory says otherwise", 147)],
    ids=["host-trusts-the-farm", "directory-password-differs"],
)
async def test_one_password_prompt_and_nla_with_the_farm_credentials(
    tmp_path, display, caplog, host_password, code
):
    require_peers(xrdp=False)
    caplog.set_level("DEBUG")
    started = time.time()
    secret = PASSWORD.encode()
    with ShadowServer(USER, host_password, display) as host:
        async with farm(tmp_path, rdp_hosts=[("host1", host.host, host.port)]) as f:
            cfg = f.client_config()
            home = tmp_path / "home"
            home.mkdir()
            profile = home / "alice.toml"
            profile.write_text(
                f'server_host = "{cfg.server_host}"\nserver_port = {cfg.server_port}\n'
                f'server_name = "localhost"\nmode = "gateway_ssl"\nca_file = "{cfg.ca_file}"\n'
                f'username = "{USER}"\nresource = "desktop"\n'
            )
            env = {
                "PATH": os.environ["PATH"], "DISPLAY": display, "HOME": str(home),
                "LANG": "C.UTF-8", "TERM": "dumb",
            }  # fmt: skip
            argv = [sys.executable, "-m", "ras", "client", "--config", str(profile)]
            argv += ["launch", "--", "/cert:ignore", "+auth-only"]
            rc, transcript, seen = await trio.to_thread.run_sync(_run_cli, argv, env, secret)
    shown = transcript.decode(errors="replace")
    assert rc == code, shown[-3000:]
    assert transcript.count(PROMPT) == 1, shown  # the farm's prompt, answered once
    assert b"single sign-on" in transcript
    assert secret not in transcript  # not echoed, not logged by the client or xfreerdp
    assert seen == []  # never in a command line or an environment, while it all ran
    assert _files_holding(secret, [home, Path("/tmp")], started) == []
    assert not any(PASSWORD in r.getMessage() for r in caplog.records)
