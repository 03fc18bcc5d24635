"""What the broker publishes and where it may go: the catalogue and placement.

The published resources, hosts, pools, groups and factor rules come from ``broker.toml`` and
from the store (the admin API); the store's are re-read whenever it changed
(``Store.generation``). :class:`Catalog` answers what a login may see, which host a launch
goes to, what the client is told to start, and whether a gateway may redeem a ticket issued
through another. What the broker decides and why is in ``docs/broker.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from ras.broker import policy
from ras.broker.assignments import SINGLE_USER, Assignments, AssignPolicy, policy_of
from ras.broker.config import BrokerConfig
from ras.broker.hosts import Choice, HostRegistry
from ras.broker.model import (
    FactorRule,
    GroupRecord,
    HostKind,
    HostRecord,
    PoolRecord,
    ResourceRecord,
    TicketScope,
)
from ras.broker.sessions import SessionTable
from ras.broker.store import Store
from ras.errors import RasError, TicketError
from ras.protocol import AppStart

__all__ = ["Catalog", "Configured", "User"]

log = logging.getLogger("ras.broker")

_CLAIM_ROUNDS = 4  # choices made again when other brokers won the chosen host's claim
_RELEASE_EVERY_S = 2.0


@dataclass(slots=True)
class User:
    """A logged-in user: the directory's name and the groups the farm counts."""

    name: str
    groups: tuple[str, ...]
    # the login this is: the id its resume tokens share, revoked at logout ("" without resume)
    login: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Configured:
    """What the administrator configured, from broker.toml and the store, at one moment."""

    resources: tuple[ResourceRecord, ...]  # broker.toml's first, then the store's
    origins: dict[str, str]  # resource id (case-folded) -> "config" or "store"
    groups: tuple[GroupRecord, ...]
    hosts: tuple[HostRecord, ...]
    pools: tuple[PoolRecord, ...]
    rules: tuple[FactorRule, ...]
    pool_members: dict[str, list[str]] = field(default_factory=dict)


class Catalog:
    """broker.toml's and the store's publishing, and the choice of a host for a launch."""

    def __init__(
        self, config: BrokerConfig, store: Store, hosts: HostRegistry, sessions: SessionTable
    ) -> None:
        self.config = config
        self.store = store
        self.hosts = hosts
        self.sessions = sessions
        # Remote PCs and VDI guests: who each belongs to (a launch never connected frees it
        # after as long as a launching session is kept)
        self.assignments = Assignments(launch_grace_s=sessions.launch_timeout_s)
        self._config_resources = tuple(r.record() for r in config.resources)
        self.config_rules = tuple(r.rule() for r in config.factor_rules)
        self._generation = -1
        self._configured = self._load()

    def _load(self) -> Configured:
        generation = self.store.generation
        stored = tuple(self.store.list_objects(ResourceRecord))
        config_ids = {r.id.casefold() for r in self._config_resources}
        origins = {r.id.casefold(): "config" for r in self._config_resources}
        extra = tuple(r for r in stored if r.id.casefold() not in config_ids)
        origins.update({r.id.casefold(): "store" for r in extra})
        hosts = tuple(self.store.list_objects(HostRecord))
        self.hosts.configure(hosts)
        pools = tuple(self.store.list_objects(PoolRecord))
        members: dict[str, list[str]] = {}
        for host in hosts:
            for pool in host.pools:
                members.setdefault(pool.casefold(), []).append(host.name)
        for listed in pools:  # membership from the pool's own list
            known = members.setdefault(listed.name.casefold(), [])
            known += [m for m in listed.members if m.casefold() not in map(str.casefold, known)]
        self._generation = generation
        return Configured(
            resources=self._config_resources + extra,
            origins=origins,
            groups=tuple(self.store.list_objects(GroupRecord)),
            hosts=hosts,
            pools=pools,
            rules=tuple(self.store.list_objects(FactorRule)),
            pool_members=members,
        )

    def configured(self) -> Configured:
        """The configuration now (re-read from the store when it changed since last time)."""
        if self.store.generation != self._generation:
            self._configured = self._load()
        return self._configured

    def resources(self) -> list[ResourceRecord]:
        """Every published resource: broker.toml's (read-only), then the store's."""
        return list(self.configured().resources)

    def resource_origins(self) -> dict[str, str]:
        """Where each resource comes from: case-folded id -> "config" or "store"."""
        return dict(self.configured().origins)

    def visible(
        self, user: User, client: str | None = None, gateway: str | None = None
    ) -> list[ResourceRecord]:
        """What this login may see. An unknown ``client`` or ``gateway`` (None) fails every
        filter that names client networks or gateways."""
        return policy.visible(
            self.configured().resources, user.name, user.groups, client or "", gateway or ""
        )

    def choose_host(self, resource: ResourceRecord, user: str, *, dry_run: bool = False) -> Choice:
        """The host for ``user``'s launch of ``resource`` (counted as used unless dry_run).
        Remote PCs and VDI guests another user owns are left out; one the user owns comes
        first; the one chosen becomes theirs (ras/broker/assignments.py)."""
        cfg = self.configured()
        place = policy.placement(resource, cfg.pools, cfg.pool_members, self.config.balancing)
        now = time.monotonic()
        names = place.hosts
        affinity = self.sessions.affinity(user, self.hosts.kinds)
        wanted = None if names is None else {n.casefold() for n in names}
        taken: list[str] = []
        mine: list[tuple[str, str]] = []
        for name, kind in self.hosts.single_user.items():
            if wanted is not None and name.casefold() not in wanted:
                continue
            owner = self.assignments.owner(name, self.assign_policy(name), now)
            if owner.casefold() == user.casefold():
                mine.append((name, f"assigned to you: {kind} {name}"))
            elif owner:
                taken.append(name)
        if taken:
            out = {t.casefold() for t in taken}
            pool = names if names is not None else tuple(self.hosts.hosts)
            names = tuple(n for n in pool if n.casefold() not in out)
        choice = self.hosts.choose(
            now,
            names,
            method=place.method,
            turn_key=place.turn_key,
            affinity=[*mine, *affinity],
            dry_run=dry_run,
        )
        if choice.host is None and taken:
            what = ", ".join(sorted(taken)[:3]) + (" ..." if len(taken) > 3 else "")
            why = f"in use: {what} {'is' if len(taken) == 1 else 'are'} another user's"
            return Choice(None, "in_use", why, choice.candidates)
        host = choice.host
        if not dry_run and host is not None and host.kind in SINGLE_USER:
            self.assignments.claim(host.name, user, self.assign_policy(host.name), now)
        return choice

    async def launch_host(self, resource: ResourceRecord, user: str) -> Choice:
        """:meth:`choose_host` for a launch, with a Remote PC's or VDI guest's claim made for
        the whole farm: the store decides between brokers (``Store.claim_host``; one broker
        alone, its memory). A host another broker gave someone else meanwhile is adopted as
        theirs and the choice made again, so the user gets another host or "in use"."""
        await self.release_hosts()
        for _ in range(_CLAIM_ROUNDS):
            choice = self.choose_host(resource, user)
            host = choice.host
            if host is None or host.kind not in SINGLE_USER:
                return choice
            name = host.name
            if self.assign_policy(name).static_user:
                return choice
            stale = self.assignments.freed.get(name.casefold(), 0)
            owner, revision = await trio.to_thread.run_sync(
                self.store.claim_host, name, user, stale
            )
            if owner.casefold() == user.casefold():
                self.assignments.stored(name, revision)
                return choice
            log.info("host claimed through another broker host=%s owner=%s", name, owner)
            self.assignments.adopt(name, owner, revision, time.monotonic())
            if choice.method != "affinity":
                host.pending = max(0, host.pending - 1)
        return Choice(None, "in_use", "in use: every candidate is another user's", [])

    async def owners(self, names: Iterable[str]) -> dict[str, str]:
        """Who each single-user host of ``names`` belongs to now, for the admin view
        (case-folded name -> owner, "" if free). One broker: its memory. Brokers sharing the
        store: the farm's claims there (whichever broker made them), except one this broker
        saw released; a static assignment; else the owner of a session begun without a launch
        (reported to every broker). Blocks on the store in a worker thread."""
        now = time.monotonic()
        names = list(names)
        # asked first: what this broker's memory lets go (released hosts) happens here
        local = {n.casefold(): self.assignments.owner(n, self.assign_policy(n), now) for n in names}
        shared = await trio.to_thread.run_sync(self.store.assigned_hosts)
        if shared is None:
            return local
        out: dict[str, str] = {}
        for name in names:
            key = name.casefold()
            policy = self.assign_policy(name)
            owner, revision = shared.get(key, ("", 0))
            if policy.static_user:
                out[key] = policy.static_user
            elif owner and revision != self.assignments.freed.get(key):
                out[key] = owner
            elif self.assignments.claimed(key):
                out[key] = ""  # this broker's claim is no longer the store's: released
            else:
                out[key] = local[key]
        return out

    async def release_hosts(self) -> None:
        """Release in the store the hosts this broker saw released (best effort: a release
        that fails is left for a later claim, which replaces the owner it saw released)."""
        released, self.assignments.released = self.assignments.released, []
        for name, revision in released:
            try:
                await trio.to_thread.run_sync(self.store.release_host, name, revision)
            except RasError as exc:
                log.warning("assignment not released host=%s reason=%s", name, exc)

    async def run(self) -> None:
        """Release hosts whose owners left, every few seconds, until cancelled."""
        while True:
            for name in self.assignments.holding():  # frees those whose time is up
                self.assignments.owner(name, self.assign_policy(name), time.monotonic())
            await self.release_hosts()
            await trio.sleep(_RELEASE_EVERY_S)

    def start_for(self, resource: ResourceRecord) -> AppStart:
        """How the resource's hosts start programs, for an .rdp file made before a host is
        chosen: RemoteApp when every registered candidate is a RemoteApp host."""
        cfg = self.configured()
        place = policy.placement(resource, cfg.pools, cfg.pool_members, self.config.balancing)
        wanted = None if place.hosts is None else {n.casefold() for n in place.hosts}
        starts = {
            h.apps for h in self.hosts.hosts.values()
            if wanted is None or h.name.casefold() in wanted
        }  # fmt: skip
        return AppStart.REMOTEAPP if starts == {AppStart.REMOTEAPP} else AppStart.SHELL

    def assign_policy(self, host: str) -> AssignPolicy:
        """A Remote PC's or VDI guest's assignment rules, from its record and its pools."""
        cfg = self.configured()
        folded = host.casefold()
        record = next((h for h in cfg.hosts if h.name.casefold() == folded), None)
        member_of = [
            p for p, names in cfg.pool_members.items() if folded in map(str.casefold, names)
        ]
        return policy_of(record, cfg.pools, member_of)

    def sessions_reported(self, host: str, users: list[str]) -> None:
        """An agent reported who has a session on ``host`` (assignments follow logoffs)."""
        if self.hosts.kinds.get(host) in SINGLE_USER:
            self.assignments.reported(host, users, self.assign_policy(host), time.monotonic())

    def check_redeeming_gateway(self, issued_via: str, resource: str, gateway: str) -> None:
        """A ticket or routing token issued through ``issued_via`` redeemed through ``gateway``
        (``TicketError`` if not allowed): with ``ticket_scope = "farm"`` any gateway of the farm
        may, so long as the resource is still published through it."""
        if issued_via == gateway:
            return
        if self.config.ticket_scope is TicketScope.GATEWAY:
            raise TicketError(f"it was issued through gateway {issued_via!r}")
        record = next((r for r in self.configured().resources if r.id == resource), None)
        if record is None or not record.enabled:
            raise TicketError(f"resource {resource!r} is no longer published")
        if not record.filter.allows_gateway(gateway):
            raise TicketError(f"resource {resource!r} is not published through this gateway")

    async def drain_host(self, name: str, drained: bool) -> HostRecord:
        """Drain (no new sessions; users still reconnect to theirs) or undrain a host."""
        record = await trio.to_thread.run_sync(self.store.get_object, HostRecord, name)
        live = next(
            (h for h in self.hosts.hosts.values() if h.name.casefold() == name.casefold()), None
        )
        if record is None:
            kind = live.kind if live is not None else HostKind.RDSH
            record = HostRecord(live.name if live is not None else name, kind)
        record = dataclasses.replace(record, drained=drained)
        await trio.to_thread.run_sync(self.store.put_object, record)
        log.info("host %s name=%s", "drained" if drained else "undrained", record.name)
        return record
