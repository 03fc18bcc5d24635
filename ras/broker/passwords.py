"""Password hashes for the built-in user store: scrypt (RFC 7914) from hashlib.

Stored form: ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``. Verification takes the same
time for an unknown user (checked against a dummy hash) as for a wrong password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["hash_password", "verify_password"]

_LOG2_N, _R, _P, _LEN = 14, 8, 1, 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, *, log2_n: int = _LOG2_N) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**log2_n, r=_R, p=_P, dklen=_LEN)
    return f"scrypt${log2_n}${_R}${_P}${_b64(salt)}${_b64(digest)}"


_DUMMY = hash_password("no user has this password")


def verify_password(password: str, stored: str | None) -> bool:
    """True if ``password`` matches ``stored``; ``None`` (no such user) costs the same, False."""
    encoded = stored if stored is not None else _DUMMY
    try:
        scheme, log2_n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=2 ** int(log2_n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=2**27,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want) and stored is not None
