"""Daemon-to-daemon traffic is mutual TLS with the farm's certificates: the broker refuses a
peer with no certificate or one from another CA, and believes the certificate's name, not
what the peer claims."""

from __future__ import annotations

import pytest
import trio
from farmkit import LOOPBACK, farm

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig
from ras.errors import ConfigError, ErrorCode, TransportError
from ras.gateway.config import GatewayConfig
from ras.gateway.server import Gateway
from ras.net.channel import Channel, PeerError
from ras.net.tls import connect_tls
from ras.pki import FarmPKI, client_context
from ras.protocol import AgentRegister, Error, GatewayRegister, Hello, HostKind, Role, Side, Welcome


async def _hello(f, port_name: str, ctx, role: Role) -> Channel:
    host, port = f.broker_addrs[port_name]
    with trio.fail_after(10):
        stream = await connect_tls(host, port, ctx, server_hostname="localhost")
        chan = Channel(stream, Side.CLIENT)
        await chan.send(Hello(role, "test"))
        assert isinstance(await chan.receive(), Welcome)
    return chan


async def _refused_at_handshake(f, port_name: str, ctx) -> None:
    host, port = f.broker_addrs[port_name]
    with trio.fail_after(10), pytest.raises(TransportError):  # noqa: PT012
        stream = await connect_tls(host, port, ctx, server_hostname="localhost")
        # TLS 1.3: the server's refusal of our certificate arrives after our handshake ends
        async with Channel(stream, Side.CLIENT) as chan:
            await chan.send(Hello(Role.GATEWAY, "test"))
            await chan.receive()


@pytest.mark.parametrize("port_name", ["gateways", "agents"])
async def test_no_client_certificate_is_refused(tmp_path, port_name):
    async with farm(tmp_path, gateways=()) as f:
        await _refused_at_handshake(f, port_name, client_context(f.pki.ca_path))


@pytest.mark.parametrize("port_name", ["gateways", "agents"])
async def test_a_certificate_from_another_ca_is_refused(tmp_path, port_name):
    async with farm(tmp_path, gateways=()) as f:
        rogue = FarmPKI(tmp_path / "rogue")
        cert, key = rogue.ensure("gateway", LOOPBACK)  # the right name, the wrong CA
        ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
        await _refused_at_handshake(f, port_name, ctx)
        assert "gateway" not in f.broker.gateways


async def test_an_agent_may_only_register_the_host_its_certificate_names(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        cert, key = f.pki.ensure("host9")
        ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
        async with await _hello(f, "agents", ctx, Role.AGENT) as chan:
            with pytest.raises(PeerError) as info:
                await chan.request(AgentRegister("host1", HostKind.RDSH, "127.0.0.1", 3389, 10))
        assert info.value.code is ErrorCode.FORBIDDEN
        assert "host1" not in f.broker.hosts.hosts


async def test_a_gateway_may_only_register_under_its_certificate_name(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        cert, key = f.pki.ensure("gw-real", LOOPBACK)
        ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
        async with await _hello(f, "gateways", ctx, Role.GATEWAY) as chan:
            with pytest.raises(PeerError) as info:
                await chan.request(GatewayRegister("gw-other", "localhost", 443))
        assert info.value.code is ErrorCode.FORBIDDEN
        assert "gw-other" not in f.broker.gateways


async def test_a_role_on_the_wrong_port_is_refused(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        cert, key = f.pki.ensure("host1")
        ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
        host, port = f.broker_addrs["gateways"]
        stream = await connect_tls(host, port, ctx, server_hostname="localhost")
        async with Channel(stream, Side.CLIENT) as chan:
            await chan.send(Hello(Role.AGENT, "test"))
            with pytest.raises(PeerError) as info:
                await _reply(chan)
        assert info.value.code is ErrorCode.FORBIDDEN


async def _reply(chan: Channel):
    msg = await chan.receive()
    if isinstance(msg, Error):
        raise PeerError(msg)
    return msg


# -- what a refused peer is told, and what it does ------------------------------------------------


async def test_an_untrusted_certificate_is_said_so(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        rogue = FarmPKI(tmp_path / "rogue")
        rogue.ensure("x")
        host, port = f.broker_addrs["gateways"]
        untrusting = client_context(rogue.ca_path)
        with trio.fail_after(10), pytest.raises(TransportError) as info:
            await connect_tls(host, port, untrusting, server_hostname="localhost")
    # It was "TLS with 127.0.0.1:PORT failed: " and nothing more.
    assert "its certificate is not trusted" in str(info.value)
    assert "CA file" in str(info.value)


async def test_a_connection_the_peer_drops_says_how(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        host, port = f.broker_addrs["gateways"]
        no_certificate = client_context(f.pki.ca_path)
        with trio.fail_after(10), pytest.raises(TransportError) as info:  # noqa: PT012
            stream = await connect_tls(host, port, no_certificate, server_hostname="localhost")
            async with Channel(stream, Side.CLIENT) as chan:
                await chan.send(Hello(Role.GATEWAY, "test"))
                await chan.receive()  # TLS 1.3: the refusal comes after our handshake
    # It was "connection lost: " and nothing more.
    assert str(info.value).startswith("connection lost: ")
    assert str(info.value).removeprefix("connection lost: ").strip()


def _gateway_config(f, name: str, cert_name: str) -> GatewayConfig:
    cert, key = f.pki.ensure(cert_name, LOOPBACK)
    public_cert, public_key = f.pki.ensure_self_signed(f"{cert_name}-public", LOOPBACK)
    return GatewayConfig(
        name=name,
        cert_file=cert,
        key_file=key,
        ca_file=f.pki.ca_path,
        public_cert_file=public_cert,
        public_key_file=public_key,
        listen_host="127.0.0.1",
        plain_port=0,
        tls_port=0,
        broker_port=f.broker_addrs["gateways"][1],
    )


async def test_a_gateway_the_broker_refuses_stops_instead_of_retrying(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        gateway = Gateway(_gateway_config(f, "gw2", "gw1"))
        # It logged "ready" and retried forever; now serve ends with a configuration error.
        with trio.fail_after(30), pytest.raises(ConfigError) as info:
            await gateway.serve()
    assert "certificate is for 'gw1', not 'gw2'" in str(info.value)


async def test_an_agent_the_broker_refuses_stops_instead_of_retrying(tmp_path):
    async with farm(tmp_path, gateways=()) as f:
        cert, key = f.pki.ensure("host1")
        agent = Agent(
            AgentConfig(
                name="host2", cert_file=cert, key_file=key, ca_file=f.pki.ca_path,
                broker_port=f.broker_addrs["agents"][1],
            )
        )  # fmt: skip
        with trio.fail_after(30), pytest.raises(ConfigError) as info:
            await agent.run()
    assert "certificate is for 'host1', not 'host2'" in str(info.value)
    assert "host2" not in f.broker.hosts.hosts
