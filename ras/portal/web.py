"""HTTP requests and responses as the portal sees them: plain values, no I/O.

The shell (:mod:`ras.portal.server`) reads a request with h11 into a :class:`Request` and
writes the :class:`Response` the portal returns. Parsing here is strict and bounded: a form
body is ``application/x-www-form-urlencoded`` with at most :data:`MAX_FIELDS` fields, each
name at most once; cookies are read from the ``Cookie`` header only.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

__all__ = ["MAX_BODY", "MAX_FIELDS", "BadRequest", "Request", "Response", "redirect"]

MAX_BODY = 16 * 1024  # the portal's forms are small: a login, an answer, a launch
MAX_FIELDS = 16
Peer = tuple[str, int]


class BadRequest(ValueError):
    """The request is not one the portal takes (answered 400 with this text)."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: tuple[tuple[str, str], ...]  # names lower-case, in order
    body: bytes
    client: Peer

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path or "/"

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query))

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (lower case), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    def cookies(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.headers:
            if key != "cookie":
                continue
            for part in value.split(";"):
                name, sep, val = part.strip().partition("=")
                if sep and name and name not in out:  # the first wins: the most specific path
                    out[name] = val.strip()
        return out

    def form(self) -> dict[str, str]:
        """The urlencoded form in the body; ``BadRequest`` for anything else."""
        kind = (self.header("content-type") or "").split(";", 1)[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise BadRequest("expected a form (application/x-www-form-urlencoded)")
        try:
            text = self.body.decode("utf-8")
            pairs = urllib.parse.parse_qsl(
                text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS
            )
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the form is not valid") from None
        out: dict[str, str] = {}
        for name, value in pairs:
            if name in out:
                raise BadRequest(f"the form names {name!r} twice")
            out[name] = value
        return out


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def redirect(location: str, *, status: int = 303) -> Response:
    """See ``location`` (a path on this portal)."""
    return Response(status, b"", "text/plain; charset=utf-8", [("location", location)])
