"""Carry bytes unchanged between two streams, with half-close and reset passed through.

Each direction is a small loop: receive, send, and at end of stream pass the half-close on
(``send_eof``) where the far stream can carry one. A stream that cannot (TLS in trio has no
half-close) is closed instead, which ends that side. A reset (or any transport failure) on one
side aborts the other side with a reset too (SO_LINGER 0), so neither peer waits on a dead
connection. The relay returns the bytes carried each way, for the audit log.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass

import trio

from ras.net.channel import aclose_quietly

__all__ = ["RelayStats", "abort", "relay"]

CHUNK = 256 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


@dataclass(slots=True)
class RelayStats:
    a_to_b: int = 0
    b_to_a: int = 0
    reset: bool = False


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    seen = 0
    while seen < 8:
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock  # type: ignore[no-any-return]
        inner = getattr(stream, "transport_stream", None) or getattr(stream, "stream", None)
        if inner is None:
            return None
        stream = inner
        seen += 1
    return None


async def abort(stream: trio.abc.Stream) -> None:
    """Close ``stream`` with a TCP reset (no FIN, unsent data dropped)."""
    sock = _socket_of(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        sock.close()
    await aclose_quietly(stream)


async def _pump(
    src: trio.abc.Stream,
    dst: trio.abc.Stream,
    stats: RelayStats,
    forward: bool,
    cancel: trio.CancelScope,
) -> None:
    try:
        while True:
            data = await src.receive_some(CHUNK)
            if not data:
                break
            await dst.send_all(data)
            if forward:
                stats.a_to_b += len(data)
            else:
                stats.b_to_a += len(data)
    except _BROKEN:
        stats.reset = True
        cancel.cancel()
        return
    # Clean end of stream from src: pass the half-close on.
    if isinstance(dst, trio.abc.HalfCloseableStream):
        try:
            await dst.send_eof()
            return
        except _BROKEN:
            pass
    cancel.cancel()


async def relay(a: trio.abc.Stream, b: trio.abc.Stream) -> RelayStats:
    """Relay until both directions ended; closes (or resets) both streams before returning."""
    stats = RelayStats()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, a, b, stats, True, nursery.cancel_scope)
            nursery.start_soon(_pump, b, a, stats, False, nursery.cancel_scope)
    finally:
        if stats.reset:
            await abort(a)
            await abort(b)
        else:
            await aclose_quietly(a)
            await aclose_quietly(b)
    return stats
