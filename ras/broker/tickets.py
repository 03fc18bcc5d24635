"""Launch tickets and resume tokens: signed, expiring claims that only the broker can make.

A launch ticket is a single-use permission to open one tunnel. It names everything the
gateway may do with it: the user and resource it was issued for, the one host:port the
tunnel may reach, the gateway it was issued through (see ``ticket_scope``), the client
address it was issued to, and when it expires. It is signed with HMAC-SHA256 under a key that
only the broker holds (gateways never verify tickets themselves: they redeem them at the
broker, which also enforces single use). Form: ``t1.<base64url JSON claims>.<base64url MAC>``.

A web launch token (``w1.``, same claims, its own key: ``TicketAuthority(key, web=True)``) is
the browser's ticket: the web client's endpoint on the gateway redeems it (``redeem_ticket``
with ``web``), and a launch ticket is not one, nor the other way round. It also carries the
SHA-256 of the host's TLS certificate as its agent reported it (``pin``): the gateway is the
TLS client to the host for a browser, and checks it.

A resume token (``s1.``, same form, its own key) lets a client whose connection was lost log in
again on a new one, through any gateway, without its password or second factor: it names the
user, the client address and an expiry (the user is looked up again at each use).

This module is pure: the clock is an argument, the single-use register lives in the store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from ras.errors import TicketError

__all__ = ["ResumeClaims", "ResumeTokens", "TicketAuthority", "TicketClaims", "new_session_id"]

_PREFIX = "t1"
_WEB_PREFIX = "w1"
_RESUME_PREFIX = "s1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_session_id() -> str:
    """The farm's id of a session, made at its launch: ``s-`` and 12 hex digits. Not a
    secret (it is in log lines): it lets one session be followed through every daemon."""
    return "s-" + os.urandom(6).hex()


@dataclass(frozen=True, slots=True)
class TicketClaims:
    id: str
    user: str
    resource: str
    host: str
    port: int
    gateway: str
    client: str
    expires: float
    session: str = ""  # the farm's id of the session the launch starts (log lines only)
    pin: str = ""  # web launch tokens: the SHA-256 (hex) of the host's certificate, if known


class TicketAuthority:
    """Issues and checks tickets under one secret key (at least 32 bytes); ``web``: web
    launch tokens."""

    def __init__(self, key: bytes, *, web: bool = False) -> None:
        if len(key) < 32:
            raise ValueError("the ticket key must be at least 32 bytes")
        self._key = key
        self._prefix = _WEB_PREFIX if web else _PREFIX
        self._what = "web launch token" if web else "ticket"

    def issue(
        self,
        *,
        user: str,
        resource: str,
        host: str,
        port: int,
        gateway: str,
        client: str,
        now: float,
        ttl_s: float,
        session: str = "",
        pin: str = "",
    ) -> tuple[str, TicketClaims]:
        claims = TicketClaims(
            id=_b64(os.urandom(16)),
            user=user,
            resource=resource,
            host=host,
            port=port,
            gateway=gateway,
            client=client,
            expires=round(now + ttl_s, 3),
            session=session,
            pin=pin,
        )
        return _sign(self._key, self._prefix, asdict(claims)), claims

    def verify(self, token: str, *, now: float) -> TicketClaims:
        """The claims of a genuine, unexpired ticket; ``TicketError`` otherwise."""
        try:
            claims = TicketClaims(**_open(self._key, self._prefix, token, self._what))
        except TypeError:
            raise TicketError(f"{self._what} claims are unreadable") from None
        if now >= claims.expires:
            raise TicketError(f"{self._what} has expired")
        return claims


@dataclass(frozen=True, slots=True)
class ResumeClaims:
    id: str
    user: str
    client: str
    expires: float


class ResumeTokens:
    """Issues and checks resume tokens under one secret key (at least 32 bytes)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the resume key must be at least 32 bytes")
        self._key = key

    def issue(
        self, *, user: str, client: str, now: float, ttl_s: float, login: str = ""
    ) -> tuple[str, ResumeClaims]:
        """A token for ``user`` at ``client``; ``login`` (a resumed login's id) is kept as the
        new token's id, so that revoking it at logout covers every token of the login."""
        claims = ResumeClaims(login or _b64(os.urandom(12)), user, client, round(now + ttl_s, 3))
        return _sign(self._key, _RESUME_PREFIX, asdict(claims)), claims

    def verify(self, token: str, *, now: float) -> ResumeClaims:
        """The claims of a genuine, unexpired resume token; ``TicketError`` otherwise."""
        try:
            claims = ResumeClaims(**_open(self._key, _RESUME_PREFIX, token, "resume token"))
        except TypeError:
            raise TicketError("resume token claims are unreadable") from None
        if now >= claims.expires:
            raise TicketError("resume token has expired")
        return claims


def _sign(key: bytes, prefix: str, claims: dict[str, object]) -> str:
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"{prefix}.{body}"
    return f"{signed}.{_b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())}"


def _open(key: bytes, prefix: str, token: str, what: str) -> dict[str, Any]:
    """The claims of a token signed under ``key``; ``TicketError`` if it is not genuine."""
    parts = token.split(".")
    if not token.isascii() or len(parts) != 3 or parts[0] != prefix:
        raise TicketError(f"not a {what}")
    signed = f"{parts[0]}.{parts[1]}"
    mac = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    # Compare the text, not the decoded bytes: base64 decoding ignores the unused low bits
    # of the last character, so several spellings of a MAC decode alike.
    if not hmac.compare_digest(parts[2].encode(), _b64(mac).encode()):
        raise TicketError(f"{what} signature is not valid")
    try:
        claims = json.loads(_unb64(parts[1]))
    except ValueError:
        raise TicketError(f"{what} claims are unreadable") from None
    if not isinstance(claims, dict):
        raise TicketError(f"{what} claims are unreadable")
    return claims
