"""The User Portal on the gateway's TLS port (``ras.portal.serve_portal``), which anyone on the
internet reaches: the request read by h11 with the portal's limits, the form, cookies and
headers parsed (``ras.portal.web``), routed and answered by the real ``Portal`` with the real
pages and security checks, without a broker (a login that passes its CSRF check finds the
broker unreachable: 503).

Fed whole and in pieces, a request must get the same status; whatever is sent must be one
HTTP/1.1 answer (or nothing, when the bytes were not HTTP or ended early). Any exception is a
crash: a stranger's bytes must never reach the gateway's "bug" handler.
"""

from __future__ import annotations

import re

import trio

from fuzz import chunks
from fuzz.admin_http import _Stream
from ras.errors import TransportError
from ras.net.channel import Channel
from ras.portal import Portal, PortalSettings, PortalSite, serve_portal

PEER = ("192.0.2.1", 50000)
TOKEN = "A" * 43
DICTIONARY = (
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"OPTIONS ",
    b" HTTP/1.1\r\n",
    b"\r\n\r\n",
    b"host: portal.example\r\n",
    b"content-length: ",
    b"transfer-encoding: chunked\r\n",
    b"content-type: application/x-www-form-urlencoded\r\n",
    b"cookie: ras_portal_login=" + TOKEN.encode(),
    b"cookie: ras_portal=",
    b"origin: https://a.example\r\n",
    b"/login",
    b"/login/answer",
    b"/resources",
    b"/launch",
    b"/logout",
    b"/static/portal.css",
    b"csrf=" + TOKEN.encode(),
    b"&username=alice&password=x",
    b"&method=native&resource=desktop",
    b"%00",
)
_STATUS = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] ")


async def _unreachable(peer: tuple[str, int]) -> Channel:
    raise TransportError("no broker in the fuzz harness")


def _serve(pieces: list[bytes]) -> bytes:
    portal = Portal(
        PortalSite("portal.example", 443, 3389, True, 5.0),
        _unreachable,
        settings=PortalSettings(cors_origins=("https://a.example",)),
    )
    stream = _Stream(list(pieces))

    async def main() -> None:
        await serve_portal(portal, stream, PEER)  # type: ignore[arg-type]

    trio.run(main)
    sent = bytes(stream.sent)
    assert not sent or _STATUS.match(sent), sent[:200]
    assert sent.count(b"HTTP/1.1 ") <= 1 or b"\r\n\r\n" in sent, sent[:200]
    return sent[:12]


def fuzz_one(data: bytes) -> None:
    whole = _serve([data] if data else [])
    split = _serve(list(chunks(data)))
    assert whole == split, (whole, split)
