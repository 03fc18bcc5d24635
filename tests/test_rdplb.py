"""RDP load balancing on the gateway's RDP port, in a real in-process farm.

A native RDP client's first bytes (TPKT + X.224 Connection Request) reach the gateway's RDP
port; the broker names the host from a routing token or an mstshash cookie; the stand-in host
echoes, so the bytes it got and sent back prove the Connection Request went through unchanged.
Decoy listeners must never see a connection. Then the pure parts: the token codec and the
session-affinity table.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, add_gateway, farm

from ras.broker.config import ResourceConfig
from ras.broker.model import TicketScope
from ras.broker.passwords import hash_password
from ras.broker.routing import MAX_TOKEN_CHARS, Affinity, RoutingTokens
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.errors import ErrorCode, TicketError
from ras.net.channel import PeerError
from ras.protocol import Mode
from ras.protocol.x224 import encode_connection_request

PAYLOAD = b"first RDP bytes after the request"


@pytest.fixture
async def listeners(nursery: trio.Nursery) -> tuple[Listener, Listener, Listener]:
    """(host1, host2, a decoy nobody may reach)."""
    found = Listener(), Listener(), Listener()
    for listener in found:
        await nursery.start(listener.serve)
    return found


async def _token(f, gateway: str = "gw", resource: str = "desktop") -> str:
    async with await ClientSession.connect(f.client_config(gateway, Mode.GATEWAY)) as session:
        await session.authenticate(USER, PASSWORD)
        granted = await session.rdp_token(resource)
    assert 0 < len(granted.token) <= MAX_TOKEN_CHARS
    assert granted.expires_in_s == 28800
    return granted.token


async def _rdp(f, cookie: str | None, *, gateway: str = "gw", keep: bool = False):
    """Connect to the RDP port like a native client; return what came back (the host's echo)
    and, with ``keep``, the open stream."""
    wire = encode_connection_request(cookie) + PAYLOAD
    stream = await trio.open_tcp_stream(*f.gateway_addrs[gateway]["rdp"])
    await stream.send_all(wire)
    got = b""
    with trio.fail_after(20):  # a hang guard only
        try:
            while len(got) < len(wire):
                data = await stream.receive_some(65536)
                if not data:
                    break
                got += data
        except trio.BrokenResourceError:
            pass
    if keep:
        return got, stream
    await stream.aclose()
    return got


async def _gateway(f, nursery, name: str = "gw", **options: object) -> None:
    await add_gateway(f, nursery, name, rdp_lb_enabled=True, rdp_port=0, **options)


async def test_routing_token_reaches_the_host_unchanged_and_is_reusable(
    tmp_path, listeners, nursery, caplog
):
    caplog.set_level("INFO", logger="ras")
    host, _, decoy = listeners
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        await _gateway(f, nursery)
        token = await _token(f)
        cookie = f"Cookie: msts={token}"
        wire = encode_connection_request(cookie) + PAYLOAD
        first = await _rdp(f, cookie)
        again = await _rdp(f, cookie)  # the RDP client's own reconnect: same token
    assert first == again == wire  # echoed: the host got exactly the client's bytes
    assert bytes(host.received) == wire * 2
    assert host.connections == 2
    assert decoy.connections == 0
    lines = [r.getMessage() for r in caplog.records]
    closed = [m for m in lines if m.startswith("tunnel closed")]
    assert len(closed) == 2
    assert all(f"rdp=127.0.0.1:{host.port}" in m and "via=token" in m for m in closed)
    assert all(f"user={USER} resource=desktop" in m for m in closed)
    assert all(f"bytes_up={len(wire)} bytes_down={len(wire)}" in m for m in closed)
    assert not any(token in m for m in lines)  # the token is a key: never logged


async def test_a_routing_token_works_through_every_gateway_of_the_farm(
    tmp_path, listeners, nursery
):
    """Behind a HALB VIP an RDP client lands on any gateway: a token issued through one is
    routed by another (ticket_scope = "farm", the default), unless its resource is not
    published through that one."""
    host, _, decoy = listeners
    only_gw = ResourceConfig("desktop", "Desktop", gateways=("gw",))
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        await _gateway(f, nursery)
        await _gateway(f, nursery, "other")
        token = await _token(f)
        cookie = f"Cookie: msts={token}"
        wire = encode_connection_request(cookie) + PAYLOAD
        assert await _rdp(f, cookie, gateway="other") == wire
        assert await _rdp(f, cookie, gateway="gw") == wire
    assert host.connections == 2
    async with farm(
        tmp_path / "restricted",
        gateways=(),
        rdp_hosts=[("host1", "127.0.0.1", host.port)],
        resources=(only_gw,),
    ) as f:
        await _gateway(f, nursery)
        await _gateway(f, nursery, "other")
        token = await _token(f)
        assert await _rdp(f, f"Cookie: msts={token}", gateway="other") == b""
    assert host.connections == 2
    assert decoy.connections == 0


async def test_cookies_that_must_go_nowhere(tmp_path, listeners, nursery, caplog):
    """Addresses in cookies, edited, expired and foreign tokens, mstshash where it is off, no
    cookie: the gateway closes, and neither the host nor the decoy sees a connection."""
    caplog.set_level("INFO", logger="ras")
    host, _, decoy = listeners
    async with farm(
        tmp_path,
        gateways=(),
        rdp_hosts=[("host1", "127.0.0.1", host.port)],
        ticket_scope=TicketScope.GATEWAY,
    ) as f:
        await _gateway(f, nursery)
        await _gateway(f, nursery, "other")
        token = await _token(f)
        key = f.store.secret("routing-key")
        expired, _ = RoutingTokens(key).issue(
            user=USER, resource="desktop", gateway="gw", now=time.time() - 7200, ttl_s=60
        )
        forged, _ = RoutingTokens(b"k" * 32).issue(
            user=USER, resource="desktop", gateway="gw", now=time.time(), ttl_s=60
        )
        edited = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
        ip = int.from_bytes(bytes([127, 0, 0, 1]), "little")
        port = int.from_bytes(decoy.port.to_bytes(2, "big"), "little")
        cookies = [
            f"Cookie: msts={ip}.{port}.0000",  # a Windows broker's address cookie
            f"Cookie: msts=127.0.0.1:{decoy.port}",
            f"Cookie: msts={edited}",
            f"Cookie: msts={expired}",
            f"Cookie: msts={forged}",
            f"Cookie: msts={token}.",
            f"Cookie: mstshash={USER}",  # mstshash routing is off
            f"tsv://MS Terminal Services Plugin.1.desktop@127.0.0.1:{decoy.port}",
            None,
        ]
        got = [await _rdp(f, cookie) for cookie in cookies]
        # with ticket_scope = "gateway", a token is bound to the gateway it was issued through
        got.append(await _rdp(f, f"Cookie: msts={token}", gateway="other"))
        # garbage and a trickled half request are closed too
        async with await trio.open_tcp_stream(*f.gateway_addrs["gw"]["rdp"]) as stream:
            await stream.send_all(b"\x03\x00\xff\xff" + bytes(100))
            with trio.fail_after(20):  # closed (or reset: unread bytes were left)
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await stream.receive_some(100) == b""
    assert got == [b""] * len(got)
    assert host.connections == decoy.connections == 0
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) >= len(got)
    assert not any(token in r.getMessage() or expired in r.getMessage() for r in caplog.records)


async def test_mstshash_routing_with_session_affinity(tmp_path, listeners, nursery, caplog):
    caplog.set_level("INFO", logger="ras")
    host1, host2, decoy = listeners
    hosts = [("host1", "127.0.0.1", host1.port), ("host2", "127.0.0.1", host2.port)]
    async with farm(tmp_path, gateways=(), rdp_hosts=hosts, mstshash_routing=True) as f:
        f.store.put_user(UserRecord("bob", hash_password("b", log2_n=10), ("users",)))
        f.store.put_user(UserRecord("carol", hash_password("c", log2_n=10), (), enabled=False))
        await _gateway(f, nursery, rdp_lb_mstshash=True)
        got, alice1 = await _rdp(f, f"Cookie: mstshash={USER}", keep=True)
        assert got.startswith(b"\x03\x00")
        got, bob = await _rdp(f, "Cookie: mstshash=bob", keep=True)
        assert got.startswith(b"\x03\x00")
        # alice again while her first connection lives: the same host, not the least loaded
        got, alice2 = await _rdp(f, f"Cookie: mstshash={USER.upper()}", keep=True)
        assert got.startswith(b"\x03\x00")
        for stream in (alice1, bob, alice2):
            await stream.aclose()
        # and again after both closed (a reconnect to a disconnected session): same host
        assert (await _rdp(f, f"Cookie: mstshash={USER}")).startswith(b"\x03\x00")
        # an unknown or disabled user goes nowhere
        assert await _rdp(f, "Cookie: mstshash=mallory") == b""
        assert await _rdp(f, "Cookie: mstshash=carol") == b""
    routes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("route user=")]
    chosen = [m.split(" host=")[1].split()[0] for m in routes]
    assert chosen[0] != chosen[1]  # alice and bob were balanced over the two hosts
    assert chosen[2] == chosen[3] == chosen[0]  # alice stuck to hers
    assert ["affinity=True" in m for m in routes] == [False, False, True, True]
    assert host1.connections + host2.connections == 4
    assert decoy.connections == 0


async def test_mstshash_needs_the_farm_to_allow_it(tmp_path, listeners, nursery):
    host, _, _ = listeners
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        await _gateway(f, nursery, rdp_lb_mstshash=True)  # the gateway would, the broker not
        assert await _rdp(f, f"Cookie: mstshash={USER}") == b""
    assert host.connections == 0


async def test_rdp_token_needs_a_login_and_a_published_resource(tmp_path, nursery):
    async with farm(tmp_path, gateways=()) as f:
        await _gateway(f, nursery)
        async with await ClientSession.connect(f.client_config("gw", Mode.GATEWAY)) as session:
            with pytest.raises(PeerError) as info:
                await session.rdp_token("desktop")
            assert info.value.code is ErrorCode.AUTH_REQUIRED
            await session.authenticate(USER, PASSWORD)
            with pytest.raises(PeerError) as info:
                await session.rdp_token("not-published")
            assert info.value.code is ErrorCode.NOT_FOUND


# -- the pure parts ---------------------------------------------------------------------------

KEY = bytes(range(32))


def test_token_round_trip_binding_and_tampering() -> None:
    tokens = RoutingTokens(KEY)
    token, claims = tokens.issue(user="alice", resource="desk", gateway="gw1", now=1000, ttl_s=60)
    assert token.startswith("r1.")
    assert len(token) < 80
    assert tokens.verify(token, now=1059) == claims
    with pytest.raises(TicketError, match="expired"):
        tokens.verify(token, now=1060)
    with pytest.raises(TicketError):
        RoutingTokens(bytes(32)).verify(token, now=1000)
    for i in range(3, len(token)):  # every edited character is refused
        for c in "AB_":
            if token[i] != c:
                with pytest.raises(TicketError):
                    tokens.verify(token[:i] + c + token[i + 1 :], now=1000)
    with pytest.raises(TicketError, match="too long"):
        tokens.issue(user="u" * 120, resource="desk", gateway="gw1", now=1000, ttl_s=60)


def test_affinity_holds_while_open_then_for_the_grace() -> None:
    table = Affinity(grace_s=600)
    assert table.host_for("alice", "desk", 0) is None
    table.opened("alice", "desk", "h1")
    table.opened("Alice", "desk", "h1")
    assert table.host_for("ALICE", "desk", 10_000) == "h1"  # open: no expiry
    assert table.host_for("alice", "other", 0) is None
    table.closed("alice", "desk", "h1", 100)
    assert table.host_for("alice", "desk", 10_000) == "h1"  # one still open
    table.closed("alice", "desk", "h1", 100)
    assert table.host_for("alice", "desk", 699) == "h1"
    assert table.host_for("alice", "desk", 700) is None
    assert len(table) == 0
    table.opened("bob", "desk", "h1")
    table.opened("bob", "desk", "h2")  # h1 went away: bob moves, h1's close is ignored
    table.closed("bob", "desk", "h1", 0)
    assert table.host_for("bob", "desk", 5000) == "h2"
