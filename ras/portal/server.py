"""The portal's h11 shell: one HTTP request on a connection the gateway's TLS port sniffed.

Reads the request (head at most ``MAX_REQUEST_HEAD``, body at most ``MAX_BODY``; anything
else is answered 400 or 413 and closed), hands it to :meth:`Portal.handle` and writes the
answer with ``Connection: close``. The caller (the gateway's front door) owns the deadline.
A WebSocket upgrade request is not the portal's: it is returned (:class:`Upgrade`) for the
gateway to hand to the web client's endpoint (``ras.gateway.webclient``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import h11
import trio

from ras.errors import TransportError
from ras.net.http import MAX_REQUEST_HEAD
from ras.net.reasons import transport_errors
from ras.portal.app import Portal
from ras.portal.web import MAX_BODY, Request, Response

__all__ = ["Upgrade", "serve_portal"]

log = logging.getLogger("ras.portal")
Peer = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A request to switch protocols (a WebSocket): its path, headers (names lower-case, the
    last of each) and the bytes read past it."""

    path: str
    headers: dict[str, str]
    trailing: bytes


async def serve_portal(portal: Portal, stream: trio.abc.Stream, client: Peer) -> Upgrade | None:
    """Serve one request from ``client`` (the real client, behind a trusted proxy) on
    ``stream``; a GET asking for an upgrade is returned instead."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        got = await _read(stream, conn)
    except h11.RemoteProtocolError as exc:  # not HTTP/1.1 we take: say so, plainly
        status = exc.error_status_hint
        with contextlib.suppress(TransportError), transport_errors("portal answer not sent"):
            await stream.send_all(
                f"HTTP/1.1 {status} Bad Request\r\nconnection: close\r\n"
                "content-length: 0\r\n\r\n".encode()
            )
        return None
    if got is None:
        return None
    head, body = got
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
    if head.method == b"GET" and "upgrade" in headers and body == b"":
        path = head.target.decode("ascii", "replace").split("?", 1)[0]
        return Upgrade(path, headers, conn.trailing_data[0])
    if isinstance(body, int):
        await _write(stream, conn, Response(body, b"Request too large\n", "text/plain"))
        return None
    request = Request(
        method=head.method.decode("ascii", "replace"),
        target=head.target.decode("ascii", "replace"),
        headers=tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers),
        body=body,
        client=client,
    )
    response = await portal.handle(request)
    await _write(stream, conn, response, head=request.method == "HEAD")
    return None


async def _read(
    stream: trio.abc.Stream, conn: h11.Connection
) -> tuple[h11.Request, bytes | int] | None:
    """The request and its body (or the status that refuses it: 413), None at EOF."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with transport_errors("connection lost in a portal request"):
                data = await stream.receive_some(16384)
            if not data:
                return None
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY:
                return request, 413
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                assert request is not None
                return request, 413
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, bytes(body)
        else:
            return None


async def _write(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, *, head: bool = False
) -> None:
    headers = [*response.headers, ("connection", "close")]
    if response.status != 204:
        headers += [
            ("content-length", str(len(response.body))),
            ("content-type", response.content_type),
        ]
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if not head and response.status != 204:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as exc:
        log.warning("portal answer not sent: %s", exc)
        return
    try:
        with transport_errors("connection lost sending a portal answer"):
            await stream.send_all(data)
    except TransportError as exc:
        log.debug("portal answer not delivered: %s", exc)
