"""The broker's state behind one interface; SQLite is the embedded implementation.

Calls are short and synchronous; the broker runs them in a worker thread
(``trio.to_thread.run_sync``) so the event loop never waits on the disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["SQLiteStore", "Store", "UserRecord"]


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password_hash: str
    groups: tuple[str, ...] = ()
    enabled: bool = True


class Store(Protocol):
    def get_user(self, name: str) -> UserRecord | None: ...
    def put_user(self, user: UserRecord) -> None: ...
    def delete_user(self, name: str) -> bool: ...
    def list_users(self) -> list[UserRecord]: ...
    def secret(self, name: str, size: int = 32) -> bytes: ...
    def redeem_once(self, ticket_id: str, expires: float) -> bool: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    groups TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS redeemed_tickets (id TEXT PRIMARY KEY, expires REAL NOT NULL);
"""


class SQLiteStore:
    """State in one SQLite file (WAL mode; the file is created with mode 0600)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def get_user(self, name: str) -> UserRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, password_hash, groups, enabled FROM users WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            return None
        return UserRecord(row[0], row[1], tuple(json.loads(row[2])), bool(row[3]))

    def put_user(self, user: UserRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO users (name, password_hash, groups, enabled) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash, "
                "groups = excluded.groups, enabled = excluded.enabled",
                (user.name, user.password_hash, json.dumps(list(user.groups)), int(user.enabled)),
            )

    def delete_user(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def list_users(self) -> list[UserRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, password_hash, groups, enabled FROM users ORDER BY name"
            ).fetchall()
        return [UserRecord(r[0], r[1], tuple(json.loads(r[2])), bool(r[3])) for r in rows]

    def secret(self, name: str, size: int = 32) -> bytes:
        """A named random secret, made on first use and kept from then on."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                (name, os.urandom(size)),
            )
            row = self._db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    def redeem_once(self, ticket_id: str, expires: float) -> bool:
        """Record a ticket as used; False if it already was. Forgets long-expired ones."""
        with self._lock:
            self._db.execute("DELETE FROM redeemed_tickets WHERE expires < ?", (time.time() - 60,))
            cur = self._db.execute(
                "INSERT OR IGNORE INTO redeemed_tickets (id, expires) VALUES (?, ?)",
                (ticket_id, expires),
            )
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()
