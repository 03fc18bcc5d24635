"""Failed-login throttling per user name and per client address (pure logic, clock injected).

Theory of operation. Every failed login (wrong password, unknown user, wrong second factor) is
counted twice: against the user name as typed (case-folded) and against the client address.
Failures older than ``window_s`` are forgotten. When a name or an address reaches its limit
within the window, it is locked for ``lockout_s``: the broker refuses its logins with
``THROTTLED`` **before** asking the directory anything, so a locked account costs the
directory (and an LDAP server's own lockout policy) nothing. Attempts refused while locked are
not counted (they cannot lengthen the lock). A successful login clears the user name's
failures (not the address's: one good account must not launder a password-guessing source).

Names are counted whether or not such a user exists, so the answers (and their timing) are the
same for an unknown user and a wrong password, locked or not. Memory is bounded: at most
``max_entries`` names and addresses are tracked; beyond that the oldest entries are dropped.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio

__all__ = ["Lockout", "LoginThrottle", "Throttle", "call", "wait_text"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Lockout:
    """Why a login is refused without trying it: which counter, and for how long still."""

    what: str  # "user" or "address"
    retry_after_s: float


@dataclass(slots=True)
class _Counter:
    failures: collections.deque[float] = field(default_factory=collections.deque)
    locked_until: float = 0.0


class _Table:
    def __init__(self, limit: int, window_s: float, lockout_s: float, max_entries: int) -> None:
        self.limit = limit
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[str, _Counter] = collections.OrderedDict()

    def locked(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: it may now)."""
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.locked_until - now)

    def fail(self, key: str, now: float) -> bool:
        """Count a failure; True if ``key`` is locked from now on."""
        entry = self.entries.pop(key, None) or _Counter()
        self.entries[key] = entry  # most recently used last
        while entry.failures and entry.failures[0] <= now - self.window_s:
            entry.failures.popleft()
        entry.failures.append(now)
        if len(entry.failures) >= self.limit:
            entry.locked_until = now + self.lockout_s
            entry.failures.clear()
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry.locked_until > now

    def clear(self, key: str) -> None:
        self.entries.pop(key, None)


class LoginThrottle(Protocol):
    """The farm's failed logins: :class:`Throttle` in memory (one broker), or
    :class:`ras.broker.etcdthrottle.EtcdThrottle`, shared by the brokers of a farm on etcd,
    whose calls block (``blocking``) and raise :class:`ras.errors.RasError` when etcd is away."""

    blocking: bool

    def check(self, user: str, address: str) -> Lockout | None: ...
    def failed(self, user: str, address: str) -> Lockout | None: ...
    def succeeded(self, user: str) -> None: ...
    def unlock(self, user: str) -> bool: ...


async def call(throttle: LoginThrottle, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, a method of ``throttle``: in a worker thread if it blocks (etcd)."""
    if throttle.blocking:
        return await trio.to_thread.run_sync(fn, *args)
    return fn(*args)


class Throttle:
    """Counts failed logins; ``check`` before trying one, ``failed`` / ``succeeded`` after."""

    blocking = False  # in memory: calls never wait

    def __init__(
        self,
        *,
        max_failures_per_user: int,
        max_failures_per_address: int,
        window_s: float,
        lockout_s: float,
        clock: Callable[[], float],
        max_entries: int = 100_000,
    ) -> None:
        self.clock = clock
        self._users = _Table(max_failures_per_user, window_s, lockout_s, max_entries)
        self._addresses = _Table(max_failures_per_address, window_s, lockout_s, max_entries)

    @staticmethod
    def _user_key(user: str) -> str:
        return user.casefold()

    def check(self, user: str, address: str) -> Lockout | None:
        """None if this login may be tried now; otherwise which lock refuses it."""
        now = self.clock()
        wait = self._addresses.locked(address, now)
        if wait > 0:
            return Lockout("address", wait)
        wait = self._users.locked(self._user_key(user), now)
        if wait > 0:
            return Lockout("user", wait)
        return None

    def failed(self, user: str, address: str) -> Lockout | None:
        """Count a failed login; the lock it starts, if it starts one."""
        now = self.clock()
        user_locked = self._users.fail(self._user_key(user), now)
        address_locked = self._addresses.fail(address, now)
        if address_locked:
            return Lockout("address", self._addresses.locked(address, now))
        if user_locked:
            return Lockout("user", self._users.locked(self._user_key(user), now))
        return None

    def succeeded(self, user: str) -> None:
        self._users.clear(self._user_key(user))

    def unlock(self, user: str) -> bool:
        """An administrator's pardon: forget the user name's failures and lock. True if it was
        locked. (A locked address stays locked: it may be guessing other names too.)"""
        key = self._user_key(user)
        locked = self._users.locked(key, self.clock()) > 0
        self._users.clear(key)
        return locked


def wait_text(seconds: float) -> str:
    """How long a lock still holds, for a person: ``try again in {wait_text(s)}``."""
    whole = max(1, math.ceil(seconds))
    if whole < 120:
        return f"{whole} s"
    return f"{math.ceil(whole / 60)} min"
