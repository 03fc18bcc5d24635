"""The gateway opens tunnels only to the host:port of a ticket the broker redeemed.

Each test runs a real in-process farm (broker, gateways, agent over mutual TLS on loopback)
with a stand-in RDP host that echoes, and decoy listeners that must never see a connection.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, add_gateway, farm

from ras.broker.config import ResourceConfig
from ras.broker.model import TicketScope
from ras.broker.server import Broker
from ras.broker.store import SQLiteStore
from ras.broker.tickets import TicketAuthority
from ras.client.session import ClientSession
from ras.errors import AuthError, ErrorCode, TransportError
from ras.net.channel import Channel, PeerError, greet
from ras.net.tls import connect_tls
from ras.pki import client_context
from ras.protocol import (
    Authenticate,
    Hello,
    Mode,
    OpenTunnel,
    RedeemTicket,
    Role,
    Side,
    TicketOk,
    Welcome,
)
from ras.protocol import ClientSession as ClientSessionMsg


@pytest.fixture
async def hosts(nursery: trio.Nursery) -> tuple[Listener, Listener]:
    """(the RDP host the agent reports, a decoy nobody may reach)."""
    host, decoy = Listener(), Listener()
    await nursery.start(host.serve)
    await nursery.start(decoy.serve)
    return host, decoy


async def _ticket(cfg, resource: str = "desktop") -> str:
    async with await ClientSession.connect(cfg) as session:
        await session.authenticate(USER, PASSWORD)
        launched = await session.launch(resource)
    assert launched.mode is cfg.mode
    return launched.ticket


async def _refused(cfg, ticket: str) -> PeerError:
    async with await ClientSession.connect(cfg) as session:
        with pytest.raises(PeerError) as info:
            await session.open_tunnel(ticket)
    return info.value


@pytest.mark.parametrize("mode", [Mode.GATEWAY_SSL, Mode.GATEWAY])
async def test_tunnel_carries_bytes_unchanged(tmp_path, hosts, mode):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config(mode=mode)
        async with await ClientSession.connect(cfg) as session:
            assert (await session.authenticate(USER, PASSWORD)).user == USER
            assert [r.id for r in await session.list_resources()] == ["desktop"]
            launched = await session.launch("desktop")
            assert (launched.host, launched.port) == ("127.0.0.1", host.port)
            tunnel = await session.open_tunnel(launched.ticket)
        payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
        async with tunnel, trio.open_nursery() as nursery:
            nursery.start_soon(tunnel.send_all, payload)
            got = bytearray()
            while len(got) < len(payload):
                got += await tunnel.receive_some()
        assert bytes(got) == payload
        assert bytes(host.received) == payload
        assert host.connections == 1
        assert decoy.connections == 0


async def test_half_close_reaches_the_host_and_the_reply_still_arrives(tmp_path, hosts):
    host, _ = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config(mode=Mode.GATEWAY)
        tunnel = await ClientSession(cfg, None).open_tunnel(await _ticket(cfg))  # type: ignore[arg-type]
        async with tunnel:
            await tunnel.send_all(b"x" * 100_000)
            await tunnel.send_eof()  # our write side is shut; the host echoes and then closes
            got = bytearray()
            with trio.fail_after(10):
                while data := await tunnel.receive_some():
                    got += data
        assert got == b"x" * 100_000


async def test_no_ticket_and_garbage_tickets_are_refused(tmp_path, hosts):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config()
        for ticket in ("", "x", "t1.e30.AAAA", f"127.0.0.1:{decoy.port}", "t1." + "A" * 2000):
            if not ticket:
                continue  # an empty ticket is refused by the codec before it is sent
            err = await _refused(cfg, ticket)
            assert err.code is ErrorCode.TICKET_INVALID
    assert host.connections == 0
    assert decoy.connections == 0


async def test_forged_tickets_are_refused(tmp_path, hosts):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config()
        genuine = await _ticket(cfg)
        prefix, body, mac = genuine.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["port"] = decoy.port
        edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        # the same signature on edited claims, and claims signed with a key of our own
        own_key, _ = TicketAuthority(os.urandom(32)).issue(
            user=USER,
            resource="desktop",
            host="127.0.0.1",
            port=decoy.port,
            gateway="gateway",
            client="127.0.0.1",
            now=trio.current_time() + 1e9,
            ttl_s=60,
        )
        for forged in (f"{prefix}.{edited}.{mac}", own_key, genuine[:-2] + "AA"):
            assert (await _refused(cfg, forged)).code is ErrorCode.TICKET_INVALID
        # the genuine ticket still works once: forgeries did not burn it
        tunnel = await ClientSession(cfg, None).open_tunnel(genuine)  # type: ignore[arg-type]
        await tunnel.aclose()
    assert decoy.connections == 0
    assert host.connections == 1


async def test_a_ticket_opens_one_tunnel_only(tmp_path, hosts):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config()
        ticket = await _ticket(cfg)
        tunnel = await ClientSession(cfg, None).open_tunnel(ticket)  # type: ignore[arg-type]
        await tunnel.aclose()
        assert (await _refused(cfg, ticket)).code is ErrorCode.TICKET_INVALID
    assert host.connections == 1
    assert decoy.connections == 0


async def test_any_gateway_of_the_farm_redeems_a_ticket_once(tmp_path, hosts):
    """ticket_scope = "farm" (the default): the tunnel may land on another gateway (behind a
    HALB VIP, or the next server of the profile); still single-use and bound to the client."""
    host, decoy = hosts
    async with farm(
        tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=("gw-a", "gw-b")
    ) as f:
        ticket = await _ticket(f.client_config("gw-a"))
        tunnel = await ClientSession(f.client_config("gw-b"), None).open_tunnel(ticket)  # type: ignore[arg-type]
        await tunnel.send_all(b"ping")
        assert await tunnel.receive_some(4) == b"ping"
        await tunnel.aclose()
        for gateway in ("gw-a", "gw-b"):  # used: refused everywhere now
            refused = await _refused(f.client_config(gateway), ticket)
            assert refused.code is ErrorCode.TICKET_INVALID
    assert host.connections == 1
    assert decoy.connections == 0


@pytest.mark.parametrize(
    "options",
    [
        # the resource is published through gw-a only
        {"resources": (ResourceConfig("desktop", "Desktop", gateways=("gw-a",)),)},
        # the farm binds a ticket to the gateway it was issued through
        {"ticket_scope": TicketScope.GATEWAY},
    ],
    ids=["resource-not-published-there", "gateway-scope"],
)
async def test_a_ticket_refused_at_another_gateway_is_not_burnt(tmp_path, hosts, options):
    host, decoy = hosts
    async with farm(
        tmp_path,
        rdp_hosts=[("host1", "127.0.0.1", host.port)],
        gateways=("gw-a", "gw-b"),
        **options,
    ) as f:
        ticket = await _ticket(f.client_config("gw-a"))
        assert (await _refused(f.client_config("gw-b"), ticket)).code is ErrorCode.TICKET_INVALID
        # not burnt by the attempt: its own gateway still honours it
        tunnel = await ClientSession(f.client_config("gw-a"), None).open_tunnel(ticket)  # type: ignore[arg-type]
        await tunnel.aclose()
    assert host.connections == 1
    assert decoy.connections == 0


async def test_an_expired_ticket_is_refused(tmp_path, hosts):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], ticket_ttl_s=0.5) as f:
        cfg = f.client_config()
        ticket = await _ticket(cfg)
        await trio.sleep(0.8)
        assert (await _refused(cfg, ticket)).code is ErrorCode.TICKET_INVALID
    assert host.connections == 0
    assert decoy.connections == 0


async def _raw_session(addr: tuple[str, int], source: str) -> Channel:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(addr)
    chan = Channel(trio.SocketStream(sock), Side.CLIENT)
    await chan.send(Hello(Role.CLIENT, "test"))
    assert isinstance(await chan.receive(), Welcome)
    return chan


async def test_a_ticket_is_bound_to_the_client_address(tmp_path, hosts):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        ticket = await _ticket(f.client_config(mode=Mode.GATEWAY))  # issued to 127.0.0.1
        async with await _raw_session(f.gateway_addrs["gateway"]["plain"], "127.0.0.2") as chan:
            with pytest.raises(PeerError) as info:
                await chan.request(OpenTunnel(ticket))
        assert info.value.code is ErrorCode.TICKET_INVALID
    assert host.connections == 0
    assert decoy.connections == 0


@pytest.mark.parametrize("msg", [RedeemTicket("t1.x.y"), ClientSessionMsg("10.0.0.9", 1)])
async def test_clients_cannot_speak_for_the_gateway(tmp_path, hosts, msg):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        async with await _raw_session(f.gateway_addrs["gateway"]["plain"], "127.0.0.1") as chan:
            with pytest.raises(PeerError) as info:
                await chan.request(msg)
        assert info.value.code is ErrorCode.UNEXPECTED
    assert host.connections == 0
    assert decoy.connections == 0


async def test_wrong_password_and_unknown_user_get_the_same_answer(tmp_path, hosts):
    host, _ = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        answers = []
        for user, password in ((USER, "wrong"), ("nobody", PASSWORD)):
            async with await ClientSession.connect(f.client_config()) as session:
                with pytest.raises(AuthError) as info:
                    await session.authenticate(user, password)
                answers.append((info.value.code, str(info.value)))
                with pytest.raises(PeerError) as denied:  # still not logged in
                    await session.launch("desktop")
                assert denied.value.code is ErrorCode.AUTH_REQUIRED
        assert answers[0] == answers[1] == (ErrorCode.AUTH_FAILED, "wrong user name or password")


async def test_no_host_means_a_clear_refusal(tmp_path):
    async with farm(tmp_path) as f:
        async with await ClientSession.connect(f.client_config()) as session:
            await session.authenticate(USER, PASSWORD)
            with pytest.raises(PeerError) as info:
                await session.launch("desktop")
        assert info.value.code is ErrorCode.NO_HOST


async def test_gateway_says_unavailable_when_the_broker_is_down(tmp_path, hosts, nursery):
    host, _ = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        # a second gateway pointed at a port where no broker listens
        dead = trio.socket.socket()
        await dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()
        await add_gateway(f, nursery, "lonely", broker_port=port)
        async with await ClientSession.connect(f.client_config("lonely")) as session:
            with pytest.raises(TransportError) as info:
                await session.authenticate(USER, PASSWORD)
        assert isinstance(info.value, PeerError)
        assert info.value.code is ErrorCode.UNAVAILABLE
        # the gateway itself keeps serving: a fresh connection still gets a welcome
        await (await ClientSession.connect(f.client_config("lonely"))).aclose()


# -- the gateway's pooled redemption connections (ras.gateway.brokerpool) ---------------------


async def _redemption_connection(f, addrs: tuple[str, int], gateway: str) -> Channel:
    """What a gateway's pool opens: mutual TLS with ``gateway``'s farm certificate, no
    client_session; each request a redeem_ticket naming its client."""
    cert, key = f.pki.ensure(gateway)
    ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
    stream = await connect_tls(addrs[0], addrs[1], ctx, server_hostname="localhost")
    return await greet(stream, Role.GATEWAY, "test")


async def test_a_used_ticket_stays_used_after_a_broker_restart(tmp_path, hosts):
    host, decoy = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config()
        ticket = await _ticket(cfg)
        tunnel = await ClientSession(cfg, None).open_tunnel(ticket)  # type: ignore[arg-type]
        await tunnel.aclose()
        # a second broker process on the same database (what a restart leaves): nothing of
        # the first one's memory, and the ticket is still within its ttl
        store = SQLiteStore(f.broker.config.database)
        try:
            async with trio.open_nursery() as nursery:
                again = Broker(f.broker.config, store)
                addrs = await nursery.start(again.serve)
                with trio.fail_after(30):
                    async with await _redemption_connection(
                        f, addrs["gateways"], "gateway"
                    ) as chan:
                        with pytest.raises(PeerError) as info:
                            await chan.request(RedeemTicket(ticket, "127.0.0.1"))
                        assert info.value.code is ErrorCode.TICKET_INVALID
                        # a fresh ticket of the farm is good there: the refusal was the reuse
                        fresh = await _ticket(cfg)
                        granted = await chan.request(RedeemTicket(fresh, "127.0.0.1"))
                        assert isinstance(granted, TicketOk)
                        assert (granted.host, granted.port) == ("127.0.0.1", host.port)
                nursery.cancel_scope.cancel()
        finally:
            store.close()
    assert host.connections == 1
    assert decoy.connections == 0


async def test_a_redemption_connection_keeps_every_check(tmp_path, hosts):
    host, decoy = hosts
    async with farm(
        tmp_path,
        rdp_hosts=[("host1", "127.0.0.1", host.port)],
        ticket_scope=TicketScope.GATEWAY,
    ) as f:
        addrs = f.broker_addrs["gateways"]
        cfg = f.client_config()
        ticket = await _ticket(cfg)  # issued through "gateway" to 127.0.0.1
        with trio.fail_after(30):
            # another gateway's certificate, or another client address: refused, not burnt
            async with await _redemption_connection(f, addrs, "gw-other") as chan:
                with pytest.raises(PeerError) as info:
                    await chan.request(RedeemTicket(ticket, "127.0.0.1"))
                assert info.value.code is ErrorCode.TICKET_INVALID
            async with await _redemption_connection(f, addrs, "gateway") as chan:
                with pytest.raises(PeerError) as info:
                    await chan.request(RedeemTicket(ticket, "127.0.0.2"))
                assert info.value.code is ErrorCode.TICKET_INVALID
                # the connection serves on: the right client gets it once, then never again
                assert isinstance(await chan.request(RedeemTicket(ticket, "127.0.0.1")), TicketOk)
                with pytest.raises(PeerError) as info:
                    await chan.request(RedeemTicket(ticket, "127.0.0.1"))
                assert info.value.code is ErrorCode.TICKET_INVALID
                # nothing but redemptions naming their client: a login is refused and closed
                with pytest.raises(PeerError) as info:
                    await chan.request(Authenticate(USER, PASSWORD))
                assert info.value.code is ErrorCode.UNEXPECTED
            # a redeem_ticket without a client cannot open such a connection
            async with await _redemption_connection(f, addrs, "gateway") as chan:
                with pytest.raises(PeerError) as info:
                    await chan.request(RedeemTicket(await _ticket(cfg)))
                assert info.value.code is ErrorCode.UNEXPECTED
    assert host.connections == 0
    assert decoy.connections == 0


async def test_tunnels_share_a_few_broker_connections_and_survive_a_broken_one(tmp_path, hosts):
    host, _ = hosts
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        gw = f.gateways["gateway"]
        cfg = f.client_config(mode=Mode.GATEWAY)
        tickets = [await _ticket(cfg) for _ in range(6)]
        with trio.fail_after(60):
            for ticket in tickets[:3]:  # one after another: one connection serves them all
                await (await ClientSession(cfg, None).open_tunnel(ticket)).aclose()  # type: ignore[arg-type]
            assert gw.redeemer.open == 1
            # the broker end of it breaks while it is idle (a broker restart looks the same):
            # the next tunnel is still granted, on a fresh connection
            idle = gw.redeemer._idle[0][0]
            await idle.stream.transport_stream.aclose()  # type: ignore[attr-defined]
            for ticket in tickets[3:]:
                await (await ClientSession(cfg, None).open_tunnel(ticket)).aclose()  # type: ignore[arg-type]
            assert gw.redeemer.open == 1
    assert host.connections == 6
