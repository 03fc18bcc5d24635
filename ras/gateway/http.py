"""The little HTTP the gateway speaks so far: a redirect to HTTPS on the plain port, and a
plain 404 on the TLS port until the portal and RD Gateway endpoints exist."""

from __future__ import annotations

import h11
import trio

from ras.net.http import MAX_REQUEST_HEAD, read_request, respond

__all__ = ["redirect_to_https", "refuse_http"]


async def redirect_to_https(stream: trio.abc.Stream, public_host: str, public_port: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    got = await read_request(stream, conn)
    if got is None:
        return
    target = got[0].target.decode("ascii", "replace")
    if not target.startswith("/"):
        target = "/"
    port = "" if public_port == 443 else f":{public_port}"
    location = f"https://{public_host}{port}{target}"
    await respond(
        stream, conn, 301, b"See " + location.encode() + b"\n", headers=[("location", location)]
    )


async def refuse_http(stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    if await read_request(stream, conn) is None:
        return
    await respond(stream, conn, 404, b"Not found\n")
