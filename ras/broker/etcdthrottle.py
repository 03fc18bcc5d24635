"""Failed-login throttling shared by every broker of a farm on etcd (:class:`EtcdThrottle`).

Theory of operation. The same counting as :class:`ras.broker.throttle.Throttle` (read its
docstring: per user name, case-folded, and per client address; failures older than
``window_s`` forgotten; ``lockout_s`` once a limit is reached), but the counters live in etcd
under the farm's prefix, so a lockout counted on one broker holds on every broker, and an
administrator's unlock on any broker lifts it everywhere::

    throttle/user/<folded name>    {"f": [failure times], "u": locked until}  (JSON)
    throttle/address/<address>     the same for a client address

A failure is counted by compare-and-swap: read the key, compute the new value, write it in a
transaction that checks the key's ``mod_revision`` is still what was read (or that it is still
absent), and start again if another broker wrote in between. No failure is lost, whichever
member each broker talks to. Times are the brokers' wall clocks (``time.time``: keep them in
NTP); keys sit on a lease that outlives both the window and the lockout, so etcd forgets
counters nobody touches any more.

Every call is a blocking request (``blocking = True``: callers run it in a worker thread). An
unreachable etcd raises :class:`ras.errors.RasError`: the broker then refuses the login
(``UNAVAILABLE``), never lets it through uncounted.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ras.broker.etcd import Etcd, KeyValue, Op
from ras.broker.store import StateError
from ras.broker.throttle import Lockout
from ras.errors import RasError

__all__ = ["EtcdThrottle"]

_CAS_ATTEMPTS = 50
_LEASE_SLACK_S = 60


@dataclass(slots=True)
class _State:
    failures: list[float]
    locked_until: float

    @staticmethod
    def parse(kv: KeyValue | None) -> _State:
        if kv is None:
            return _State([], 0.0)
        try:
            body = json.loads(kv.value)
            return _State([float(t) for t in body["f"]], float(body["u"]))
        except (ValueError, KeyError, TypeError):
            return _State([], 0.0)  # a damaged counter counts as none (it is rewritten)

    def encode(self) -> bytes:
        return json.dumps({"f": self.failures, "u": self.locked_until}).encode()


class EtcdThrottle:
    """The farm's failed logins in etcd; the interface of :class:`Throttle` (thread-safe)."""

    blocking = True

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        *,
        max_failures_per_user: int,
        max_failures_per_address: int,
        window_s: float,
        lockout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.etcd = etcd
        self._prefix = prefix.encode() + b"throttle/"
        self._limits = {b"user": max_failures_per_user, b"address": max_failures_per_address}
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.clock = clock
        self._lease_lock = threading.Lock()
        self._lease = 0
        self._lease_until = 0.0  # time.monotonic()

    def _key(self, what: bytes, name: str) -> bytes:
        return self._prefix + what + b"/" + name.encode()

    @staticmethod
    def _user(user: str) -> str:
        return user.casefold()

    def _lease_for_counter(self) -> int:
        """A lease that outlives a counter written now (the window and the lockout)."""
        keep = max(self.window_s, self.lockout_s)
        now = time.monotonic()
        with self._lease_lock:
            if self._lease and self._lease_until - now >= keep:
                return self._lease
            ttl = math.ceil(keep) + _LEASE_SLACK_S
            self._lease = self.etcd.grant(ttl)
            self._lease_until = now + ttl
            return self._lease

    def _count(self, what: bytes, name: str, now: float) -> float:
        """Count one failure of ``name``; seconds it is locked from now on (0: not locked)."""
        key = self._key(what, name)
        for _ in range(_CAS_ATTEMPTS):
            old = self.etcd.get(key)
            state = _State.parse(old)
            state.failures = [t for t in state.failures if t > now - self.window_s]
            state.failures.append(now)
            if len(state.failures) >= self._limits[what]:
                state.locked_until = now + self.lockout_s
                state.failures = []
            lease = self._lease_for_counter()
            try:
                got = self.etcd.txn([Op.unchanged(key, old)], [Op.put(key, state.encode(), lease)])
            except RasError as exc:
                if "lease not found" not in str(exc):
                    raise
                with self._lease_lock:  # ended early (the cluster's clock): take a new one
                    self._lease = 0
                continue
            if got.succeeded:
                return max(0.0, state.locked_until - now)
        raise StateError(f"the failed logins of {name!r} change too often to be counted")

    def check(self, user: str, address: str) -> Lockout | None:
        """None if this login may be tried now; otherwise which lock refuses it."""
        now = self.clock()
        keys = (self._key(b"address", address), self._key(b"user", self._user(user)))
        got = self.etcd.txn([], [Op.get(k) for k in keys])  # one read of both
        for index, what in enumerate(("address", "user")):
            kvs = got.ranged(index)
            wait = _State.parse(kvs[0] if kvs else None).locked_until - now
            if wait > 0:
                return Lockout(what, wait)
        return None

    def failed(self, user: str, address: str) -> Lockout | None:
        """Count a failed login on the farm; the lock it starts, if it starts one."""
        now = self.clock()
        user_wait = self._count(b"user", self._user(user), now)
        address_wait = self._count(b"address", address, now)
        if address_wait > 0:
            return Lockout("address", address_wait)
        if user_wait > 0:
            return Lockout("user", user_wait)
        return None

    def succeeded(self, user: str) -> None:
        """Forget the user name's failures: a read, and a write only if there were any (a
        write is a Raft commit, and most logins follow no failure)."""
        key = self._key(b"user", self._user(user))
        if self.etcd.get(key) is not None:
            self.etcd.delete(key)

    def unlock(self, user: str) -> bool:
        """Forget the user name's failures and lock, on every broker; True if it was locked."""
        key = self._key(b"user", self._user(user))
        got = self.etcd.txn([], [Op.get(key), Op.delete(key)])
        kvs = got.ranged(0)
        return _State.parse(kvs[0] if kvs else None).locked_until > self.clock()
