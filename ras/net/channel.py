"""A control-protocol connection over a trio stream: the thin shell around ``Connection``.

``Channel`` reads from the stream, feeds the sans-I/O codec and hands out one message at a
time; it writes what the codec produces. Transport failures become ``TransportError`` and
protocol violations by the peer are answered with an ``error`` frame carrying the code, then
the stream is closed and ``RemoteProtocolError`` raised. Callers own timeouts: wrap calls in
``trio.fail_after``/``move_on_after``.
"""

from __future__ import annotations

import collections
from types import TracebackType

import trio

from ras.errors import ErrorCode, PeerError, ProtocolError, RemoteProtocolError, TransportError
from ras.net.reasons import BROKEN, transport_errors
from ras.protocol import (
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Role,
    Side,
    State,
    Welcome,
)  # fmt: skip

__all__ = ["Channel", "PeerError", "greet"]  # PeerError lives in ras.errors; kept here too

RECEIVE_SIZE = 65536


class Channel:
    """Framed control-protocol traffic over ``stream``; ``side`` is who we are."""

    def __init__(
        self, stream: trio.abc.Stream, side: Side, *, max_frame_size: int | None = None
    ) -> None:
        self.stream = stream
        self.conn = (
            Connection(side)
            if max_frame_size is None
            else Connection(side, max_frame_size=max_frame_size)
        )
        self._events: collections.deque[Message | ConnectionClosed] = collections.deque()
        self._send_lock = trio.Lock()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def send(self, msg: Message) -> None:
        if self.conn.state in (State.CLOSED, State.ERROR) and not isinstance(msg, Error):
            raise TransportError("the connection is closed")
        await self._write(self.conn.send(msg))

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            with transport_errors("connection lost while sending"):
                await self.stream.send_all(data)

    async def refuse(self, code: ErrorCode, message: str) -> None:
        """Answer a request with a (non-fatal, 2xx/5xx) ``error``; the connection stays open."""
        await self.send(Error(code, message))

    async def answer(self, result: Message | tuple[ErrorCode, str]) -> None:
        """Send a reply message, or a refusal given as ``(code, message)``."""
        if isinstance(result, tuple):
            await self.refuse(*result)
        else:
            await self.send(result)

    async def receive(self) -> Message:
        """The next message. ``ConnectionClosed`` at a frame boundary is a ``TransportError``."""
        while not self._events:
            with transport_errors("connection lost"):
                data = await self.stream.receive_some(RECEIVE_SIZE)
            try:
                self._events.extend(self.conn.receive_data(bytes(data)))
            except RemoteProtocolError as exc:
                await self.fail(exc.code, str(exc))
                raise
        event = self._events.popleft()
        if isinstance(event, ConnectionClosed):
            raise TransportError("the peer closed the connection")
        return event

    async def answer_ping(self, msg: Message) -> bool:
        """The one place pings are answered: a ``ping`` gets its ``pong`` and a ``pong`` needs
        nothing (True: ``msg`` is dealt with); any other message is the caller's (False).
        Loops that read requests call it first; ``receive_reply`` and ``ping`` do too."""
        if isinstance(msg, Ping):
            await self.send(Pong(msg.nonce))
            return True
        return isinstance(msg, Pong)

    async def receive_reply(self) -> Message:
        """The next message that is not a ping or a pong (pings are answered on the way)."""
        while True:
            msg = await self.receive()
            if not await self.answer_ping(msg):
                return msg

    async def ping(self, nonce: int) -> None:
        """Send ``ping`` and wait for its ``pong`` (a request whose answer ``receive_reply``
        would skip). Pings from the peer are answered on the way; anything else is a
        ``TransportError``, an ``error`` a ``PeerError``."""
        await self.send(Ping(nonce))
        while True:
            msg = await self.receive()
            if isinstance(msg, Pong) and msg.nonce == nonce:
                return
            if await self.answer_ping(msg):
                continue
            if isinstance(msg, Error):
                raise PeerError(msg)
            raise TransportError(f"the peer answered ping with {msg.TYPE}")

    async def request(self, msg: Message) -> Message:
        """Send ``msg`` and return the answer; an ``error`` answer raises ``PeerError``."""
        await self.send(msg)
        reply = await self.receive_reply()
        if isinstance(reply, Error):
            raise PeerError(reply)
        return reply

    async def fail(self, code: ErrorCode, message: str) -> None:
        """Best effort: send an ``error`` frame, then close the stream."""
        try:
            if self.conn.state not in (State.TUNNEL, State.CLOSED):
                with trio.move_on_after(1):
                    await self._write(self.conn.send_error(code, message))
        except (TransportError, ProtocolError):
            pass
        finally:
            await self.aclose()

    def into_tunnel(self) -> bytes:
        """After ``tunnel_open``: the raw bytes already read past the last frame."""
        return self.conn.trailing_data()

    async def aclose(self) -> None:
        await aclose_quietly(self.stream)


async def aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close a stream, ignoring a broken transport underneath (a TLS close_notify may fail)."""
    try:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
    except BROKEN:
        pass


async def greet(stream: trio.abc.Stream, role: Role, software: str) -> Channel:
    """Open the control protocol on a connected ``stream`` as ``role``: preface and ``hello``,
    then the peer's ``welcome``. The stream is closed if that fails. The caller owns the
    deadline."""
    chan = Channel(stream, Side.CLIENT)
    try:
        await chan.send(Hello(role, software))
        welcome = await chan.receive_reply()
        if not isinstance(welcome, Welcome):
            if isinstance(welcome, Error):
                raise PeerError(welcome)
            raise TransportError(f"the peer answered hello with {welcome.TYPE}")
    except BaseException:
        await chan.aclose()
        raise
    return chan
