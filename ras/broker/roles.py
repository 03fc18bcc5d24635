"""Broker roles on etcd: one primary takes administration; every broker serves users.

Theory of operation. Every broker of a farm on etcd serves logins, launches, agents and
redemptions (their state is shared). Only the *primary* takes admin writes and farm settings;
the others answer them with a redirect naming the primary. Keys under the farm's prefix:

    roles/members/<name>   each broker's presence (priority, admin URL) on its own lease
    roles/designated       the broker that should be primary (written by promotion)
    roles/home             the primary before an automatic promotion (for failback)
    roles/primary          the primary's name, on the primary's lease

The designated broker holds ``roles/primary`` on a lease of ``primary_lease_s`` it refreshes
every third of it; it is primary from the revision at which it created the key, and every
write of configured objects it makes is a transaction that also checks the key still has that
revision (``EtcdStore.fence``). If its lease ends (the process died, or it lost the cluster:
a partition), the key goes with it, and a late write of the old primary is refused by etcd
itself, whatever the old primary believes: it steps down as soon as its refresh fails.

Promotion. ``ras admin broker promote NAME`` (any broker takes it) writes ``designated`` and
deletes ``primary``, deposing the old primary at once; NAME takes the key at its next tick.
Automatic promotion: when ``roles/primary`` has been vacant for ``auto_promote_after_s``
(default 30 minutes, 15 minutes to 72 hours), the live broker with the best priority (the
lowest number, then the name) promotes itself, if auto-promotion is on and at most three
brokers are members (as the guide has it). With ``failback``, a primary that was promoted
automatically hands the role back to the former primary (``roles/home``) once it is back.

One broker on SQLite has no roles: it is always the primary.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import trio

from ras.broker.etcd import Op
from ras.broker.etcdstore import EtcdStore
from ras.config import Invalid, check_positive
from ras.errors import RasError

__all__ = ["AUTO_PROMOTE_MAX", "BrokerInfo", "Roles", "RolesConfig"]

log = logging.getLogger("ras.broker")

AUTO_PROMOTE_MAX = 3  # brokers at most for automatic promotion (the guide's limit)


@dataclass(frozen=True, slots=True)
class RolesConfig:
    """The ``[roles]`` table of ``broker.toml`` (with ``[etcd]`` only)."""

    priority: int = 1  # lower first: the order in which secondaries are promoted
    auto_promote: bool = True
    auto_promote_after_s: float = 1800.0
    failback: bool = False
    primary_lease_s: float = 10.0
    admin_url: str = ""  # how admins reach this broker's API (for redirects); "" = https://name

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 1000:
            raise Invalid("priority", "must be between 0 and 1000")
        if not 900 <= self.auto_promote_after_s <= 259200 or math.isnan(self.auto_promote_after_s):
            raise Invalid("auto_promote_after_s", "must be from 900 (15 min) to 259200 (72 h)")
        check_positive("primary_lease_s", self.primary_lease_s)
        if not 3 <= self.primary_lease_s <= 120:
            raise Invalid("primary_lease_s", "must be from 3 to 120")


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    name: str
    priority: int
    admin_url: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "priority": self.priority, "admin_url": self.admin_url}


class Roles:
    """This broker's role; ``run`` keeps it (a task of the broker's)."""

    def __init__(
        self,
        name: str,
        store: EtcdStore,
        config: RolesConfig,
        *,
        admin_url: str,
    ) -> None:
        self.name = name
        self.store = store
        self.config = config
        self.me = BrokerInfo(name, config.priority, config.admin_url or admin_url)
        self.primary = ""  # the primary's name as last seen ("" none)
        self.is_primary = False
        self.changed = trio.Event()  # set (and replaced) by ``run`` whenever the role changes
        self._lease = 0
        self._member_lease = 0
        self._vacant_since: float | None = None

    def _key(self, *parts: str) -> bytes:
        return self.store.key("roles", *parts)

    # -- what others ask ------------------------------------------------------------------

    def members(self) -> list[BrokerInfo]:
        """The brokers present now (a blocking call: run it in a thread)."""
        out = []
        for kv in self.store.etcd.get_prefix(self._key("members", "")):
            try:
                body = json.loads(kv.value)
                out.append(BrokerInfo(str(body["name"]), int(body["priority"]), str(body["url"])))
            except (ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda b: (b.priority, b.name.casefold()))

    def status(self) -> dict[str, object]:
        """Who is primary and who is there (blocking)."""
        members = self.members()
        primary = self.store.etcd.get(self._key("primary"))
        designated = self.store.etcd.get(self._key("designated"))
        name = primary.value.decode() if primary is not None else ""
        return {
            "self": self.name,
            "primary": name,
            "designated": designated.value.decode() if designated is not None else "",
            "auto_promote": self.config.auto_promote and len(members) <= AUTO_PROMOTE_MAX,
            "auto_promote_after_s": self.config.auto_promote_after_s,
            "brokers": [
                b.to_json() | {"role": "primary" if b.name == name else "secondary"}
                for b in members
            ],
        }

    def primary_url(self) -> str:
        """The admin URL of the primary ("" if there is none now; blocking)."""
        for member in self.members():
            if member.name == self.primary:
                return member.admin_url
        return ""

    def promote(self, name: str) -> None:
        """Make ``name`` the primary: designate it and depose the current one (blocking).
        ``LookupError`` if no such broker is present."""
        if name.casefold() not in {m.name.casefold() for m in self.members()}:
            raise LookupError(f"no broker {name!r} is present")
        self.store.etcd.txn(
            [], [Op.put(self._key("designated"), name.encode()), Op.delete(self._key("primary"))]
        )
        log.warning("broker promote name=%s by=%s", name, self.name)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep this broker's presence and role, until cancelled (then step down)."""
        every = self.config.primary_lease_s / 3
        try:
            while True:
                before = (self.is_primary, self.primary)
                try:
                    await trio.to_thread.run_sync(self._tick, trio.current_time())
                except RasError as exc:  # lost the cluster: no longer primary, whatever we hold
                    log.warning("roles: etcd unavailable reason=%s", exc)
                    self._lost()
                    self._member_lease = 0
                if (self.is_primary, self.primary) != before:
                    self.changed.set()  # here, on the trio thread (the tick ran in a worker)
                    self.changed = trio.Event()
                await trio.sleep(every)
        finally:
            with trio.CancelScope(shield=True):
                if self.is_primary:
                    await trio.to_thread.run_sync(self._resign)
                self._set(False, "")
                self.changed.set()
                self.changed = trio.Event()

    def _set(self, primary: bool, name: str) -> None:
        if (primary, name) != (self.is_primary, self.primary):
            self.is_primary, self.primary = primary, name
            role = "primary" if primary else "secondary"
            log.warning("broker role=%s name=%s primary=%s", role, self.name, name or "-")

    def _lost(self) -> None:
        """Our lease is gone: writes are fenced already (the key's revision moved)."""
        if self.is_primary:
            log.warning("broker lost the primary role name=%s (lease ended)", self.name)
        self._lease = 0
        self._set(False, "")

    def _resign(self) -> None:
        try:
            if self._lease:
                self.store.etcd.revoke(self._lease)
        except RasError:
            pass

    def _tick(self, now: float) -> None:
        etcd = self.store.etcd
        ttl = max(3, int(self.config.primary_lease_s))
        if not self._member_lease or etcd.keep_alive(self._member_lease) <= 0:
            self._member_lease = etcd.grant(ttl)
        body = json.dumps(
            {"name": self.name, "priority": self.me.priority, "url": self.me.admin_url}
        ).encode()
        etcd.put(self._key("members", self.name.casefold()), body, self._member_lease)
        if self._lease and etcd.keep_alive(self._lease) <= 0:
            self._lost()
        primary = etcd.get(self._key("primary"))
        if primary is not None:
            self._vacant_since = None
            name = primary.value.decode()
            mine = name == self.name and primary.lease == self._lease and self._lease != 0
            if not mine and self.is_primary:
                self._lost()  # deposed (promotion) while our lease lives
            if mine and self._failed_back():
                self._lost()
                return
            self._set(mine, name)
            return
        if self.is_primary:
            self._lost()
        designated = etcd.get(self._key("designated"))
        target = designated.value.decode() if designated is not None else ""
        if target.casefold() == self.name.casefold() or not target:
            self._take(first=not target)
            return
        if self._vacant_since is None:
            self._vacant_since = now
        self._set(False, "")
        if self._may_auto_promote(now):
            log.warning(
                "broker auto-promotion name=%s after=%.0fs without a primary (was %s)",
                self.name, now - self._vacant_since, target,
            )  # fmt: skip
            etcd.txn(
                [Op.absent(self._key("primary"))],
                [
                    Op.put(self._key("designated"), self.name.encode()),
                    Op.put(self._key("home"), target.encode()),
                ],
            )
            self._take(first=False)

    def _may_auto_promote(self, now: float) -> bool:
        if not self.config.auto_promote or self._vacant_since is None:
            return False
        if now - self._vacant_since < self.config.auto_promote_after_s:
            return False
        members = self.members()
        if len(members) > AUTO_PROMOTE_MAX or not members:
            return False
        return members[0].name == self.name  # the best priority present promotes itself

    def _take(self, *, first: bool) -> None:
        """Try to become primary: create ``roles/primary`` on a new lease (first one wins)."""
        etcd = self.store.etcd
        lease = etcd.grant(max(3, int(self.config.primary_lease_s)))
        key = self._key("primary")
        ops = [Op.put(key, self.name.encode(), lease)]
        if first:
            ops.append(Op.put(self._key("designated"), self.name.encode()))
        got = etcd.txn([Op.absent(key)], ops)
        if not got.succeeded:
            etcd.revoke(lease)
            return
        self._lease = lease
        self.store.fence = (key, got.revision)  # our writes hold while the key is ours
        self._vacant_since = None
        self._set(True, self.name)

    def _failed_back(self) -> bool:
        """Hand the role back to the former primary once it is present, with failback."""
        if not self.config.failback:
            return False
        home = self.store.etcd.get(self._key("home"))
        if home is None:
            return False
        name = home.value.decode()
        if name.casefold() == self.name.casefold():
            return False
        if name.casefold() not in {m.name.casefold() for m in self.members()}:
            return False
        log.warning("broker failback to=%s from=%s", name, self.name)
        self.store.etcd.txn(
            [],
            [
                Op.put(self._key("designated"), name.encode()),
                Op.delete(self._key("home")),
                Op.delete(self._key("primary")),
            ],
        )
        return True
