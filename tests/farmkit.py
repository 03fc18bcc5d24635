"""An in-process farm for tests: broker, gateways and agents on 127.0.0.1, every port 0.

Certificates come from the project's own PKI in a temporary directory; the demo user gets a
known password. Everything runs in the caller's trio nursery and stops with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.directory import Directory
from ras.broker.passwords import hash_password
from ras.broker.server import Broker
from ras.broker.store import SQLiteStore, UserRecord
from ras.client.config import ClientConfig
from ras.errors import ErrorCode
from ras.gateway.config import GatewayConfig
from ras.gateway.server import Gateway
from ras.net.channel import Channel, greet
from ras.net.tls import connect_tls
from ras.pki import FarmPKI, client_context
from ras.protocol import (
    AuthChallenge,
    Authenticate,
    AuthOk,
    AuthResponse,
    ClientSession,
    Error,
    Message,
    Mode,
    Role,
)

USER = "alice"
PASSWORD = "correct horse battery staple"
LOOPBACK = ("localhost", "127.0.0.1")


@dataclass
class Farm:
    pki: FarmPKI
    broker: Broker
    store: SQLiteStore
    broker_addrs: dict[str, tuple[str, int]]
    gateways: dict[str, Gateway] = field(default_factory=dict)
    gateway_addrs: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)

    def client_config(
        self, gateway: str = "gateway", mode: Mode = Mode.GATEWAY_SSL, **kw: object
    ) -> ClientConfig:
        addrs = self.gateway_addrs[gateway]
        tls = mode in (Mode.GATEWAY_SSL, Mode.DIRECT_SSL)
        host, port = addrs["tls" if tls else "plain"]
        return ClientConfig(
            server_host=host,
            server_port=port,
            mode=mode,
            server_name="localhost",
            ca_file=self.pki.directory / f"{gateway}-public.pem",
            username=USER,
            resource="desktop",
            **kw,  # type: ignore[arg-type]
        )


@contextlib.asynccontextmanager
async def farm(
    tmp: Path,
    *,
    rdp_hosts: Sequence[tuple[str, str, int]] = (),
    gateways: Sequence[str] = ("gateway",),
    ticket_ttl_s: float = 60.0,
    resources: Sequence[ResourceConfig] = (ResourceConfig("desktop", "Desktop"),),
    directory: Callable[[SQLiteStore], Directory] | None = None,
    **broker_options: object,
) -> AsyncIterator[Farm]:
    """A running farm. ``rdp_hosts``: (agent name, RDP host, RDP port) for each agent."""
    pki = FarmPKI(tmp / "pki")
    pki.init_ca()
    cert, key = pki.ensure("broker", LOOPBACK)
    cfg = BrokerConfig(
        database=tmp / "broker.sqlite3",
        cert_file=cert,
        key_file=key,
        ca_file=pki.ca_path,
        gateway_port=0,
        agent_port=0,
        ticket_ttl_s=ticket_ttl_s,
        resources=tuple(resources),
        **{"admin_port": 0, **broker_options},  # type: ignore[arg-type]
    )
    store = SQLiteStore(cfg.database)
    store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    broker = Broker(cfg, store, directory=None if directory is None else directory(store))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(broker.serve)
        f = Farm(pki, broker, store, addrs)
        for name in gateways:
            await add_gateway(f, nursery, name)
        for name, host, port in rdp_hosts:
            await add_agent(f, nursery, name, host, port)
        try:
            yield f
        finally:
            nursery.cancel_scope.cancel()
            store.close()


async def add_gateway(f: Farm, nursery: trio.Nursery, name: str, **options: object) -> Gateway:
    cert, key = f.pki.ensure(name, LOOPBACK)
    pub_cert, pub_key = f.pki.ensure_self_signed(f"{name}-public", LOOPBACK)
    settings: dict[str, object] = {
        "listen_host": "127.0.0.1",
        "plain_port": 0,
        "tls_port": 0,
        "broker_port": f.broker_addrs["gateways"][1],
        **options,
    }
    cfg = GatewayConfig(
        name=name,
        public_cert_file=pub_cert,
        public_key_file=pub_key,
        cert_file=cert,
        key_file=key,
        ca_file=f.pki.ca_path,
        **settings,  # type: ignore[arg-type]
    )
    gateway = Gateway(cfg)
    f.gateway_addrs[name] = await nursery.start(gateway.serve)
    f.gateways[name] = gateway
    return gateway


async def add_agent(
    f: Farm,
    nursery: trio.Nursery,
    name: str,
    host: str,
    port: int,
    *,
    cert_name: str | None = None,
    **options: object,
) -> Agent:
    """An agent for host ``name``; ``options``: other ``AgentConfig`` settings (a
    ``broker_port`` of a fault proxy in front of the broker, ``retry_max_s``)."""
    cert, key = f.pki.ensure(cert_name or name)
    settings: dict[str, object] = {"broker_port": f.broker_addrs["agents"][1], **options}
    cfg = AgentConfig(
        name=name,
        cert_file=cert,
        key_file=key,
        ca_file=f.pki.ca_path,
        rdp_host=host,
        rdp_port=port,
        **settings,  # type: ignore[arg-type]
    )
    agent = Agent(cfg)
    await nursery.start(agent.run)
    f.agents[name] = agent
    if cert_name is None:
        with trio.fail_after(30):
            await agent.registered.wait()
    return agent


@contextlib.asynccontextmanager
async def broker_session(
    f: Farm, *, gateway: str = "gw-test", client: str = "192.0.2.7"
) -> AsyncIterator[Channel]:
    """A connection to the broker as gateway ``gateway`` (its own farm certificate) on behalf
    of a client at ``client``: what a gateway opens for each client, without the gateway."""
    cert, key = f.pki.ensure(gateway)
    ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
    host, port = f.broker_addrs["gateways"]
    with trio.fail_after(30):
        stream = await connect_tls(host, port, ctx, server_hostname="localhost")
        chan = await greet(stream, Role.GATEWAY, "farmkit")
    async with chan:
        await chan.send(ClientSession(client, 0))
        yield chan


async def login(
    chan: Channel, user: str, password: str, answers: Sequence[str] = ()
) -> tuple[ErrorCode | None, str]:
    """Log in on a broker session, answering challenges with ``answers`` in turn: (None,
    canonical user name) when logged in, else the refusal's (code, message)."""
    pending = list(answers)
    msg: Message = Authenticate(user, password)
    with trio.fail_after(30):
        while True:
            reply = await _ask(chan, msg)
            if isinstance(reply, AuthOk):
                return None, reply.user
            if isinstance(reply, Error):
                return reply.code, reply.message
            assert isinstance(reply, AuthChallenge), reply
            msg = AuthResponse(pending.pop(0) if pending else "")


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds: for state a test cannot wait on otherwise (the broker's
    view of an agent's report). The deadline is a hang guard, not a timing assertion."""
    with trio.fail_after(20):
        while not condition():  # noqa: ASYNC110 (polled state, no event to wait on)
            await trio.sleep(0.02)


async def _ask(chan: Channel, msg: Message) -> Message:
    await chan.send(msg)
    return await chan.receive_reply()


def replace(cfg: ClientConfig, **changes: object) -> ClientConfig:
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


class Listener:
    """A TCP server on 127.0.0.1 that counts connections and echoes (a stand-in RDP host, or a
    decoy that must never be reached)."""

    def __init__(self) -> None:
        self.connections = 0
        self.resets = 0
        self.received = bytearray()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def handle(stream: trio.SocketStream) -> None:
            self.connections += 1
            async with stream:
                try:
                    while data := await stream.receive_some(65536):
                        self.received += data
                        await stream.send_all(data)
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.resets += 1

        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(handle, listeners, handler_nursery=nursery)
