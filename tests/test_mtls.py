"""Daemon-to-daemon traffic is mutual TLS with the farm's certificates: the broker refuses a
peer with no certificate or one from another CA, and believes the certificate's name, not
what the peer claims."""

from __future__ import annotations

import pytest
import trio
from farmkit import LOOPBACK, farm

from ras.errors import ErrorCode, TransportError
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
