"""The little HTTP the gateway speaks so far: a redirect to HTTPS on the plain port, and a
plain 404 on the TLS port until the portal and RD Gateway endpoints exist. h11 does the
parsing; the caller owns the deadline."""

from __future__ import annotations

import h11
import trio

__all__ = ["redirect_to_https", "refuse_http"]

MAX_REQUEST_HEAD = 16 * 1024


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(bytes(data))
            if not data:
                return None
        else:
            return None


async def _respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    headers = [
        *headers,
        ("content-length", str(len(body))),
        ("connection", "close"),
        ("content-type", "text/plain; charset=utf-8"),
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def redirect_to_https(stream: trio.abc.Stream, public_host: str, public_port: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    request = await _read_request(stream, conn)
    if request is None:
        return
    target = request.target.decode("ascii", "replace")
    if not target.startswith("/"):
        target = "/"
    port = "" if public_port == 443 else f":{public_port}"
    location = f"https://{public_host}{port}{target}"
    await _respond(stream, conn, 301, [("location", location)], b"See " + location.encode() + b"\n")


async def refuse_http(stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    if await _read_request(stream, conn) is None:
        return
    await _respond(stream, conn, 404, [], b"Not found\n")
