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

Reports group by ``host``, ``gateway``, ``resource``, ``user`` or ``day`` (UTC): per group, the
sessions launched, the distinct users, and for ``gateway``, ``user`` and ``day`` the logins by
result. A login has no host or resource, so those groups count sessions only.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = ["GROUPS", "History", "LaunchEvent", "LoginEvent"]

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


# The SQL of each grouping: its key over the table's columns.
_KEY = {
    "host": "host",
    "gateway": "gateway",
    "resource": "resource",
    "user": "user",
    "day": "strftime('%Y-%m-%d', at, 'unixepoch')",
}


class History:
    """The logins and launches of one broker, in ``path`` (created 0600)."""

    def __init__(self, path: Path, *, keep_days: float = 90.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)
        self.path = path
        self.keep_days = keep_days
        self._pending: list[LoginEvent | LaunchEvent] = []
        self._lock = threading.Lock()  # the database, from worker threads
        self._purged = 0.0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def login(self, *, user: str, gateway: str, result: str, factor: str) -> None:
        self._pending.append(LoginEvent(time.time(), user, gateway, result, factor))

    def launch(
        self, *, session: str, user: str, resource: str, host: str, gateway: str, mode: str
    ) -> None:
        self._pending.append(LaunchEvent(time.time(), session, user, resource, host, gateway, mode))

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
        with self._lock:
            if pending:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO logins VALUES (?, ?, ?, ?, ?)", logins)
                self._db.executemany("INSERT INTO launches VALUES (?, ?, ?, ?, ?, ?, ?)", launches)
                self._db.execute("COMMIT")
            now = time.time()
            if now - self._purged >= _PURGE_EVERY_S:
                cutoff = now - self.keep_days * 86400
                self._db.execute("DELETE FROM logins WHERE at < ?", (cutoff,))
                self._db.execute("DELETE FROM launches WHERE at < ?", (cutoff,))
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
        of ``GROUPS``. Call it in a worker thread."""
        if by not in _KEY:
            raise ValueError(f"{by!r} is not one of: {', '.join(GROUPS)}")
        self.flush()
        key = _KEY[by]
        rows: dict[str, dict[str, Any]] = {}

        def row(name: str) -> dict[str, Any]:
            return rows.setdefault(name, {by: name, "sessions": 0, "users": 0})

        with self._lock:
            launched = self._db.execute(
                f"SELECT {key}, COUNT(*), COUNT(DISTINCT user) FROM launches "
                "WHERE at >= ? AND at < ? GROUP BY 1",
                (start, end),
            ).fetchall()
            logins = []
            if by in ("gateway", "user", "day"):
                logins = self._db.execute(
                    f"SELECT {key}, result, COUNT(*) FROM logins "
                    "WHERE at >= ? AND at < ? GROUP BY 1, 2",
                    (start, end),
                ).fetchall()
            totals = self._db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT user) FROM launches WHERE at >= ? AND at < ?",
                (start, end),
            ).fetchone()
            login_totals = self._db.execute(
                "SELECT result, COUNT(*) FROM logins WHERE at >= ? AND at < ? GROUP BY 1",
                (start, end),
            ).fetchall()
        for name, sessions, users in launched:
            row(str(name)).update(sessions=sessions, users=users)
        for name, result, n in logins:
            row(str(name)).setdefault("logins", {})[str(result)] = n
        return {
            "from": start,
            "to": end,
            "by": by,
            "rows": sorted(rows.values(), key=lambda r: (-r["sessions"], str(r[by]))),
            "totals": {
                "sessions": totals[0],
                "users": totals[1],
                "logins": {str(result): n for result, n in login_totals},
            },
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()
