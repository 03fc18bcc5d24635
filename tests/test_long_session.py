"""A real RDP session through `ras client launch`, held for three minutes with traffic.

What a user notices: until the client's keepalive waited for its pong (`Channel.ping`;
`receive_reply` used to drop pongs), every session through `ras client launch` was cut after
`keepalive_s + request_timeout_s` (60 s with the defaults): the first unanswered ping made
`ras client` exit 4 ("the gateway did not answer in time"), which cut the tunnel under a live
xfreerdp (exit 131); against that code this test fails after about 50 s (`KEEPALIVE_S` + 30).
Here the real `ras client` command serves a forwarder in gateway mode (`launch --listen`), a
real xfreerdp logs in through it to a real xrdp, and the test desktop repaints the whole screen
every `REPAINT_S` seconds until it logs the user off after `DESKTOP_S` seconds. Exit 12 from
xfreerdp proves that the session lived to the desktop's end; the gateway's audit line, that it
was one tunnel, open for at least `HELD_S` seconds.

The gateway is set so that a session without working keepalives would be noticed, not only a
cut: `session_idle_timeout_s` (a control session that sent no ping for that long is closed,
and the client would log `session lost` and re-establish it), and `tunnel_idle_timeout_s` (a
tunnel that carried no byte for that long is closed: the traffic flowed all along).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from conftest import require_peers
from farmkit import PASSWORD, USER, add_gateway, farm, until
from rdp_peers import XrdpServer, free_port, xfreerdp

pytestmark = pytest.mark.peers

DESKTOP_S = 185  # the session's life: the test desktop logs off after this
HELD_S = 180  # what the test requires of the tunnel
KEEPALIVE_S = 20  # so that nine pings fall inside the session
SESSION_IDLE_TIMEOUT_S = 50  # more than two keepalive periods: one late ping is not a failure
TUNNEL_IDLE_TIMEOUT_S = 20  # ten repaints
REPAINT_S = 2
# What `ras client` must never say while the session lives.
LOST = ("did not answer", "session lost", "session re-established", "reconnect failed")
AUDIT = re.compile(r"bytes_up=(\d+) bytes_down=(\d+) seconds=([\d.]+) reset=(\w+)")


class RasClient:
    """`ras client ... launch --listen` running as a subprocess, its stderr in a file."""

    def __init__(self, proc: trio.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")

    async def wait_listening(self) -> None:
        """Until it says where the RDP client should connect (or fail if it exits first)."""
        with trio.fail_after(60):  # a hang guard only
            while "point an RDP client at" not in self.output():
                if self.proc.poll() is not None:
                    pytest.fail(f"ras client exited {self.proc.returncode}:\n{self.output()}")
                await trio.sleep(0.1)


@contextlib.asynccontextmanager
async def ras_client_launch(tmp_path: Path, config: Path, port: int) -> AsyncIterator[RasClient]:
    """Start `ras client --config CONFIG launch desktop --listen 127.0.0.1:PORT`; stop it on
    the way out in every case (SIGTERM, then SIGKILL), even when the test is cancelled."""
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    env.pop("RAS_PASSWORD", None)
    argv = [sys.executable, "-m", "ras", "client", "--config", str(config)]
    argv += ["--password-file", str(password), "launch", "desktop"]
    argv += ["--listen", f"127.0.0.1:{port}"]
    stderr = tmp_path / "ras-client.log"
    with open(stderr, "wb") as out:  # noqa: ASYNC230 (a local file, once, before the test)
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, env=env
        )
    try:
        yield RasClient(proc, stderr)
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()


async def test_a_real_session_through_ras_client_launch_lasts_three_minutes(
    tmp_path, display, nursery, caplog
):
    require_peers(xrdp=True)
    caplog.set_level("INFO", logger="ras")
    with XrdpServer(desktop_seconds=DESKTOP_S, repaint_seconds=REPAINT_S) as server:
        hosts = [("host1", server.host, server.port)]
        async with farm(tmp_path, gateways=(), rdp_hosts=hosts) as f:
            await add_gateway(
                f,
                nursery,
                "gateway",
                session_idle_timeout_s=SESSION_IDLE_TIMEOUT_S,
                tunnel_idle_timeout_s=TUNNEL_IDLE_TIMEOUT_S,
            )
            host, port = f.gateway_addrs["gateway"]["plain"]
            config = tmp_path / "client.toml"
            config.write_text(
                f'server_host = "{host}"\nserver_port = {port}\nmode = "gateway"\n'
                f'username = "{USER}"\nresource = "desktop"\nkeepalive_s = {KEEPALIVE_S}\n'
            )
            listen = free_port()
            async with ras_client_launch(tmp_path, config, listen) as client:
                await client.wait_listening()
                result = await trio.to_thread.run_sync(
                    lambda: xfreerdp(
                        "127.0.0.1",
                        listen,
                        server.user,
                        server.password,
                        display=display,
                        extra=["/sec:tls"],
                        timeout=DESKTOP_S + 60,
                    )
                )
                exited = client.proc.poll()  # before the cleanup stops it
                output = client.output()
                await until(lambda: _audit_lines(caplog))  # once the relay finished
            # 12: xrdp logged the user off when the desktop ended: the session lived so long.
            assert result.returncode == 12, f"{result.summary()}\n{server.log_tail()}\n{output}"
    assert exited is None, f"ras client exited {exited} during the session:\n{output}"
    assert not [line for line in output.splitlines() if any(s in line for s in LOST)], output
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith(("session timeout", "tunnel idle"))]
    # one tunnel (no reconnect of the RDP client hid a cut), open all along, with traffic
    (audit,) = _audit_lines(caplog)
    assert "via=ticket" in audit
    assert f"rdp={server.host}:{server.port}" in audit
    assert "ended_by" not in audit, audit
    numbers = AUDIT.search(audit)
    assert numbers is not None, audit
    bytes_up, bytes_down, seconds, _reset = numbers.groups()
    assert float(seconds) >= HELD_S, audit
    assert int(bytes_up) > 0, audit
    assert int(bytes_down) > 0, audit


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for r in caplog.records if (m := r.getMessage()).startswith("tunnel closed")]
