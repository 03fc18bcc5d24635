"""What the portal adds to every answer, and the checks every form passes: no I/O.

- Headers: a strict Content-Security-Policy (scripts, styles and images from the portal
  itself only, no inline script or style, forms post only here), ``frame-ancestors`` and
  ``X-Frame-Options`` unless the settings allow embedding, HSTS when configured, no
  sniffing, the referrer only to the portal itself, and ``Cache-Control: no-store`` on
  everything but static files.
- CORS: only an ``Origin`` on the settings' allow-list gets ``Access-Control-*`` headers (and
  the preflight its max-age); any other origin gets none, so the browser keeps the answer
  from the calling page.
- CSRF: every form carries a token. Before login it is the double-submit token of the login
  cookie (a random value in an HttpOnly cookie that the form must repeat); after, the
  session's own token, derived from the session's cookies (:func:`session_csrf`) so that any
  gateway of the farm that takes the session over checks the same one. A POST whose
  ``Origin`` is present and neither this portal's nor an allowed one is refused as well.
- Cookies: ``Secure; HttpOnly; SameSite=Strict`` (``SameSite=None`` when embedding is allowed,
  or an embedding page could never log in).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import urllib.parse

from ras.portal.settings import PortalSettings
from ras.portal.web import Request, Response

_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,128}")

__all__ = [
    "check_token",
    "cookie",
    "cors_headers",
    "new_token",
    "origin_allowed",
    "security_headers",
    "session_csrf",
    "well_formed",
]


def new_token() -> str:
    """A random, unguessable value (session ids, CSRF tokens, pending logins)."""
    return secrets.token_urlsafe(32)


def session_csrf(session_id: str, resume_token: str) -> str:
    """The CSRF token of a session, derived from its two cookies: every gateway that takes the
    session over computes the same one, and a page of another site, which cannot read the
    (HttpOnly) cookies, cannot."""
    digest = hashlib.sha256(
        b"ras portal csrf\x00%s\x00%s" % (session_id.encode(), resume_token.encode())
    )
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def well_formed(token: str | None) -> bool:
    """Could ``token`` be one of ours (what ``new_token`` and ``session_csrf`` make)?"""
    return token is not None and _TOKEN.fullmatch(token) is not None


def check_token(expected: str, given: str | None) -> bool:
    """``given`` is ``expected`` (compared in constant time; any text, even not ASCII, which
    ``hmac.compare_digest`` refuses as ``str``: found by the portal_http fuzz target)."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def _origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def csp(
    settings: PortalSettings,
    *,
    extra_connect: tuple[str, ...] = (),
    extra_style: tuple[str, ...] = (),
) -> str:
    connect = ["'self'", *extra_connect]
    if settings.client_ip_detection_url:
        connect.append(_origin_of(settings.client_ip_detection_url))
    ancestors = "*" if settings.allow_embedding else "'self'"
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self' 'wasm-unsafe-eval'",  # the web client's RDP engine is WASM
            " ".join(("style-src 'self'", *extra_style)),
            "img-src 'self' data: blob:",
            f"connect-src {' '.join(connect)}",
            "form-action 'self'",
            "base-uri 'none'",
            f"frame-ancestors {ancestors}",
        )
    )


def security_headers(
    settings: PortalSettings, response: Response, *, static: bool = False
) -> list[tuple[str, str]]:
    headers = [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),  # "no-referrer" would make Origin "null"
        ("cross-origin-opener-policy", "same-origin"),
        ("cache-control", "public, max-age=300" if static else "no-store"),
    ]
    if response.header("content-security-policy") is None:  # a page may bring its own
        headers.append(("content-security-policy", csp(settings)))
    if not settings.allow_embedding:
        headers.append(("x-frame-options", "SAMEORIGIN"))
    if settings.hsts and settings.hsts_max_age_s > 0:
        headers.append(("strict-transport-security", f"max-age={settings.hsts_max_age_s}"))
    return headers


def origin_allowed(settings: PortalSettings, request: Request, own: str) -> bool:
    """May a POST with this request's ``Origin`` change anything? None (an old browser, a
    native tool), this portal's own origin, and the CORS allow-list may."""
    origin = request.header("origin")
    return origin is None or origin == own or origin in settings.cors_origins


def cors_headers(settings: PortalSettings, request: Request) -> list[tuple[str, str]]:
    """``Access-Control-*`` for an allowed ``Origin``; nothing for any other (but ``Vary:
    Origin`` whenever some origin is allowed, so that a cache never hands one origin's answer
    to another)."""
    origin = request.header("origin")
    vary = [("vary", "Origin")] if settings.cors_origins else []
    if origin is None or origin not in settings.cors_origins:
        return vary
    headers = [
        ("access-control-allow-origin", origin),
        ("access-control-allow-credentials", "true"),
        *vary,
    ]
    if request.method == "OPTIONS":
        headers += [
            ("access-control-allow-methods", "GET, POST"),
            ("access-control-allow-headers", "content-type"),
            ("access-control-max-age", str(settings.cors_max_age_s)),
        ]
    return headers


def cookie(settings: PortalSettings, name: str, value: str, *, max_age_s: int) -> str:
    """A ``Set-Cookie`` value; ``max_age_s`` 0 deletes it."""
    same_site = "None" if settings.allow_embedding else "Strict"
    return f"{name}={value}; Path=/; Max-Age={max_age_s}; Secure; HttpOnly; SameSite={same_site}"
