"""Who is on which host, through which gateway, since when (pure logic, in memory).

Theory of operation. Two sources feed the table. A launch adds a *launching* session: the
broker sent the user to a host, with the resource, gateway and client address of the launch.
An agent's report (``load_report.sessions_detail``) is the truth about its host: it lists the
sessions that exist there, active or disconnected. A reported session of a user who has a
launching session on that host takes over the launch's resource, gateway, client and start
time (that launch has arrived); sessions the host no longer reports are gone (logged off).
Launching sessions that no report confirms within ``launch_timeout_s`` are dropped (the client
never connected, or the agent does not list sessions).

A launched session that ends (its host stops reporting it, or an admin logs it off) is passed
to ``on_end`` with the farm's id of its launch (``ras.broker.history`` records when). A launch
that never started (dropped by ``launch_timeout_s``) did not end: it never ran.

A reported session's id is ``<host>:<the agent's session id>``, unique in the farm; the part
after the host is what ``session_action`` sends to the agent.

Cost. Every agent reports every few seconds, so with thousands of hosts a report must cost
its own host's sessions, not the farm's: the sessions are indexed by host (for reports) and by
user (for affinity at each launch), and the launching ones are also kept in a heap by start
time, so that expiring them costs only the expired ones.
"""

from __future__ import annotations

import builtins
import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping

from ras.broker.model import SessionRecord, SessionState
from ras.protocol import HostKind, SessionInfo

__all__ = ["SessionTable"]

_SINGLE_USER = (HostKind.VDI, HostKind.REMOTE_PC)


class SessionTable:
    def __init__(self, launch_timeout_s: float = 120.0) -> None:
        self.launch_timeout_s = launch_timeout_s
        self._sessions: dict[str, SessionRecord] = {}
        self._by_host: dict[str, dict[str, SessionRecord]] = {}
        self._by_user: dict[str, dict[str, SessionRecord]] = {}  # by case-folded user
        # (since, id) of launching sessions, oldest first; an entry whose session is gone or
        # no longer launching is skipped when it comes up.
        self._launching: list[tuple[float, str]] = []
        self._ids = itertools.count(1)
        # A reported session's launch: its id -> the farm's session id made at the launch
        # (``s-...``), so that log lines on the agent's side name the same session.
        self._farm: dict[str, str] = {}
        # called with the farm's id of a launched session that ended (ras.broker.history)
        self.on_end: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

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

    def farm_id(self, session_id: str) -> str:
        """The farm's id of a session (its launch's, ``s-...``); "" if it had no launch."""
        if session_id.startswith("s-"):
            return session_id
        return self._farm.get(session_id, "")

    def launched(
        self,
        *,
        user: str,
        host: str,
        resource: str,
        gateway: str,
        client: str,
        now: float,
        session: str = "",
        kind: str = "native",
    ) -> SessionRecord:
        """A launching session; its id is ``session`` (the farm's id of the launch) if given."""
        self.expire(now)
        record = SessionRecord(
            session or f"launch-{next(self._ids)}", user, host, resource, gateway, client,
            SessionState.LAUNCHING, now, now, kind,
        )  # fmt: skip
        self._put(record)
        return record

    def reported(
        self, host: str, detail: Iterable[SessionInfo], now: float
    ) -> builtins.list[SessionRecord]:
        """An agent's list of its host's sessions (all of them). Returns the sessions that
        were launches until now: their launch has arrived (``farm_id`` names the launch)."""
        started: list[SessionRecord] = []
        self.expire(now)
        mine = self._by_host.get(host, {})
        known = {sid: s for sid, s in mine.items() if s.state is not SessionState.LAUNCHING}
        launches = [s for s in mine.values() if s.state is SessionState.LAUNCHING]
        seen: set[str] = set()
        for info in detail:
            sid = f"{host}:{info.id}"
            seen.add(sid)
            state = SessionState(str(info.state))
            old = known.get(sid)
            if old is None and launches:
                folded = info.user.casefold()
                launch = next((s for s in launches if s.user.casefold() == folded), None)
                if launch is not None:
                    launches.remove(launch)
                    self._drop(launch.id)
                    old = launch
                    if launch.id.startswith("s-"):
                        self._farm[sid] = launch.id
            if old is None:
                self._put(SessionRecord(sid, info.user, host, "", "", "", state, now, now))
                continue
            record = SessionRecord(
                sid, info.user, host, old.resource, old.gateway, old.client, state,
                old.since, now, old.kind,
            )  # fmt: skip
            self._put(record)
            if old.state is SessionState.LAUNCHING:
                started.append(record)
        for sid in known.keys() - seen:
            self._end(sid)
        return started

    def remove(self, session_id: str) -> None:
        self._end(session_id)

    def _end(self, session_id: str) -> None:
        """Drop a session that ended; tell ``on_end`` if it was a launch that had started."""
        farm = self._farm.get(session_id, "")
        record = self._sessions.get(session_id)
        self._drop(session_id)
        if farm and record is not None and self.on_end is not None:
            self.on_end(farm)

    def expire(self, now: float) -> None:
        """Drop the launching sessions older than ``launch_timeout_s``."""
        heap, cutoff = self._launching, now - self.launch_timeout_s
        while heap and heap[0][0] < cutoff:
            since, sid = heapq.heappop(heap)
            s = self._sessions.get(sid)
            if s is not None and s.state is SessionState.LAUNCHING and s.since == since:
                self._drop(sid)

    def affinity(self, user: str, kinds: Mapping[str, HostKind]) -> builtins.list[tuple[str, str]]:
        """Hosts the user should go back to, best first, with why: a disconnected session
        anywhere; an active or launching one on a single-user host (VDI, Remote PC)."""
        found: list[tuple[int, float, str, str]] = []
        for s in self._by_user.get(user.casefold(), {}).values():
            if s.state is SessionState.DISCONNECTED:
                found.append((0, -s.updated, s.host, f"affinity: disconnected session {s.id}"))
            elif kinds.get(s.host) in _SINGLE_USER:
                found.append((1, -s.updated, s.host, f"affinity: your {s.state} session {s.id}"))
        return [(host, why) for _, _, host, why in sorted(found)]

    def _put(self, record: SessionRecord) -> None:
        """Add or replace a session in the table and its indexes."""
        if record.id in self._sessions:
            self._drop(record.id, forget=False)
        self._sessions[record.id] = record
        self._by_host.setdefault(record.host, {})[record.id] = record
        self._by_user.setdefault(record.user.casefold(), {})[record.id] = record
        if record.state is SessionState.LAUNCHING:
            heapq.heappush(self._launching, (record.since, record.id))

    def _drop(self, session_id: str, *, forget: bool = True) -> None:
        if forget:
            self._farm.pop(session_id, None)
        record = self._sessions.pop(session_id, None)
        if record is None:
            return
        for index, key in ((self._by_host, record.host), (self._by_user, record.user.casefold())):
            bucket = index.get(key)
            if bucket is not None:
                bucket.pop(session_id, None)
                if not bucket:
                    del index[key]
