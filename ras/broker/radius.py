"""RADIUS second factor (RFC 2865) through pyrad: PAP, Access-Challenge rounds,
Message-Authenticator, timeouts, retries and several servers.

``RadiusClient.authenticate`` answers :class:`Accept`, :class:`Reject` or :class:`Challenge`
(show ``prompt`` to the user, send the answer back with ``state``). When no server answers in
time it raises :class:`RadiusUnavailable`: the caller denies, never allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ras.errors import AuthError, ErrorCode

__all__ = ["Accept", "Challenge", "RadiusUnavailable", "Reject"]


@dataclass(frozen=True, slots=True)
class Accept:
    message: str = ""


@dataclass(frozen=True, slots=True)
class Reject:
    message: str = ""


@dataclass(frozen=True, slots=True)
class Challenge:
    prompt: str
    state: bytes = field(repr=False)
    echo: bool = True


class RadiusUnavailable(AuthError):
    """No RADIUS server answered (or answered with a bad authenticator); deny."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.UNAVAILABLE)
