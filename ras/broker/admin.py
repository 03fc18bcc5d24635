"""The broker's admin API: JSON over HTTPS (port 20443), in the style of the RAS REST API.

Theory of operation. One request per connection (``connection: close``), each under two
deadlines: the TLS handshake and the request head and body must arrive within
``handshake_timeout_s``, and the whole exchange must finish within ``request_timeout_s``.
Bodies are bounded (``MAX_BODY``); a bigger one is answered 413 before it is read.

Who may ask. Either the client presents a farm certificate (mutual TLS, optional on this
port) whose name is in ``admin_cert_names``, or it logs on with ``POST /api/session/logon``
and sends the token it gets back in an ``auth_token`` header. Logon checks the password
against the broker's directory, and only members of an ``admin_groups`` group get a token.
Tokens are random, kept in memory only (a broker restart logs every admin off), expire after
``admin_token_ttl_s``, and are never logged. Failed logons are counted per user name and per
client address before the directory is asked, as for users of the farm.

What can be asked lives in :mod:`ras.broker.admin_routes`; this module is the HTTP shell:
reading, authenticating, dispatching, answering errors as ``{"error": code, "message": ...}``
with the matching HTTP status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio

from ras.broker.admin_api import ApiError, ApiRequest, Handler, Route, bad_field, decode_json
from ras.broker.admin_brokers import PROMOTE
from ras.broker.admin_reports import PART
from ras.broker.admin_routes import routes
from ras.broker.directory import DirectoryUnavailable
from ras.broker.model import GroupRecord
from ras.broker.parts import BrokerParts
from ras.broker.policy import groups_of
from ras.broker.throttle import Throttle, wait_text
from ras.net.http import MAX_REQUEST_HEAD, respond
from ras.net.listen import serve_tcp
from ras.pki import peer_name, server_context

__all__ = [  # the admin_api names are here too, for who imported them from this module
    "MAX_BODY",
    "AdminServer",
    "ApiError",
    "ApiRequest",
    "Handler",
    "Route",
    "TokenStore",
    "bad_field",
    "decode_json",
    "serve_admin",
]

log = logging.getLogger("ras.broker.admin")

# Writes a secondary takes too: logging off, promoting (how a farm without a primary gets one)
# and lifting a login lock (the counters are shared state, not the farm's configuration).
_ON_ANY_BROKER = (("session", "logoff"), PROMOTE, ("users", "{}", "unlock"))

MAX_BODY = 64 * 1024


@dataclass(slots=True)
class TokenStore:
    """Admin tokens in memory: the SHA-256 of each token maps to (user, expiry)."""

    ttl_s: float
    _tokens: dict[bytes, tuple[str, float]] = field(default_factory=dict)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def issue(self, user: str, now: float) -> str:
        self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
        token = secrets.token_urlsafe(32)
        self._tokens[self._key(token)] = (user, now + self.ttl_s)
        return token

    def check(self, token: str, now: float) -> str | None:
        entry = self._tokens.get(self._key(token))
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def revoke(self, token: str) -> bool:
        return self._tokens.pop(self._key(token), None) is not None


class AdminServer:
    """The admin API of one broker."""

    def __init__(self, broker: BrokerParts) -> None:
        self.broker = broker
        cfg = broker.config
        self.tokens = TokenStore(cfg.admin_token_ttl_s)
        # Admin logons are counted apart from the farm's logins, by the same rules.
        self._throttle = Throttle(
            max_failures_per_user=cfg.max_failures_per_user,
            max_failures_per_address=cfg.max_failures_per_address,
            window_s=cfg.failure_window_s,
            lockout_s=cfg.lockout_s,
            clock=time.monotonic,
        )
        self._ssl = server_context(cfg.cert_file, cfg.key_file, client_ca_file=cfg.ca_file)
        # A client certificate is welcome (it may name an admin) but not required: a logon
        # with a password and a token works too.
        self._ssl.verify_mode = ssl.CERT_OPTIONAL
        self._routes = [Route("POST", ("session", "logon"), self._logon)]
        self._routes.append(Route("POST", ("session", "logoff"), self._logoff))
        self._routes.extend(routes(broker, self.unlock))

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.broker.config
        listen = partial(
            serve_tcp,
            self._handle,
            cfg.admin_listen_host,
            cfg.admin_port,
            log=log,
            what="admin",
            ssl_context=self._ssl,
        )
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(listen)
            task_status.started(bound[0])

    # -- one connection ---------------------------------------------------------------------

    async def _handle(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        assert isinstance(stream, trio.SSLStream)
        cfg = self.broker.config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        with trio.fail_after(cfg.request_timeout_s):
            try:
                with trio.fail_after(cfg.handshake_timeout_s):
                    await stream.do_handshake()
                    cert = stream.getpeercert(binary_form=True)
                    got = await _read_request(stream, conn)
            except ApiError as exc:
                await self._answer(stream, conn, exc.status, exc.body(), None, peer)
                return
            if got is None:
                return
            status, answer = await self._dispatch(got, cert, peer)
            await self._answer(stream, conn, status, answer, (got.method, got.target), peer)

    async def _answer(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        status: int,
        answer: Any,
        what: tuple[str, str] | None,
        peer: tuple[str, int],
    ) -> None:
        if what is not None:
            # The path only: a query may carry names but never secrets; bodies are not logged.
            log.info("admin %s %s -> %d client=%s", what[0], what[1].split("?")[0], status, peer[0])
        body = json.dumps(answer, indent=2, sort_keys=True).encode() + b"\n"
        if conn.our_state is not h11.SEND_RESPONSE:
            return  # the request never got far enough to be answered
        location = answer.get("location") if status == 307 and isinstance(answer, dict) else None
        headers = [("location", str(location))] if location else None
        await respond(stream, conn, status, body, content_type="application/json", headers=headers)

    async def _dispatch(
        self, got: _Raw, cert: bytes | None, peer: tuple[str, int]
    ) -> tuple[int, Any]:
        method = got.method
        url = urllib.parse.urlsplit(got.target)
        segments = [urllib.parse.unquote(s) for s in url.path.split("/") if s]
        if not segments or segments[0] != "api":
            return 404, ApiError(404, "not_found", f"no such resource: {url.path}").body()
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        request = ApiRequest(method, tuple(segments[1:]), query, got.body, peer[0], got.headers)
        try:
            candidates = [r for r in self._routes if r.matches(request.parts)]
            if not candidates:
                raise ApiError(404, "not_found", f"no such resource: {url.path}")
            route = next((r for r in candidates if r.method == method), None)
            if route is None:
                allowed = ", ".join(sorted({r.method for r in candidates}))
                raise ApiError(405, "method_not_allowed", f"{method} {url.path}: use {allowed}")
            if (
                route.pattern == PART
                and cert
                and await self.broker.reports.is_broker(peer_name(cert))
            ):  # another broker of the farm asks for this one's report
                request = dataclasses.replace(request, admin=f"broker:{peer_name(cert)}")
            elif route.handler != self._logon:
                request = dataclasses.replace(request, admin=self._who(cert, request))
            if method != "GET" and route.pattern not in _ON_ANY_BROKER:
                await self._primary_only(url.path)
            return await route.handler(request)
        except ApiError as exc:
            return exc.status, exc.body()
        except Exception:
            log.exception("bug in the admin API: %s %s", method, url.path)
            return 500, ApiError(500, "internal", "internal error (see the broker's log)").body()

    async def _primary_only(self, path: str) -> None:
        """Refuse a write on a secondary broker: 307 to the primary's API (its name and URL
        in the answer), 503 if the farm has no primary now."""
        roles = self.broker.roles
        if roles is None or roles.is_primary:
            return
        url = await trio.to_thread.run_sync(roles.primary_url)
        if not roles.primary or not url:
            raise ApiError(
                503,
                "no_primary",
                f"broker {roles.name} is a secondary and the farm has no primary now: admin "
                "writes wait for one (ras admin broker promote NAME makes one)",
            )
        error = ApiError(
            307,
            "not_primary",
            f"broker {roles.name} is a secondary: admin writes go to the primary "
            f"{roles.primary} at {url}",
        )
        error.extra = {"primary": roles.primary, "location": url.rstrip("/") + path}
        raise error

    def _who(self, cert: bytes | None, request: ApiRequest) -> str:
        """The admin behind the request, from the certificate or the token; 401 otherwise."""
        cfg = self.broker.config
        if cert:
            name = peer_name(cert)
            if name in cfg.admin_cert_names:
                return f"cert:{name}"
        token = request.headers.get("auth_token", "")
        if token:
            user = self.tokens.check(token, time.monotonic())
            if user is not None:
                return user
            raise ApiError(
                401, "unauthorized", "the auth_token is unknown or expired: log on again"
            )
        raise ApiError(
            401,
            "unauthorized",
            "log on first (POST /api/session/logon) and send the token in an auth_token header, "
            "or present an admin certificate",
        )

    # -- logon / logoff ---------------------------------------------------------------------

    async def _logon(self, request: ApiRequest) -> tuple[int, Any]:
        body = request.json()
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not username:
            raise bad_field("username", "a non-empty string is required")
        if not isinstance(password, str) or not password:
            raise bad_field("password", "a non-empty string is required")
        lockout = self._throttle.check(username, request.client)
        if lockout is not None:
            wait = lockout.retry_after_s
            log.warning(
                "admin logon throttled user=%s client=%s lock=%s retry_in=%.0fs",
                username,
                request.client,
                lockout.what,
                wait,
            )
            raise ApiError(
                429, "throttled", f"too many failed logons; try again in {wait_text(wait)}"
            )
        identity = await self.authenticate(username, password)
        if identity is None:
            self._throttle.failed(username, request.client)
            log.warning("admin logon failed user=%s client=%s", username, request.client)
            raise ApiError(401, "unauthorized", "wrong user name or password")
        self._throttle.succeeded(username)
        name, groups = identity
        allowed = {g.lower() for g in self.broker.config.admin_groups}
        if not allowed & {g.lower() for g in groups}:
            log.warning(
                "admin logon refused user=%s client=%s reason=not an admin", name, request.client
            )
            raise ApiError(403, "forbidden", f"{name} is not in an admin group")
        log.info("admin logon user=%s client=%s", name, request.client)
        token = self.tokens.issue(name, time.monotonic())
        return 200, {"authToken": token, "expiresInS": int(self.tokens.ttl_s), "user": name}

    async def authenticate(
        self, username: str, password: str
    ) -> tuple[str, tuple[str, ...]] | None:
        """The user's name and groups (the directory's and the broker's own groups) if the
        password is right; a directory that cannot answer means no (503)."""
        try:
            identity = await self.broker.directory.authenticate(username, password)
        except DirectoryUnavailable as exc:
            log.warning("admin logon denied user=%s reason=%s", username, exc)
            raise ApiError(503, "unavailable", "the directory cannot answer now") from None
        if identity is None:
            return None
        groups: list[GroupRecord] = await trio.to_thread.run_sync(
            self.broker.store.list_objects, GroupRecord
        )
        return identity.name, groups_of(identity.name, identity.groups, groups)

    def unlock(self, user: str) -> bool:
        """Forget the user name's failed admin logons (and its lock); True if it was locked."""
        return self._throttle.unlock(user)

    async def _logoff(self, request: ApiRequest) -> tuple[int, Any]:
        token = request.headers.get("auth_token", "")
        revoked = bool(token) and self.tokens.revoke(token)
        return 200, {"loggedOff": revoked}


@dataclass(frozen=True, slots=True)
class _Raw:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> _Raw | None:
    """The request, its headers (names in lower case) and its body; None if the peer sent
    nothing or something that is not HTTP; ApiError 413 for a body over ``MAX_BODY`` (told
    before it is read, when the request says its length)."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ApiError(400, "bad_request", f"not a valid HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data:
                return None
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
            length = dict(request.headers).get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY:
                raise ApiError(413, "too_large", f"the body is larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise ApiError(413, "too_large", f"the body is larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
            return _Raw(
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
                headers,
                bytes(body),
            )
        else:
            return None


async def serve_admin(
    broker: BrokerParts, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the admin API of ``broker`` on ``admin_listen_host:admin_port`` until cancelled."""
    await AdminServer(broker).serve(task_status=task_status)
