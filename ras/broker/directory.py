"""Where users and their groups come from: the built-in store or an LDAP/AD directory.

A :class:`Directory` answers two questions: is this the user's password (``authenticate``),
and who is this user (``lookup``, without a password). ``None`` means "no" (unknown user or
wrong password: the caller answers both the same way). A directory that cannot answer (down,
slow, or answering strangely) raises :class:`DirectoryUnavailable`: the caller denies and logs
it, never allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from ras.broker.passwords import verify_password
from ras.broker.store import Store
from ras.errors import AuthError, ErrorCode

__all__ = ["BuiltinDirectory", "Directory", "DirectoryUnavailable", "Identity"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A user the directory vouches for: the name as the directory spells it, its groups."""

    name: str
    groups: tuple[str, ...] = ()
    source: str = "builtin"


class DirectoryUnavailable(AuthError):
    """The directory could not answer; the login is denied. The message names the server and
    the reason (never the password)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.UNAVAILABLE)


class Directory(Protocol):
    async def authenticate(self, username: str, password: str) -> Identity | None: ...
    async def lookup(self, username: str) -> Identity | None: ...


class BuiltinDirectory:
    """Users in the broker's own store, with scrypt hashes. An unknown or disabled user costs
    the same time as a wrong password."""

    source = "builtin"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def authenticate(self, username: str, password: str) -> Identity | None:
        record = await trio.to_thread.run_sync(self.store.get_user, username)
        stored = record.password_hash if record is not None and record.enabled else None
        ok = await trio.to_thread.run_sync(verify_password, password, stored)
        if not ok or record is None:
            return None
        return Identity(record.name, record.groups, self.source)

    async def lookup(self, username: str) -> Identity | None:
        record = await trio.to_thread.run_sync(self.store.get_user, username)
        if record is None or not record.enabled:
            return None
        return Identity(record.name, record.groups, self.source)
