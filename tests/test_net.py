"""The I/O shells of ``ras.net``: protocol sniffing, the byte relay, the control channel, race.

Sniffing and the channel run over ``trio.testing.memory_stream_pair()``; the relay runs over real
TCP on 127.0.0.1 because half-close, reset and file descriptors are what it is about.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ras.errors import ErrorCode, RemoteProtocolError, TransportError
from ras.net.channel import Channel
from ras.net.relay import RelayStats, relay
from ras.net.sniff import Kind, PrefixedStream, classify, sniff
from ras.net.tasks import race
from ras.protocol import (
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    Role,
    Side,
    Welcome,
    preface,
)
from ras.protocol.messages import encode_body

# -- samples of what arrives on a gateway port -------------------------------------------------


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl module)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="rds.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def control_hello() -> bytes:
    return Connection(Side.CLIENT).send(Hello(Role.CLIENT, "test-client/1.0"))


def x224_connection_request() -> bytes:
    """TPKT + X.224 Connection Request with an mstshash cookie and an RDP negotiation request,
    as mstsc/xfreerdp send it to a plain RDP port."""
    x224 = (
        b"\xe0\x00\x00\x00\x00\x00"
        + b"Cookie: mstshash=alice\r\n"
        + b"\x01\x00\x08\x00\x03\x00\x00\x00"
    )
    body = bytes([len(x224)]) + x224
    return b"\x03\x00" + struct.pack("!H", 4 + len(body)) + body


def proxy_v2_header() -> bytes:
    addresses = (
        socket.inet_aton("192.0.2.7")
        + socket.inet_aton("10.0.0.1")
        + struct.pack("!HH", 51000, 443)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


SAMPLES: list[tuple[str, bytes, Kind]] = [
    ("tls", tls_client_hello(), Kind.TLS),
    ("control", control_hello(), Kind.CONTROL),
    ("control-preface-only", b"RASCP/1\r\n", Kind.CONTROL),
    ("http-get", b"GET / HTTP/1.1\r\nHost: rds.example.org\r\n\r\n", Kind.HTTP),
    ("http-post", b"POST /RDWeb/login HTTP/1.1\r\nContent-Length: 0\r\n\r\n", Kind.HTTP),
    ("http-options", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", Kind.HTTP),
    ("rdg-out", b"RDG_OUT_DATA /remoteDesktopGateway/ HTTP/1.1\r\nHost: gw\r\n\r\n", Kind.HTTP),
    ("rdg-in", b"RDG_IN_DATA /remoteDesktopGateway/ HTTP/1.1\r\nHost: gw\r\n\r\n", Kind.HTTP),
    ("tpkt", x224_connection_request(), Kind.TPKT),
    ("proxy-v2", proxy_v2_header() + b"\x16\x03\x01", Kind.PROXY_V2),
    ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n", Kind.UNKNOWN),
    ("binary", b"\x00\x01\x02\x03garbage", Kind.UNKNOWN),
    ("lowercase", b"hello there\n", Kind.UNKNOWN),
    ("shouting", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n", Kind.UNKNOWN),
    ("tls-like", b"\x16\x04\x00\x00", Kind.UNKNOWN),
    ("rascp-typo", b"RASCQ/1\r\n", Kind.UNKNOWN),
]
IDS = [name for name, _, _ in SAMPLES]


@pytest.mark.parametrize(("name", "data", "kind"), SAMPLES, ids=IDS)
def test_classify_whole(name, data, kind):
    assert classify(data) is kind


@pytest.mark.parametrize(("name", "data", "kind"), SAMPLES, ids=IDS)
def test_classify_never_changes_its_mind(name, data, kind):
    """Fed a growing prefix, classify answers None until it knows, then always the same."""
    answers = [classify(data[:n]) for n in range(len(data) + 1)]
    decided = [a for a in answers if a is not None]
    assert decided
    assert set(decided) == {kind}
    first = answers.index(kind)
    assert all(a is kind for a in answers[first:])


async def feed(stream: trio.abc.SendStream, data: bytes, *, one_at_a_time: bool) -> None:
    if one_at_a_time:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()
    else:
        await stream.send_all(data)
    await stream.send_eof()


async def read_all(stream: trio.abc.ReceiveStream, max_bytes: int | None = None) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("name", "data", "kind"), SAMPLES, ids=IDS)
async def test_sniff_classifies_and_gives_every_byte_back(name, data, kind, one_at_a_time):
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: feed(left, data, one_at_a_time=one_at_a_time))
        with trio.fail_after(5):
            got, stream = await sniff(right)
            assert got is kind
            assert isinstance(stream, PrefixedStream)
            assert await read_all(stream) == data


async def test_prefixed_stream_honours_max_bytes_and_passes_writes_through():
    left, right = trio.testing.memory_stream_pair()
    data = b"GET /some/long/path HTTP/1.1\r\n\r\n"
    await left.send_all(data)
    kind, stream = await sniff(right)
    assert kind is Kind.HTTP
    pieces = []
    while len(b"".join(pieces)) < len(data):
        piece = await stream.receive_some(3)
        assert 1 <= len(piece) <= 3
        pieces.append(piece)
    assert b"".join(pieces) == data
    await stream.send_all(b"HTTP/1.1 404 Not Found\r\n\r\n")
    await stream.send_eof()
    assert await read_all(left) == b"HTTP/1.1 404 Not Found\r\n\r\n"


@pytest.mark.parametrize(
    "data", [b"", b"GE", b"RASC", b"\x16", b"\r\n\r\n\x00\r\n", b"RDG_OUT_DATA"]
)
async def test_sniff_of_a_stream_that_ends_too_soon_is_a_transport_error(data):
    left, right = trio.testing.memory_stream_pair()
    await feed(left, data, one_at_a_time=False)
    with trio.fail_after(5), pytest.raises(TransportError):
        await sniff(right)


def _sniff_sync(data: bytes, one_at_a_time: bool) -> tuple[Kind, bytes]:
    async def main() -> tuple[Kind, bytes]:
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: feed(left, data, one_at_a_time=one_at_a_time))
            kind, stream = await sniff(right)
            return kind, await read_all(stream)

    return trio.run(main)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=st.sampled_from([b"", b"R", b"RDG_", b"GET", b"\x16", b"\r\n\r\n", b"ABCDEFGHIJKLMNOP"]),
    tail=st.binary(min_size=17, max_size=40),
    one_at_a_time=st.booleans(),
)
def test_sniff_decides_on_any_stream_of_17_bytes_or_more(head, tail, one_at_a_time):
    """Whatever arrives, 17 bytes are enough to decide: sniff never fails on a live stream,
    agrees with classify and loses no byte."""
    data = head + tail
    kind, replay = _sniff_sync(data, one_at_a_time)
    assert kind is classify(data)
    assert replay == data


# -- relay over real TCP ------------------------------------------------------------------------

LINGER_ZERO = struct.pack("ii", 1, 0)


class Loopback:
    """Two listeners on 127.0.0.1; ``pair(i)`` is a connected (client, server) stream pair."""

    def __init__(self, listeners: list[trio.SocketListener]) -> None:
        self.listeners = listeners

    async def pair(self, i: int) -> tuple[trio.SocketStream, trio.SocketStream]:
        port = self.listeners[i].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await self.listeners[i].accept()
        return client, server

    async def aclose(self) -> None:
        for lst in self.listeners:
            await lst.aclose()


async def loopback() -> Loopback:
    listeners = [(await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(2)]
    return Loopback(listeners)  # type: ignore[arg-type]


async def relayed(
    lo: Loopback,
) -> tuple[trio.SocketStream, trio.SocketStream, trio.SocketStream, trio.SocketStream]:
    """peer A <-> (a  relay  b) <-> peer B."""
    peer_a, a = await lo.pair(0)
    b, peer_b = await lo.pair(1)
    return peer_a, a, b, peer_b


@dataclass
class Running:
    stats: RelayStats | None = None

    def is_set(self) -> bool:
        return self.stats is not None


async def run_relay(nursery: trio.Nursery, a: trio.abc.Stream, b: trio.abc.Stream) -> Running:
    done = Running()

    async def go() -> None:
        done.stats = await relay(a, b)

    nursery.start_soon(go)
    return done


async def test_relay_carries_bytes_unchanged_both_ways_and_counts_them():
    lo = await loopback()
    peer_a, a, b, peer_b = await relayed(lo)
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(1024 * 1024 + 5)
    got: dict[str, bytes] = {}

    async def talk(me: trio.SocketStream, data: bytes, name: str) -> None:
        async def send() -> None:
            await me.send_all(data)
            await me.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(send)
            got[name] = await read_all(me)
        await me.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            done = await run_relay(nursery, a, b)
            nursery.start_soon(talk, peer_a, up, "a")
            nursery.start_soon(talk, peer_b, down, "b")
    await lo.aclose()
    assert got["b"] == up
    assert got["a"] == down
    assert done.stats == RelayStats(a_to_b=len(up), b_to_a=len(down), reset=False)


async def test_relay_passes_a_half_close_through():
    lo = await loopback()
    peer_a, a, b, peer_b = await relayed(lo)
    request = b"please answer after my EOF\n"
    answer = os.urandom(200_000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            done = await run_relay(nursery, a, b)
            await peer_a.send_all(request)
            await peer_a.send_eof()
            # B sees the request and then end of stream, while its own direction stays open.
            assert await read_all(peer_b) == request
            await peer_b.send_all(answer)
            await peer_b.send_all(b"the end")
            await peer_b.aclose()
            assert await read_all(peer_a) == answer + b"the end"
            await peer_a.aclose()
        assert done.is_set()
    await lo.aclose()
    assert done.stats == RelayStats(len(request), len(answer) + 7, reset=False)


@pytest.mark.parametrize("who", ["a", "b"])
async def test_relay_turns_a_reset_into_a_reset(who):
    lo = await loopback()
    peer_a, a, b, peer_b = await relayed(lo)
    resetter, other = (peer_a, peer_b) if who == "a" else (peer_b, peer_a)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            done = await run_relay(nursery, a, b)
            await resetter.send_all(b"hello")
            assert await other.receive_some(100) == b"hello"
            resetter.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            await resetter.aclose()  # RST, not FIN
            with pytest.raises(trio.BrokenResourceError):
                await read_all(other)
            await other.aclose()
        assert done.is_set()
    await lo.aclose()
    assert done.stats.reset is True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_many_short_relays_leak_no_file_descriptors():
    before = open_fds()
    lo = await loopback()
    with trio.fail_after(120):
        for i in range(300):
            peer_a, a, b, peer_b = await relayed(lo)
            async with trio.open_nursery() as nursery:
                done = await run_relay(nursery, a, b)
                await peer_a.send_all(b"x" * (i + 1))
                assert await peer_b.receive_some(1000)
                match i % 3:
                    case 0:  # both close cleanly
                        await peer_a.aclose()
                        await read_all(peer_b)
                        await peer_b.aclose()
                    case 1:  # A resets
                        peer_a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                        await peer_a.aclose()
                        with pytest.raises(trio.BrokenResourceError):
                            await read_all(peer_b)
                        await peer_b.aclose()
                    case _:  # B hangs up first
                        await peer_b.aclose()
                        await read_all(peer_a)
                        await peer_a.aclose()
            assert done.is_set()
    await lo.aclose()
    assert open_fds() == before


# -- the control channel over memory streams ----------------------------------------------------


def frame(msg: object) -> bytes:
    body = encode_body(msg)  # type: ignore[arg-type]
    return struct.pack("!I", len(body)) + body


BAD_INPUT = [
    ("garbage", b"GET / HTTP/1.1\r\n\r\n", ErrorCode.BAD_PREFACE),
    ("version zero", b"RASCP/0\r\n", ErrorCode.BAD_PREFACE),
    ("huge frame", preface() + struct.pack("!I", 2**31), ErrorCode.FRAME_TOO_LARGE),
    ("not json", preface() + struct.pack("!I", 8) + b"not json", ErrorCode.MALFORMED),
    ("server message from a client", preface() + frame(Welcome(1, "x")), ErrorCode.UNEXPECTED),
    ("empty frame", preface() + struct.pack("!I", 0), ErrorCode.MALFORMED),
]


async def peer_sees(stream: trio.abc.ReceiveStream) -> list[object]:
    """What a client-side codec makes of everything the server sent until it closed."""
    conn = Connection(Side.CLIENT)
    conn.send(Hello(Role.CLIENT, "peer"))
    data = await read_all(stream)
    return [*conn.receive_data(data), *conn.receive_data(b"")]


@pytest.mark.parametrize(("name", "data", "code"), BAD_INPUT, ids=[n for n, _, _ in BAD_INPUT])
async def test_channel_answers_a_misbehaving_peer_with_an_error_then_closes(
    name, data, code, autojump_clock
):
    left, right = trio.testing.memory_stream_pair()
    chan = Channel(right, Side.SERVER)
    await left.send_all(data)
    with trio.fail_after(5):
        with pytest.raises(RemoteProtocolError) as info:
            await chan.receive()
        assert info.value.code == code
        events = await peer_sees(left)
    assert len(events) == 2, events
    error, closed = events
    assert isinstance(error, Error)
    assert error.code == code
    assert isinstance(closed, ConnectionClosed)


async def test_channel_client_side_refuses_a_server_that_talks_nonsense(autojump_clock):
    left, right = trio.testing.memory_stream_pair()
    chan = Channel(left, Side.CLIENT)
    server = Connection(Side.SERVER)

    async def bad_server() -> bytes:
        server.receive_data(await right.receive_some())
        await right.send_all(frame(Hello(Role.CLIENT, "x")))  # a server may not say hello
        return await read_all(right)

    async with trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def run_server() -> None:
            received.append(await bad_server())

        nursery.start_soon(run_server)
        await chan.send(Hello(Role.CLIENT, "c"))
        with trio.fail_after(5), pytest.raises(RemoteProtocolError) as info:
            await chan.receive()
    assert info.value.code == ErrorCode.UNEXPECTED
    (error,) = server.receive_data(received[0])
    assert isinstance(error, Error)
    assert error.code == ErrorCode.UNEXPECTED


async def test_channel_round_trip_and_clean_close(autojump_clock):
    left, right = trio.testing.memory_stream_pair()
    client, server = Channel(left, Side.CLIENT), Channel(right, Side.SERVER)
    await client.send(Hello(Role.AGENT, "agent/1"))
    assert await server.receive() == Hello(Role.AGENT, "agent/1")
    await server.send(Welcome(1, "broker/1"))
    assert await client.receive() == Welcome(1, "broker/1")
    await client.aclose()
    with pytest.raises(TransportError):
        await server.receive()


# -- race ---------------------------------------------------------------------------------------


async def test_race_reraises_the_first_error_itself_and_cancels_the_others(autojump_clock):
    cancelled: list[str] = []

    async def fails() -> None:
        await trio.sleep(1)
        raise KeyError("boom")

    async def waits(name: str) -> None:
        try:
            await trio.sleep(1000)
        except trio.Cancelled:
            cancelled.append(name)
            raise

    with pytest.raises(KeyError) as info:
        await race(fails, lambda: waits("w1"), lambda: waits("w2"))
    assert type(info.value) is KeyError
    assert info.value.args == ("boom",)
    assert not isinstance(info.value, BaseExceptionGroup)
    assert sorted(cancelled) == ["w1", "w2"]
    assert trio.current_time() == 1  # nobody waited for the sleepers


async def test_race_keeps_the_first_error_when_a_cancelled_sibling_fails_too(autojump_clock):
    async def fails() -> None:
        await trio.sleep(1)
        raise ValueError("first")

    async def fails_on_cancel() -> None:
        try:
            await trio.sleep(1000)
        finally:
            raise RuntimeError("second")

    with pytest.raises(ValueError, match="first"):
        await race(fails, fails_on_cancel)


async def test_race_ends_when_one_returns(autojump_clock):
    finished: list[str] = []

    def after(seconds: float, name: str) -> Callable[[], Awaitable[None]]:
        async def fn() -> None:
            await trio.sleep(seconds)
            finished.append(name)

        return fn

    assert await race(after(5, "slow"), after(2, "fast"), after(9, "slower")) is None
    assert finished == ["fast"]
    assert trio.current_time() == 2


async def test_race_is_cancelled_from_outside(autojump_clock):
    with trio.move_on_after(3) as scope:
        await race(trio.sleep_forever, trio.sleep_forever)
    assert scope.cancelled_caught
