"""The admin API's blocking HTTPS client for ``ras admin`` (one connection per request)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from ras.cli.common import EXIT
from ras.errors import RasError
from ras.pki import client_context

__all__ = ["AdminApiError", "AdminClient"]


class AdminApiError(RasError):
    """The API answered with an error (``status``, ``code``, ``field``), or could not be
    reached (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field

    @property
    def exit_code(self) -> int:
        if self.status == 0:
            return EXIT.UNREACHABLE
        if self.status in (401, 403, 429):
            return EXIT.AUTH
        if self.status == 400:
            return EXIT.USAGE
        return EXIT.FAILED


class AdminClient:
    """A blocking client of the admin API (one HTTPS connection per request)."""

    def __init__(
        self,
        url: str,
        ca_file: Path,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise AdminApiError(0, "usage", f"--url {url!r}: expected https://HOST[:PORT]")
        self.host = parts.hostname
        self.port = parts.port or 20443
        self.timeout_s = timeout_s
        self.token: str | None = None
        self._ssl: ssl.SSLContext = client_context(ca_file, cert_file=cert_file, key_file=key_file)

    def request(
        self, method: str, path: str, body: object = None, query: dict[str, str] | None = None
    ) -> Any:
        """The JSON answer to ``method /api/path``; AdminApiError for an error answer."""
        target = "/api/" + "/".join(urllib.parse.quote(p, safe="") for p in path.split("/"))
        if query:
            target += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        headers = {"accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if self.token is not None:
            headers["auth_token"] = self.token
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout_s, context=self._ssl
        )
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            where = f"{self.host}:{self.port}"
            if isinstance(exc, ssl.SSLCertVerificationError):
                why = f"its certificate is not trusted ({exc.verify_message}); check --ca-file"
            elif isinstance(exc, socket.timeout | TimeoutError):
                why = "no answer in time"
            else:
                why = str(exc) or type(exc).__name__
            raise AdminApiError(0, "unreachable", f"admin API at {where}: {why}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            raise AdminApiError(
                response.status, "bad_answer", f"the answer is not JSON (HTTP {response.status})"
            ) from None
        if response.status >= 300:  # a 307 from a secondary broker names the primary
            info = answer if isinstance(answer, dict) else {}
            raise AdminApiError(
                response.status,
                str(info.get("error", "error")),
                str(info.get("message", f"HTTP {response.status}")),
                info.get("field"),
            )
        return answer

    def logon(self, username: str, password: str) -> None:
        answer = self.request("POST", "session/logon", {"username": username, "password": password})
        self.token = str(answer["authToken"])

    def logoff(self) -> None:
        if self.token is not None:
            with contextlib.suppress(AdminApiError):  # the token expires on its own anyway
                self.request("POST", "session/logoff")
            self.token = None
