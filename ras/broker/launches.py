"""Launches and their tickets: the host for a launch, the ticket a gateway redeems, and why.

A launch picks a host (:meth:`Catalog.choose_host`), counts the session as launching, and,
for a tunnelled mode, issues a launch ticket bound to the user, the resource, the host, the
gateway, the client and a short expiry. A gateway redeems the ticket once (the store's
``redeem_once``) before it opens the tunnel to the host the ticket names, and to no other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from ras.broker import policy
from ras.broker.catalog import Catalog, User
from ras.broker.config import BrokerConfig
from ras.broker.directory import Directory, DirectoryUnavailable
from ras.broker.history import History
from ras.broker.hosts import HostRegistry
from ras.broker.model import SessionRecord
from ras.broker.programs import program_fields
from ras.broker.sessions import SessionTable
from ras.broker.store import Store
from ras.broker.tickets import TicketAuthority, new_session_id
from ras.errors import ErrorCode, RasError, TicketError
from ras.ops.metrics import (
    BROKER_LAUNCH_SECONDS,
    BROKER_LAUNCHES,
    BROKER_PLACEMENTS,
    BROKER_TICKETS,
    ticket_reason,
)
from ras.protocol import Launch, LaunchOk, Message, Mode, RedeemTicket, TicketOk

__all__ = ["Launches"]

log = logging.getLogger("ras.broker")


class Launches:
    """Launch requests, ticket redemptions and the dry run of a launch (``explain``)."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        catalog: Catalog,
        directory: Directory,
        tickets: TicketAuthority,
        history: History | None = None,
    ) -> None:
        self.config = config
        self.history = history
        self.store = store
        self.catalog = catalog
        self.hosts: HostRegistry = catalog.hosts
        self.sessions: SessionTable = catalog.sessions
        self.directory = directory
        self.tickets = tickets
        self.web_tickets = TicketAuthority(store.secret("web-launch-key"), web=True)
        # told of each launching session (several brokers: ras.broker.launchshare)
        self.on_launch: Callable[[SessionRecord], None] | None = None

    async def launch(
        self, msg: Launch, user: User, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        """A launch, counted (``ras_broker_launches_total``, its latency) and, when it goes
        somewhere, recorded for reports (``ras.broker.history``)."""
        started = time.perf_counter()
        answer = await self._launch(msg, user, client, gateway)
        BROKER_LAUNCH_SECONDS.observe(time.perf_counter() - started)
        if isinstance(answer, tuple):
            result = "no_host" if answer[0] is ErrorCode.NO_HOST else "not_found"
        else:
            result = "ok"
        BROKER_LAUNCHES.labels(result, msg.mode).inc()
        return answer

    async def _launch(
        self, msg: Launch, user: User, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        resource = next(
            (r for r in self.catalog.visible(user, client, gateway) if r.id == msg.resource), None
        )
        if resource is None:
            return ErrorCode.NOT_FOUND, f"no resource {msg.resource!r} is published to you"
        now = time.time()
        choice = await self.catalog.launch_host(resource, user.name)
        host = choice.host
        BROKER_PLACEMENTS.labels(choice.method if host is not None else "none").inc()
        if host is None:
            if choice.method == "in_use":  # a Remote PC or VDI guest that is someone else's
                log.warning(
                    "launch failed user=%s resource=%s reason=%s", user.name, resource.id,
                    choice.why,
                )  # fmt: skip
                return ErrorCode.NO_HOST, f"{choice.why}; try again when it is free"
            log.warning(
                "launch failed user=%s resource=%s reason=no host available", user.name, resource.id
            )
            return ErrorCode.NO_HOST, "no host is available for this resource right now"
        session = new_session_id()
        ticket = ""
        web = msg.mode is Mode.WEB
        if msg.mode.tunnelled or web:
            BROKER_TICKETS.labels("issued", "").inc()
            ticket, _ = (self.web_tickets if web else self.tickets).issue(
                user=user.name,
                resource=resource.id,
                host=host.rdp_host,
                port=host.rdp_port,
                gateway=gateway,
                client=client,
                now=now,
                ttl_s=self.config.ticket_ttl_s,
                session=session,
                pin=host.rdp_cert_sha256 if web else "",
            )
        if choice.method != "affinity":
            record = self.sessions.launched(
                user=user.name, host=host.name, resource=resource.id, gateway=gateway,
                client=client, now=now, session=session, kind="web" if web else "native",
            )  # fmt: skip
            if self.on_launch is not None:
                self.on_launch(record)
        if self.history is not None:
            self.history.launch(
                session=session, user=user.name, resource=resource.id, host=host.name,
                gateway=gateway, mode=str(msg.mode),
            )  # fmt: skip
        log.info(
            "launch user=%s resource=%s host=%s rdp=%s:%d mode=%s client=%s gateway=%s "
            "session=%s score=%.3f why=%s",
            user.name, resource.id, host.name, host.rdp_host, host.rdp_port, msg.mode, client,
            gateway, session, host.score, choice.why,
        )  # fmt: skip
        return LaunchOk(
            msg.mode, host.rdp_host, host.rdp_port, ticket, int(self.config.ticket_ttl_s),
            **program_fields(resource, self.catalog.configured().resources, host.apps),
            session=session,
        )  # fmt: skip

    async def redeem(
        self, msg: RedeemTicket, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        try:
            claims = (self.web_tickets if msg.web else self.tickets).verify(
                msg.ticket, now=time.time()
            )
            self.catalog.check_redeeming_gateway(claims.gateway, claims.resource, gateway)
            if claims.client != client:
                raise TicketError(f"ticket was issued to client {claims.client}")
            if not await trio.to_thread.run_sync(self.store.redeem_once, claims.id, claims.expires):
                raise TicketError("ticket was already used")
        except TicketError as exc:
            BROKER_TICKETS.labels("refused", ticket_reason(str(exc))).inc()
            log.warning("ticket refused client=%s gateway=%s reason=%s", client, gateway, exc)
            return ErrorCode.TICKET_INVALID, "ticket is not valid"
        except RasError as exc:  # a shared store (etcd) out of reach: the ticket stays unused
            log.error("ticket not redeemed client=%s gateway=%s reason=%s", client, gateway, exc)
            return ErrorCode.UNAVAILABLE, "the farm's state cannot be reached; try again"
        BROKER_TICKETS.labels("redeemed", "").inc()
        log.info(
            "ticket redeemed user=%s resource=%s rdp=%s:%d client=%s gateway=%s "
            "issued_via=%s session=%s",
            claims.user,
            claims.resource,
            claims.host,
            claims.port,
            client,
            gateway,
            claims.gateway,
            claims.session or "-",
        )
        return TicketOk(
            claims.host, claims.port, claims.user, claims.resource, claims.session, claims.pin
        )

    async def explain(
        self, user: str, resource: str, client: str = "127.0.0.1", gateway: str = ""
    ) -> dict[str, object]:
        """Why a launch of ``resource`` by ``user`` from ``client`` through ``gateway`` would
        go where it would go (nothing is changed: no host is counted as used)."""
        out: dict[str, object] = {
            "user": user, "resource": resource, "client": client, "gateway": gateway,
            "pick": None,
        }  # fmt: skip
        try:
            identity = await self.directory.lookup(user)
        except DirectoryUnavailable as exc:
            out["why"] = f"the directory cannot be reached: {exc}"
            return out
        if identity is None:
            out["why"] = "no such user in the directory"
            return out
        cfg = self.catalog.configured()
        groups = policy.groups_of(identity.name, identity.groups, cfg.groups)
        out.update(user=identity.name, groups=list(groups))
        record = next((r for r in cfg.resources if r.id.casefold() == resource.casefold()), None)
        if record is None:
            out["why"] = "no such resource"
            return out
        out.update(resource=record.id, origin=cfg.origins.get(record.id.casefold(), "store"))
        refusal = record.filter.why_not(identity.name, groups, client, gateway)
        if not record.enabled or refusal:
            out["published"] = False
            out["why"] = "resource disabled" if not record.enabled else f"filtered out: {refusal}"
            return out
        out["published"] = True
        choice = self.catalog.choose_host(record, identity.name, dry_run=True)
        kinds = self.hosts.kinds
        out.update(
            method=choice.method,
            why=choice.why,
            pick=None if choice.host is None else choice.host.name,
            affinity=[
                {"host": h, "why": w} for h, w in self.sessions.affinity(identity.name, kinds)
            ],
            candidates=[c.to_json() for c in choice.candidates],
        )
        return out
