"""Who a single-user host belongs to: Remote PCs and VDI guests (pure logic, in memory).

Theory of operation. A Remote PC (``kind = remote_pc``) or a VDI guest (``kind = vdi``)
takes one user at a time. It is *assigned* to a user:

- **statically**, by its host record (``assigned_user``): only that user gets it, always;
- **on first use**: the first user launched to it owns it; while they own it, nobody else is
  sent there, and a launch that finds every candidate owned by others gets a clear "in use"
  answer naming the host, not a generic "no host".

An assignment on first use is *released* when the owner's session is gone (the agent no longer
reports a session of theirs) and stays gone for the host's *keep* time: 0 (the default) frees
the host at logoff; a positive ``keep_assignment_s`` keeps it for the owner that long (they
come back to the same PC); a *persistent* pool (VDI: "persistent desktops") keeps it for
ever. A launch that never turns into a session releases the host after ``launch_grace_s``
(the client never connected), counted like a logoff from the launch.

The host's record and its pools give its policy (:func:`policy_of`): the record's
``keep_assignment_s`` if set, else persistent if any of its pools is, else the longest keep of
its pools. Pools list members themselves (``members``, "membership from a list") as well as
hosts naming their pools.

Races. Two users launching the same PC at once: the broker handles launches one at a time
(the choice and the claim run without an ``await`` between them), so the first claims it and
the second finds it owned ("in use"). Brokers sharing their state on etcd also claim the host
in the store (``Store.claim_host``, a transaction, see :class:`ras.broker.etcdstore.EtcdStore`)
before answering: a claim another broker won is *adopted* here (:meth:`Assignments.adopt`) and
the launch goes elsewhere or gets "in use". Every broker gets every agent's reports, so each
sees the owner's logoff and releases the host, in memory and in the store (:attr:`released`,
which :class:`ras.broker.catalog.Catalog` hands to the store); a claim of a host this broker
saw released replaces the stored owner only if the store still holds that very claim (its
etcd revision, ``freed``): a claim made since, even the same user's, stands.

Who a host belongs to, as the admin API shows it (:meth:`ras.broker.catalog.Catalog.owners`):
one broker alone, this memory; brokers sharing a store, the store's claim (so a host claimed
through broker A is named at broker B), unless this broker saw that very claim released, then
a session begun without a launch (every broker gets the reports), then nobody.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ras.broker.model import HostRecord, PoolRecord
from ras.protocol import HostKind

__all__ = ["SINGLE_USER", "AssignPolicy", "Assignments", "policy_of"]

SINGLE_USER = (HostKind.VDI, HostKind.REMOTE_PC)


@dataclass(frozen=True, slots=True)
class AssignPolicy:
    """A single-user host's assignment rules."""

    static_user: str = ""  # assigned to this user for good ("" : on first use)
    keep_s: float = 0.0  # kept for the owner after their session ends (math.inf: persistent)


def policy_of(
    record: HostRecord | None, pools: Iterable[PoolRecord], member_of: Iterable[str]
) -> AssignPolicy:
    """The policy of a host: its record's settings, else its pools' (``member_of``: the
    case-folded names of the pools it belongs to)."""
    wanted = set(member_of)
    mine = [p for p in pools if p.name.casefold() in wanted]
    if record is not None and record.keep_assignment_s is not None:
        keep = record.keep_assignment_s
    elif any(p.persistent for p in mine):
        keep = math.inf
    else:
        keep = max((p.keep_assignment_s for p in mine), default=0.0)
    return AssignPolicy(record.assigned_user if record is not None else "", keep)


@dataclass(slots=True)
class _Owner:
    user: str
    since: float
    seen: bool = False  # a session of the owner was reported since the claim
    free_at: float | None = None  # when the host is released; None while the owner is on it
    revision: int = 0  # the claim's revision in a shared store (0: none)


class Assignments:
    """Assignments of single-user hosts, by case-folded host name."""

    def __init__(self, launch_grace_s: float = 120.0) -> None:
        self.launch_grace_s = launch_grace_s
        self._owners: dict[str, _Owner] = {}
        # (host, claim revision) released here, for the store to release too (the catalog's)
        self.released: list[tuple[str, int]] = []
        self.freed: dict[str, int] = {}  # host -> the revision of the claim released here last

    def owner(self, host: str, policy: AssignPolicy, now: float) -> str:
        """Who ``host`` belongs to now ("" : nobody)."""
        if policy.static_user:
            return policy.static_user
        key = host.casefold()
        held = self._owners.get(key)
        if held is None:
            return ""
        if held.free_at is None and not held.seen and now - held.since > self.launch_grace_s:
            held.free_at = held.since + self.launch_grace_s + policy.keep_s  # never connected
        if held.free_at is not None and now >= held.free_at:
            del self._owners[key]
            if held.revision:
                self.released.append((key, held.revision))
                self.freed[key] = held.revision
            return ""
        return held.user

    def claimed(self, host: str) -> bool:
        """Whether this broker's owner of ``host`` came from a claim in a shared store (a
        launch here or one adopted), not from a session begun without a launch."""
        held = self._owners.get(host.casefold())
        return held is not None and held.revision != 0

    def holding(self) -> list[str]:
        """The hosts assigned on first use now (case-folded), released or not yet."""
        return list(self._owners)

    def free_for(self, host: str, user: str, policy: AssignPolicy, now: float) -> bool:
        owner = self.owner(host, policy, now)
        return not owner or owner.casefold() == user.casefold()

    def claim(self, host: str, user: str, policy: AssignPolicy, now: float) -> bool:
        """``user`` is launched to ``host``: it is theirs (False if it belongs to another)."""
        if not self.free_for(host, user, policy, now):
            return False
        if policy.static_user:
            return True
        held = self._owners.get(host.casefold())
        if held is None or held.user.casefold() != user.casefold():
            self._owners[host.casefold()] = _Owner(user, now)
        else:
            held.free_at = None
            held.since, held.seen = now, False
        return True

    def stored(self, host: str, revision: int) -> None:
        """The claim just made here is the shared store's claim of ``revision``."""
        held = self._owners.get(host.casefold())
        if held is not None:
            held.revision = revision
        self.freed.pop(host.casefold(), None)

    def adopt(self, host: str, user: str, revision: int, now: float) -> None:
        """``host`` was claimed by ``user`` through another broker (the shared store said so,
        claim ``revision``): theirs here too, released as if launched here now."""
        self._owners[host.casefold()] = _Owner(user, now, revision=revision)
        self.freed.pop(host.casefold(), None)

    def reported(self, host: str, users: Iterable[str], policy: AssignPolicy, now: float) -> None:
        """The users with a session on ``host`` now, from its agent's report."""
        present = {u.casefold() for u in users}
        key = host.casefold()
        held = self._owners.get(key)
        if held is None:
            if present and not policy.static_user:  # someone logged in without a launch
                first = sorted(present)[0]
                self._owners[key] = _Owner(first, now, seen=True)
            return
        if held.user.casefold() in present:
            held.seen, held.free_at = True, None
        elif held.seen and held.free_at is None:  # the owner's session ended: keep, or free
            held.free_at = now + policy.keep_s

    def held(self, policies: Mapping[str, AssignPolicy], now: float) -> dict[str, str]:
        """host -> owner for every assigned host (for the admin API)."""
        out = {}
        for key in list(self._owners):
            owner = self.owner(key, policies.get(key, AssignPolicy()), now)
            if owner:
                out[key] = owner
        for key, policy in policies.items():
            if policy.static_user:
                out[key] = policy.static_user
        return out
