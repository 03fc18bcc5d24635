"""What the web client's tests share: a browser's WebSocket played with wsproto, a stand-in RDP
host, and the RDCleanPath request a browser sends.

Used over memory streams (tests/test_webclient.py, where the gateway already read the upgrade
request) and over real loopback sockets (tests/test_webclient_drain.py, where the browser sends
the upgrade itself: :meth:`Browser.open`)."""

from __future__ import annotations

import base64
import contextlib
import ssl

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection

from ras.gateway.webclient import WEBSOCKET_PATH
from ras.net.reasons import BROKEN
from ras.protocol.rdcleanpath import CleanPathPdu, encode_pdu, parse_pdu
from ras.protocol.x224 import encode_connection_request, parse_connection_request

# what an RDP server that selected CredSSP answers (rdpNegRsp, HYBRID)
CONFIRM = bytes.fromhex("030000130ed000001234000200080002000000")
X224 = encode_connection_request("Cookie: mstshash=alice")
WS_KEY = base64.b64encode(b"0123456789abcdef").decode()
WS_HEADERS = {
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": WS_KEY,
}


def cleanpath_request(token: str, destination: str = "rdp1.test:3389") -> bytes:
    """The browser's RDCleanPath request: ``token`` and :data:`X224`."""
    return encode_pdu(CleanPathPdu.request(X224, destination, token))


class RdpHost:
    """Answers the X.224 request with CONFIRM, then TLS with its own certificate, then echoes."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.connections = 0
        self.requests: list[bytes] = []
        self.received = bytearray()

    async def serve(self, stream: trio.abc.Stream, peer: object = None) -> None:
        self.connections += 1
        data = b""
        while (request := parse_connection_request(data)) is None:
            data += await stream.receive_some()
        self.requests.append(data[: request.length])
        await stream.send_all(CONFIRM)
        tls = trio.SSLStream(stream, self.context, server_side=True)
        with contextlib.suppress(*BROKEN):
            while got := await tls.receive_some():
                self.received += got
                await tls.send_all(got)


class Browser:
    """The browser's side of the WebSocket."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT)
        self.data = b""
        self.closed = False

    async def open(self, host: str = "localhost") -> None:
        """Send the HTTP upgrade to the web client's path, then read the answer."""
        head = f"GET {WEBSOCKET_PATH} HTTP/1.1\r\nhost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in WS_HEADERS.items()
        )
        await self.stream.send_all(head.encode() + b"\r\n")
        await self.start()

    async def start(self) -> None:
        """Read the gateway's ``101`` answer to the upgrade."""
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await self.stream.receive_some()
            assert chunk, f"the gateway closed before its answer: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.ws.receive_data(head.split(b"\r\n\r\n", 1)[1])

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(BytesMessage(data=data)))

    async def receive(self) -> bytes:
        """Payload bytes as they come (b"": the gateway closed, by a Close or the TCP end)."""
        while True:
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    self.data += event.data
                elif isinstance(event, CloseConnection):
                    self.closed = True
            if self.data or self.closed:
                out, self.data = self.data, b""
                return out
            try:
                chunk = await self.stream.receive_some()
            except trio.BrokenResourceError:  # a reset, or TLS cut without close_notify
                chunk = b""
            if not chunk:
                self.closed = True
                return b""
            self.ws.receive_data(chunk)

    async def echo(self, data: bytes) -> bytes:
        """Send ``data`` and read as many bytes back (fewer if the gateway closes first)."""
        await self.send(data)
        got = b""
        while len(got) < len(data) and (more := await self.receive()):
            got += more
        return got

    async def answer(self) -> CleanPathPdu:
        got = b""
        while (parsed := parse_pdu(got, max_size=1 << 16)) is None:
            more = await self.receive()
            assert more, "the gateway closed without an answer"
            got += more
        return parsed[0]

    async def close(self) -> None:
        await self.stream.send_all(self.ws.send(CloseConnection(1000)))
