"""The ACME HTTP-01 answers a gateway or a HALB gives on its plain port, for the tokens the
broker handed it (``acme_challenge`` / ``acme_withdraw`` on its link). Bounded: at most
``MAX_TOKENS``. A token nobody handed out is a 404, and so is a token asked for under another
host name than the one it was handed out for (the request's Host, without its port)."""

from __future__ import annotations

import logging

import h11
import trio

from ras.net.http import MAX_REQUEST_HEAD, read_request, respond
from ras.protocol import AcmeChallenge

__all__ = ["CHALLENGE_PREFIX", "Challenges", "answer", "is_challenge", "serve_challenge"]

log = logging.getLogger("ras.acme")
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
MAX_TOKENS = 100


class Challenges:
    """token -> (key authorization, name), as the broker says."""

    def __init__(self) -> None:
        self._answers: dict[str, tuple[str, str]] = {}

    def add(self, msg: AcmeChallenge) -> None:
        if msg.token not in self._answers and len(self._answers) >= MAX_TOKENS:
            # the oldest challenge is the one most likely over already
            self._answers.pop(next(iter(self._answers)))
        self._answers[msg.token] = (msg.key_authorization, msg.name.casefold())
        log.info("acme challenge token=%s name=%s", msg.token, msg.name or "-")

    def withdraw(self, token: str) -> None:
        if self._answers.pop(token, None) is not None:
            log.info("acme challenge withdrawn token=%s", token)

    def clear(self) -> None:
        self._answers.clear()

    def answer(self, target: str, host: str = "") -> str | None:
        """The key authorization for a request target and Host, or None (not a challenge we
        know, or one for another name)."""
        if not target.startswith(CHALLENGE_PREFIX):
            return None
        found = self._answers.get(target[len(CHALLENGE_PREFIX) :])
        if found is None:
            return None
        key_authorization, name = found
        if name and _host_name(host) != name:
            return None
        return key_authorization

    def __contains__(self, token: str) -> bool:
        return token in self._answers


def _host_name(host: str) -> str:
    """A Host header's name, without the port (``[v6]:80`` gives ``v6``) or a final dot."""
    host = host.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".").casefold()


def is_challenge(request: h11.Request) -> bool:
    """A GET or HEAD under ``/.well-known/acme-challenge/``."""
    return request.method in (b"GET", b"HEAD") and request.target.startswith(
        CHALLENGE_PREFIX.encode()
    )


async def answer(
    stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request, challenges: Challenges
) -> None:
    """200 with the key authorization of a token we were handed, 404 for any other."""
    target = request.target.decode("ascii", "replace").split("?", 1)[0]
    host = next((v for k, v in request.headers if k == b"host"), b"")
    key_authorization = challenges.answer(target, host.decode("ascii", "replace"))
    if key_authorization is None:
        await respond(stream, conn, 404, b"Not found\n")
        return
    body = key_authorization.encode() if request.method == b"GET" else b""
    await respond(stream, conn, 200, body, content_type="application/octet-stream")


async def serve_challenge(stream: trio.abc.Stream, challenges: Challenges) -> None:
    """One request that should be a challenge (a HALB's port 80): answered, or 404."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    got = await read_request(stream, conn)
    if got is None:
        return
    if is_challenge(got[0]):
        await answer(stream, conn, got[0], challenges)
    else:
        await respond(stream, conn, 404, b"Not found\n")
