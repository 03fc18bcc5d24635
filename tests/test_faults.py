"""Faults on the wire: the fault proxy (``ras.lab.faults``), then the farm through it.

A :class:`FaultProxy` between two daemons delays, slices, stalls, blackholes and resets their
connections while they run. The farm runs in-process on loopback (tests/farmkit.py) with the
proxy in front of a gateway (client sessions and tunnels), in front of the broker (the
gateway's link, sessions and redemptions; an agent's link), and in front of the RDP host.
Nothing may hang past its deadline, no byte a tunnel carries may change, and every daemon
must be back in service once the faults stop. Assertions read state and replies, never log
text or timings; every deadline here is a hang guard.
"""

from __future__ import annotations

import random

import pytest
import trio
from farmkit import PASSWORD, USER, Farm, Listener, add_agent, add_gateway, farm, replace, until

from ras.client.session import ClientSession
from ras.errors import ErrorCode, PeerError, TransportError
from ras.lab.faults import Direction, FaultProxy, Faults
from ras.protocol import Mode


async def _proxy(nursery: trio.Nursery, target: tuple[str, int]) -> FaultProxy:
    proxy = FaultProxy(target)
    await nursery.start(proxy.serve)
    return proxy


def _payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def _exchange(stream: trio.abc.Stream, data: bytes) -> bytes:
    """Send ``data`` while reading what comes back, until as many bytes came (or the end)."""
    got = bytearray()

    async def read() -> None:
        while len(got) < len(data) and (chunk := await stream.receive_some()):
            got.extend(chunk)

    with trio.fail_after(30):  # a hang guard only
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await stream.send_all(data)
    return bytes(got)


async def _receive(stream: trio.abc.Stream, size: int) -> bytes:
    """Exactly ``size`` bytes (fewer if the stream ends first)."""
    got = bytearray()
    with trio.fail_after(30):  # a hang guard only
        while len(got) < size and (chunk := await stream.receive_some(size - len(got))):
            got.extend(chunk)
    return bytes(got)


async def _ended(stream: trio.abc.Stream) -> bytes:
    """Read until the stream ends (an end of stream or a reset); what came before it."""
    got = bytearray()
    with trio.fail_after(30):  # a hang guard only
        try:
            while chunk := await stream.receive_some():
                got.extend(chunk)
        except trio.BrokenResourceError:
            pass
    return bytes(got)


# -- the proxy itself --------------------------------------------------------------------------


@pytest.fixture
async def proxy(nursery: trio.Nursery, host: Listener) -> FaultProxy:
    return await _proxy(nursery, ("127.0.0.1", host.port))


async def test_bytes_arrive_unchanged_through_latency_slices_and_a_bandwidth_cap(proxy, host):
    proxy.set(latency_s=0.02, max_piece=97, piece_gap_s=0.0001)
    proxy.set(Direction.DOWN, bandwidth_bps=1_000_000)
    data = _payload(20_000)
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        assert await _exchange(stream, data) == data
        await stream.send_eof()  # the half-close goes through, and the echo's comes back
        assert await _ended(stream) == b""
    assert bytes(host.received) == data
    assert proxy.forwarded == {Direction.UP: len(data), Direction.DOWN: len(data)}


async def test_a_stall_holds_the_bytes_until_it_is_lifted(proxy, host):
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        assert await _exchange(stream, b"before") == b"before"
        proxy.stall()
        await stream.send_all(b"held")
        await trio.sleep(0.2)  # time enough to forward it, were it not stalled
        assert bytes(host.received) == b"before"
        proxy.clear()
        assert await _receive(stream, 4) == b"held"
        assert await _exchange(stream, b"after") == b"after"
    assert bytes(host.received) == b"beforeheldafter"


async def test_a_blackhole_drops_bytes_and_the_end_of_stream_until_it_is_lifted(proxy, host):
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        proxy.blackhole(Direction.UP)
        await stream.send_all(b"lost")
        await stream.send_eof()
        await until(lambda: proxy.dropped[Direction.UP] == 4)
        assert proxy.open == 1  # the connection looks alive: nothing came back, not even a FIN
        proxy.clear()
        assert await _ended(stream) == b""  # the held end of stream went through; echoed back
    assert host.received == b""
    assert host.connections == 1


async def test_resets_reach_both_peers_and_a_refusing_proxy_resets_new_connections(proxy, host):
    stream = await trio.open_tcp_stream(*proxy.address)
    assert await _exchange(stream, b"ping") == b"ping"
    assert proxy.reset_all() == 1
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()
    await stream.aclose()
    await until(lambda: host.resets == 1)
    proxy.refusing = True
    async with await trio.open_tcp_stream(*proxy.address) as refused:
        with pytest.raises(trio.BrokenResourceError):
            await refused.receive_some()
    assert (proxy.accepted, proxy.refused, host.connections) == (2, 1, 1)
    proxy.clear()
    async with await trio.open_tcp_stream(*proxy.address) as again:
        assert await _exchange(again, b"pong") == b"pong"


async def test_cut_after_truncates_a_connection_with_a_reset(proxy, host):
    proxy.set(Direction.DOWN, cut_after=10)
    async with await trio.open_tcp_stream(*proxy.address) as stream:
        await stream.send_all(b"0123456789abcdef")
        assert await _ended(stream) == b"0123456789"
    assert proxy.resets == 1


def test_faults_refuse_nonsense():
    with pytest.raises(ValueError, match="negative"):
        Faults(latency_s=-1)
    with pytest.raises(ValueError, match="negative"):
        Faults(max_piece=-3)


# -- a gateway's clients through the proxy -----------------------------------------------------


async def _launch(cfg) -> tuple[ClientSession, str]:
    session = await ClientSession.connect(cfg)
    await session.authenticate(USER, PASSWORD)
    return session, (await session.launch("desktop")).ticket


@pytest.mark.parametrize("mode", [Mode.GATEWAY, Mode.GATEWAY_SSL])
async def test_a_tunnel_through_latency_and_slices_carries_bytes_unchanged(
    tmp_path, nursery, host, mode
):
    """Slices of 1 to 13 bytes with latency between the client and the gateway (the TLS
    handshake, the control protocol and the tunnel), and slices between the gateway and the
    RDP host: what goes in comes out, both ways."""
    back = await _proxy(nursery, ("127.0.0.1", host.port))
    back.set(latency_s=0.01, max_piece=100)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", back.address[1])]) as f:
        port = f.gateway_addrs["gateway"]["tls" if mode is Mode.GATEWAY_SSL else "plain"]
        front = await _proxy(nursery, port)
        front.set(latency_s=0.01, max_piece=13)
        cfg = replace(f.client_config(mode=mode), server_port=front.address[1])
        data = _payload(16_384)
        with trio.fail_after(60):  # a hang guard only
            session, ticket = await _launch(cfg)
            async with session:
                tunnel = await session.open_tunnel(ticket)
            async with tunnel:
                assert await _exchange(tunnel, data) == data
    assert bytes(host.received) == data


@pytest.mark.parametrize("idle_timeout_s", [0, 1])
async def test_a_stalled_tunnel_is_cut_by_the_idle_timeout_only(
    tmp_path, nursery, host, idle_timeout_s
):
    """A tunnel whose client goes silent (its path stalls) outlives every timeout of the
    session it came from (pre-authentication, session idle); with a tunnel idle timeout it is
    ended by that, and by nothing else."""
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        gw = await add_gateway(
            f,
            nursery,
            "gateway",
            preauth_timeout_s=2,
            session_idle_timeout_s=1,
            handshake_timeout_s=1,
            tunnel_idle_timeout_s=idle_timeout_s,
        )
        front = await _proxy(nursery, f.gateway_addrs["gateway"]["plain"])
        cfg = replace(f.client_config(mode=Mode.GATEWAY), server_port=front.address[1])
        with trio.fail_after(60):  # a hang guard only
            session, ticket = await _launch(cfg)
            async with session:
                tunnel = await session.open_tunnel(ticket)
            assert await _exchange(tunnel, b"before") == b"before"
            (opened,) = gw.tunnels
            front.stall()
            await tunnel.send_all(b"during the stall")
            if idle_timeout_s:
                await until(lambda: len(gw.tunnels) == 0)
                assert opened.ended_by == "idle timeout"
                front.clear()
                assert await _ended(tunnel) == b""  # closed, and the held bytes went nowhere
                assert bytes(host.received) == b"before"
            else:
                await trio.sleep(2.5)  # past the session's deadlines: none of them applies
                assert list(gw.tunnels) == [opened]
                front.clear()
                assert await _receive(tunnel, 16) == b"during the stall"
                assert await _exchange(tunnel, b" and after") == b" and after"
                assert bytes(host.received) == b"beforeduring the stall and after"
                assert opened.ended_by == ""
            await tunnel.aclose()


async def test_a_blackholed_session_fails_in_time_and_comes_back_when_the_path_does(
    tmp_path, nursery, host
):
    """The path to the gateway drops everything: a request fails within the client's
    request_timeout_s (plus one connect_timeout_s to find no other way), it does not hang;
    once the path works, the next request re-establishes the session (resumed, no password)
    and is answered."""
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        front = await _proxy(nursery, f.gateway_addrs["gateway"]["plain"])
        cfg = replace(
            f.client_config(mode=Mode.GATEWAY),
            server_port=front.address[1],
            request_timeout_s=1,
            connect_timeout_s=1,
        )
        with trio.fail_after(60):  # a hang guard only
            async with await ClientSession.connect(cfg) as session:
                await session.authenticate(USER, PASSWORD)
                front.blackhole()
                with pytest.raises(TransportError) as info:
                    await session.list_resources()
                assert not isinstance(info.value, PeerError)  # no answer at all
                assert session.reconnects == 0
                front.clear()
                resources = await session.list_resources()
                assert [r.id for r in resources] == ["desktop"]
                assert session.reconnects == 1
                tunnel = await session.open_tunnel((await session.launch("desktop")).ticket)
                async with tunnel:
                    assert await _exchange(tunnel, b"back") == b"back"


# -- the broker's links through the proxy ------------------------------------------------------


async def _gateway_behind(f: Farm, nursery: trio.Nursery, **options: object):
    """The gateway "gateway" reaching the broker through a fault proxy."""
    link = await _proxy(nursery, f.broker_addrs["gateways"])
    gw = await add_gateway(f, nursery, "gateway", broker_port=link.address[1], **options)
    await until(lambda: gw.registered.is_set() and f.broker.gateways["gateway"].online)
    return gw, link


async def _tunnel_works(f: Farm, host: Listener) -> None:
    cfg = f.client_config(mode=Mode.GATEWAY)
    with trio.fail_after(30):  # a hang guard only
        session, ticket = await _launch(cfg)
        async with session, await session.open_tunnel(ticket) as tunnel:
            assert await _exchange(tunnel, b"works") == b"works"


async def _login_refused(f: Farm) -> ErrorCode:
    cfg = f.client_config(mode=Mode.GATEWAY)
    with trio.fail_after(30):  # a hang guard only
        async with await ClientSession.connect(cfg) as session:
            with pytest.raises(PeerError) as info:
                await session.authenticate(USER, PASSWORD)
    return info.value.code


async def test_the_gateway_registers_again_after_its_broker_connections_are_reset(
    tmp_path, nursery, host
):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        gw, link = await _gateway_behind(f, nursery)
        await _tunnel_works(f, host)
        link.refusing = True
        assert link.reset_all() >= 1  # the link, and the pooled redemption connection
        await until(lambda: not f.broker.gateways["gateway"].online)
        await until(lambda: not gw.registered.is_set())
        # while the broker cannot be reached, clients are told so at once
        assert await _login_refused(f) is ErrorCode.UNAVAILABLE
        link.clear()
        await until(lambda: gw.registered.is_set() and f.broker.gateways["gateway"].online)
        assert f.broker.gateways["gateway"].links == 1
        await _tunnel_works(f, host)
    assert host.connections == 2


async def test_a_stalled_broker_link_is_noticed_and_the_gateway_registers_again(
    tmp_path, nursery, host
):
    """The path to the broker stops forwarding: the link's pings go unanswered and the gateway
    takes it down within broker_timeout_s; a client's login meanwhile gets UNAVAILABLE within
    the same deadline; when the path forwards again, the gateway registers again (the broker
    drops the stale link) and serves."""
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        gw, link = await _gateway_behind(f, nursery, link_ping_interval_s=0.2, broker_timeout_s=1)
        link.stall()
        await until(lambda: not gw.registered.is_set())
        assert await _login_refused(f) is ErrorCode.UNAVAILABLE
        link.clear()
        await until(lambda: gw.registered.is_set() and f.broker.gateways["gateway"].links == 1)
        await _tunnel_works(f, host)


@pytest.mark.parametrize("fault", ["reset", "stall"])
async def test_a_host_drops_out_while_its_agent_cannot_reach_the_broker_and_comes_back(
    tmp_path, nursery, host, fault
):
    """An agent's link reset (the host is offline at once) or stalled (the broker hears no
    report for host_timeout_s): launches find no host; when the path works again the agent
    registers again and the host takes launches."""
    async with farm(tmp_path, gateways=(), host_timeout_s=1, report_interval_s=0.2) as f:
        # the broker holds a gateway's link to host_timeout_s too: it must ping more often
        await add_gateway(f, nursery, "gateway", link_ping_interval_s=0.2)
        link = await _proxy(nursery, f.broker_addrs["agents"])
        agent = await add_agent(
            f, nursery, "host1", "127.0.0.1", host.port, broker_port=link.address[1], retry_max_s=1
        )
        await until(lambda: f.broker.hosts.hosts["host1"].online)
        await _tunnel_works(f, host)
        if fault == "reset":
            link.refusing = True
            assert link.reset_all() == 1
        else:
            link.stall()
        await until(lambda: not f.broker.hosts.hosts["host1"].online)
        async with await ClientSession.connect(f.client_config(mode=Mode.GATEWAY)) as session:
            await session.authenticate(USER, PASSWORD)
            with pytest.raises(PeerError) as info:
                await session.launch("desktop")
            assert info.value.code is ErrorCode.NO_HOST
        link.clear()
        await until(lambda: agent.registered.is_set() and f.broker.hosts.hosts["host1"].online)
        await _tunnel_works(f, host)
    assert host.connections == 2
