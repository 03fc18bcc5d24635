"""An admin API request as it arrives on the wire (``ras.broker.admin``), without TLS or
sockets: the request head and body read by ``_read_request`` (h11), dispatched by
``AdminServer._dispatch`` (the path split and URL-decoded, the query, the route table, the
``auth_token`` header), and answered by ``AdminServer._answer``.

The server is the real class with the real route table, but without a broker: the real logon
handler runs, with a directory that knows nobody and no failure counting; any ``auth_token``
is accepted, and every other route's handler is replaced by one that only decodes the body
(``ApiRequest.json()``, see ``fuzz.admin_json`` for what validates it) and answers with the
path's segments and the query. So a 500 here is a fault of the HTTP shell. The input is fed
whole and in pieces: both must get the same answer. Only ``ApiError`` 400 or 413 may come out
of the reading, and a request read whole must be answered.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import h11

from fuzz import chunks, run_sync
from ras.broker.admin import AdminServer, ApiError, ApiRequest, Route, _read_request
from ras.broker.admin_routes import routes
from ras.net.http import MAX_REQUEST_HEAD

PEER = ("192.0.2.1", 50000)
# A fault found by this target and reported, not yet fixed (it is not in a codec): the answer
# to a HEAD request carries a body (ras.net.http.respond), which h11 refuses with
# LocalProtocolError, so the handler fails and the client gets no answer. Tolerated here so
# the target can look further; tests/test_fuzz.py holds the strict xfail that turns red when
# it is fixed (then remove this).
HEAD_FAULT = "HEAD: answer with a body refused by h11"
DICTIONARY = (
    b"POST ",
    b"GET ",
    b"PUT ",
    b"DELETE ",
    b" HTTP/1.1\r\n",
    b"\r\n\r\n",
    b"host: ",
    b"content-length: ",
    b"transfer-encoding: chunked\r\n",
    b"auth_token: ",
    b"content-type: application/json\r\n",
    b"/api/",
    b"session/logon",
    b"users",
    b"groups",
    b"hosts",
    b"pools",
    b"resources",
    b"rules",
    b"sessions",
    b"%2F",
    b"%00",
    b"?user=",
    b'{"username":"',
)


class _Stream:
    """The client's bytes, handed out in the given pieces, then EOF; what is sent is kept."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pieces:
            return b""
        piece = self._pieces.pop(0)
        if max_bytes is not None and len(piece) > max_bytes:
            piece, self._pieces[0:0] = piece[:max_bytes], [piece[max_bytes:]]
        return piece

    async def send_all(self, data: bytes) -> None:
        self.sent += data


class _AnyToken:
    def check(self, token: str, now: float) -> str | None:
        return "fuzz"


class _NoThrottle:
    def check(self, user: str, client: str) -> None:
        return None

    def failed(self, user: str, client: str) -> None:
        pass

    def succeeded(self, user: str) -> None:
        pass


async def _nobody(username: str, password: str) -> None:
    return None  # the directory knows no such user, or the password is wrong


async def _decode_body(request: ApiRequest) -> tuple[int, Any]:
    request.json()
    return 200, {"parts": list(request.parts), "query": request.query}


def _server() -> AdminServer:
    server = object.__new__(AdminServer)
    server.broker = SimpleNamespace(
        config=SimpleNamespace(admin_cert_names=(), admin_groups=("ras-admins",)),
        store=None,  # route tables that bind the store when built (ras.broker.portal)
        history=None,  # and the history (ras.broker.admin_reports)
        reports=None,  # and the farm's reports (ras.broker.farmreport)
        roles=None,  # one broker: the primary (ras.broker.roles)
    )
    server.tokens = _AnyToken()
    server._throttle = _NoThrottle()
    server.authenticate = _nobody
    table = [Route("POST", ("session", "logon"), server._logon)]
    table.append(Route("POST", ("session", "logoff"), _decode_body))
    table += [
        Route(r.method, r.pattern, _decode_body) for r in routes(server.broker, server.unlock)
    ]
    server._routes = table
    return server


def _serve(pieces: list[bytes], *, known_faults: bool = True) -> tuple[int, Any] | None:
    """The status and the answer (for an error, its code and field: the message may quote
    what h11 had buffered), or None if nothing was answered. ``known_faults``: see
    ``HEAD_FAULT``."""
    server = _server()
    stream = _Stream(list(pieces))
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        got = run_sync(_read_request(stream, conn))
    except ApiError as exc:
        status, answer, what = exc.status, exc.body(), None
    else:
        if got is None:
            assert not stream.sent
            return None
        status, answer = run_sync(server._dispatch(got, None, PEER))
        assert status != 500, answer
        what = (got.method, got.target)
    if what is None:
        assert status in (400, 413), answer
    try:
        run_sync(server._answer(stream, conn, status, answer, what, PEER))
    except h11.LocalProtocolError:
        if known_faults and getattr(conn, "_request_method", None) == b"HEAD":
            return status, HEAD_FAULT
        raise
    # A request read whole is always answered; one refused on its head may not be.
    if what is not None or stream.sent:
        assert stream.sent.startswith(b"HTTP/1.1 %d " % status), bytes(stream.sent[:64])
    if "error" in answer:
        answer = {k: v for k, v in answer.items() if k != "message"}
    return status, answer


def fuzz_one(data: bytes) -> None:
    whole = _serve([data] if data else [])
    split = _serve(list(chunks(data)))
    assert whole == split, (whole, split)
