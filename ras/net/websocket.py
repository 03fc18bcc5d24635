"""A WebSocket as a byte stream: the server side, after an HTTP/1.1 upgrade, on wsproto.

Theory of operation. :func:`accept` answers an upgrade request that the caller's HTTP parser
(h11) already read: ``101 Switching Protocols`` with the ``Sec-WebSocket-Accept`` of the
request's key, no extension, no subprotocol. From then on :class:`WebSocketStream` is a
``trio.abc.Stream`` whose bytes are the payloads of binary messages: ``send_all`` sends one
binary message, ``receive_some`` returns payload bytes as they arrive, whatever the message
and frame boundaries (RDCleanPath and the RDP bytes after it are a byte stream to both ends).
Pings are answered; a text message is a protocol error (close code 1003); the peer's Close
is answered and is the end of the stream (``b""``), as is a TCP end of stream. ``aclose``
sends a Close (1000) if none was sent, then closes the transport.

The stream exposes its ``transport_stream``, so the gateway's tunnel registry finds the TCP
socket underneath (idle time, shutdown at a drain) as for any other tunnel.
"""

from __future__ import annotations

import contextlib

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError as WsLocalError
from wsproto.utilities import RemoteProtocolError as WsRemoteError
from wsproto.utilities import generate_accept_token

from ras.errors import RemoteProtocolError, TransportError
from ras.net.reasons import transport_errors

__all__ = ["WebSocketStream", "accept", "upgrade_problem"]

_READ = 65536
_UNSUPPORTED_DATA = 1003


def upgrade_problem(headers: dict[str, str]) -> str | None:
    """Why the request's (lower-case) ``headers`` are not a WebSocket upgrade we take; None
    when they are."""
    if "websocket" not in headers.get("upgrade", "").lower():
        return "not a WebSocket upgrade"
    if "upgrade" not in (t.strip() for t in headers.get("connection", "").lower().split(",")):
        return "no Connection: Upgrade"
    if headers.get("sec-websocket-version", "") != "13":
        return "WebSocket version is not 13"
    if len(headers.get("sec-websocket-key", "")) != 24:
        return "no valid Sec-WebSocket-Key"
    return None


async def accept(
    transport: trio.abc.Stream, headers: dict[str, str], trailing: bytes = b""
) -> WebSocketStream:
    """Answer the upgrade (``headers`` checked by :func:`upgrade_problem`) and return the
    stream. ``trailing``: bytes the HTTP parser read past the request. The caller owns the
    deadline."""
    token = generate_accept_token(headers["sec-websocket-key"].encode("ascii"))
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + token + b"\r\n\r\n"
    )
    with transport_errors("connection lost answering the WebSocket upgrade"):
        await transport.send_all(answer)
    return WebSocketStream(transport, trailing)


class WebSocketStream(trio.abc.Stream):
    """The binary messages of a WebSocket (server side) as one byte stream."""

    def __init__(self, transport: trio.abc.Stream, trailing: bytes = b"") -> None:
        self.transport_stream = transport
        self._ws = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self._pending = bytearray()
        self._eof = False
        self._send_lock = trio.Lock()  # a pong or a Close may go out while the relay sends

    async def _write(self, data: bytes) -> None:
        if data:
            async with self._send_lock:
                with transport_errors("WebSocket connection lost"):
                    await self.transport_stream.send_all(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("the WebSocket is closing")
        await self._write(self._ws.send(BytesMessage(data=bytes(data))))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending and not self._eof:
            await self._events()
            if self._pending or self._eof:
                break
            with transport_errors("WebSocket connection lost"):
                data = await self.transport_stream.receive_some(_READ)
            if not data:
                self._eof = True
                break
            self._ws.receive_data(bytes(data))
        n = len(self._pending) if max_bytes is None else min(max_bytes, len(self._pending))
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    async def _events(self) -> None:
        try:
            for event in self._ws.events():
                match event:
                    case BytesMessage():
                        self._pending += event.data
                    case Ping():
                        await self._write(self._ws.send(event.response()))
                    case CloseConnection():
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            await self._write(self._ws.send(event.response()))
                        self._eof = True
                    case TextMessage():
                        await self._write(
                            self._ws.send(CloseConnection(_UNSUPPORTED_DATA, "binary only"))
                        )
                        raise RemoteProtocolError("a WebSocket text message (binary only)")
        except WsRemoteError as exc:
            raise RemoteProtocolError(f"bad WebSocket frame: {exc}") from exc

    async def aclose(self) -> None:
        try:
            if self._ws.state is ConnectionState.OPEN:
                with contextlib.suppress(TransportError, WsLocalError), trio.move_on_after(1):
                    await self._write(self._ws.send(CloseConnection(1000)))
        finally:
            await self.transport_stream.aclose()
