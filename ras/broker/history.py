"""What the broker remembers for reports: every login and every launch, with when.

Theory of operation. The broker's other state is what is true now (sessions, hosts); a report
asks what happened between two dates, so logins (user, gateway, result, factor) and launches
(session id, user, resource, host, gateway, mode) are appended to a table of their own, in an
SQLite file of their own (``history_file``, by default beside ``database``): a busy farm's
history never slows the configuration store, and a broker sharing its state through etcd keeps
its own history locally. The event loop only appends to a list (:meth:`History.login`,
:meth:`History.launch`); :meth:`History.run` writes the list in a worker thread every second,
and forgets events older than ``history_days``. A report (:meth:`History.report`) writes what
is pending first, so it includes the last second.

Session ends. :meth:`History.ended` records when a launched session ended: the broker's session
table saw the agent stop reporting it (or an admin logged it off), or the gateway closed a
routed RDP-port connection (``route ended``). Ends are kept in their own table, one row per
session id, and joined to the launches at report time, so a session's duration is its end
minus its launch, both as this broker recorded them.

Reports group by ``host``, ``gateway``, ``resource``, ``user`` or ``day`` (UTC): per group, the
sessions launched, the distinct users, of those sessions how many have ended and their total
and mean duration, and for ``gateway``, ``user`` and ``day`` the logins by result. A login has
no host or resource, so those groups count sessions only.

A report is made of *parts* (:meth:`History.part`): one broker's figures in a form that adds
up (user names, not counts of distinct users), so that the parts of several brokers merge
into one report of the farm (:func:`merge`, ``ras.broker.farmreport``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = ["GROUPS", "EndEvent", "History", "LaunchEvent", "LoginEvent", "merge"]

GROUPS = ("host", "gateway", "resource", "user", "day")
_FLUSH_EVERY_S = 1.0
_PURGE_EVERY_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS logins (
    at REAL NOT NULL, user TEXT NOT NULL, gateway TEXT NOT NULL,
    result TEXT NOT NULL, factor TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logins_at ON logins (at);
CREATE TABLE IF NOT EXISTS launches (
    at REAL NOT NULL, session TEXT NOT NULL, user TEXT NOT NULL, resource TEXT NOT NULL,
    host TEXT NOT NULL, gateway TEXT NOT NULL, mode TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS launches_at ON launches (at);
CREATE TABLE IF NOT EXISTS ends (session TEXT PRIMARY KEY, at REAL NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class LoginEvent:
    at: float
    user: str
    gateway: str
    result: str  # ok, failed, throttled, unavailable
    factor: str  # password, totp, radius, resume


@dataclass(frozen=True, slots=True)
class LaunchEvent:
    at: float
    session: str
    user: str
    resource: str
    host: str
    gateway: str
    mode: str


@dataclass(frozen=True, slots=True)
class EndEvent:
    at: float
    session: str


# The SQL of each grouping: its key over the table's columns.
_KEY = {
    "host": "host",
    "gateway": "gateway",
    "resource": "resource",
    "user": "user",
    "day": "strftime('%Y-%m-%d', at, 'unixepoch')",
}
# The same over launches (l) joined to their ends (e).
_LKEY = {
    "host": "l.host",
    "gateway": "l.gateway",
    "resource": "l.resource",
    "user": "l.user",
    "day": "strftime('%Y-%m-%d', l.at, 'unixepoch')",
}


class History:
    """The logins and launches of one broker, in ``path`` (created 0600)."""

    def __init__(
        self, path: Path, *, keep_days: float = 90.0, clock: Callable[[], float] = time.time
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)
        self.path = path
        self.keep_days = keep_days
        self.clock = clock
        self._pending: list[LoginEvent | LaunchEvent | EndEvent] = []
        self._lock = threading.Lock()  # the database, from worker threads
        self._purged = 0.0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def login(self, *, user: str, gateway: str, result: str, factor: str) -> None:
        self._pending.append(LoginEvent(self.clock(), user, gateway, result, factor))

    def launch(
        self, *, session: str, user: str, resource: str, host: str, gateway: str, mode: str
    ) -> None:
        self._pending.append(
            LaunchEvent(self.clock(), session, user, resource, host, gateway, mode)
        )

    def ended(self, session: str) -> None:
        """The launched session ``session`` (its farm id) ended now; a second end is ignored."""
        if session:
            self._pending.append(EndEvent(self.clock(), session))

    def flush(self) -> None:
        """Write what is pending (a worker thread's job: it waits on the disk)."""
        pending, self._pending = self._pending, []
        logins = [
            (e.at, e.user, e.gateway, e.result, e.factor)
            for e in pending if isinstance(e, LoginEvent)
        ]  # fmt: skip
        launches = [
            (e.at, e.session, e.user, e.resource, e.host, e.gateway, e.mode)
            for e in pending if isinstance(e, LaunchEvent)
        ]  # fmt: skip
        ends = [(e.session, e.at) for e in pending if isinstance(e, EndEvent)]
        with self._lock:
            if pending:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO logins VALUES (?, ?, ?, ?, ?)", logins)
                self._db.executemany("INSERT INTO launches VALUES (?, ?, ?, ?, ?, ?, ?)", launches)
                self._db.executemany("INSERT OR IGNORE INTO ends VALUES (?, ?)", ends)
                self._db.execute("COMMIT")
            now = time.time()
            if now - self._purged >= _PURGE_EVERY_S:
                cutoff = now - self.keep_days * 86400
                self._db.execute("DELETE FROM logins WHERE at < ?", (cutoff,))
                self._db.execute("DELETE FROM launches WHERE at < ?", (cutoff,))
                self._db.execute("DELETE FROM ends WHERE at < ?", (cutoff,))
                self._purged = now

    async def run(self) -> None:
        """Write pending events every second until cancelled, then once more."""
        try:
            while True:
                await trio.sleep(_FLUSH_EVERY_S)
                if self._pending:
                    await trio.to_thread.run_sync(self.flush)
        finally:
            self.flush()

    def report(self, start: float, end: float, by: str) -> dict[str, Any]:
        """Sessions and logins between ``start`` and ``end`` (Unix times), grouped ``by`` one
        of ``GROUPS``: this broker's :meth:`part` as a report. Call it in a worker thread."""
        return merge([self.part(start, end, by)])

    def part(self, start: float, end: float, by: str) -> dict[str, Any]:
        """This broker's figures between ``start`` and ``end`` grouped ``by``, in a form that
        :func:`merge` adds to other brokers' (JSON: rows by group name, each with its user
        names). Writes what is pending first. Call it in a worker thread."""
        if by not in _KEY:
            raise ValueError(f"{by!r} is not one of: {', '.join(GROUPS)}")
        self.flush()
        rows: dict[str, dict[str, Any]] = {}

        def row(name: object) -> dict[str, Any]:
            return rows.setdefault(str(name), _empty_row())

        with self._lock:
            launched = self._db.execute(
                f"SELECT {_LKEY[by]}, l.user, COUNT(*), COUNT(e.at), TOTAL(MAX(e.at - l.at, 0)) "
                "FROM launches AS l LEFT JOIN ends AS e ON e.session = l.session "
                "WHERE l.at >= ? AND l.at < ? GROUP BY 1, 2",
                (start, end),
            ).fetchall()
            login_key = _KEY[by] if by in _WITH_LOGINS else "''"  # no host, no resource
            logins = self._db.execute(
                f"SELECT {login_key}, result, COUNT(*) FROM logins "
                "WHERE at >= ? AND at < ? GROUP BY 1, 2",
                (start, end),
            ).fetchall()
        users: set[str] = set()
        totals: dict[str, int] = {}
        for name, user, sessions, ended, seconds in launched:
            r = row(name)
            r["sessions"] += sessions
            r["ended"] += ended
            r["seconds"] += seconds
            r["users"].append(str(user))
            users.add(str(user))
        for name, result, n in logins:
            totals[str(result)] = totals.get(str(result), 0) + n
            if by in _WITH_LOGINS:
                logins_of = row(name)["logins"]
                logins_of[str(result)] = logins_of.get(str(result), 0) + n
        return {
            "from": start, "to": end, "by": by, "rows": rows, "users": sorted(users),
            "logins": totals,
        }  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()


_WITH_LOGINS = ("gateway", "user", "day")  # the groups a login has


def _empty_row() -> dict[str, Any]:
    return {"sessions": 0, "users": [], "ended": 0, "seconds": 0.0, "logins": {}}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the :meth:`History.part` of one or more brokers (same range and
    grouping): counts added, users counted once however many brokers saw them."""
    first = parts[0]
    by = str(first["by"])
    rows: dict[str, dict[str, Any]] = {}
    users: set[str] = set()
    logins: dict[str, int] = {}
    ended = 0
    seconds = 0.0
    for part in parts:
        for name, r in part["rows"].items():
            into = rows.setdefault(str(name), _empty_row() | {"users": set()})
            for field in ("sessions", "ended", "seconds"):
                into[field] += r[field]
            into["users"].update(r["users"])
            for result, n in r["logins"].items():
                into["logins"][result] = into["logins"].get(result, 0) + int(n)
        users.update(part["users"])
        for result, n in part["logins"].items():
            logins[result] = logins.get(result, 0) + int(n)
    out = []
    for name, r in rows.items():
        ended += r["ended"]
        seconds += r["seconds"]
        line = {by: name, "sessions": r["sessions"], "users": len(r["users"])}
        line |= _durations(r["ended"], r["seconds"])
        if by in _WITH_LOGINS and r["logins"]:
            line["logins"] = r["logins"]
        out.append(line)
    return {
        "from": first["from"],
        "to": first["to"],
        "by": by,
        "rows": sorted(out, key=lambda r: (-r["sessions"], str(r[by]))),
        "totals": {
            "sessions": sum(r["sessions"] for r in out),
            "users": len(users),
            **_durations(ended, seconds),
            "logins": logins,
        },
    }


def _durations(ended: int, seconds: float) -> dict[str, Any]:
    """Of a group's sessions, how many ended, their total and mean time (seconds, rounded)."""
    return {
        "ended": ended,
        "session_s": round(seconds, 1),
        "mean_s": round(seconds / ended, 1) if ended else None,
    }
