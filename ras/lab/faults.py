"""A TCP proxy that injects faults between two daemons, for tests and the lab.

``tc netem`` is not in the lab's kernel, so latency, slicing, truncation, stalls and resets come
from this proxy instead. Put it between a client and its server (a client and a gateway, a
gateway and its broker, an agent and the broker) and change its faults while traffic flows::

    proxy = FaultProxy(("127.0.0.1", broker_port))
    host, port = await nursery.start(proxy.serve)     # point the client here
    proxy.set(latency_s=0.05, max_piece=7)             # both directions
    proxy.set(Direction.DOWN, bandwidth_bps=64_000)    # one direction
    proxy.stall()                                      # hold every byte (TCP backs up)
    proxy.blackhole()                                  # drop every byte, end of stream too
    proxy.reset_all()                                  # RST both ends of every connection
    proxy.refusing = True                              # new connections are reset at once
    proxy.clear()                                      # no faults: held bytes flow again

Theory of operation. Each accepted connection gets a connection to the target and two
directions, ``UP`` (the accepted side to the target) and ``DOWN`` (back). A direction is a
reader and a writer joined by a small queue: the reader takes what its source has (not while
the direction is stalled, so the kernel's buffers fill and the sender feels it), stamps it
with the time it may be delivered (now plus the latency then in force) and queues it; the
writer waits for that time, splits the bytes into pieces, paces them to the bandwidth cap and
writes them. The faults are read at each step, so a change acts at once on every connection,
open or new. A blackholed direction reads and drops; an end of stream that arrives while it
is blackholed is held until the blackhole is lifted (a FIN is lost with the data). A reset
(``reset_all``, ``cut_after``, or a reset by either peer) closes both sockets with SO_LINGER 0,
so both peers see a TCP reset; a clean end of stream is passed on as a half-close.

The proxy never changes a byte it forwards; it only delays, splits, holds, drops or cuts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

__all__ = ["Direction", "FaultProxy", "Faults"]

_READ = 65536
_QUEUE = 16  # pieces a direction holds between its reader and its writer
_LINGER_ZERO = struct.pack("ii", 1, 0)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Direction(enum.Enum):
    UP = "up"  # from the accepted connection to the target
    DOWN = "down"  # from the target back


@dataclass(frozen=True, slots=True)
class Faults:
    """What happens to the bytes of one direction (the defaults: nothing).

    ``latency_s``: each read is delivered this much later (pipelined: it delays, it does not
    cap the rate). ``bandwidth_bps``: at most this many bytes a second per connection (0: no
    cap). ``max_piece``: writes are split into pieces of 1 to ``max_piece`` bytes (0: as
    read), with ``piece_gap_s`` between pieces so they leave as separate segments.
    ``stalled``: nothing is forwarded (nor read) until it is lifted. ``blackhole``: everything
    read is dropped. ``cut_after``: a connection is reset after this many bytes went its way.
    """

    latency_s: float = 0.0
    bandwidth_bps: float = 0.0
    max_piece: int = 0
    piece_gap_s: float = 0.0
    stalled: bool = False
    blackhole: bool = False
    cut_after: int | None = None

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bandwidth_bps < 0 or self.piece_gap_s < 0:
            raise ValueError("latency_s, bandwidth_bps and piece_gap_s cannot be negative")
        if self.max_piece < 0 or (self.cut_after is not None and self.cut_after < 0):
            raise ValueError("max_piece and cut_after cannot be negative")


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted side, the target side, bytes each way."""

    client: trio.SocketStream
    server: trio.SocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reset: bool = False
    carried: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(Direction, 0))

    def abort(self) -> None:
        self.reset = True
        self.scope.cancel()


class FaultProxy:
    """Forwards TCP connections to ``target`` through faults that can change at any time."""

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.target = target
        self.host = host
        self.address: tuple[str, int] = (host, 0)
        self.faults = dict.fromkeys(Direction, Faults())
        self.refusing = False  #: new connections are reset as soon as they are accepted
        self.accepted = 0  #: connections accepted, refused ones included
        self.refused = 0  #: connections reset at once (refusing, or the target down)
        self.resets = 0  #: connections that ended with a reset, however
        self.forwarded = dict.fromkeys(Direction, 0)  #: bytes written, each way
        self.dropped = dict.fromkeys(Direction, 0)  #: bytes a blackhole took, each way
        self._links: set[_Link] = set()
        self._changed = trio.Event()
        self._random = random.Random(seed)

    # -- control ---------------------------------------------------------------------------

    @property
    def open(self) -> int:
        """Connections being proxied now."""
        return len(self._links)

    def set(self, direction: Direction | None = None, **changes: object) -> None:
        """Change the faults of ``direction`` (None: both); unnamed ones stay as they are."""
        for d in Direction if direction is None else (direction,):
            self.faults[d] = dataclasses.replace(self.faults[d], **changes)  # type: ignore[arg-type]
        self._changed_now()

    def stall(self, direction: Direction | None = None) -> None:
        """Stop forwarding (and reading) until ``clear`` or ``set(stalled=False)``."""
        self.set(direction, stalled=True)

    def blackhole(self, direction: Direction | None = None) -> None:
        """Drop everything from now until ``clear`` or ``set(blackhole=False)``."""
        self.set(direction, blackhole=True)

    def clear(self) -> None:
        """No faults any more, and new connections are taken again."""
        self.faults = dict.fromkeys(Direction, Faults())
        self.refusing = False
        self._changed_now()

    def reset_all(self) -> int:
        """Reset both ends of every open connection; how many there were."""
        links = list(self._links)
        for link in links:
            link.abort()
        return len(links)

    def _changed_now(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _until(self, ok: Callable[[], bool]) -> None:
        while not ok():
            await self._changed.wait()

    # -- serving ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until cancelled; ``started`` gets the address to connect to."""
        listeners = await trio.open_tcp_listeners(self.address[1], host=self.host)
        self.address = (self.host, listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as handlers:
            task_status.started(self.address)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if self.refusing:
            self.refused += 1
            _abort(client)
            return
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            self.refused += 1
            _abort(client)
            return
        link = _Link(client, server)
        self._links.add(link)
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, link, client, server, Direction.UP)
                    await self._direction(link, server, client, Direction.DOWN)
        finally:
            self._links.discard(link)
            if link.reset:
                self.resets += 1
                _abort(client)
                _abort(server)
            else:
                client.socket.close()
                server.socket.close()

    async def _direction(
        self, link: _Link, src: trio.SocketStream, dst: trio.SocketStream, way: Direction
    ) -> None:
        queue_in, queue_out = trio.open_memory_channel[tuple[float, bytes]](_QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, link, src, queue_in, way)
            await self._write(link, dst, queue_out, way)

    async def _read(
        self,
        link: _Link,
        src: trio.SocketStream,
        queue: trio.MemorySendChannel[tuple[float, bytes]],
        way: Direction,
    ) -> None:
        async with queue:
            while True:
                await self._until(lambda: not self.faults[way].stalled)
                try:
                    data = await src.receive_some(_READ)
                except _BROKEN:
                    link.abort()
                    return
                if not data:  # the end of stream: passed on, unless it falls in a blackhole
                    await self._until(lambda: not self.faults[way].blackhole)
                    await queue.send((trio.current_time() + self.faults[way].latency_s, b""))
                    return
                if self.faults[way].blackhole:
                    self.dropped[way] += len(data)
                    continue
                await queue.send((trio.current_time() + self.faults[way].latency_s, data))

    async def _write(
        self,
        link: _Link,
        dst: trio.SocketStream,
        queue: trio.MemoryReceiveChannel[tuple[float, bytes]],
        way: Direction,
    ) -> None:
        async with queue:
            async for deliver_at, data in queue:
                await trio.sleep_until(deliver_at)
                if not data:
                    with contextlib.suppress(*_BROKEN):
                        await dst.send_eof()
                    return
                view = memoryview(data)
                while view:
                    await self._until(lambda: not self.faults[way].stalled)
                    faults = self.faults[way]
                    if faults.blackhole:  # read before the blackhole began: lost all the same
                        self.dropped[way] += len(view)
                        break
                    size = len(view)
                    if faults.max_piece:
                        size = min(size, self._random.randint(1, faults.max_piece))
                    if faults.cut_after is not None:
                        size = min(size, faults.cut_after - link.carried[way])
                        if size <= 0:
                            link.abort()
                            return
                    try:
                        await dst.send_all(view[:size])
                    except _BROKEN:
                        link.abort()
                        return
                    view = view[size:]
                    link.carried[way] += size
                    self.forwarded[way] += size
                    if faults.bandwidth_bps:
                        await trio.sleep(size / faults.bandwidth_bps)
                    if faults.piece_gap_s and view:
                        await trio.sleep(faults.piece_gap_s)


def _abort(stream: trio.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer sees ECONNRESET, not an end of stream."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    stream.socket.close()
