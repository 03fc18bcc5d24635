"""The small amount of HTTP/1.1 the daemons serve themselves (redirects, admin JSON), on h11.
One request per connection; the caller owns the deadline."""

from __future__ import annotations

import h11
import trio

__all__ = ["MAX_REQUEST_HEAD", "read_request", "respond"]

MAX_REQUEST_HEAD = 16 * 1024


async def read_request(
    stream: trio.abc.Stream, conn: h11.Connection, *, max_body: int = 0
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body (at most ``max_body`` bytes), or None if the peer sent
    something that is not HTTP, too much, or nothing."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(bytes(data))
            if not data:
                return None
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                return None
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, bytes(body)
        else:
            return None


async def respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
) -> None:
    all_headers = [
        *(headers or []),
        ("content-length", str(len(body))),
        ("connection", "close"),
        ("content-type", content_type),
    ]
    data = conn.send(h11.Response(status_code=status, headers=all_headers)) or b""
    # The answer to HEAD is the head alone (its content-length says what GET would send);
    # h11 refuses a body there. h11 keeps the request's method only in this attribute.
    if getattr(conn, "_request_method", None) != b"HEAD":
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
