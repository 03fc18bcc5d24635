"""Real xfreerdp through every client mode and through the RDP load balancer on the gateway's
RDP port, to real RDP servers.

NLA (CredSSP) runs end to end between xfreerdp and freerdp-shadow-cli, so exit 0 for the right
password and 147 for a wrong one come from the real server through our bytes: in the direct
modes through the client's forwarder straight to the host, in the gateway modes through a
ticketed tunnel of the gateway, and on the RDP port through the gateway's routing from the
X.224 cookie. xrdp's exit 12 is a real login and session.
"""

from __future__ import annotations

import os
import sys

import pytest
import trio
from conftest import SHADOW_PASSWORD, SHADOW_USER, require_peers
from farmkit import PASSWORD, USER, add_gateway, farm
from rdp_peers import XrdpServer, xfreerdp

from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.client.forwarder import serve_forwarder
from ras.client.rdpfile import parse_rdp_file
from ras.client.session import ClientSession
from ras.protocol import Mode

pytestmark = pytest.mark.peers
WRONG = "not the password"


async def _run_xfreerdp(host: str, port: int, user: str, password: str, display: str, *extra):
    return await trio.to_thread.run_sync(
        lambda: xfreerdp(host, port, user, password, display=display, extra=list(extra))
    )


# every mode of a native client; Mode.WEB is the browser's (tests/test_webclient_browser.py)
@pytest.mark.parametrize("mode", [m for m in Mode if m is not Mode.WEB])
async def test_xfreerdp_nla_in_every_client_mode(tmp_path, shadow, display, mode, caplog):
    caplog.set_level("INFO", logger="ras")
    async with (
        farm(tmp_path, rdp_hosts=[("host1", shadow.host, shadow.port)]) as f,
        trio.open_nursery() as nursery,
    ):
        session = await ClientSession.connect(f.client_config(mode=mode))
        await session.authenticate(USER, PASSWORD)
        _, port = await nursery.start(serve_forwarder, session, "desktop")
        right = await _run_xfreerdp("127.0.0.1", port, SHADOW_USER, SHADOW_PASSWORD, display,
                                    "+auth-only")  # fmt: skip
        wrong = await _run_xfreerdp("127.0.0.1", port, SHADOW_USER, WRONG, display, "+auth-only")
        nursery.cancel_scope.cancel()
        await session.aclose()
    assert right.returncode == 0, right.summary()
    assert wrong.returncode == 147, wrong.summary()
    lines = [r.getMessage() for r in caplog.records]
    # each RDP connection got its own launch; only the gateway modes used tunnels
    assert sum(m.startswith("launch user=") and f"mode={mode}" in m for m in lines) == 2
    tunnels = [m for m in lines if m.startswith("tunnel open")]
    assert len(tunnels) == (2 if mode.tunnelled else 0)
    assert all(f"tls={mode is Mode.GATEWAY_SSL}" in m for m in tunnels)


async def test_xfreerdp_real_xrdp_login_in_gateway_mode(tmp_path, display):
    require_peers(xrdp=True)
    with XrdpServer(desktop_seconds=1) as server:
        async with (
            farm(tmp_path, rdp_hosts=[("host1", server.host, server.port)]) as f,
            trio.open_nursery() as nursery,
        ):
            session = await ClientSession.connect(f.client_config(mode=Mode.GATEWAY))
            await session.authenticate(USER, PASSWORD)
            _, port = await nursery.start(serve_forwarder, session, "desktop")
            result = await _run_xfreerdp(
                "127.0.0.1", port, server.user, server.password, display, "/sec:tls"
            )
            nursery.cancel_scope.cancel()
            await session.aclose()
    # 12: xrdp logged the user off when the test desktop ended: a real login and session.
    assert result.returncode == 12, f"{result.summary()}\n{server.log_tail()}"


async def _ras(*args: str, env: dict[str, str]) -> trio.Process:
    return await trio.run_process(
        [sys.executable, "-m", "ras", "client", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def _xfreerdp_file(rdp_file, password: str, display: str, home) -> int:
    """xfreerdp reading an .rdp file, as a user double-clicks one (the file comes first)."""
    argv = ["xfreerdp", str(rdp_file), f"/u:{SHADOW_USER}", f"/p:{password}", "/cert:ignore"]
    env = {**os.environ, "DISPLAY": display, "HOME": str(home)}
    with trio.fail_after(60):  # a hang guard only
        proc = await trio.run_process([*argv, "+auth-only"], env=env, check=False,
                                      capture_stdout=True, capture_stderr=True)  # fmt: skip
    return proc.returncode


async def test_xfreerdp_through_the_rdp_port_with_an_exported_rdp_file(
    tmp_path, shadow, display, nursery, caplog
):
    """`ras client profile add`, `ras client rdp-file`, then xfreerdp on the file alone."""
    caplog.set_level("INFO", logger="ras")
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", shadow.host, shadow.port)]) as f:
        await add_gateway(f, nursery, "gateway", rdp_lb_enabled=True, rdp_port=0)
        host, port = f.gateway_addrs["gateway"]["plain"]
        _, rdp_port = f.gateway_addrs["gateway"]["rdp"]
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        env.pop("RAS_PASSWORD", None)
        added = await _ras("profile", "add", "lab", "--server", f"{host}:{port}", "--mode",
                           "gateway", "--user", USER, "--resource", "desktop", env=env)  # fmt: skip
        assert added.returncode == 0, added.stderr
        rdp_file = tmp_path / "desktop.rdp"
        exported = await _ras(
            *("--password-file", str(tmp_path / "pw"), "rdp-file", "-o", str(rdp_file)),
            *("--rdp-address", f"127.0.0.1:{rdp_port}"),
            env=env,
        )
        assert exported.returncode == 0, exported.stderr
        settings = parse_rdp_file(rdp_file.read_text())
        assert settings["full address"] == f"127.0.0.1:{rdp_port}"
        assert settings["loadbalanceinfo"].startswith("Cookie: msts=r1.")
        assert oct(rdp_file.stat().st_mode & 0o777) == "0o600"
        right = await _xfreerdp_file(rdp_file, SHADOW_PASSWORD, display, tmp_path)
        wrong = await _xfreerdp_file(rdp_file, WRONG, display, tmp_path)
    assert (right, wrong) == (0, 147)
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tunnel closed")]
    assert len(closed) == 2
    assert all("via=token" in m and f"rdp={shadow.host}:{shadow.port}" in m for m in closed)
    token = settings["loadbalanceinfo"].split("=", 1)[1]
    assert not any(token in r.getMessage() for r in caplog.records)


async def test_xfreerdp_through_the_rdp_port_with_an_mstshash_cookie(
    tmp_path, shadow, display, nursery, caplog
):
    caplog.set_level("INFO", logger="ras")
    hosts = [("host1", shadow.host, shadow.port)]
    async with farm(tmp_path, gateways=(), rdp_hosts=hosts, mstshash_routing=True) as f:
        # the RDP user name is what the cookie carries: the farm must know that user
        f.store.put_user(UserRecord(SHADOW_USER, hash_password("unused", log2_n=10), ()))
        await add_gateway(f, nursery, "gateway", rdp_lb_enabled=True, rdp_port=0,
                          rdp_lb_mstshash=True)  # fmt: skip
        host, port = f.gateway_addrs["gateway"]["rdp"]
        right = await _run_xfreerdp(host, port, SHADOW_USER, SHADOW_PASSWORD, display,
                                    "+auth-only")  # fmt: skip
        wrong = await _run_xfreerdp(host, port, SHADOW_USER, WRONG, display, "+auth-only")
    assert right.returncode == 0, right.summary()
    assert wrong.returncode == 147, wrong.summary()
    routes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("route user=")]
    assert len(routes) == 2
    assert all("via=mstshash" in m for m in routes)
    assert "affinity=True" in routes[1]  # the second connection went where the first did
