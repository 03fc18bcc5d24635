"""Reports of the whole farm when several brokers share it through etcd.

Theory of operation. Each broker keeps the history of the logins and launches that went
through it in a file of its own (``ras.broker.history``): history is a bulk, append-only log,
and etcd is not a bulk store, so it never goes there row by row. A report asked of any broker
is therefore made by *fanning out*: the broker asked reads its own part, asks every other
broker of the farm for its part (``GET /api/reports/part``) over the admin API's mutual TLS,
presenting its own farm certificate, and merges the parts (``history.merge``: counts added,
users counted once). The answer names the brokers ``included`` and those ``missing`` with why
(down, refused, no answer in time): a broker that is down never makes the report fail, it makes
it say what it lacks. In time means within ``PEER_TIMEOUT_S`` and half the admin API's
``request_timeout_s``, so that the merged answer still fits in the request's own deadline; a
broker that has not answered by then is left behind (its worker thread abandoned).

Which brokers. ``roles/members`` in etcd lists only the brokers present now, so a broker that
is down would silently drop out of the report. Each broker therefore also writes one key,
``reports/brokers/<name>`` (its admin URL and when it last said so), without a lease, at start
and every hour: the farm's list of brokers that have history. An entry not refreshed for
``history_days`` is ignored (its history would be gone anyway). If etcd cannot be read, the
report is this broker's alone and says the others could not be listed.

Who may ask for a part. A part names users, so only a certificate of the farm (the admin
API's client CA) whose name is a broker in that list is let in, besides the admins.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import trio

from ras.broker.config import BrokerConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.history import History, merge
from ras.cli.adminclient import AdminClient
from ras.errors import RasError

__all__ = ["PEER_TIMEOUT_S", "FarmReports"]

log = logging.getLogger("ras.broker.reports")

PEER_TIMEOUT_S = 10.0  # at most, for another broker's part
_REFRESH_S = 3600.0


class FarmReports:
    """Reports of this broker, and of the farm's other brokers on etcd (``store``)."""

    def __init__(
        self, config: BrokerConfig, history: History, store: EtcdStore | None, admin_url: str
    ) -> None:
        self.config = config
        self.history = history
        self.store = store
        self.admin_url = admin_url

    def _key(self, name: str = "") -> bytes:
        assert self.store is not None
        return self.store.key("reports", "brokers", name)

    def announce(self) -> None:
        """Say in etcd that this broker has history and where its admin API is (blocking)."""
        if self.store is None:
            return
        body = {"url": self.admin_url, "seen": time.time()}
        self.store.etcd.put(self._key(self.config.name), json.dumps(body).encode())

    def brokers(self) -> dict[str, str]:
        """The farm's brokers with history: name -> admin URL (blocking)."""
        if self.store is None:
            return {self.config.name: self.admin_url}
        oldest = time.time() - self.config.history_days * 86400
        found = {}
        for kv in self.store.etcd.get_prefix(self._key()):
            try:
                body = json.loads(kv.value)
                name = kv.key[len(self._key()) :].decode()
                if float(body["seen"]) >= oldest:
                    found[name] = str(body["url"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                continue
        found[self.config.name] = self.admin_url
        return found

    async def run(self) -> None:
        """Announce this broker at start and every hour (retrying in a minute if etcd fails)."""
        if self.store is None:
            return
        while True:
            try:
                await trio.to_thread.run_sync(self.announce)
                wait = _REFRESH_S
            except RasError as exc:
                log.warning("reports: cannot list this broker in etcd: %s", exc)
                wait = 60.0
            await trio.sleep(wait)

    async def is_broker(self, name: str) -> bool:
        """Whether ``name`` (a farm certificate's) is a broker of this farm."""
        if self.store is None or name == self.config.name:
            return False
        try:
            return name in await trio.to_thread.run_sync(self.brokers)
        except RasError:
            return False

    async def report(self, start: float, end: float, by: str) -> dict[str, Any]:
        """The farm's report: this broker's part and every other known broker's, merged,
        with ``brokers``: ``included`` (names) and ``missing`` (name and why)."""
        me = self.config.name
        missing: list[dict[str, str]] = []
        try:
            others = await trio.to_thread.run_sync(self.brokers)
        except RasError as exc:
            others = {me: self.admin_url}
            missing.append({"name": "*", "why": f"the farm's brokers cannot be listed: {exc}"})
        others.pop(me, None)
        parts: dict[str, dict[str, Any]] = {}

        wait_s = min(PEER_TIMEOUT_S, self.config.request_timeout_s / 2)

        async def ask(name: str, url: str) -> None:
            try:
                with trio.move_on_after(wait_s) as waited:
                    parts[name] = await trio.to_thread.run_sync(
                        self._ask, url, start, end, by, wait_s, abandon_on_cancel=True
                    )
                if waited.cancelled_caught:
                    raise RasError(f"no answer within {wait_s:g} s")
            except (RasError, ValueError, KeyError, TypeError, AttributeError) as exc:
                why = str(exc) if isinstance(exc, RasError) else f"bad answer: {exc!r}"
                log.warning("reports: broker %s not included: %s", name, why)
                missing.append({"name": name, "why": why})

        async with trio.open_nursery() as nursery:
            for name, url in sorted(others.items()):
                nursery.start_soon(ask, name, url)
            parts[me] = await trio.to_thread.run_sync(self.history.part, start, end, by)
        included = sorted(parts)
        answer = merge([parts[name] for name in included])
        answer["brokers"] = {
            "included": included,
            "missing": sorted(missing, key=lambda m: m["name"]),
        }
        return answer

    def _ask(self, url: str, start: float, end: float, by: str, wait_s: float) -> dict[str, Any]:
        """Another broker's part (blocking), asked with this broker's farm certificate."""
        cfg = self.config
        api = AdminClient(
            url, cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file, timeout_s=wait_s
        )
        part = api.request(
            "GET", "reports/part", query={"from": repr(start), "to": repr(end), "by": by}
        )
        if not isinstance(part, dict) or part.get("by") != by:
            raise ValueError("not a report part")
        lacking = [f for f in ("rows", "users", "logins") if f not in part]
        if lacking:
            raise ValueError(f"a report part without {lacking[0]}")
        merge([part])  # one that does not merge is left out here, not a failed report
        return part
