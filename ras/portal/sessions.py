"""The portal's web sessions and logins in progress, each holding its broker connection.

Theory of operation. A browser logs in over several HTTP requests (the password, then one
request per second-factor prompt), and the broker keeps a login's state on its connection,
as for any client. So the portal keeps that connection while the login is pending
(:class:`PendingLogin`, found by a random id in the form) and, once the user is in, for the
web session's life (:class:`WebSession`, found by a random id in the session cookie): the
resource list and launches are asked on the connection the user logged in on, one request
at a time (its lock), exactly as the control protocol's clients do. If the broker connection
breaks (a broker restart), the session logs in again on a new one with the resume token the
broker gave at login; if that is refused, the session is over. The browser holds that token
too (an HttpOnly cookie beside the session's), so that another gateway of the farm (behind a
HALB, the browser's next connection may land anywhere) takes the session over the same way.

A session ends at logout, when idle for ``session_idle_s``, ``session_max_s`` after login, or
when its broker connection is lost for good; a pending login ``PENDING_S`` after its last
answer (the broker's own challenge timeout ends it there too). Ended entries are dropped from
the tables at once and their connections closed by :meth:`Sessions.sweep` or by the request
that found them expired. Limits bound what strangers can hold: pending logins per client
address and in all, sessions in all.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ras.net.channel import Channel
from ras.portal.security import new_token

__all__ = ["MAX_PENDING_PER_IP", "PENDING_S", "PendingLogin", "Sessions", "WebSession"]

log = logging.getLogger("ras.portal")
PENDING_S = 120.0
MAX_PENDING_PER_IP = 8
MAX_PENDING = 1000
MAX_SESSIONS = 10_000
Peer = tuple[str, int]


@dataclass(eq=False, slots=True)
class PendingLogin:
    """A login waiting for the user's answer to a second-factor prompt."""

    chan: Channel
    client: str
    username: str
    prompt: str
    echo: bool
    since: float
    id: str = field(default_factory=new_token)


@dataclass(eq=False, slots=True)
class WebSession:
    """A logged-in browser: its user, its CSRF token and its broker connection."""

    user: str
    client: str
    chan: Channel | None
    resume_token: str
    created: float
    seen: float
    id: str = field(default_factory=new_token)
    csrf: str = field(default_factory=new_token)
    lock: trio.Lock = field(default_factory=trio.Lock)


class Sessions:
    """Both tables; the clock is trio's (``trio.current_time``)."""

    def __init__(self) -> None:
        self._sessions: dict[str, WebSession] = {}
        self._pending: dict[str, PendingLogin] = {}
        self._ended: dict[str, None] = {}  # ids ended here, oldest first
        self._closing: list[Channel] = []
        self._wake = trio.Event()

    def __len__(self) -> int:
        return len(self._sessions)

    # -- pending logins -------------------------------------------------------------------------

    def may_start_login(self, client: str) -> bool:
        """Room for one more pending login from ``client`` (checked before the broker is
        asked, so a stranger cannot hold broker connections without bound)."""
        self.expire()
        per_ip = Counter(p.client for p in self._pending.values())
        return per_ip[client] < MAX_PENDING_PER_IP and len(self._pending) < MAX_PENDING

    def add_pending(self, pending: PendingLogin) -> None:
        self._pending[pending.id] = pending

    def take_pending(self, pending_id: str, client: str) -> PendingLogin | None:
        """The pending login ``pending_id`` of ``client``, removed from the table (the caller
        puts it back if the broker asks again); None if unknown, expired or another client's."""
        self.expire()
        pending = self._pending.get(pending_id)
        if pending is None or pending.client != client:
            return None
        del self._pending[pending_id]
        return pending

    # -- sessions -------------------------------------------------------------------------------

    def add(self, session: WebSession) -> bool:
        self.expire()
        if len(self._sessions) >= MAX_SESSIONS:
            return False
        self._sessions[session.id] = session
        return True

    def get(self, session_id: str | None, *, idle_s: float, max_s: float) -> WebSession | None:
        """The live session of this cookie value (its idle timer restarted), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = trio.current_time()
        if now - session.seen > idle_s or now - session.created > max_s:
            log.info("portal session expired user=%s client=%s", session.user, session.client)
            self.end(session)
            return None
        session.seen = now
        return session

    def known(self, session_id: str) -> bool:
        """Was this session id ended here (logged out or expired)? Such a cookie is never taken
        over again by this gateway."""
        return session_id in self._ended

    def end(self, session: WebSession) -> None:
        """Forget ``session``; its broker connection is closed by the sweeper."""
        self._ended[session.id] = None
        while len(self._ended) > MAX_SESSIONS:  # the oldest first
            del self._ended[next(iter(self._ended))]
        if self._sessions.pop(session.id, None) is not None and session.chan is not None:
            self.close_later(session.chan)
            session.chan = None

    def close_later(self, chan: Channel) -> None:
        self._closing.append(chan)
        self._wake.set()

    def expire(self, *, idle_s: float | None = None, max_s: float | None = None) -> None:
        """Drop pending logins past ``PENDING_S`` (and, given the limits, idle or old
        sessions)."""
        now = trio.current_time()
        for pending in [p for p in self._pending.values() if now - p.since > PENDING_S]:
            del self._pending[pending.id]
            self.close_later(pending.chan)
        if idle_s is None or max_s is None:
            return
        for session in list(self._sessions.values()):
            if now - session.seen > idle_s or now - session.created > max_s:
                log.info("portal session expired user=%s client=%s", session.user, session.client)
                self.end(session)

    def end_all(self) -> None:
        for session in list(self._sessions.values()):
            self.end(session)
        for pending in list(self._pending.values()):
            self.close_later(pending.chan)
        self._pending.clear()

    async def sweep(self, limits: Callable[[], tuple[float, float]], *, every_s: float) -> None:
        """Run for the gateway's life: close what ended, expire what timed out (``limits()``:
        the idle and maximum session lifetimes of the current settings)."""
        try:
            while True:
                with trio.move_on_after(every_s):
                    await self._wake.wait()
                self._wake = trio.Event()
                idle_s, max_s = limits()
                self.expire(idle_s=idle_s, max_s=max_s)
                closing, self._closing = self._closing, []
                for chan in closing:
                    await chan.aclose()
        finally:
            self.end_all()
            for chan in self._closing:
                await chan.aclose()
