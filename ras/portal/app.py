"""The User Portal: what each request gets, given the gateway's broker connections.

Theory of operation. ``Portal.handle`` takes one parsed request and returns the response; the
h11 shell (:mod:`ras.portal.server`) reads and writes them, one request per connection, under
the connection's pre-authentication deadline. The portal talks to the broker exactly as the
gateway's client sessions do (``ras.gateway.session``): a connection per browser login opened
with ``client_session`` naming the browser's address (the real one behind a HALB or a
forwarding gateway), then ``authenticate`` and the broker's challenge rounds, then
``list_resources`` and ``rdp_token`` on it (:mod:`ras.portal.sessions` keeps it). So the
broker's directory, second-factor rules, throttling and lockout, publishing filters and audit
apply to browsers as they do to every client; the portal decides nothing about who may do what.

Routes: ``/`` (to the list or the login), ``/login`` (GET the form, POST the password),
``/login/answer`` (POST a second-factor answer), ``/resources``, ``/launch`` (POST: an .rdp file
for the native method, the web client for the browser), ``/logout`` (POST) and ``/static/*``.
Every POST passes its CSRF token (:mod:`ras.portal.security`); every answer carries the
security headers, and CORS headers for an allowed origin only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import trio

from ras.client.programs import Program
from ras.client.rdpfile import render_rdp_file
from ras.errors import ErrorCode, TransportError
from ras.net.channel import Channel
from ras.portal import pages
from ras.portal.security import (
    check_token,
    cookie,
    cors_headers,
    new_token,
    origin_allowed,
    security_headers,
    session_csrf,
    well_formed,
)
from ras.portal.sessions import PendingLogin, Sessions, WebSession
from ras.portal.settings import PortalSettings
from ras.portal.web import BadRequest, Request, Response, redirect
from ras.protocol import (
    AuthChallenge,
    Authenticate,
    AuthOk,
    AuthResponse,
    Error,
    ListResources,
    LoggedOut,
    Logout,
    Message,
    RdpToken,
    RdpTokenOk,
    ResourceList,
    Resume,
)  # fmt: skip

__all__ = ["Portal", "PortalSite", "WebLaunch"]

log = logging.getLogger("ras.portal")
Peer = tuple[str, int]
OpenSession = Callable[[Peer], Awaitable[Channel]]
# The browser launch (the web client's, ras.webclient): given the session and the resource id,
# the answer that opens the desktop in the page.
WebLaunch = Callable[[WebSession, str, Request], Awaitable[Response]]
# The web client's files (``ras.gateway.webclient``): the answer to GET /webclient/NAME.
WebFiles = Callable[[str], Response]
FARM = "User Portal"
_LOGIN_COOKIE_S = 3600
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,16384}")  # what a resume token may be
_STATIC = resources.files("ras.portal").joinpath("static")
_STATIC_FILES = frozenset(p.name for p in _STATIC.iterdir() if p.name.endswith((".css", ".js")))


class SessionLost(Exception):
    """The session's broker connection is gone and cannot be resumed: log in again."""


class BrokerDown(Exception):
    """The broker did not answer (or could not be reached) in time."""


@dataclass(frozen=True, slots=True)
class PortalSite:
    """What the portal needs to know about the gateway that serves it."""

    public_host: str
    public_port: int
    rdp_port: int
    rdp_enabled: bool  # the gateway's RDP port is on (the native method's .rdp files go there)
    broker_timeout_s: float


class Portal:
    """The portal of one gateway; ``settings`` is replaced when the broker pushes new ones."""

    def __init__(
        self,
        site: PortalSite,
        open_session: OpenSession,
        *,
        settings: PortalSettings | None = None,
        web_launch: WebLaunch | None = None,
        web_files: WebFiles | None = None,
    ) -> None:
        self.site = site
        self.settings = settings or PortalSettings()
        self.sessions = Sessions()
        self.web_launch = web_launch
        self.web_files = web_files  # the web client's RDP engine (npm), under /webclient/
        self._open_session = open_session

    def public_address(self) -> tuple[str, int]:
        """Where browsers reach this portal: the gateway's public host and port, or the
        alternate ones of a network load balancer in front (the plain port's redirects)."""
        s = self.settings
        return s.alternate_host or self.site.public_host, s.alternate_port or self.site.public_port

    def apply(self, text: str) -> bool:
        """Take the settings the broker pushed (the JSON of a ``PortalSettings``); bad ones are
        logged and the current ones kept."""
        try:
            data = json.loads(text)
            settings = PortalSettings.from_json(data)
        except (ValueError, TypeError, AttributeError) as exc:  # Invalid is a ValueError
            log.error("portal settings from the broker refused: %s", exc)
            return False
        self.settings = settings
        log.info("portal settings name=%s launch_method=%s", settings.name, settings.launch_method)
        return True

    async def run(self) -> None:
        """Close ended sessions' broker connections and expire idle ones (the gateway's life)."""

        def limits() -> tuple[float, float]:
            return float(self.settings.session_idle_s), float(self.settings.session_max_s)

        await self.sessions.sweep(limits, every_s=10.0)

    # -- one request ------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """The answer to ``request``, with the security and CORS headers."""
        settings = self.settings
        try:
            response = await self._route(request)
        except BadRequest as exc:
            response = self._message(400, "Bad request", str(exc))
        except BrokerDown:
            response = self._message(
                503, "Not available", "The farm cannot be reached now; try again later."
            )
        static = request.path.startswith(("/static/", "/webclient/")) and response.status == 200
        response.headers += security_headers(settings, response, static=static)
        response.headers += cors_headers(settings, request)
        return response

    async def _route(self, request: Request) -> Response:
        path, method = request.path, request.method
        if method == "OPTIONS":  # a CORS preflight: the headers say everything
            return Response(204, content_type="text/plain; charset=utf-8")
        if method == "POST" and not origin_allowed(self.settings, request, self._own(request)):
            log.info(
                "portal refused client=%s reason=cross-origin POST from %s",
                request.client[0],
                request.header("origin"),
            )
            return self._message(403, "Refused", "This form was sent from another site.")
        routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/"): self._home,
            ("GET", "/login"): self._login_form,
            ("POST", "/login"): self._login,
            ("POST", "/login/answer"): self._answer,
            ("GET", "/resources"): self._resources,
            ("POST", "/launch"): self._launch,
            ("POST", "/logout"): self._logout,
        }
        get = "GET" if method == "HEAD" else method
        if (get, path) in routes:
            return await routes[get, path](request)
        if get == "GET" and path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if get == "GET" and path.startswith("/webclient/") and self.web_files is not None:
            return self.web_files(path.removeprefix("/webclient/"))
        if any(p == path for _, p in routes):
            return self._message(405, "Not allowed", f"{method} is not used here.")
        return self._message(404, "Not found", "There is no such page.")

    @staticmethod
    def _own(request: Request) -> str:
        return f"https://{request.header('host') or ''}"

    # -- pages ------------------------------------------------------------------------------

    def message(self, status: int, heading: str, text: str, link: str = "/") -> Response:
        """A page saying ``text`` (the web client's launch answers its errors so)."""
        return self._message(status, heading, text, link)

    def _message(self, status: int, heading: str, text: str, link: str = "/") -> Response:
        page = pages.message_page(farm=FARM, heading=heading, text=text, link=link)
        return Response(status, page)

    def _static(self, name: str) -> Response:
        if name not in _STATIC_FILES:
            return self._message(404, "Not found", "There is no such file.")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        body = _STATIC.joinpath(name).read_bytes()
        return Response(200, body, f"{kind}; charset=utf-8")

    async def _session(self, request: Request) -> WebSession | None:
        """The browser's live session: this gateway's, or one it logged in to at another
        gateway of the farm (behind a HALB or a DNS round robin), taken over here with the
        broker's resume token from the resume cookie."""
        s = self.settings
        cookies = request.cookies()
        sid = cookies.get(s.cookie_name)
        session = self.sessions.get(sid, idle_s=s.session_idle_s, max_s=s.session_max_s)
        token = cookies.get(self._resume_cookie())
        if session is not None or sid is None or not well_formed(sid) or self.sessions.known(sid):
            return session
        if not token or not _PRINTABLE.fullmatch(token):
            return None
        now = trio.current_time()
        adopted = WebSession("", request.client[0], None, token, now, now, id=sid)
        try:
            chan, user = await self._resume(adopted)
        except SessionLost:
            return None
        adopted.user, adopted.chan = user, chan
        adopted.csrf = session_csrf(sid, token)
        if not self.sessions.add(adopted):
            self.sessions.close_later(chan)
            return None
        log.info("portal session taken over user=%s client=%s", user, adopted.client)
        return adopted

    def _expired(self, request: Request) -> Response:
        """No live session: to the login page (saying so if the browser had one)."""
        name = self.settings.cookie_name
        if name not in request.cookies():
            return redirect("/login")
        return self._forget(redirect("/login?expired=1"))

    async def _home(self, request: Request) -> Response:
        if await self._session(request) is None:
            return self._expired(request)
        return redirect("/resources")

    # -- logging in -------------------------------------------------------------------------

    def _login_cookie(self) -> str:
        return f"{self.settings.cookie_name}_login"

    def _resume_cookie(self) -> str:
        return f"{self.settings.cookie_name}_resume"

    def _forget(self, response: Response) -> Response:
        """The browser's session cookies deleted."""
        for name in (self.settings.cookie_name, self._resume_cookie()):
            response.headers.append(("set-cookie", cookie(self.settings, name, "", max_age_s=0)))
        return response

    def _login_page(
        self, request: Request, status: int, notice: str = "", username: str = ""
    ) -> Response:
        """The login form with its double-submit CSRF token (the login cookie's value)."""
        token = request.cookies().get(self._login_cookie()) or ""
        response = Response(status)
        if not well_formed(token):
            token = new_token()
            response.headers.append(
                (
                    "set-cookie",
                    cookie(self.settings, self._login_cookie(), token, max_age_s=_LOGIN_COOKIE_S),
                )
            )
        response.body = pages.login_page(
            farm=FARM, csrf=token, settings=self.settings, notice=notice, username=username
        )
        return response

    async def _login_form(self, request: Request) -> Response:
        if await self._session(request) is not None:
            return redirect("/resources")
        notice = ""
        if request.query.get("expired"):
            notice = "Your session has ended. Log in again."
        elif request.query.get("out"):
            notice = "You have logged out."
        return self._login_page(request, 200, notice)

    def _login_csrf(self, request: Request, form: dict[str, str]) -> bool:
        expected = request.cookies().get(self._login_cookie()) or ""
        return well_formed(expected) and check_token(expected, form.get("csrf"))

    async def _login(self, request: Request) -> Response:
        form = request.form()
        if not self._login_csrf(request, form):
            return self._csrf_refused(request)
        username = form.get("username", "").strip()
        password = form.get("password", "")
        if not username or len(username) > 256 or len(password) > 1024:
            return self._login_page(request, 400, "Enter your user name and password.")
        client = request.client[0]
        if not self.sessions.may_start_login(client):
            log.warning("portal login refused client=%s reason=too many pending logins", client)
            return self._login_page(request, 429, "Too many logins in progress; wait a minute.")
        reported = _address(form.get("reported_ip", ""))
        if reported:
            log.info("portal login client=%s reported_ip=%s", client, reported)
        try:
            with trio.fail_after(self.site.broker_timeout_s):
                chan = await self._open_session(request.client)
        except (TransportError, trio.TooSlowError) as exc:
            log.warning("portal broker unavailable client=%s reason=%s", client, exc or "timeout")
            raise BrokerDown from None
        reply = await self._ask_login(chan, Authenticate(username, password))
        return await self._after_auth(request, chan, reply, username)

    async def _answer(self, request: Request) -> Response:
        form = request.form()
        if not self._login_csrf(request, form):
            return self._csrf_refused(request)
        pending = self.sessions.take_pending(form.get("pending", ""), request.client[0])
        if pending is None:
            return self._login_page(request, 401, "That verification expired. Log in again.")
        answer = form.get("answer", "")[:256]
        reply = await self._ask_login(pending.chan, AuthResponse(answer))
        return await self._after_auth(request, pending.chan, reply, pending.username)

    async def _ask_login(self, chan: Channel, msg: Message) -> Message:
        try:
            with trio.fail_after(self.site.broker_timeout_s):
                await chan.send(msg)
                return await chan.receive_reply()
        except (TransportError, trio.TooSlowError) as exc:
            self.sessions.close_later(chan)
            log.warning("portal broker unavailable reason=%s", exc or "timeout")
            raise BrokerDown from None

    async def _after_auth(
        self, request: Request, chan: Channel, reply: Message, username: str
    ) -> Response:
        client = request.client[0]
        now = trio.current_time()
        match reply:
            case AuthOk():
                session = WebSession(reply.user, client, chan, reply.resume_token, now, now)
                if reply.resume_token:  # the same on every gateway that takes the session over
                    session.csrf = session_csrf(session.id, reply.resume_token)
                if not self.sessions.add(session):
                    self.sessions.close_later(chan)
                    return self._login_page(request, 503, "Too many sessions; try again later.")
                log.info("portal login ok user=%s client=%s", reply.user, client)
                response = redirect("/resources")
                s = self.settings
                response.headers += [
                    ("set-cookie", cookie(s, s.cookie_name, session.id, max_age_s=s.session_max_s)),
                    ("set-cookie", cookie(s, self._login_cookie(), "", max_age_s=0)),
                ]
                if reply.resume_token:
                    response.headers.append(
                        (
                            "set-cookie",
                            cookie(
                                s, self._resume_cookie(), reply.resume_token,
                                max_age_s=s.session_max_s,
                            ),
                        )
                    )  # fmt: skip
                return response
            case AuthChallenge():
                pending = PendingLogin(chan, client, username, reply.prompt, reply.echo, now)
                self.sessions.add_pending(pending)
                token = request.cookies().get(self._login_cookie()) or ""
                page = pages.challenge_page(
                    farm=FARM, csrf=token, pending=pending.id, prompt=reply.prompt, echo=reply.echo
                )
                return Response(200, page)
            case Error():
                self.sessions.close_later(chan)
                log.info(
                    "portal login refused user=%s client=%s code=%s",
                    username,
                    client,
                    reply.code.name,
                )
                status, text = _REFUSALS.get(reply.code, (403, "You cannot log in here."))
                if reply.code is ErrorCode.THROTTLED:
                    text = f"Locked: {reply.message}."
                elif reply.code is ErrorCode.UNAVAILABLE:  # the directory, or RADIUS: which
                    text = f"{reply.message[:1].upper()}{reply.message[1:]}."
                return self._login_page(request, status, text, username)
            case _:
                self.sessions.close_later(chan)
                log.warning("portal broker answered a login with %s", reply.TYPE)
                raise BrokerDown

    def _csrf_refused(self, request: Request) -> Response:
        log.info("portal refused client=%s reason=CSRF token missing or wrong", request.client[0])
        return self._message(
            403, "Refused", "This form has expired or did not come from this portal.", "/login"
        )

    # -- logged in --------------------------------------------------------------------------

    async def _resources(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return self._expired(request)
        try:
            reply = await self._ask(session, ListResources())
        except SessionLost:
            return self._expired(request)
        if not isinstance(reply, ResourceList):
            log.warning("portal broker answered list_resources with %s", reply.TYPE)
            raise BrokerDown
        page = pages.resources_page(
            farm=FARM,
            user=session.user,
            csrf=session.csrf,
            resources=reply.resources,
            settings=self.settings,
            available=self._available(),
        )
        return Response(200, page)

    async def _launch(self, request: Request) -> Response:
        session = await self._session(request)
        form = request.form()
        if session is None:
            return self._expired(request)
        if not check_token(session.csrf, form.get("csrf")):
            return self._csrf_refused(request)
        resource, method = form.get("resource", ""), form.get("method", "")
        if method not in pages.offered_methods(self.settings, self._available()):
            return self._message(403, "Refused", "That launch method is not offered here.")
        if method == "browser":
            assert self.web_launch is not None  # offered only then
            return await self.web_launch(session, resource, request)
        return await self._rdp_file(request, session, resource)

    def _available(self) -> tuple[str, ...]:
        """The launch methods this gateway can serve: native needs an RDP port for the .rdp
        files (the gateway's, or the alternate one of a load balancer), the browser the web
        client."""
        native = self.site.rdp_enabled or bool(self.settings.alternate_rdp_port)
        return (*(("browser",) if self.web_launch else ()), *(("native",) if native else ()))

    async def _rdp_file(self, request: Request, session: WebSession, resource: str) -> Response:
        s, site = self.settings, self.site
        try:
            msg = RdpToken(resource)
        except ValueError:
            raise BadRequest("no such resource") from None
        try:
            reply = await self._ask(session, msg)
        except SessionLost:
            return self._expired(request)
        if isinstance(reply, Error):
            return self._message(404, "Not found", reply.message, "/resources")
        if not isinstance(reply, RdpTokenOk):
            raise BrokerDown
        host = s.alternate_host or site.public_host
        port = s.alternate_rdp_port or site.rdp_port
        text = render_rdp_file(
            host=host, port=port, token=reply.token, username=session.user,
            program=Program.from_launch(reply, resource),  # an application opens as itself
        )  # fmt: skip
        log.info(
            "portal rdp file user=%s client=%s resource=%s rdp=%s:%d",
            session.user,
            session.client,
            resource,
            host,
            port,
        )
        return Response(
            200,
            text.encode(),
            "application/x-rdp",
            [("content-disposition", f'attachment; filename="{resource}.rdp"')],
        )

    async def _logout(self, request: Request) -> Response:
        session = await self._session(request)
        form = request.form()
        if session is None:
            return self._expired(request)
        if not check_token(session.csrf, form.get("csrf")):
            return self._csrf_refused(request)
        try:  # the broker revokes the resume token: no gateway takes a copied cookie over
            if not isinstance(await self._ask(session, Logout(session.resume_token)), LoggedOut):
                raise BrokerDown
        except (SessionLost, BrokerDown):
            log.warning(
                "portal logout user=%s client=%s: the broker was not told; the session's "
                "resume token stays valid until it expires",
                session.user,
                session.client,
            )
        self.sessions.end(session)
        log.info("portal logout user=%s client=%s", session.user, session.client)
        return self._forget(redirect("/login?out=1"))

    async def ask(self, session: WebSession, msg: Message) -> Message:
        """``msg`` on the session's broker connection, its answer (``SessionLost``: log in
        again; ``BrokerDown``). The web client's launch asks for its token so."""
        return await self._ask(session, msg)

    async def _ask(self, session: WebSession, msg: Message) -> Message:
        """``msg`` on the session's broker connection (resumed on a new one if it broke)."""
        async with session.lock:
            for attempt in range(2):
                if session.chan is None:
                    session.chan, _ = await self._resume(session)
                try:
                    with trio.fail_after(self.site.broker_timeout_s):
                        await session.chan.send(msg)
                        reply = await session.chan.receive_reply()
                except (TransportError, trio.TooSlowError) as exc:
                    # a late answer would be read as the next request's: never reuse it
                    self.sessions.close_later(session.chan)
                    session.chan = None
                    if attempt or isinstance(exc, trio.TooSlowError):
                        raise BrokerDown from None
                    continue
                if isinstance(reply, Error) and reply.code is ErrorCode.AUTH_REQUIRED:
                    # logged out elsewhere (another gateway of the farm): the session is over
                    self.sessions.close_later(session.chan)
                    session.chan = None
                    self.sessions.end(session)
                    raise SessionLost
                return reply
        raise AssertionError("unreachable")

    async def _resume(self, session: WebSession) -> tuple[Channel, str]:
        """A new broker connection logged in with the session's resume token: the connection
        and the user; ``SessionLost`` (the session ended) if there is no token or the broker
        refuses it."""
        if not session.resume_token:
            self.sessions.end(session)
            raise SessionLost
        client = (session.client, 0)
        try:
            with trio.fail_after(self.site.broker_timeout_s):
                chan = await self._open_session(client)
        except (TransportError, trio.TooSlowError):
            raise BrokerDown from None
        reply = await self._ask_login(chan, Resume(session.resume_token))
        if not isinstance(reply, AuthOk):
            self.sessions.close_later(chan)
            self.sessions.end(session)
            log.info("portal session not resumed user=%s client=%s", session.user, client[0])
            raise SessionLost
        return chan, reply.user


_REFUSALS = {
    ErrorCode.AUTH_FAILED: (401, "Wrong user name or password."),
    ErrorCode.THROTTLED: (429, ""),
    ErrorCode.UNAVAILABLE: (503, ""),
}


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return ""
