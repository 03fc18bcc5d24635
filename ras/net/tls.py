"""Opening TLS connections to other daemons (mutual TLS with the farm's certificates)."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Awaitable, Callable

import trio

from ras.errors import TransportError
from ras.net.channel import aclose_quietly
from ras.net.reasons import transport_errors

__all__ = ["Connect", "connect_staggered", "connect_tcp", "connect_tls"]

#: How a daemon opens a TCP connection to ``(host, port)``: ``connect_tcp``, or in tests a
#: memory network's (the seam that lets handlers run without sockets).
Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def connect_tcp(host: str, port: int, *, source: str | None = None) -> trio.SocketStream:
    """A TCP connection with TCP_NODELAY; failures become ``TransportError``.

    A numeric address gets one plain socket connect (the balancer's hot path); a name goes
    through trio's resolver and happy-eyeballs. ``source``: the local address to connect from
    (an IP address of this machine)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    with transport_errors(f"cannot connect to {host}:{port}"):
        if address is None:
            return await trio.open_tcp_stream(host, port, local_address=source)
        family = trio.socket.AF_INET6 if address.version == 6 else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        try:
            if source is not None:
                await sock.bind((source, 0))
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)  # sets TCP_NODELAY


async def connect_staggered(
    host: str, port: int, *, stagger_s: float = 0.25, attempts: int = 4
) -> trio.abc.Stream:
    """``connect_tcp``, but an attempt that has not connected after ``stagger_s`` (or has
    failed) gets a fresh one alongside it, up to ``attempts``; the first to connect wins and
    the others are closed. Why: when a HALB VIP moves, a SYN sent just before the gratuitous
    ARP goes to the node that died and is lost, and the kernel sends it again only after its
    1 s retransmission timeout; a fresh attempt a quarter second later goes to the new holder.
    The last failure is raised if none connects (the caller owns the deadline)."""
    winner: list[trio.abc.Stream] = []
    failures: list[BaseException] = []
    failed = [trio.Event() for _ in range(attempts)]

    async def attempt(i: int, nursery: trio.Nursery) -> None:
        if i:
            with trio.move_on_after(stagger_s):
                await failed[i - 1].wait()
        try:
            stream = await connect_tcp(host, port)
        except TransportError as exc:
            failures.append(exc)
            failed[i].set()
            return
        if winner:
            await aclose_quietly(stream)
            return
        winner.append(stream)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i in range(attempts):
            nursery.start_soon(attempt, i, nursery)
    if winner:
        return winner[0]
    raise failures[-1]


async def connect_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    connect: Connect = connect_tcp,
) -> trio.SSLStream[trio.abc.Stream]:
    """A TLS connection whose handshake is done (the caller owns the deadline); ``connect``
    opens the connection underneath."""
    tcp = await connect(host, port)
    stream = trio.SSLStream(tcp, context, server_hostname=server_hostname or host)
    try:
        with transport_errors(f"TLS with {host}:{port} failed", handshake=True):
            await stream.do_handshake()
    except BaseException:  # failed, or cancelled mid-handshake: do not leak the socket
        await aclose_quietly(tcp)
        raise
    return stream
