"""The little HTTP the gateway speaks on its plain port: ACME HTTP-01 answers for the tokens
the broker handed it and a redirect to HTTPS for everything else. HTTP on the TLS port is the
User Portal's (``ras.portal``; ACME is never answered there)."""

from __future__ import annotations

import h11
import trio

from ras.net.acme import Challenges, answer, is_challenge
from ras.net.http import MAX_REQUEST_HEAD, read_request, respond

__all__ = ["plain_http", "redirect_to_https"]


async def plain_http(
    stream: trio.abc.Stream, public_host: str, public_port: int, challenges: Challenges
) -> None:
    """One request on the plain port: an ACME answer, a 404 for an unknown token, or a
    redirect to HTTPS."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    got = await read_request(stream, conn)
    if got is None:
        return
    request = got[0]
    if is_challenge(request):
        await answer(stream, conn, request, challenges)
        return
    target = request.target.decode("ascii", "replace")
    await _redirect(stream, conn, target, public_host, public_port)


async def redirect_to_https(stream: trio.abc.Stream, public_host: str, public_port: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    got = await read_request(stream, conn)
    if got is None:
        return
    await _redirect(
        stream, conn, got[0].target.decode("ascii", "replace"), public_host, public_port
    )


async def _redirect(
    stream: trio.abc.Stream, conn: h11.Connection, target: str, public_host: str, public_port: int
) -> None:
    if not target.startswith("/"):
        target = "/"
    port = "" if public_port == 443 else f":{public_port}"
    location = f"https://{public_host}{port}{target}"
    await respond(
        stream, conn, 301, b"See " + location.encode() + b"\n", headers=[("location", location)]
    )
