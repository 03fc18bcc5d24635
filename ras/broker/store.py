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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ras.broker.model import MODELS
from ras.config import Invalid
from ras.errors import RasError

__all__ = ["SQLiteStore", "StateError", "Store", "UserRecord"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password_hash: str
    groups: tuple[str, ...] = ()
    enabled: bool = True
    totp_secret: bytes | None = field(default=None, repr=False)


class StateError(RasError):
    """The broker's state cannot be opened or used (a damaged or foreign database file)."""


class Store(Protocol):
    # Counts the changes to configured objects, so that readers can cache them.
    generation: int

    def get_user(self, name: str) -> UserRecord | None: ...
    def put_user(self, user: UserRecord) -> None: ...
    def delete_user(self, name: str) -> bool: ...
    def list_users(self) -> list[UserRecord]: ...
    def secret(self, name: str, size: int = 32) -> bytes: ...
    def redeem_once(self, ticket_id: str, expires: float) -> bool: ...
    def was_redeemed(self, ticket_id: str) -> bool: ...
    def use_totp_step(self, name: str, step: int) -> bool: ...
    def claim_host(self, host: str, user: str, stale: int = 0) -> tuple[str, int]: ...
    def release_host(self, host: str, revision: int) -> bool: ...
    def assigned_hosts(self) -> dict[str, tuple[str, int]] | None:
        """The farm-wide claims of single-user hosts: case-folded host -> (owner, revision of
        the claim); None where nothing is shared (one broker: its memory is the truth)."""

    def get_object(self, cls: type[T], key: str) -> T | None: ...
    def put_object(self, obj: Any) -> None: ...
    def delete_object(self, cls: type[Any], key: str) -> bool: ...
    def list_objects(self, cls: type[T]) -> list[T]: ...
    async def follow(self) -> None:
        """Keep ``generation`` up with changes other brokers make, until cancelled (a store
        that no one else writes returns at once)."""

    def close(self) -> None: ...


# Each entry takes the schema one version further; never edit a released entry, append.
_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    groups TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL DEFAULT 1,
    totp_secret BLOB,
    totp_step INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS redeemed_tickets (id TEXT PRIMARY KEY, expires REAL NOT NULL);
""",
    # 2: what an administrator configures (groups, hosts, pools, resources, factor rules), as
    # the JSON of ras.broker.model records, one table for all kinds.
    """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    key TEXT NOT NULL COLLATE NOCASE,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
""",
)

_PURGE_EVERY_S = 30.0
_USER_COLUMNS = "name, password_hash, groups, enabled, totp_secret"


def _user(row: tuple[object, ...]) -> UserRecord:
    name, password_hash, groups, enabled, secret = row
    return UserRecord(
        str(name),
        str(password_hash),
        tuple(json.loads(str(groups))),
        bool(enabled),
        None if secret is None else bytes(typing.cast(bytes, secret)),
    )


class SQLiteStore:
    """State in one SQLite file (WAL mode; the file is created with mode 0600)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)
        self._lock = threading.Lock()
        self.generation = 0
        self._purged = 0.0  # when expired redeemed tickets were last deleted
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StateError(f"{path}: not a usable broker database: {exc}") from None

    def _migrate(self) -> None:
        """Bring the schema to the newest version (``PRAGMA user_version`` counts them)."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(_MIGRATIONS):
            raise StateError(f"schema version {version} is newer than this ras knows")
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            self._db.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")

    def get_user(self, name: str) -> UserRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _user(row)

    def put_user(self, user: UserRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO users (name, password_hash, groups, enabled, totp_secret) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "password_hash = excluded.password_hash, groups = excluded.groups, "
                "enabled = excluded.enabled, totp_secret = excluded.totp_secret, "
                "totp_step = CASE WHEN users.totp_secret IS excluded.totp_secret "
                "THEN users.totp_step ELSE -1 END",
                (
                    user.name,
                    user.password_hash,
                    json.dumps(list(user.groups)),
                    int(user.enabled),
                    user.totp_secret,
                ),
            )

    def delete_user(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def list_users(self) -> list[UserRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name").fetchall()
        return [_user(r) for r in rows]

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
        """Record a ticket as used; False if it already was. Forgets long-expired ones (a
        scan of the table, so at most once every ``_PURGE_EVERY_S``, not per ticket)."""
        with self._lock:
            now = time.time()
            if now - self._purged >= _PURGE_EVERY_S:
                self._db.execute("DELETE FROM redeemed_tickets WHERE expires < ?", (now - 60,))
                self._purged = now
            cur = self._db.execute(
                "INSERT OR IGNORE INTO redeemed_tickets (id, expires) VALUES (?, ?)",
                (ticket_id, expires),
            )
            return cur.rowcount == 1

    def was_redeemed(self, ticket_id: str) -> bool:
        """Whether ``redeem_once`` recorded ``ticket_id`` (and has not forgotten it yet)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM redeemed_tickets WHERE id = ?", (ticket_id,)
            ).fetchone()
        return row is not None

    def use_totp_step(self, name: str, step: int) -> bool:
        """Record that ``name`` used the one-time code of ``step``; False if that step or a
        later one was used already (a code works once)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE users SET totp_step = ? WHERE name = ? AND totp_step < ?",
                (step, name, step),
            )
            return bool(cur.rowcount == 1)

    # -- Remote PC / VDI assignments (ras.broker.assignments) ---------------------------------

    def claim_host(self, host: str, user: str, stale: int = 0) -> tuple[str, int]:
        """Make a single-user host ``user``'s: (its owner afterwards, the revision of that
        claim). One broker alone: its memory (:class:`ras.broker.assignments.Assignments`) is
        the whole truth, so this always grants (revision 0: nothing stored)."""
        return user, 0

    def release_host(self, host: str, revision: int) -> bool:
        """The claim of ``revision`` on ``host`` is over (one broker alone: nothing stored)."""
        return False

    def assigned_hosts(self) -> None:
        """Nothing shared: the broker's memory says who each host belongs to."""
        return None

    # -- configured objects (ras.broker.model records) ---------------------------------------

    def get_object(self, cls: type[T], key: str) -> T | None:
        kind = _kind(cls)
        with self._lock:
            row = self._db.execute(
                "SELECT key, body FROM objects WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
        return None if row is None else _object(cls, kind, row)

    def put_object(self, obj: Any) -> None:
        """Create or replace ``obj`` (a record of ``MODELS``), found by its kind and key."""
        kind = _kind(type(obj))
        body = json.dumps(obj.to_json(), separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT INTO objects (kind, key, body) VALUES (?, ?, ?) "
                "ON CONFLICT(kind, key) DO UPDATE SET key = excluded.key, body = excluded.body",
                (kind, obj.key, body),
            )
            self.generation += 1

    def delete_object(self, cls: type[Any], key: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM objects WHERE kind = ? AND key = ?", (_kind(cls), key)
            )
            self.generation += 1
            return cur.rowcount > 0

    def list_objects(self, cls: type[T]) -> list[T]:
        """Every record of this kind, sorted by key (without regard to case)."""
        kind = _kind(cls)
        with self._lock:
            rows = self._db.execute(
                "SELECT key, body FROM objects WHERE kind = ? ORDER BY key", (kind,)
            ).fetchall()
        return [_object(cls, kind, r) for r in rows]

    async def follow(self) -> None:
        return  # one broker's own file: its generation is always up to date

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _kind(cls: type[Any]) -> str:
    kind = getattr(cls, "KIND", None)
    if not isinstance(kind, str) or MODELS.get(kind) is not cls:
        raise TypeError(f"{cls.__name__} is not a stored kind of record")
    return kind


def _object(cls: type[T], kind: str, row: tuple[object, ...]) -> T:
    key, body = row
    try:
        return typing.cast(T, cls.from_json(json.loads(str(body))))  # type: ignore[attr-defined]
    except (ValueError, Invalid) as exc:
        raise StateError(f"stored {kind} {key!r} is damaged: {exc}") from None
