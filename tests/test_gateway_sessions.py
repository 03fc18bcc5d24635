"""The gateway's front door and client sessions over memory streams (the fast level; see
tests/memkit.py).

A real gateway and a real broker, their connections on a memory network under trio's autojump
clock: pre-authentication deadlines from the accept, the per-address slots and rate, the
session idle timeout, the order of the control protocol, and the RDP port's admission take a
few milliseconds and read what a client receives and the gateway's state. Tunnels to a real
socket, TLS on the gateway's public port and drains stay with the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
import trio
from farmkit import PASSWORD, USER, until
from memkit import BROKER, EchoHost, MemoryFarm, memory_farm, reply_to

from ras.errors import ErrorCode
from ras.net.reasons import BROKEN
from ras.protocol import (
    Authenticate,
    AuthOk,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    ListResources,
    OpenTunnel,
    RdpToken,
    RdpTokenOk,
    ResourceList,
    Role,
    Side,
    Welcome,
    preface,
)
from ras.protocol.messages import encode_body
from ras.protocol.x224 import encode_connection_request

pytestmark = pytest.mark.usefixtures("inline_threads")

TRICKLER, OTHER = "127.0.0.3", "127.0.0.4"
HOST = ("10.0.0.21", 3389)
PAYLOAD = b"first RDP bytes after the request"


def _frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def _hello() -> bytes:
    return Connection(Side.CLIENT).send(Hello(Role.CLIENT, "trickler/1"))


async def _answer(stream: trio.abc.Stream) -> tuple[list[object], bool]:
    """What a client makes of everything the gateway sent until it closed: the events after
    the server's welcome (if any), and whether the gateway said anything at all."""
    data = bytearray()
    with trio.fail_after(3600):  # a hang guard (virtual time)
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except BROKEN:
            pass
    conn = Connection(Side.CLIENT)
    conn.send(Hello(Role.CLIENT, "reader"))
    events = [*(conn.receive_data(bytes(data)) if data else ()), *conn.receive_data(b"")]
    return [e for e in events if not isinstance(e, Welcome)], bool(data)


async def _unanswered(stream: trio.abc.Stream) -> bool:
    """The gateway closed ``stream`` without a word."""
    events, said = await _answer(stream)
    return not said and [type(e) for e in events] == [ConnectionClosed]


async def _login(f: MemoryFarm, source: str) -> None:
    async with await f.client(source) as chan:
        assert isinstance(await reply_to(chan, Authenticate(USER, PASSWORD)), AuthOk)


# -- admission: deadlines from the accept, slots and rate per address --------------------------


class _Trickler:
    """Sends ``data`` to ``stream`` a byte every ``step_s`` s until the gateway closes it;
    ``sent`` counts the bytes that went."""

    def __init__(self, stream: trio.abc.Stream, data: bytes, *, step_s: float) -> None:
        self.stream, self.data, self.step_s = stream, data, step_s
        self.sent = 0

    async def run(self) -> None:
        for byte in self.data:
            try:
                await self.stream.send_all(bytes([byte]))
            except BROKEN:
                return
            self.sent += 1
            await trio.sleep(self.step_s)


async def test_a_trickling_client_loses_its_slot_at_the_deadline(tmp_path, nursery, autojump_clock):
    """A client trickling its hello holds its address's only pre-authentication slot until the
    deadline, counted from the accept (its bytes do not extend it), and is closed then.
    Meanwhile a second connection from its address is closed unanswered and another address
    logs in; afterwards its address logs in like anyone."""
    async with memory_farm(tmp_path, nursery) as f:
        gw = f.gateway(preauth_timeout_s=3, handshake_timeout_s=60, max_preauth_per_ip=1)
        trickle = await f.net.connect("gateway", 80, source=TRICKLER)
        accepted = trio.current_time()
        trickler = _Trickler(trickle, _hello() * 10, step_s=0.1)
        async with trio.open_nursery() as inner:
            inner.start_soon(trickler.run)
            await until(lambda: gw.limits.preauth(TRICKLER) == 1)
            second = await f.net.connect("gateway", 80, source=TRICKLER)
            with contextlib.suppress(trio.BrokenResourceError):  # closed at once
                await second.send_all(_hello())
            assert await _unanswered(second)
            await _login(f, OTHER)
            # no error can go before the hello is whole (the protocol's order): just closed
            assert await _unanswered(trickle)
            closed_after = trio.current_time() - accepted
            inner.cancel_scope.cancel()
        assert closed_after == pytest.approx(3)
        assert 20 <= trickler.sent < len(_hello())  # into the hello frame, then cut off
        await until(lambda: gw.limits.preauth(TRICKLER) == 0)
        await _login(f, TRICKLER)
        assert gw.limits.held == 0


async def test_new_connections_per_address_are_rate_limited(tmp_path, nursery, autojump_clock):
    async with memory_farm(tmp_path, nursery) as f:
        f.gateway(max_new_per_ip_per_s=0.01, max_new_per_ip_burst=3)
        for _ in range(3):
            await (await f.client("127.0.0.5")).aclose()
        fourth = await f.net.connect("gateway", 80, source="127.0.0.5")
        with contextlib.suppress(trio.BrokenResourceError):  # closed at once
            await fourth.send_all(preface())
        assert await _unanswered(fourth)
        await _login(f, "127.0.0.6")  # another address is not affected


async def test_pings_do_not_extend_the_pre_authentication_deadline(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery) as f:
        gw = f.gateway(preauth_timeout_s=30)
        chan = await f.client(TRICKLER)
        accepted = trio.current_time()
        for nonce in range(5):  # at 0, 5.5, ... 22 s: each answered, none extends the deadline
            await chan.ping(nonce)
            await trio.sleep(5.5)
        events, _ = await _answer(chan.stream)
        assert trio.current_time() - accepted == pytest.approx(30)
        error, _closed = events
        assert isinstance(error, Error)
        assert error.code is ErrorCode.TIMEOUT
        assert gw.limits.held == 0
        assert f.net.dialled == [("gateway", 80)]  # the broker was never asked anything


async def test_a_logged_in_session_times_out_when_idle_and_pings_keep_it(
    tmp_path, nursery, autojump_clock
):
    async with memory_farm(tmp_path, nursery) as f:
        gw = f.gateway(preauth_timeout_s=10, session_idle_timeout_s=600)
        chan = await f.client()
        assert isinstance(await reply_to(chan, Authenticate(USER, PASSWORD)), AuthOk)
        assert gw.limits.held == 0  # logged in: the slot is free
        for nonce in range(3):  # 3 x 500 s: longer than the idle timeout, in total
            await trio.sleep(500)
            await chan.ping(nonce)
        assert isinstance(await reply_to(chan, ListResources()), ResourceList)
        silent_from = trio.current_time()
        events, _ = await _answer(chan.stream)
        assert trio.current_time() - silent_from == pytest.approx(600)
        error, _closed = events
        assert isinstance(error, Error)
        assert error.code is ErrorCode.TIMEOUT


# -- the order of the control protocol ----------------------------------------------------------

ORDER = [
    ("open_tunnel before hello", preface() + _frame(encode_body(OpenTunnel("t1.x.y"))), 106),
    ("unknown message", preface() + _hello()[len(preface()) :] + _frame(b'{"type":"zz"}'), 104),
    ("frame too large", preface() + struct.pack("!I", 2**20), 102),
    ("a server's message", preface() + _frame(encode_body(Welcome(1, "x"))), 106),
    ("a login before hello", preface() + _frame(encode_body(Authenticate(USER, PASSWORD))), 106),
]


@pytest.mark.parametrize(("name", "data", "code"), ORDER, ids=[n for n, _, _ in ORDER])
async def test_protocol_errors_are_answered_with_their_code_and_close(
    tmp_path, nursery, autojump_clock, name, data, code
):
    async with memory_farm(tmp_path, nursery) as f:
        gw = f.gateway()
        stream = await f.net.connect("gateway", 80, source=TRICKLER)
        await stream.send_all(data)
        events, _ = await _answer(stream)
        error, closed = events
        assert isinstance(error, Error), name
        assert error.code == code
        assert isinstance(closed, ConnectionClosed)
        await until(lambda: gw.limits.held == 0)
        assert f.net.dialled == [("gateway", 80)]  # nothing reached the broker or a host


# -- the RDP port -------------------------------------------------------------------------------


async def _routing_token(f: MemoryFarm) -> str:
    async with await f.client() as chan:
        assert isinstance(await reply_to(chan, Authenticate(USER, PASSWORD)), AuthOk)
        token = await reply_to(chan, RdpToken("desktop"))
    assert isinstance(token, RdpTokenOk), token
    return token.token


async def _routed(f: MemoryFarm, token: str, source: str) -> trio.abc.Stream:
    """A native RDP client's connection, routed: its Connection Request came back echoed."""
    stream = await f.net.connect("gateway", 3389, source=source)
    wire = encode_connection_request(f"Cookie: msts={token}") + PAYLOAD
    await stream.send_all(wire)
    got = b""
    with trio.fail_after(60):  # a hang guard (virtual time)
        while len(got) < len(wire):
            got += await stream.receive_some()
    assert got == wire
    return stream


async def test_rdp_port_slots_per_address_and_the_deadline_from_accept(
    tmp_path, nursery, autojump_clock
):
    """A client trickling its Connection Request holds its address's only slot until the
    pre-authentication deadline (from the accept: its bytes do not extend it); meanwhile a
    second connection from its address is refused and another address is routed."""
    host = EchoHost()
    async with memory_farm(tmp_path, nursery) as f:
        f.net.listen(HOST, host.serve)
        await f.agent("host1", HOST)
        gw = f.gateway(
            rdp_lb_enabled=True, preauth_timeout_s=2, handshake_timeout_s=60, max_preauth_per_ip=1
        )
        token = await _routing_token(f)
        wire = encode_connection_request(f"Cookie: msts={token}")
        trickle = await f.net.connect("gateway", 3389, source=TRICKLER)
        accepted = trio.current_time()
        trickler = _Trickler(trickle, wire, step_s=0.5)
        async with trio.open_nursery() as inner:
            inner.start_soon(trickler.run)
            await until(lambda: gw.limits.preauth(TRICKLER) == 1)
            # no slot left for its address: a second connection is closed unanswered ...
            second = await f.net.connect("gateway", 3389, source=TRICKLER)
            with contextlib.suppress(trio.BrokenResourceError):  # closed at once
                await second.send_all(wire + PAYLOAD)
            assert await _unanswered(second)
            # ... while another address is routed, and its slot is free once routed
            routed = await _routed(f, token, OTHER)
            assert gw.limits.preauth(OTHER) == 0
            await routed.aclose()
            assert await _unanswered(trickle)
            closed_after = trio.current_time() - accepted
            inner.cancel_scope.cancel()
        assert closed_after == pytest.approx(2)
        assert 2 <= trickler.sent < len(wire)  # it kept sending, and the deadline did not move
        await until(lambda: gw.limits.held == 0)
        # its slot is back: the trickler's address is routed like anyone
        await (await _routed(f, token, TRICKLER)).aclose()
        await until(lambda: len(gw.tunnels) == 0)
    assert host.connections == 2
    # the gateway dialled the broker and the host the broker named, nothing else
    assert set(f.net.dialled) - {("gateway", 80), ("gateway", 3389), (BROKER, 20003)} == {
        (BROKER, 20002),
        HOST,
    }
