"""Launch tickets: signed, expiring, single-use permissions to open one tunnel.

A ticket names everything the gateway may do with it: the user and resource it was issued
for, the one host:port the tunnel may reach, the gateway that may redeem it, the client
address it was issued to, and when it expires. It is signed with HMAC-SHA256 under a key that
only the broker holds (gateways never verify tickets themselves: they redeem them at the
broker, which also enforces single use). Form: ``t1.<base64url JSON claims>.<base64url MAC>``.

This module is pure: the clock is an argument, the single-use register lives in the store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass

from ras.errors import TicketError

__all__ = ["TicketAuthority", "TicketClaims"]

_PREFIX = "t1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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


class TicketAuthority:
    """Issues and checks tickets under one secret key (at least 32 bytes)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the ticket key must be at least 32 bytes")
        self._key = key

    def _mac(self, signed: str) -> bytes:
        return hmac.new(self._key, signed.encode(), hashlib.sha256).digest()

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
        )
        body = _b64(json.dumps(asdict(claims), separators=(",", ":")).encode())
        signed = f"{_PREFIX}.{body}"
        return f"{signed}.{_b64(self._mac(signed))}", claims

    def verify(self, token: str, *, now: float) -> TicketClaims:
        """The claims of a genuine, unexpired ticket; ``TicketError`` otherwise."""
        parts = token.split(".")
        if not token.isascii() or len(parts) != 3 or parts[0] != _PREFIX:
            raise TicketError("not a ticket")
        signed = f"{parts[0]}.{parts[1]}"
        # Compare the text, not the decoded bytes: base64 decoding ignores the unused low bits
        # of the last character, so several spellings of a MAC decode alike.
        if not hmac.compare_digest(parts[2].encode(), _b64(self._mac(signed)).encode()):
            raise TicketError("ticket signature is not valid")
        try:
            claims = TicketClaims(**json.loads(_unb64(parts[1])))
        except (ValueError, TypeError):
            raise TicketError("ticket claims are unreadable") from None
        if now >= claims.expires:
            raise TicketError("ticket has expired")
        return claims
