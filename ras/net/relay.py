"""Carry bytes unchanged between two streams, with half-close and reset passed through.

Each direction is a small loop: take what the source has, hand it to the far side, and at end
of stream pass the half-close on: a TCP FIN for a socket, a TLS close_notify for the gateway's
TLS (``ras.net.fastio.TLSStream``), ``send_eof`` for any other half-closeable stream.
Only a stream that cannot be half-closed (a ``trio.SSLStream``) is closed instead, which ends
the tunnel. A reset (or any transport failure) on one side aborts the other with a reset too
(SO_LINGER 0), so neither peer waits on a dead connection. A stream that maps its own I/O
errors (the web client's ``WebSocketStream``: ``TransportError``, and ``RemoteProtocolError``
for a bad frame) ends its tunnel the same way.

The loops run on the lean path of ``ras.net.fastio``: raw non-blocking sockets, pooled
buffers (an idle tunnel holds none; a direction holds at most one, so a slow reader cannot
make the relay buffer more), TLS records decrypted in bulk, and ``os.splice`` between two
plain sockets. Bytes a ``PrefixedStream`` still holds (sniffed, or read past the last control
frame) are sent first, then the relay works on the stream underneath. One direction runs in
the caller's task and the other in one child task, to keep the objects per tunnel few.

The relay returns the bytes carried each way, for the audit log.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

from ras.errors import RemoteProtocolError, TransportError
from ras.net.channel import aclose_quietly
from ras.net.fastio import PIPE_SIZE, PIPES, POOL, Leg, Yielder, leg_for, write_fd
from ras.net.reasons import BROKEN

__all__ = ["SPLICED", "RelayStats", "abort", "relay", "socket_of"]

_LINGER_ZERO = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
#: In splice mode, a splice that moves less than this goes back to read/write.
_SPLICE_BELOW = 16 * 1024
#: What ends a tunnel as a reset: a broken transport, whether raw or mapped by the stream.
_ENDS = (*BROKEN, TransportError, RemoteProtocolError)
#: Splices done (both directions, all tunnels): the benchmark checks bulk really splices.
SPLICED = [0]


@dataclass(slots=True)
class RelayStats:
    """Bytes carried each way, whether the tunnel ended by a reset, and the most bytes the
    relay held at once (read from one side, not yet handed to the other)."""

    a_to_b: int = 0
    b_to_a: int = 0
    reset: bool = False
    peak_buffered: int = field(default=0, compare=False)
    buffered: int = field(default=0, compare=False, repr=False)

    def hold(self, n: int) -> None:
        self.buffered += n
        if self.buffered > self.peak_buffered:
            self.peak_buffered = self.buffered

    def count(self, n: int, forward: bool) -> None:
        self.buffered -= n
        if forward:
            self.a_to_b += n
        else:
            self.b_to_a += n


def socket_of(stream: object) -> trio.socket.SocketType | None:
    """The socket under a stack of stream wrappers (prefix, TLS), if there is one."""
    for _ in range(8):
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock  # type: ignore[no-any-return]
        inner = getattr(stream, "transport_stream", None) or getattr(stream, "stream", None)
        if inner is None:
            return None
        stream = inner
    return None


async def abort(stream: trio.abc.Stream) -> None:
    """Close ``stream`` with a TCP reset (no FIN, unsent data dropped)."""
    sock = socket_of(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        sock.close()
    await aclose_quietly(stream)


async def _copy(src: Leg, dst: Leg, stats: RelayStats, forward: bool) -> None:
    """Through one pooled buffer at a time, until the end of ``src``."""
    yielder = Yielder()
    while True:
        buf = POOL.take()
        try:
            view = memoryview(buf)
            n = src.try_receive_into(view)
            if n > 0:
                stats.hold(n)
                await dst.send(view[:n], yielder)
                stats.count(n, forward)
        finally:
            POOL.give(buf)
        if n < 0:
            await src.wait_receivable()
        elif n == 0:
            return


async def _plain(src: int, dst: int, stats: RelayStats, forward: bool) -> None:
    """Between two plain sockets, until the end of ``src``. Small reads (an echo, an RDP
    message) go through a pooled buffer with one ``read`` and one ``write``: fewer syscalls
    and less latency than two splices. A read that fills the buffer means bulk, and bulk
    moves by splice until a splice moves less than ``_SPLICE_BELOW`` (the stream calmed)."""
    yielder = Yielder()
    size = POOL.size
    while True:
        buf = POOL.take()
        try:
            try:
                n = os.readv(src, (buf,))
            except BlockingIOError:
                n = -1
            if n > 0:
                stats.hold(n)
                view = memoryview(buf)[:n]
                try:
                    sent = os.write(dst, view)
                except BlockingIOError:
                    sent = 0
                if sent < n:
                    await write_fd(dst, view[sent:], yielder)
                stats.count(n, forward)
        finally:
            POOL.give(buf)
        if n < 0:
            await trio.lowlevel.wait_readable(src)
        elif n == 0:
            return
        elif n < size:  # a message: the socket is most likely empty now, skip the retry
            await trio.lowlevel.wait_readable(src)
        elif await _splice(src, dst, stats, forward):
            return


async def _splice(src: int, dst: int, stats: RelayStats, forward: bool) -> bool:
    """Socket to pipe to socket in the kernel while the stream is bulk: True at the end of
    ``src``, False when a splice moved less than ``_SPLICE_BELOW``."""
    yielder = Yielder()
    while True:
        pipe = PIPES.take()
        empty = False
        try:
            try:
                n = os.splice(src, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                n = -1
            if n > 0:
                stats.hold(n)
                left = n
                while left:
                    try:
                        left -= os.splice(pipe[0], dst, left, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst)
                        continue
                    await yielder.tick()
                stats.count(n, forward)
                SPLICED[0] += 1
            empty = True
        finally:
            if empty:
                PIPES.give(pipe)
            else:
                PIPES.discard(pipe)
        if n < 0:
            await trio.lowlevel.wait_readable(src)
        elif n == 0:
            return True
        elif n < _SPLICE_BELOW:
            return False


async def _direction(
    src: Leg,
    dst: Leg,
    prefix: bytes,
    stats: RelayStats,
    forward: bool,
    cancel: trio.CancelScope,
) -> None:
    try:
        if prefix:
            stats.hold(len(prefix))
            await dst.send(memoryview(prefix), Yielder())
            stats.count(len(prefix), forward)
        if src.fd is not None and dst.fd is not None:
            await _plain(src.fd, dst.fd, stats, forward)
        else:
            await _copy(src, dst, stats, forward)
    except _ENDS:
        stats.reset = True
        cancel.cancel()
        return
    # Clean end of stream from src: pass the half-close on.
    try:
        if await dst.send_eof():
            return
    except _ENDS:
        pass
    cancel.cancel()


async def relay(a: trio.abc.Stream, b: trio.abc.Stream) -> RelayStats:
    """Relay until both directions ended; closes (or resets) both streams before returning."""
    stats = RelayStats()
    PIPES.enter()
    try:
        leg_a, prefix_a = leg_for(a)
        leg_b, prefix_b = leg_for(b)
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(_direction, leg_b, leg_a, prefix_b, stats, False, scope)
            await _direction(leg_a, leg_b, prefix_a, stats, True, scope)
    finally:
        PIPES.leave()
        if stats.reset:
            await abort(a)
            await abort(b)
        else:
            await _close(a)
            await _close(b)
    return stats


async def _close(stream: trio.abc.Stream) -> None:
    """Close ``stream``; a plain socket at once (no cancel scope, no checkpoint: a few
    microseconds less per tunnel), anything else with ``aclose_quietly``."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
    else:
        await aclose_quietly(stream)
