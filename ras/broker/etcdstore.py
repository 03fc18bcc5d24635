"""The broker's state on etcd, shared by every broker of the farm (:class:`EtcdStore`).

Theory of operation. The same interface as :class:`ras.broker.store.SQLiteStore`, the
embedded default for one broker; with an ``[etcd]`` table in ``broker.toml`` every broker of
the farm keeps its state in one etcd cluster instead, under the configured prefix::

    users/<name>             a user: JSON of the record (the TOTP secret base64)
    totp/<name>              the last TOTP step used (its own key: a login writes it)
    secrets/<name>           a random secret, made by the first broker that needs it
    tickets/<id>             a redeemed ticket, on a lease that ends after the ticket does
    assigned/<host>          the user a Remote PC or VDI guest is assigned to on first use
    objects/<kind>/<key>     an administrator's record (group, host and its drain state, pool,
                             resource, factor rule, settings), JSON of ras.broker.model
    objects-changed          rewritten with every change of objects/: readers poll its revision

Names and keys are case-folded in the key (as SQLite's ``COLLATE NOCASE``), the record keeps
its spelling. Single use is linearizable: a ticket is redeemed by a transaction that creates
``tickets/<id>`` only if its ``create_revision`` is 0, so of two brokers redeeming the same
ticket at the same instant exactly one succeeds, whichever member each talks to; a TOTP step
is used by compare-and-swap on the ``mod_revision`` of ``totp/<name>``. A secret is created
the same way, so all brokers sign and check tickets with the same key. A Remote PC or VDI
guest is claimed the same way (:meth:`EtcdStore.claim_host`): of two users launched to it
through two brokers at the same instant, exactly one gets it.

``generation`` counts changes to the configured objects, as SQLite's does, but other brokers
change them too: :meth:`EtcdStore.follow` (a task the broker runs) reads the revision of
``objects-changed`` every ``poll_s`` and bumps ``generation`` when it moved, so a change made
on one broker is served by every broker within about a second. Writes of objects can be
*fenced* (:attr:`EtcdStore.fence`): a transaction that also checks that the primary's key
still has the revision this broker won it at, so a deposed primary's late write is refused
(``ras.broker.roles``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import typing
from typing import Any, TypeVar

import trio

from ras.broker.etcd import Etcd, EtcdConfig, Op
from ras.broker.model import MODELS
from ras.broker.store import StateError, UserRecord
from ras.config import Invalid
from ras.errors import RasError

__all__ = ["EtcdStore", "FencedOut"]

T = TypeVar("T")
log = logging.getLogger("ras.broker")

_CAS_ATTEMPTS = 50
_TICKET_GRACE_S = 60  # a redeemed ticket is remembered this long after it expired, at least
_LEASE_SLACK_S = 120  # a ticket lease outlives the latest ticket put on it by this much


class FencedOut(RasError):
    """A write refused because this broker is no longer the primary it was."""


def _fold(name: str) -> bytes:
    return name.casefold().encode()


def _user_json(user: UserRecord) -> bytes:
    secret = None if user.totp_secret is None else base64.b64encode(user.totp_secret).decode()
    body = {
        "name": user.name,
        "password_hash": user.password_hash,
        "groups": list(user.groups),
        "enabled": user.enabled,
        "totp_secret": secret,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _user(raw: bytes) -> UserRecord:
    try:
        body = json.loads(raw)
        secret = body["totp_secret"]
        return UserRecord(
            str(body["name"]),
            str(body["password_hash"]),
            tuple(str(g) for g in body["groups"]),
            bool(body["enabled"]),
            None if secret is None else base64.b64decode(secret),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"a stored user is damaged: {exc}") from None


def _kind(cls: type[Any]) -> str:
    kind = getattr(cls, "KIND", None)
    if not isinstance(kind, str) or MODELS.get(kind) is not cls:
        raise TypeError(f"{cls.__name__} is not a stored kind of record")
    return kind


def _object(cls: type[T], kind: str, raw: bytes) -> T:
    try:
        return typing.cast(T, cls.from_json(json.loads(raw)))  # type: ignore[attr-defined]
    except (ValueError, Invalid) as exc:
        raise StateError(f"a stored {kind} is damaged: {exc}") from None


class EtcdStore:
    """State in an etcd cluster, shared by the farm's brokers (thread-safe)."""

    def __init__(self, config: EtcdConfig, *, poll_s: float = 1.0) -> None:
        self.etcd = Etcd(config)
        self.prefix = config.prefix  # this farm's keys start with it
        self._prefix = config.prefix.encode()
        self.poll_s = poll_s
        self.generation = 0
        self._seen_change = -1  # mod_revision of objects-changed when last read
        self._lease_lock = threading.Lock()
        self._lease = 0
        self._lease_until = 0.0
        # (key, revision): writes of objects also check that key still has that revision
        self.fence: tuple[bytes, int] | None = None

    def key(self, *parts: str | bytes) -> bytes:
        return self._prefix + b"/".join(p.encode() if isinstance(p, str) else p for p in parts)

    # -- users ----------------------------------------------------------------------------------

    def get_user(self, name: str) -> UserRecord | None:
        kv = self.etcd.get(self.key("users", _fold(name)))
        return None if kv is None else _user(kv.value)

    def put_user(self, user: UserRecord) -> None:
        key = self.key("users", _fold(user.name))
        for _ in range(_CAS_ATTEMPTS):
            old = self.etcd.get(key)
            compare = (
                [Op.absent(key)] if old is None else [Op.mod_revision_is(key, old.mod_revision)]
            )
            ops = [Op.put(key, _user_json(user))]
            if old is None or _user(old.value).totp_secret != user.totp_secret:
                ops.append(Op.delete(self.key("totp", _fold(user.name))))  # a new secret
            if self.etcd.txn(compare, ops).succeeded:
                return
        raise StateError(f"user {user.name!r} changes too often to be written")

    def delete_user(self, name: str) -> bool:
        self.etcd.delete(self.key("totp", _fold(name)))
        return self.etcd.delete(self.key("users", _fold(name)))

    def list_users(self) -> list[UserRecord]:
        users = [_user(kv.value) for kv in self.etcd.get_prefix(self.key("users", b""))]
        return sorted(users, key=lambda u: u.name.casefold())

    def use_totp_step(self, name: str, step: int) -> bool:
        """Record that ``name`` used the one-time code of ``step``; False if that step or a
        later one was used already (compare-and-swap: one of two brokers wins)."""
        key = self.key("totp", _fold(name))
        for _ in range(_CAS_ATTEMPTS):
            old = self.etcd.get(key)
            if old is not None and int(old.value) >= step:
                return False
            compare = (
                [Op.absent(key)] if old is None else [Op.mod_revision_is(key, old.mod_revision)]
            )
            if self.etcd.txn(compare, [Op.put(key, str(step).encode())]).succeeded:
                return True
        raise StateError(f"the one-time code step of {name!r} changes too often")

    # -- secrets and single use -------------------------------------------------------------

    def secret(self, name: str, size: int = 32) -> bytes:
        """A named random secret, made by the first broker that asks, the same for all."""
        key = self.key("secrets", name)
        got = self.etcd.txn([Op.absent(key)], [Op.put(key, os.urandom(size))], [Op.get(key)])
        if got.succeeded:
            kv = self.etcd.get(key)
            assert kv is not None
            return kv.value
        return got.ranged(0)[0].value

    def _ticket_lease(self, expires: float, now: float) -> int:
        """A lease that outlives ``expires`` by the grace: one serves many tickets."""
        with self._lease_lock:
            if self._lease and self._lease_until >= expires + _TICKET_GRACE_S:
                return self._lease
            ttl = int(max(0.0, expires - now)) + _TICKET_GRACE_S + _LEASE_SLACK_S
            self._lease = self.etcd.grant(ttl)
            self._lease_until = now + ttl
            return self._lease

    def redeem_once(self, ticket_id: str, expires: float) -> bool:
        """Record a ticket as used; False if it already was, on any broker (a transaction:
        create ``tickets/<id>`` only if it does not exist). Forgotten when its lease ends."""
        key = self.key("tickets", ticket_id)
        now = time.time()
        for _ in range(2):
            lease = self._ticket_lease(expires, now)
            try:
                return self.etcd.txn([Op.absent(key)], [Op.put(key, b"1", lease)]).succeeded
            except RasError as exc:
                if "lease not found" not in str(exc):
                    raise
                with self._lease_lock:  # expired early (the cluster's clock): take a new one
                    self._lease = 0
        raise StateError("no lease for redeemed tickets")

    def was_redeemed(self, ticket_id: str) -> bool:
        """Whether ``redeem_once`` recorded ``ticket_id`` on any broker (until its lease ends)."""
        return self.etcd.get(self.key("tickets", ticket_id)) is not None

    # -- Remote PC / VDI assignments (ras.broker.assignments) ---------------------------------

    def claim_host(self, host: str, user: str, stale: int = 0) -> tuple[str, int]:
        """Make a single-user host ``user``'s, for the whole farm: (its owner afterwards, the
        revision of that owner's claim). A transaction writes ``assigned/<host>`` if it is
        absent, or names ``user`` already (a fresh claim), or is still the claim of revision
        ``stale`` (one this broker saw released), at the revision read: of two brokers claiming
        at once, one wins and the other reads the winner."""
        key = self.key("assigned", _fold(host))
        for _ in range(_CAS_ATTEMPTS):
            old = self.etcd.get(key)
            if old is not None:
                owner = old.value.decode(errors="replace")
                if owner.casefold() != user.casefold() and old.mod_revision != stale:
                    return owner, old.mod_revision
            compare = (
                [Op.absent(key)] if old is None else [Op.mod_revision_is(key, old.mod_revision)]
            )
            got = self.etcd.txn(compare, [Op.put(key, user.encode())])
            if got.succeeded:
                return user, got.revision
        raise StateError(f"the assignment of {host!r} changes too often")

    def release_host(self, host: str, revision: int) -> bool:
        """The claim of ``revision`` on ``host`` is over: delete ``assigned/<host>`` if it is
        still that claim (compare and delete: a newer claim, even the same user's, stays)."""
        key = self.key("assigned", _fold(host))
        got = self.etcd.txn([Op.mod_revision_is(key, revision)], [Op.delete(key)])
        return bool(got.succeeded)

    def assigned_hosts(self) -> dict[str, tuple[str, int]]:
        """Every claim in the store, whichever broker made it: case-folded host -> (owner,
        the claim's revision), in one read of ``assigned/``."""
        start = self.key("assigned", b"")
        return {
            kv.key[len(start) :].decode(errors="replace"): (
                kv.value.decode(errors="replace"),
                kv.mod_revision,
            )
            for kv in self.etcd.get_prefix(start)
        }

    # -- configured objects (ras.broker.model records) --------------------------------------

    def _changed(self) -> dict[str, Any]:
        return Op.put(self.key("objects-changed"), str(time.time()).encode())

    def _fenced(self) -> list[dict[str, Any]]:
        if self.fence is None:
            return []
        key, revision = self.fence
        return [Op.mod_revision_is(key, revision)]

    def get_object(self, cls: type[T], key: str) -> T | None:
        kind = _kind(cls)
        kv = self.etcd.get(self.key("objects", kind, _fold(key)))
        return None if kv is None else _object(cls, kind, kv.value)

    def put_object(self, obj: Any) -> None:
        """Create or replace ``obj`` (a record of ``MODELS``), found by its kind and key."""
        kind = _kind(type(obj))
        body = json.dumps(obj.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        key = self.key("objects", kind, _fold(obj.key))
        got = self.etcd.txn(self._fenced(), [Op.put(key, body), self._changed()])
        if not got.succeeded:
            raise FencedOut("this broker is no longer the primary: the write was refused")
        self.generation += 1

    def delete_object(self, cls: type[Any], key: str) -> bool:
        path = self.key("objects", _kind(cls), _fold(key))
        got = self.etcd.txn(
            self._fenced(),
            [Op.delete(path), self._changed()],
        )
        if not got.succeeded:
            raise FencedOut("this broker is no longer the primary: the write was refused")
        self.generation += 1
        return int(got.responses[0].get("response_delete_range", {}).get("deleted", 0)) > 0

    def list_objects(self, cls: type[T]) -> list[T]:
        """Every record of this kind, sorted by key (without regard to case)."""
        kind = _kind(cls)
        kvs = self.etcd.get_prefix(self.key("objects", kind, b""))
        return [_object(cls, kind, kv.value) for kv in kvs]

    def poll_changes(self) -> bool:
        """Read whether objects changed since last time (any broker); bumps ``generation``."""
        kv = self.etcd.get(self.key("objects-changed"))
        seen = 0 if kv is None else kv.mod_revision
        if seen != self._seen_change:
            self._seen_change = seen
            self.generation += 1
            return True
        return False

    async def follow(self) -> None:
        """Keep ``generation`` up with changes made by other brokers, until cancelled."""
        away = False
        while True:
            try:
                await trio.to_thread.run_sync(self.poll_changes)
            except RasError as exc:  # the cluster is away: keep what we have, try again
                if not away:
                    log.warning("etcd unavailable reason=%s", exc)
                away = True
            else:
                if away:
                    log.info("etcd available again")
                away = False
            await trio.sleep(self.poll_s)

    def close(self) -> None:
        pass
