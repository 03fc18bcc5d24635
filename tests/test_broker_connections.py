"""The broker's connection handlers over memory streams (the fast level; see tests/memkit.py).

Gateways, HALB nodes and agents are played with real mutual TLS over memory streams under
trio's autojump clock: the handshake deadline, the order of the first messages, idle
redemption connections, silent gateway links and agents take a few milliseconds here.
"""

from __future__ import annotations

import pytest
import trio
from farmkit import PASSWORD, USER, until
from memkit import BROKER, memory_farm, reply_to

from ras.errors import ErrorCode, TransportError
from ras.net.channel import Channel
from ras.protocol import (
    Authenticate,
    AuthOk,
    Error,
    GatewayEntry,
    GatewayList,
    GatewayRegister,
    Launch,
    ListGateways,
    ListResources,
    Mode,
    Ping,
    Pong,
    PortalSettingsUpdate,
    RedeemTicket,
    Registered,
    ResourceList,
    Role,
    TicketOk,
)

pytestmark = pytest.mark.usefixtures("inline_threads")


async def _closed(chan: Channel) -> Error | None:
    """Read until the broker closes: its last ``error`` (None if it said nothing)."""
    last: Error | None = None
    with trio.fail_after(3600):  # a hang guard (virtual time)
        try:
            while True:
                msg = await chan.receive()
                if isinstance(msg, Error):
                    last = msg
        except TransportError:
            return last


async def test_a_connection_that_never_says_hello_is_closed_at_the_handshake_deadline(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery, handshake_timeout_s=10) as f:
        silent = await f.net.connect(BROKER, 20002)  # not even TLS
        with trio.move_on_after(9.9):
            assert await silent.receive_some() == b"never"
        with trio.fail_after(0.2):
            assert await silent.receive_some() == b""
        # after TLS, hello is due by the same deadline
        raw = await f.net.connect(BROKER, 20002)
        tls = trio.SSLStream(raw, f.tls("gateway"), server_hostname="localhost")
        await tls.do_handshake()
        with trio.fail_after(10.2):
            assert await tls.receive_some() == b""
    assert [type(e) for e in f.net.ended] == [trio.TooSlowError, trio.TooSlowError]


@pytest.mark.parametrize(
    "first",
    [ListResources(), Authenticate(USER, PASSWORD), RedeemTicket("t1.x.y"), Ping(1)],
    ids=["list_resources", "authenticate", "redeem_ticket_without_client", "ping"],
)
async def test_a_gateway_connection_must_say_what_it_is_first(
    tmp_path, nursery, autojump_clock, first
):
    async with memory_farm(tmp_path, nursery) as f:
        chan = await f.dial_broker("gateway", Role.GATEWAY)
        await chan.send(first)
        error = await _closed(chan)
    assert error is not None
    assert error.code is ErrorCode.UNEXPECTED


async def test_the_first_message_is_due_by_the_handshake_deadline(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery, handshake_timeout_s=10) as f:
        chan = await f.dial_broker("gateway", Role.GATEWAY)
        with trio.fail_after(10.2):
            assert await _closed(chan) is None
    assert [type(e) for e in f.net.ended] == [trio.TooSlowError]


async def test_an_agent_cannot_use_the_gateway_port_nor_a_gateway_the_agent_port(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery) as f:
        for name, role, port in (("host1", Role.AGENT, 20002), ("gateway", Role.GATEWAY, 20003)):
            with pytest.raises(TransportError, match="FORBIDDEN"):
                await f.dial_broker(name, role, port=port)


async def test_a_client_session_answers_in_order_and_refuses_what_comes_too_soon(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery) as f, f.session() as chan:
        reply = await reply_to(chan, ListResources())
        assert isinstance(reply, Error)
        assert reply.code is ErrorCode.AUTH_REQUIRED
        reply = await reply_to(chan, Launch("desktop", Mode.GATEWAY))
        assert isinstance(reply, Error)
        assert reply.code is ErrorCode.AUTH_REQUIRED
        assert isinstance(await reply_to(chan, Authenticate(USER, PASSWORD)), AuthOk)
        listed = await reply_to(chan, ListResources())
        assert isinstance(listed, ResourceList)
        assert [r.id for r in listed.resources] == ["desktop"]
        no_host = await reply_to(chan, Launch("desktop", Mode.GATEWAY))
        assert isinstance(no_host, Error)
        assert no_host.code is ErrorCode.NO_HOST
        # a message only a server sends is a protocol error: answered, then closed
        await chan.send(ListGateways())
        error = await _closed(chan)
    assert error is not None
    assert error.code is ErrorCode.UNEXPECTED


async def test_an_idle_redemption_connection_is_closed_and_pings_keep_it(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery) as f:
        await f.agent("host1", ("10.0.0.21", 3389))
        async with f.session(client="192.0.2.7") as login:
            assert isinstance(await reply_to(login, Authenticate(USER, PASSWORD)), AuthOk)
            launched = await reply_to(login, Launch("desktop", Mode.GATEWAY))
        chan = await f.dial_broker("gateway", Role.GATEWAY)
        granted = await chan.request(RedeemTicket(launched.ticket, "192.0.2.7"))  # type: ignore[attr-defined]
        assert isinstance(granted, TicketOk)
        assert (granted.host, granted.port) == ("10.0.0.21", 3389)
        for nonce in range(3):  # every 100 s: longer than the whole idle limit, in total
            await trio.sleep(100)
            await chan.ping(nonce)
        with trio.fail_after(121):
            assert await _closed(chan) is None  # 120 s after the last message: closed


async def test_a_silent_gateway_link_goes_offline_and_a_halb_node_sees_it(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery, host_timeout_s=20) as f:
        link = await f.dial_broker("gw1", Role.GATEWAY)
        assert isinstance(
            await link.request(GatewayRegister("gw1", "gw1.example", 443)), Registered
        )
        # the broker pushes a registered gateway its portal settings before anything else
        assert isinstance(await link.receive(), PortalSettingsUpdate)
        halb = await f.dial_broker("halb1", Role.HALB)
        listed = await halb.request(ListGateways())
        assert listed == GatewayList((GatewayEntry("gw1", "gw1.example", 443),))
        for nonce in range(5):  # pings keep the link: 50 s, more than host_timeout_s
            await trio.sleep(10)
            await link.ping(nonce)
        assert f.broker.gateways["gw1"].online
        await trio.sleep(20)  # silent for host_timeout_s: the broker drops the link
        await until(lambda: not f.broker.gateways["gw1"].online)
        assert await halb.request(ListGateways()) == GatewayList(())
        await halb.send(Ping(7))
        assert await halb.receive() == Pong(7)


async def test_a_silent_agent_is_told_and_its_host_goes_offline(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery, host_timeout_s=20, report_interval_s=5) as f:
        chan = await f.agent("host1", ("10.0.0.21", 3389))
        await trio.sleep(19)
        await chan.ping(1)  # a ping counts as a sign of life too
        await trio.sleep(19)
        assert f.broker.hosts.hosts["host1"].online
        error = await _closed(chan)
        assert error is not None
        assert error.code is ErrorCode.TIMEOUT
        await until(lambda: not f.broker.hosts.hosts["host1"].online)
