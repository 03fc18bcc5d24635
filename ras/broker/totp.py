"""Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP), pure functions.

A code is accepted for the current 30-second step or one step either side (clock skew), and
only for a step later than the last one the user used, so a code works once.
"""

from __future__ import annotations

import base64
import hmac
import os
import struct
import urllib.parse

__all__ = ["hotp", "new_secret", "otpauth_uri", "totp", "verify_totp"]

STEP_S = 30
DIGITS = 6


def hotp(secret: bytes, counter: int, *, digits: int = DIGITS, digest: str = "sha1") -> str:
    mac = hmac.new(secret, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def totp(secret: bytes, now: float, *, digits: int = DIGITS, digest: str = "sha1") -> str:
    return hotp(secret, int(now // STEP_S), digits=digits, digest=digest)


def verify_totp(
    secret: bytes, code: str, now: float, *, last_step: int = -1, window: int = 1
) -> int | None:
    """The time step ``code`` belongs to, if it is valid now and newer than ``last_step``."""
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isdigit():
        return None
    current = int(now // STEP_S)
    for step in range(current - window, current + window + 1):
        if step > last_step and hmac.compare_digest(hotp(secret, step), code):
            return step
    return None


def new_secret() -> bytes:
    return os.urandom(20)


def otpauth_uri(secret: bytes, user: str, issuer: str = "RAS") -> str:
    """The enrolment URI an authenticator app reads (usually from a QR code)."""
    label = urllib.parse.quote(f"{issuer}:{user}")
    query = urllib.parse.urlencode(
        {
            "secret": base64.b32encode(secret).decode().rstrip("="),
            "issuer": issuer,
            "algorithm": "SHA1",
            "digits": DIGITS,
            "period": STEP_S,
        }
    )
    return f"otpauth://totp/{label}?{query}"
