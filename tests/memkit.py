"""The fast test level: the broker's and the gateway's connection handlers over memory streams.

No socket, no listener: :class:`MemoryNet` hands each connection to the handler "listening" at
the address dialled, over ``trio.testing.memory_stream_pair()``, with the farm's real mutual
TLS on top where the daemon expects it (the broker's ports). Tests run under trio's
``autojump_clock``: a deadline of minutes passes in a few milliseconds, and nothing depends on
how busy the machine is. What is asserted is what a peer receives (replies, error codes, the
end of the stream) and the daemons' state, never log text.

The broker offloads its store and its password hashes to worker threads; the autojump clock
would jump past every deadline while a thread works (the run loop looks idle), so the kit runs
that offload inline (:func:`inline_threads`): the same calls, on the trio thread.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from farmkit import PASSWORD, USER

from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.passwords import hash_password
from ras.broker.server import Broker
from ras.broker.store import SQLiteStore, UserRecord
from ras.errors import RasError, TransportError
from ras.gateway.config import GatewayConfig
from ras.gateway.front import Port
from ras.gateway.server import Gateway
from ras.net.channel import Channel, aclose_quietly, greet
from ras.net.reasons import BROKEN
from ras.pki import FarmPKI, client_context, server_context
from ras.protocol import (
    AgentRegister,
    ClientSession,
    Hello,
    HostKind,
    LoadReport,
    Message,
    Registered,
    Role,
    Side,
    Welcome,
)

__all__ = [
    "BROKER",
    "EchoHost",
    "MemoryFarm",
    "MemoryNet",
    "inline_threads",
    "memory_farm",
    "reply_to",
]

Peer = tuple[str, int]
Handler = Callable[[trio.abc.Stream, Peer], Awaitable[None]]
BROKER = "broker.test"  # the broker's address on the memory network (its gateway port: 20002)
GATEWAY_PORTS = {Port.PLAIN: 80, Port.TLS: 443, Port.RDP: 3389}


async def _inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trio.to_thread.run_sync`` runs its function inline (see the module's docstring)."""
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)


@dataclass
class MemoryNet:
    """Addresses served by handlers; ``connect`` makes a memory connection to one.

    ``dialled`` lists every address asked for, served or not (a test can check that nothing
    but the broker and the ticket's host was ever tried); ``ended`` what each served
    connection's handler ended with (None: it returned)."""

    nursery: trio.Nursery
    handlers: dict[Peer, tuple[Handler, ssl.SSLContext | None]] = field(default_factory=dict)
    dialled: list[Peer] = field(default_factory=list)
    ended: list[BaseException | None] = field(default_factory=list)
    _ports: int = 40000

    def listen(self, address: Peer, handler: Handler, *, tls: ssl.SSLContext | None = None) -> None:
        self.handlers[address] = (handler, tls)

    async def connect(self, host: str, port: int, *, source: str = "127.0.0.1") -> trio.abc.Stream:
        """A connection from ``source`` to ``host:port``; ``TransportError`` where nothing
        listens (as ``ras.net.tls.connect_tcp`` says it)."""
        self.dialled.append((host, port))
        served = self.handlers.get((host, port))
        if served is None:
            raise TransportError(f"cannot connect to {host}:{port}: Connection refused")
        handler, tls = served
        mine, theirs = trio.testing.memory_stream_pair()
        stream: trio.abc.Stream = theirs
        if tls is not None:
            stream = trio.SSLStream(theirs, tls, server_side=True)
        self._ports += 1
        self.nursery.start_soon(self._serve, handler, stream, (source, self._ports))
        return mine

    async def _serve(self, handler: Handler, stream: trio.abc.Stream, peer: Peer) -> None:
        """What ``ras.net.listen.serve_tcp`` does around a handler: whatever it raises ends
        this connection only, and the stream is closed."""
        outcome: BaseException | None = None
        try:
            await handler(stream, peer)
        except (RasError, trio.TooSlowError, *BROKEN) as exc:
            outcome = exc
        finally:
            self.ended.append(outcome)
            await aclose_quietly(stream)


@dataclass
class MemoryFarm:
    """A broker (not listening: its handlers are on ``net``) with its PKI, on ``net``."""

    pki: FarmPKI
    broker: Broker
    store: SQLiteStore
    net: MemoryNet

    def tls(self, name: str) -> ssl.SSLContext:
        """The client side of the farm's mutual TLS as daemon ``name``."""
        cert, key = self.pki.ensure(name)
        return client_context(self.pki.ca_path, cert_file=cert, key_file=key)

    async def dial_broker(self, name: str, role: Role, *, port: int = 20002) -> Channel:
        """A connection to the broker as ``name`` (its farm certificate), hello answered."""
        raw = await self.net.connect(BROKER, port)
        stream = trio.SSLStream(raw, self.tls(name), server_hostname="localhost")
        return await greet(stream, role, "memkit")

    @contextlib.asynccontextmanager
    async def session(self, gateway: str = "gateway", client: str = "192.0.2.7"):  # type: ignore[no-untyped-def]
        """What a gateway opens for one client: ``client_session`` first."""
        async with await self.dial_broker(gateway, Role.GATEWAY) as chan:
            await chan.send(ClientSession(client, 0))
            yield chan

    def gateway(self, name: str = "gateway", **options: object) -> Gateway:
        """A normal gateway ``name`` on the memory network: its front door serves ``name``'s
        ports 80, 443 (TLS) and, with ``rdp_lb_enabled``, 3389; it reaches the broker and the
        RDP hosts through ``net``. Its link to the broker is not run (nothing here needs it)."""
        cert, key = self.pki.ensure(name)
        public_cert, public_key = self.pki.ensure_self_signed(f"{name}-public", ("localhost",))
        settings: dict[str, object] = {"broker_host": BROKER, "broker_port": 20002, **options}
        cfg = GatewayConfig(
            name=name,
            cert_file=cert,
            key_file=key,
            ca_file=self.pki.ca_path,
            public_cert_file=public_cert,
            public_key_file=public_key,
            **settings,  # type: ignore[arg-type]
        )
        gateway = Gateway(cfg, connect=self.net.connect)
        for port, number in GATEWAY_PORTS.items():
            if port is not Port.RDP or cfg.rdp_lb_enabled:
                self.net.listen((name, number), partial(gateway.front_door, port=port))
        return gateway

    async def client(self, source: str = "127.0.0.1", gateway: str = "gateway") -> Channel:
        """A client's control connection to ``gateway``'s plain port from ``source``, welcomed."""
        stream = await self.net.connect(gateway, 80, source=source)
        chan = Channel(stream, Side.CLIENT)
        await chan.send(Hello(Role.CLIENT, "memkit"))
        welcome = await chan.receive()
        assert isinstance(welcome, Welcome), welcome
        return chan

    async def agent(self, name: str, rdp: Peer, *, max_sessions: int = 10) -> Channel:
        """An agent's registered link for host ``name`` (one load report sent)."""
        chan = await self.dial_broker(name, Role.AGENT, port=20003)
        reply = await chan.request(AgentRegister(name, HostKind.RDSH, rdp[0], rdp[1], max_sessions))
        assert isinstance(reply, Registered), reply
        await chan.send(LoadReport(1.0, 10.0, 0, 0))
        return chan


@contextlib.asynccontextmanager
async def memory_farm(
    tmp: Path,
    nursery: trio.Nursery,
    *,
    resources: tuple[ResourceConfig, ...] = (ResourceConfig("desktop", "Desktop"),),
    **options: object,
) -> AsyncIterator[MemoryFarm]:
    """A broker on a memory network (gateway port ``BROKER:20002``, agent port 20003);
    ``options``: other ``BrokerConfig`` settings. Needs ``inline_threads``."""
    pki = FarmPKI(tmp / "pki")
    pki.init_ca()
    cert, key = pki.ensure("broker", ("localhost", "127.0.0.1", BROKER))
    settings: dict[str, object] = {"admin_enabled": False, "host_timeout_s": 3600.0, **options}
    cfg = BrokerConfig(
        database=tmp / "broker.sqlite3",
        cert_file=cert,
        key_file=key,
        ca_file=pki.ca_path,
        resources=resources,
        **settings,  # type: ignore[arg-type]
    )
    store = SQLiteStore(cfg.database)
    store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    broker = Broker(cfg, store)
    net = MemoryNet(nursery)
    tls = server_context(cfg.cert_file, cfg.key_file, client_ca_file=cfg.ca_file)
    net.listen((BROKER, 20002), broker.handle_gateway, tls=tls)  # the seam: no listener
    net.listen((BROKER, 20003), broker.handle_agent, tls=tls)
    try:
        yield MemoryFarm(pki, broker, store, net)
    finally:
        store.close()


async def reply_to(chan: Channel, msg: Message) -> Message:
    """Send ``msg``; the next message that is not a ping (an ``error`` is returned, not
    raised)."""
    await chan.send(msg)
    return await chan.receive_reply()


class EchoHost:
    """A stand-in RDP host on the memory network: echoes, counts connections, keeps what it
    received."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = bytearray()

    async def serve(self, stream: trio.abc.Stream, peer: Peer) -> None:
        self.connections += 1
        with contextlib.suppress(*BROKEN):
            while data := await stream.receive_some():
                self.received += data
                await stream.send_all(data)
