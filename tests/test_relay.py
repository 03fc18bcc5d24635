"""The relay's lean path (``ras.net.fastio``) over real sockets on 127.0.0.1, plain and TLS.

A relay server here does what the gateway does after a tunnel is granted: it accepts a client
(terminating TLS with a farm-like self-signed certificate from ``ras.pki``, through
``server_tls``, the gateway's own TLS), connects to a peer and calls ``relay``. The client's
TLS is ``trio.SSLStream`` (a different driver over OpenSSL) where it only moves bytes, and
``TLSStream`` on the client side where the test needs a TLS half-close, which
``trio.SSLStream`` cannot send.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from ras.net import fastio
from ras.net.fastio import TLSStream, server_tls
from ras.net.relay import RelayStats, relay
from ras.pki import FarmPKI, server_context

LINGER_ZERO = struct.pack("ii", 1, 0)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pki = FarmPKI(tmp_path_factory.mktemp("pki"))
    pki.init_ca()
    return pki.ensure_self_signed("gateway-public", ("localhost", "127.0.0.1"))


def client_context(cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    return ctx


@dataclass
class RelayServer:
    """Accepts on ``port``, connects each client to ``target`` and relays; ``stats`` of every
    ended tunnel."""

    port: int = 0
    stats: list[RelayStats] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def add(self, stats: RelayStats) -> None:
        self.stats.append(stats)
        self._changed.set()
        self._changed = trio.Event()

    async def ended(self, n: int = 1) -> None:
        """Wait until ``n`` tunnels have ended."""
        while len(self.stats) < n:
            await self._changed.wait()
        await trio.testing.wait_all_tasks_blocked()  # the handlers' tasks return


@contextlib.asynccontextmanager
async def relay_server(
    target: int, context: ssl.SSLContext | None = None
) -> AsyncIterator[RelayServer]:
    server = RelayServer()
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    server.port = listener.socket.getsockname()[1]

    async def handle(client: trio.SocketStream) -> None:
        front: trio.abc.Stream = client
        if context is not None:
            tls = server_tls(client, context)
            assert isinstance(tls, TLSStream)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError:
                await tls.aclose()
                return
            front = tls
        host = await trio.open_tcp_stream("127.0.0.1", target)
        server.add(await relay(front, host))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        yield server
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def peer_listener() -> AsyncIterator[tuple[int, trio.SocketListener]]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        yield listener.socket.getsockname()[1], listener  # type: ignore[misc]


async def open_client(
    port: int, cert: Path | None, *, lean: bool = False
) -> trio.abc.HalfCloseableStream | trio.SSLStream[trio.SocketStream] | trio.SocketStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    if cert is None:
        return tcp
    if lean:
        tls = TLSStream(tcp.socket, client_context(cert), server_hostname="localhost")
    else:
        tls = trio.SSLStream(tcp, client_context(cert), server_hostname="localhost")  # type: ignore[assignment]
    await tls.do_handshake()
    return tls


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(1 << 16):
        chunks.append(bytes(data))
    return b"".join(chunks)


def reset(stream: trio.abc.Stream) -> None:
    sock = (
        stream.socket if isinstance(stream, trio.SocketStream) else stream.transport_stream.socket
    )  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    sock.close()


MODES = ["plain", "tls"]


# -- bytes unchanged --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("up", "down"), [(1, 0), (100, 17), (5 << 20, 3 << 20)])
async def test_bytes_arrive_unchanged_both_ways(mode, up, down, tls_files):
    cert, key = tls_files
    sent_up, sent_down = os.urandom(up), os.urandom(down)
    with trio.fail_after(60):
        async with peer_listener() as (port, listener):
            ctx = server_context(cert, key) if mode == "tls" else None
            async with relay_server(port, ctx) as server:
                client = await open_client(server.port, cert if mode == "tls" else None)
                host = await listener.accept()
                got: dict[str, bytes] = {}

                async def host_side() -> None:
                    async with trio.open_nursery() as n:
                        n.start_soon(host.send_all, sent_down)
                        got["up"] = await receive_exactly(host, up)
                    await host.aclose()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(host_side)
                    await client.send_all(sent_up)
                    got["down"] = await read_all(client)
                await client.aclose()
                await server.ended()
    assert got["up"] == sent_up
    assert got["down"] == sent_down
    assert server.stats[0] == RelayStats(a_to_b=up, b_to_a=down, reset=False)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        assert data, "end of stream too early"
        buf += data
    return bytes(buf)


async def test_a_sniffed_prefix_is_sent_first_then_the_lean_path(tls_files):
    """What the gateway relays: a PrefixedStream over the TLS stream (bytes read past the last
    control frame) whose prefix must reach the host before the rest."""
    from ras.net.sniff import PrefixedStream

    cert, key = tls_files
    with trio.fail_after(30):
        async with peer_listener() as (port, listener):
            outer = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            client_tcp = await trio.open_tcp_stream("127.0.0.1", outer.socket.getsockname()[1])
            accepted = await outer.accept()
            await outer.aclose()
            client = trio.SSLStream(client_tcp, client_context(cert), server_hostname="localhost")
            tls = server_tls(PrefixedStream(accepted, b""), server_context(cert, key))
            async with trio.open_nursery() as n:
                n.start_soon(client.do_handshake)
                await tls.do_handshake()
            await client.send_all(b"HEAD-and-then-the-rest")
            head = await tls.receive_some(4)
            host_out = await trio.open_tcp_stream("127.0.0.1", port)
            host = await listener.accept()
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    await relay(PrefixedStream(tls, head), host_out)

                nursery.start_soon(run)
                await client.send_all(b"!")
                want = b"HEAD-and-then-the-rest!"
                assert await receive_exactly(host, len(want)) == want
                await host.send_all(b"ok")
                assert await receive_exactly(client, 2) == b"ok"
                await host.aclose()
                await client.aclose()


# -- half-close ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_client_shuts_its_write_side_and_still_gets_the_full_reply(mode, tls_files):
    cert, key = tls_files
    request = b"please answer after my end of stream\n"
    answer = os.urandom(300_000)
    with trio.fail_after(30):
        async with peer_listener() as (port, listener):
            ctx = server_context(cert, key) if mode == "tls" else None
            async with relay_server(port, ctx) as server:
                client = await open_client(server.port, cert if mode == "tls" else None, lean=True)
                host = await listener.accept()
                await client.send_all(request)
                await client.send_eof()  # FIN, or a TLS close_notify
                # The host sees the request, then end of stream; its own direction stays open.
                assert await read_all(host) == request
                await host.send_all(answer)
                await host.aclose()
                assert await read_all(client) == answer
                await client.aclose()
                await server.ended()
    assert server.stats[0] == RelayStats(len(request), len(answer), reset=False)


@pytest.mark.parametrize("mode", MODES)
async def test_host_shuts_its_write_side_and_still_gets_the_client_data(mode, tls_files):
    cert, key = tls_files
    greeting = b"host speaks first, then ends its direction"
    reply = os.urandom(200_000)
    with trio.fail_after(30):
        async with peer_listener() as (port, listener):
            ctx = server_context(cert, key) if mode == "tls" else None
            async with relay_server(port, ctx) as server:
                client = await open_client(server.port, cert if mode == "tls" else None, lean=True)
                host = await listener.accept()
                await host.send_all(greeting)
                await host.send_eof()
                assert await read_all(client) == greeting  # end of stream seen by the client
                await client.send_all(reply)  # ... whose own direction still works
                await client.aclose()
                assert await read_all(host) == reply
                await host.aclose()
                await server.ended()
    assert server.stats[0] == RelayStats(len(reply), len(greeting), reset=False)


# -- reset ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("who", ["client", "host"])
async def test_a_reset_on_one_side_becomes_a_reset_on_the_other(mode, who, tls_files):
    cert, key = tls_files
    with trio.fail_after(10):
        async with peer_listener() as (port, listener):
            ctx = server_context(cert, key) if mode == "tls" else None
            async with relay_server(port, ctx) as server:
                client = await open_client(server.port, cert if mode == "tls" else None)
                host = await listener.accept()
                await client.send_all(b"hello")
                assert await receive_exactly(host, 5) == b"hello"
                resetter, other = (client, host) if who == "client" else (host, client)
                reset(resetter)
                with pytest.raises(trio.BrokenResourceError):
                    await read_all(other)
                with contextlib.suppress(trio.BrokenResourceError):
                    await other.aclose()
                await server.ended()
    assert server.stats[0].reset is True


# -- bounded buffers ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_slow_reader_does_not_make_the_relay_buffer_more(mode, tls_files):
    """The client sends 32 MiB as fast as it can; the host reads 4 KiB at a time. Everything
    arrives, and the relay never held more than one buffer (TLS) or one pipe (plain)."""
    cert, key = tls_files
    total = 32 << 20
    data = os.urandom(1 << 20) * 32
    with trio.fail_after(120):
        async with peer_listener() as (port, listener):
            ctx = server_context(cert, key) if mode == "tls" else None
            async with relay_server(port, ctx) as server:
                client = await open_client(server.port, cert if mode == "tls" else None)
                host = await listener.accept()
                held = 0

                async def slow_reader() -> bytes:
                    nonlocal held
                    got = bytearray()
                    while len(got) < total:
                        got += await host.receive_some(4096)
                        held = max(held, fastio.POOL.held)
                        await trio.lowlevel.checkpoint()
                    return bytes(got)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, data)
                    got = await slow_reader()
                await client.aclose()
                await host.aclose()
                await server.ended()
    assert got == data
    bound = fastio.PIPE_SIZE if mode == "plain" else fastio.BUFFER_SIZE
    assert server.stats[0].peak_buffered <= bound
    assert held <= 2  # one buffer per direction at most
    assert fastio.POOL.held == 0


# -- no leaks after many tunnels ----------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())  # type: ignore[arg-type]


async def echo_server(listener: trio.SocketListener) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        await stream.aclose()

    await trio.serve_listeners(echo, [listener])


@pytest.mark.parametrize(("mode", "tunnels"), [("plain", 10_000), ("tls", 500)])
async def test_after_many_short_tunnels_fds_and_tasks_are_back(mode, tunnels, tls_files):
    cert, key = tls_files
    ctx = server_context(cert, key) if mode == "tls" else None
    client_ctx = client_context(cert)
    with trio.fail_after(600):
        async with trio.open_nursery() as outer:
            echo_listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            outer.start_soon(echo_server, echo_listener)
            async with relay_server(echo_listener.socket.getsockname()[1], ctx) as server:
                await trio.sleep(0.1)
                gc.collect()  # what earlier tests left unreachable closes now, not mid-count
                fds, tasks = open_fds(), count_tasks()

                async def one(i: int) -> None:
                    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                    if ctx is not None:
                        stream = trio.SSLStream(stream, client_ctx, server_hostname="localhost")
                    message = b"x" * (1 + i % 200)
                    await stream.send_all(message)
                    assert await receive_exactly(stream, len(message)) == message
                    if i % 3 == 1:
                        reset(stream)
                    else:
                        await stream.aclose()

                async def worker(first: int) -> None:
                    for i in range(first, tunnels, 20):
                        await one(i)

                async with trio.open_nursery() as nursery:
                    for w in range(20):
                        nursery.start_soon(worker, w)
                await server.ended(tunnels)
                gc.collect()
                assert open_fds() == fds
                assert count_tasks() == tasks
            outer.cancel_scope.cancel()
    assert sum(s.reset for s in server.stats) >= tunnels // 3
    assert fastio.POOL.held == 0
