"""A real RDP client through the farm to real RDP servers: the proof of the tunnel.

xfreerdp connects to the client's local forwarder; the forwarder launches the desktop through
the gateway's TLS port (gateway SSL mode), gets a ticket and opens a tunnel; the gateway
redeems the ticket at the broker over mutual TLS and relays to the host the agent registered.
NLA (CredSSP) runs end to end between xfreerdp and the server inside the RDP TLS, so a single
changed or reordered byte anywhere on the path breaks it: exit 0 for the right password and
147 for a wrong one come from the real server through our bytes.
"""

from __future__ import annotations

import os
import sys

import pytest
import trio
from conftest import SHADOW_PASSWORD, SHADOW_USER, require_peers
from farmkit import PASSWORD, USER, farm
from rdp_peers import XrdpServer, xfreerdp

from ras.client.forwarder import serve_forwarder
from ras.client.session import ClientSession

pytestmark = pytest.mark.peers


async def _forwarder(f, nursery: trio.Nursery) -> tuple[ClientSession, int]:
    session = await ClientSession.connect(f.client_config())
    await session.authenticate(USER, PASSWORD)
    _, port = await nursery.start(serve_forwarder, session, "desktop")
    return session, port


async def _xfreerdp(port: int, user: str, password: str, display: str, *extra: str):
    return await trio.to_thread.run_sync(
        lambda: xfreerdp("127.0.0.1", port, user, password, display=display, extra=list(extra))
    )


async def test_xfreerdp_nla_through_the_gateway_tls_tunnel(tmp_path, shadow, display, caplog):
    caplog.set_level("INFO", logger="ras")
    async with (
        farm(tmp_path, rdp_hosts=[("host1", shadow.host, shadow.port)]) as f,
        trio.open_nursery() as nursery,
    ):
        session, port = await _forwarder(f, nursery)
        right = await _xfreerdp(port, SHADOW_USER, SHADOW_PASSWORD, display, "+auth-only")
        wrong = await _xfreerdp(port, SHADOW_USER, "not the password", display, "+auth-only")
        nursery.cancel_scope.cancel()
        await session.aclose()
    assert right.returncode == 0, right.summary()
    assert wrong.returncode == 147, wrong.summary()
    # Both connections really went through tunnels of the gateway, each with its own ticket.
    opened = [r for r in caplog.records if r.getMessage().startswith("tunnel open")]
    redeemed = [r for r in caplog.records if r.getMessage().startswith("ticket redeemed")]
    assert len(opened) == 2
    assert len(redeemed) == 2
    assert all(f"rdp=127.0.0.1:{shadow.port}" in r.getMessage() for r in opened)
    assert all("tls=True" in r.getMessage() for r in opened)
    # The password never reaches a log line.
    assert not any(
        SHADOW_PASSWORD in r.getMessage() or PASSWORD in r.getMessage() for r in caplog.records
    )


async def test_xfreerdp_real_xrdp_login_through_the_gateway(tmp_path, display):
    require_peers(xrdp=True)
    with XrdpServer(desktop_seconds=2) as server:
        async with (
            farm(tmp_path, rdp_hosts=[("host1", server.host, server.port)]) as f,
            trio.open_nursery() as nursery,
        ):
            session, port = await _forwarder(f, nursery)
            result = await _xfreerdp(port, server.user, server.password, display, "/sec:tls")
            nursery.cancel_scope.cancel()
            await session.aclose()
    # 12: xrdp logged the user off when the test desktop ended: a real login and session.
    assert result.returncode == 12, f"{result.summary()}\n{server.log_tail()}"


async def test_ras_client_launch_runs_xfreerdp_and_returns_its_exit_code(tmp_path, shadow, display):
    """The CLI as a user runs it: `ras client launch desktop -- <xfreerdp args>`."""
    async with farm(tmp_path, rdp_hosts=[("host1", shadow.host, shadow.port)]) as f:
        cfg = f.client_config()
        profile = tmp_path / "alice.toml"
        profile.write_text(
            f'server_host = "{cfg.server_host}"\nserver_port = {cfg.server_port}\n'
            f'server_name = "localhost"\nmode = "gateway_ssl"\nca_file = "{cfg.ca_file}"\n'
            f'username = "{USER}"\nresource = "desktop"\n'
        )
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        env = {**os.environ, "DISPLAY": display, "HOME": str(tmp_path)}
        codes = []
        for rdp_password in (SHADOW_PASSWORD, "not the password"):
            proc = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "ras",
                    "client",
                    "--config",
                    str(profile),
                    "--password-file",
                    str(tmp_path / "pw"),
                    "launch",
                    "--",
                    f"/u:{SHADOW_USER}",
                    f"/p:{rdp_password}",
                    "/cert:ignore",
                    "+auth-only",
                ],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            codes.append(proc.returncode)
            assert b"logged in as alice" in proc.stderr
    assert codes == [0, 147]
