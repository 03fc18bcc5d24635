"""Who is on which host, through which gateway, since when (pure logic, in memory).

Theory of operation. Two sources feed the table. A launch adds a *launching* session: the
broker sent the user to a host, with the resource, gateway and client address of the launch.
An agent's report (``load_report.sessions_detail``) is the truth about its host: it lists the
sessions that exist there, active or disconnected. A reported session of a user who has a
launching session on that host takes over the launch's resource, gateway, client and start
time (that launch has arrived); sessions the host no longer reports are gone (logged off).
Launching sessions that no report confirms within ``launch_timeout_s`` are dropped (the client
never connected, or the agent does not list sessions).

A reported session's id is ``<host>:<the agent's session id>``, unique in the farm; the part
after the host is what ``session_action`` sends to the agent.
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterable

from ras.broker.model import SessionRecord, SessionState
from ras.protocol import HostKind, SessionInfo

__all__ = ["SessionTable"]


class SessionTable:
    def __init__(self, launch_timeout_s: float = 120.0) -> None:
        self.launch_timeout_s = launch_timeout_s
        self._sessions: dict[str, SessionRecord] = {}
        self._ids = itertools.count(1)

    def list(self) -> list[SessionRecord]:
        """Every session, oldest first."""
        return sorted(self._sessions.values(), key=lambda s: (s.since, s.id))

    def get(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    @staticmethod
    def agent_id(session: SessionRecord) -> str:
        """The id the host's agent knows the session by."""
        prefix = f"{session.host}:"
        return session.id[len(prefix) :] if session.id.startswith(prefix) else session.id

    def launched(
        self, *, user: str, host: str, resource: str, gateway: str, client: str, now: float
    ) -> SessionRecord:
        self.expire(now)
        record = SessionRecord(
            f"launch-{next(self._ids)}", user, host, resource, gateway, client,
            SessionState.LAUNCHING, now, now,
        )  # fmt: skip
        self._sessions[record.id] = record
        return record

    def reported(self, host: str, detail: Iterable[SessionInfo], now: float) -> None:
        """An agent's list of its host's sessions (all of them)."""
        self.expire(now)
        mine = [s for s in self._sessions.values() if s.host == host]
        known = {s.id: s for s in mine if s.state is not SessionState.LAUNCHING}
        launches = [s for s in mine if s.state is SessionState.LAUNCHING]
        seen: set[str] = set()
        for info in detail:
            sid = f"{host}:{info.id}"
            seen.add(sid)
            state = SessionState(str(info.state))
            old = known.get(sid)
            if old is None:
                launch = next(
                    (s for s in launches if s.user.casefold() == info.user.casefold()), None
                )
                if launch is not None:
                    launches.remove(launch)
                    del self._sessions[launch.id]
                    old = launch
            if old is None:
                self._sessions[sid] = SessionRecord(
                    sid, info.user, host, "", "", "", state, now, now
                )
            else:
                self._sessions[sid] = SessionRecord(
                    sid, info.user, host, old.resource, old.gateway, old.client, state,
                    old.since, now,
                )  # fmt: skip
        for sid in known.keys() - seen:
            del self._sessions[sid]

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def expire(self, now: float) -> None:
        for s in list(self._sessions.values()):
            if s.state is SessionState.LAUNCHING and now - s.since > self.launch_timeout_s:
                del self._sessions[s.id]

    def affinity(self, user: str, kinds: dict[str, HostKind]) -> builtins.list[tuple[str, str]]:
        """Hosts the user should go back to, best first, with why: a disconnected session
        anywhere; an active or launching one on a single-user host (VDI, Remote PC)."""
        folded = user.casefold()
        found: list[tuple[int, float, str, str]] = []
        for s in self._sessions.values():
            if s.user.casefold() != folded:
                continue
            if s.state is SessionState.DISCONNECTED:
                found.append((0, -s.updated, s.host, f"affinity: disconnected session {s.id}"))
            elif kinds.get(s.host) in (HostKind.VDI, HostKind.REMOTE_PC):
                found.append((1, -s.updated, s.host, f"affinity: your {s.state} session {s.id}"))
        return [(host, why) for _, _, host, why in sorted(found)]
