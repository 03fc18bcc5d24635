"""Launches made through one broker, known to the other brokers of a farm on etcd.

Theory of operation. Agents report to every broker, so every broker's view of hosts and
sessions is complete from the next report on (every few seconds). What a report cannot carry
is a launch still in flight: the broker sent a user to a host and the client has not logged
on yet. Until the agent reports that session, only the broker that made the launch knew it:
another broker would not count it on the host's load (a burst through two brokers piles on
one host), and its admin view missed the launch, then showed the session without its
resource, gateway and client.

So each launch is also written to etcd, ``launches/<session id>`` (JSON of the
:class:`ras.broker.model.SessionRecord` and the broker's name), on a lease that ends after
``launch_timeout_s``. :meth:`SharedLaunches.run` writes this broker's launches as they come
and reads the others' every ``poll_s``; a launch from another broker enters this broker's
:class:`ras.broker.sessions.SessionTable` as a launching session (then the agent's report
takes it over as usual) and counts as pending on its host (a Remote PC or VDI guest is
claimed in the store at the launch: ``assigned/<host>``, ``Catalog.launch_host``). etcd
away: launches go on (they do not need it); the others learn them from reports.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import trio

from ras.broker.assignments import SINGLE_USER
from ras.broker.catalog import Catalog
from ras.broker.etcd import Op
from ras.broker.etcdstore import EtcdStore
from ras.broker.model import SessionRecord
from ras.errors import RasError

__all__ = ["SharedLaunches"]

log = logging.getLogger("ras.broker")

_LEASE_SLACK_S = 30
_BATCH = 100  # puts per transaction (etcd takes at most 128 operations in one)


class SharedLaunches:
    """This broker's launches to etcd, the other brokers' into its own tables."""

    def __init__(
        self, name: str, store: EtcdStore, catalog: Catalog, *, poll_s: float = 1.0
    ) -> None:
        self.name = name
        self.store = store
        self.catalog = catalog
        self.poll_s = poll_s
        self._prefix = store.prefix.encode() + b"launches/"
        self._outbox: list[SessionRecord] = []
        self._wake = trio.Event()
        self._seen: set[str] = set()  # ids of others' launches already taken in
        self._lease = 0
        self._lease_until = 0.0  # time.monotonic()

    def launched(self, record: SessionRecord) -> None:
        """A launch made here (called on the trio thread; written by :meth:`run`)."""
        self._outbox.append(record)
        self._wake.set()

    def _lease_for_launch(self) -> int:
        keep = self.catalog.sessions.launch_timeout_s
        now = time.monotonic()
        if self._lease and self._lease_until - now >= keep:
            return self._lease
        ttl = math.ceil(keep) + _LEASE_SLACK_S
        self._lease = self.store.etcd.grant(ttl)
        self._lease_until = now + ttl
        return self._lease

    def publish(self, records: list[SessionRecord]) -> None:
        """Write launches made here (blocking: a worker thread), up to ``_BATCH`` in one
        transaction: one Raft commit for the launches of a poll interval, not one each."""
        for start in range(0, len(records), _BATCH):
            puts = []
            for record in records[start : start + _BATCH]:
                body = {"broker": self.name, "session": record.to_json()}
                value = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
                puts.append((self._prefix + record.id.encode(), value))
            for _ in range(2):
                lease = self._lease_for_launch()
                try:
                    self.store.etcd.txn([], [Op.put(k, v, lease) for k, v in puts])
                    break
                except RasError as exc:
                    if "lease not found" not in str(exc):
                        raise
                    self._lease = 0  # ended early (the cluster's clock): take a new one

    def read(self) -> list[SessionRecord]:
        """The launches other brokers made, still in flight (blocking: a worker thread)."""
        out: list[SessionRecord] = []
        for kv in self.store.etcd.get_prefix(self._prefix):
            try:
                body: dict[str, Any] = json.loads(kv.value)
                if body["broker"] != self.name:
                    out.append(SessionRecord.from_json(body["session"]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("shared launch unreadable key=%r reason=%s", kv.key, exc)
        return out

    def take_in(self, records: list[SessionRecord]) -> int:
        """Add other brokers' launches to this broker's tables; how many were new."""
        sessions, hosts = self.catalog.sessions, self.catalog.hosts
        now = time.time()
        new = 0
        for record in records:
            if record.id in self._seen or now - record.since > sessions.launch_timeout_s:
                continue
            new += 1
            if sessions.get(record.id) is None:
                sessions.launched(
                    user=record.user, host=record.host, resource=record.resource,
                    gateway=record.gateway, client=record.client, now=record.since,
                    session=record.id, kind=record.kind,
                )  # fmt: skip
            host = hosts.hosts.get(record.host)
            # a Remote PC or VDI guest: its claim in the store decides (Catalog.launch_host)
            if host is not None and host.kind not in SINGLE_USER:
                host.pending += 1  # until the agent's next report counts it
                host.refresh()
        self._seen = {r.id for r in records}  # forget those whose lease ended
        return new

    async def run(self) -> None:
        """Write this broker's launches as they come (what came while a write was under way
        goes in the next one), read the others' every ``poll_s``, until cancelled."""
        away = False
        next_read = 0.0
        while True:
            with trio.move_on_at(next_read):
                await self._wake.wait()
            self._wake = trio.Event()
            outbox, self._outbox = self._outbox, []
            reading = trio.current_time() >= next_read
            try:
                if outbox:
                    await trio.to_thread.run_sync(self.publish, outbox)
                others = await trio.to_thread.run_sync(self.read) if reading else None
            except RasError as exc:
                if not away:
                    log.warning("shared launches unavailable reason=%s", exc)
                away = True
                next_read = trio.current_time() + self.poll_s
                continue
            if away:
                log.info("shared launches available again")
            away = False
            if others is not None:
                self.take_in(others)
                next_read = trio.current_time() + self.poll_s
