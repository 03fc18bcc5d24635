"""Real xfreerdp through the HALB pair's VIP to a real RDP server with NLA, in every gateway
mode, and an RDP client's next connection after the VIP moved under a running forwarder.

The farm is ras/lab/farmlab.py's (broker, agent, three gateways, two `ras halb` nodes, each a
process in its own lab host). The RDP server is freerdp-shadow-cli with NLA on this machine's
loopback (it mirrors an Xvfb display); a bridge listening in the lab's `rdp` host carries each
connection to it byte for byte, so for the farm the RDP host is `rdp:3390`. xfreerdp and the
`ras client` command run in the lab's client host. NLA (CredSSP) runs end to end between
xfreerdp and the server: exit 0 with the right password, 147 with a wrong one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHADOW_PASSWORD, SHADOW_USER
from labkit import Bridge

from ras.lab.farmlab import (
    PLAIN_PORT,
    PUBLIC_NAME,
    RDP_PORT,
    TLS_PORT,
    USER,
    FarmLab,
    build_farm_lab,
    farm_hosts,
)

pytestmark = [pytest.mark.lab, pytest.mark.peers]
RAS = [sys.executable, "-m", "ras"]
BRIDGE_PORT = 3390
LISTEN = 13389
WRONG = "not the password"


@pytest.fixture
def rdp_farm(make_lab, tmp_path, shadow) -> Iterator[tuple[FarmLab, Bridge]]:
    lab = make_lab(*farm_hosts())
    bridge = Bridge(lab.hosts["rdp"], BRIDGE_PORT, (shadow.host, shadow.port))
    try:
        yield build_farm_lab(lab, tmp_path, rdp_port=BRIDGE_PORT), bridge
    finally:
        bridge.close()


def _client_toml(fl: FarmLab, mode: str) -> Path:
    port = TLS_PORT if mode == "gateway_ssl" else PLAIN_PORT
    path = fl.tmp / f"client-{mode}.toml"
    path.write_text(
        f'server_host = "{fl.vip}"\nserver_port = {port}\nmode = "{mode}"\n'
        f'server_name = "{PUBLIC_NAME}"\nca_file = "{fl.public_cert}"\n'
        f'username = "{USER}"\nresource = "desktop"\nkeepalive_s = 1\n'
        f"connect_timeout_s = 2\nrequest_timeout_s = 5\n"
    )
    return path


def _xfreerdp(fl: FarmLab, display: str, *args: str, password: str) -> int:
    """xfreerdp in the client host, NLA and +auth-only; its exit code."""
    home = fl.tmp / "home"
    home.mkdir(exist_ok=True)
    argv = ["xfreerdp", *args, f"/u:{SHADOW_USER}", f"/p:{password}", "/cert:ignore"]
    env = {"DISPLAY": display, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    proc = fl.client.popen([*argv, "+auth-only"], env=env)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _shadow_refusals(shadow) -> int:
    """The logins the RDP server itself refused (its NLA/NTLM check), as its log says."""
    text = Path(shadow.log).read_text(errors="replace")
    return text.count("client authentication failure")


def _forwarder(fl: FarmLab, mode: str):
    proc = fl.client.popen(
        [*RAS, "client", "--config", str(_client_toml(fl, mode)), "--password-file",
         str(fl.password_file), "launch", "desktop", "--listen", f"127.0.0.1:{LISTEN}"]
    )  # fmt: skip
    fl.wait(lambda: "point an RDP client at" in fl.lab.log_of(proc).read_text(), "forwarder")
    return proc


@pytest.mark.parametrize("mode", ["gateway", "gateway_ssl"])
def test_xfreerdp_nla_through_the_vip(rdp_farm, display, shadow, mode):
    fl, bridge = rdp_farm
    refused_before = _shadow_refusals(shadow)
    _forwarder(fl, mode)
    right = _xfreerdp(fl, display, f"/v:127.0.0.1:{LISTEN}", password=SHADOW_PASSWORD)
    wrong = _xfreerdp(fl, display, f"/v:127.0.0.1:{LISTEN}", password=WRONG)
    assert (right, wrong) == (0, 147)
    assert bridge.connections == 2  # both reached the RDP host through a gateway tunnel
    fl.wait(lambda: _shadow_refusals(shadow) > refused_before, "the RDP server's refusal", 10)


def test_xfreerdp_nla_through_the_vip_rdp_port(rdp_farm, display, shadow):
    fl, bridge = rdp_farm
    rdp_file = fl.tmp / "desktop.rdp"
    done = fl.client.run(
        [*RAS, "client", "--config", str(_client_toml(fl, "gateway")), "--password-file",
         str(fl.password_file), "rdp-file", "desktop", "-o", str(rdp_file),
         "--rdp-address", f"{fl.vip}:{RDP_PORT}"],
        check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    refused_before = _shadow_refusals(shadow)
    right = _xfreerdp(fl, display, str(rdp_file), password=SHADOW_PASSWORD)
    wrong = _xfreerdp(fl, display, str(rdp_file), password=WRONG)
    assert (right, wrong) == (0, 147)
    assert bridge.connections == 2
    fl.wait(lambda: _shadow_refusals(shadow) > refused_before, "the RDP server's refusal", 10)


def test_the_next_rdp_connection_after_the_vip_moved_under_a_running_forwarder(rdp_farm, display):
    """`ras client launch --listen` keeps running while the HALB master dies; its session is
    re-established through the new master, so the RDP client's next connection lands."""
    fl, bridge = rdp_farm
    forwarder = _forwarder(fl, "gateway_ssl")
    assert _xfreerdp(fl, display, f"/v:127.0.0.1:{LISTEN}", password=SHADOW_PASSWORD) == 0
    old = fl.master()
    fl.crash_node(old)
    fl.wait(lambda: fl.holders() not in ([], [old]), "another node takes the VIP")
    log = fl.lab.log_of(forwarder)
    fl.wait(lambda: "session re-established" in log.read_text(), "the session comes back", 30)
    assert _xfreerdp(fl, display, f"/v:127.0.0.1:{LISTEN}", password=SHADOW_PASSWORD) == 0
    assert forwarder.poll() is None, fl.lab.log_tail(forwarder)
    assert bridge.connections == 2
    assert "cannot forward" not in log.read_text()
