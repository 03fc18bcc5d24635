"""The one-machine farm: broker, gateway and an agent in one process on loopback.

``init_farm`` makes a state directory the first time (farm CA and every certificate, the
gateway's self-signed public certificate, the config files, the SQLite state and a demo user)
and reuses what is there on later runs; ``run_farm`` serves the three daemons until cancelled,
and the demo RDP host (``ras.demohost``) when the farm was made without an RDP host of its own.
Every file it writes is an ordinary config that ``ras broker/gateway/agent --config`` read too.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import trio

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig
from ras.broker.passwords import hash_password
from ras.broker.server import Broker
from ras.broker.store import SQLiteStore, UserRecord
from ras.client.config import ClientConfig
from ras.config import load
from ras.demohost import run_demo_host
from ras.gateway.config import GatewayConfig
from ras.gateway.server import Gateway
from ras.pki import FarmPKI, write_atomic

__all__ = ["FarmPorts", "FarmState", "init_farm", "run_farm"]

log = logging.getLogger("ras.farm")
DEMO_USER = "demo"
ADMIN_USER = "admin"  # in the ras-admins group: may log on to the admin API
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True, slots=True)
class FarmPorts:
    gateway_plain: int = 18080
    gateway_tls: int = 18443
    broker_gateways: int = 20002
    broker_agents: int = 20003
    broker_admin: int = 20443
    gateway_rdp: int = 18389  # the gateway's RDP port: native clients with the portal's .rdp files
    demo_rdp: int = 33389  # the demo RDP host (ras.demohost), when no --rdp is given


@dataclass(frozen=True, slots=True)
class FarmState:
    directory: Path

    @property
    def broker_toml(self) -> Path:
        return self.directory / "broker.toml"

    @property
    def gateway_toml(self) -> Path:
        return self.directory / "gateway.toml"

    @property
    def agent_toml(self) -> Path:
        return self.directory / "agent.toml"

    @property
    def client_toml(self) -> Path:
        return self.directory / "client.toml"

    @property
    def password_file(self) -> Path:
        return self.directory / "demo.password"

    @property
    def admin_password_file(self) -> Path:
        return self.directory / "admin.password"

    @property
    def demo_marker(self) -> Path:
        """Present when the farm's RDP host is the demo one (ras.demohost); holds its port."""
        return self.directory / "demo-rdp.port"

    def demo_rdp_port(self) -> int | None:
        try:
            return int(self.demo_marker.read_text().strip())
        except (OSError, ValueError):
            return None


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_once(path: Path, text: str) -> None:
    if not path.exists():
        write_atomic(path, text.encode(), mode=0o644)


def init_farm(
    directory: Path,
    *,
    rdp_host: str | None = None,
    rdp_port: int = 3389,
    ports: FarmPorts = FarmPorts(),
    agent_name: str = "host1",
) -> FarmState:
    """Create what is missing in ``directory``; never overwrite a file that exists. With no
    ``rdp_host`` the farm's RDP host is the demo one (``ras.demohost``) on ``ports.demo_rdp``."""
    state = FarmState(directory.resolve())
    state.directory.mkdir(parents=True, exist_ok=True)
    if rdp_host is None:
        rdp_host, rdp_port = "127.0.0.1", ports.demo_rdp
        if not state.agent_toml.exists():
            _write_once(state.demo_marker, f"{rdp_port}\n")
    pki = FarmPKI(state.directory / "pki")
    pki.init_ca()
    pki.ensure("broker", LOOPBACK_NAMES)
    pki.ensure("gateway", LOOPBACK_NAMES)
    pki.ensure(agent_name)
    pki.ensure("admin")  # the admin API's client certificate (admin_cert_names below)
    pki.ensure_self_signed("gateway-public", LOOPBACK_NAMES)
    _write_once(
        state.broker_toml,
        f"""\
# The Connection Broker of the one-machine farm (made by `ras farm`; edit freely).
name = "broker"
listen_host = "127.0.0.1"
gateway_port = {ports.broker_gateways}
agent_port = {ports.broker_agents}
admin_port = {ports.broker_admin}
admin_cert_names = ["admin"]
database = "broker.sqlite3"
cert_file = "pki/broker.pem"
key_file = "pki/broker.key"
ca_file = "pki/ca.pem"
ticket_ttl_s = 60

[[resources]]
id = "desktop"
name = "Desktop"
kind = "desktop"
""",
    )
    _write_once(
        state.gateway_toml,
        f"""\
# The Secure Gateway of the one-machine farm (made by `ras farm`; edit freely).
name = "gateway"
listen_host = "127.0.0.1"
plain_port = {ports.gateway_plain}
tls_port = {ports.gateway_tls}
public_host = "localhost"
public_port = {ports.gateway_tls}
public_cert_file = "pki/gateway-public.pem"
public_key_file = "pki/gateway-public.key"
cert_file = "pki/gateway.pem"
key_file = "pki/gateway.key"
ca_file = "pki/ca.pem"
broker_host = "127.0.0.1"
broker_port = {ports.broker_gateways}
# Native RDP clients with a routing token: the User Portal's .rdp files name this port.
rdp_lb_enabled = true
rdp_port = {ports.gateway_rdp}
""",
    )
    _write_once(
        state.agent_toml,
        f"""\
# The host agent of the one-machine farm: it reports the RDP host below to the broker.
name = {_toml_str(agent_name)}
kind = "rdsh"
rdp_host = {_toml_str(rdp_host)}
rdp_port = {rdp_port}
report_rdp_certificate = true  # the web client's gateway pins it (docs/webclient.md)
cert_file = "pki/{agent_name}.pem"
key_file = "pki/{agent_name}.key"
ca_file = "pki/ca.pem"
broker_host = "127.0.0.1"
broker_port = {ports.broker_agents}
""",
    )
    _write_once(
        state.client_toml,
        f"""\
# A client profile for the one-machine farm: gateway SSL mode through the local gateway.
server_host = "127.0.0.1"
server_port = {ports.gateway_tls}
server_name = "localhost"
mode = "gateway_ssl"
ca_file = "pki/gateway-public.pem"
username = "{DEMO_USER}"
resource = "desktop"
listen_host = "127.0.0.1"
listen_port = 13389
""",
    )
    broker = load(BrokerConfig, state.broker_toml)
    store = SQLiteStore(broker.database)
    try:
        if store.get_user(DEMO_USER) is None:
            password = secrets.token_urlsafe(12)
            store.put_user(UserRecord(DEMO_USER, hash_password(password), ("users",)))
            write_atomic(state.password_file, password.encode() + b"\n", mode=0o600)
        if store.get_user(ADMIN_USER) is None:
            password = secrets.token_urlsafe(12)
            store.put_user(UserRecord(ADMIN_USER, hash_password(password), ("ras-admins",)))
            write_atomic(state.admin_password_file, password.encode() + b"\n", mode=0o600)
    finally:
        store.close()
    return state


async def run_farm(
    state: FarmState,
    *,
    task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve broker, gateway and agent from ``state`` until cancelled."""
    broker_cfg = load(BrokerConfig, state.broker_toml)
    gateway_cfg = load(GatewayConfig, state.gateway_toml)
    agent_cfg = load(AgentConfig, state.agent_toml)
    load(ClientConfig, state.client_toml)  # fail early on a broken client profile
    store = SQLiteStore(broker_cfg.database)
    try:
        broker = Broker(broker_cfg, store)
        gateway = Gateway(gateway_cfg)
        agent = Agent(agent_cfg)
        async with trio.open_nursery() as nursery:
            addrs: dict[str, tuple[str, int]] = {}
            demo = state.demo_rdp_port()
            if demo is not None and (agent_cfg.rdp_host, agent_cfg.rdp_port) == (
                "127.0.0.1",
                demo,
            ):
                host = await nursery.start(run_demo_host, state.directory, demo)
                addrs["demo_rdp"] = (host.host, host.port)
            for what, addr in (await nursery.start(broker.serve)).items():
                addrs[f"broker_{what}"] = addr
            for what, addr in (await nursery.start(gateway.serve)).items():
                addrs[f"gateway_{what}"] = addr
            await nursery.start(agent.run)
            with trio.fail_after(30):
                await agent.registered.wait()
            task_status.started(addrs)
    finally:
        store.close()
