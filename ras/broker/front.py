"""The broker's gateway port, after hello/welcome: gateways' links, client sessions,
redemption connections, and HALB nodes asking which gateways are online.

Gateways open a long-lived link (``gateway_register``) and one connection per client session
(``client_session``), on which they relay the client's requests, and a few redemption
connections, on which they redeem the tickets of the tunnels they are asked to open (each
``redeem_ticket`` naming its client). A ticket is redeemed by a gateway of the farm, any of
them with ``ticket_scope = "farm"``, the default, so that a client's tunnel may land on another
gateway behind a HALB VIP, or only the one it was issued through with ``"gateway"``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from ras.broker.catalog import Catalog, User
from ras.broker.config import BrokerConfig
from ras.broker.gatewaylink import GatewayLinks
from ras.broker.launches import Launches
from ras.broker.login import Login
from ras.broker.routing import Router
from ras.errors import ErrorCode, RasError
from ras.net.channel import Channel
from ras.protocol import (
    Authenticate,
    AuthOk,
    ClientSession,
    GatewayEntry,
    GatewayList,
    GatewayRegister,
    Launch,
    ListGateways,
    ListResources,
    LoggedOut,
    Logout,
    Message,
    Ping,
    Pong,
    RdpToken,
    RedeemTicket,
    Registered,
    Resource,
    ResourceList,
    Resume,
    Role,
    Route,
)  # fmt: skip

__all__ = ["GatewayFront", "GatewayInfo"]

log = logging.getLogger("ras.broker")

_REDEMPTION_IDLE_S = 120.0  # a gateway's redemption connection idle this long is closed


@dataclass(slots=True)
class GatewayInfo:
    name: str
    public_host: str
    public_port: int
    since: float
    links: int = 0  # registered links: one per worker process of the gateway

    @property
    def online(self) -> bool:
        return self.links > 0


class GatewayFront:
    """What gateways and HALB nodes ask on the gateway port; ``gateways`` are those known."""

    def __init__(
        self,
        config: BrokerConfig,
        catalog: Catalog,
        login: Login,
        launches: Launches,
        router: Router,
        links: GatewayLinks,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.login = login
        self.launches = launches
        self.router = router
        self.links = links
        self.gateways: dict[str, GatewayInfo] = {}

    async def serve(self, chan: Channel, gateway: str, role: Role) -> None:
        """One connection; ``gateway`` is the name in the peer's certificate."""
        if role is Role.HALB:
            await self._halb(chan, gateway)
            return
        with trio.fail_after(self.config.handshake_timeout_s):
            first = await chan.receive()
        match first:
            case GatewayRegister():
                await self._gateway_link(chan, gateway, first)
            case ClientSession():
                await self._client_session(chan, gateway, first)
            case RedeemTicket() if first.client:
                await self._redemptions(chan, gateway, first)
            case _:
                await chan.fail(
                    ErrorCode.UNEXPECTED,
                    "expected gateway_register, client_session or redeem_ticket with a client",
                )

    async def _redemptions(self, chan: Channel, gateway: str, first: RedeemTicket) -> None:
        """A gateway's redemption connection: only ``redeem_ticket``s, each naming its client
        (the gateway keeps a few such connections open instead of one per tunnel)."""
        msg: Message = first
        while True:
            match msg:
                case RedeemTicket() if msg.client:
                    with trio.fail_after(self.config.request_timeout_s):
                        await chan.answer(await self.launches.redeem(msg, msg.client, gateway))
                case Ping() | Pong():
                    await chan.answer_ping(msg)
                case _:
                    what = msg.TYPE if msg.TYPE != "redeem_ticket" else "redeem_ticket, no client,"
                    await chan.fail(ErrorCode.UNEXPECTED, f"{what} on a redemption connection")
                    return
            with trio.move_on_after(_REDEMPTION_IDLE_S) as idle:
                msg = await chan.receive()
            if idle.cancelled_caught:  # the gateway stops reusing it long before
                await chan.aclose()
                return

    async def _halb(self, chan: Channel, name: str) -> None:
        """A HALB node asking which gateways are online, as often as it likes; it gets the
        ACME tokens and the public certificate pushed as the gateways do."""
        log.info("halb connected name=%s", name)
        await self.links.attach(name, chan, halb=True)
        try:
            await self._halb_requests(chan)
        finally:
            self.links.detach(name, chan)

    async def _halb_requests(self, chan: Channel) -> None:
        while True:
            msg = await chan.receive()
            match msg:
                case ListGateways():
                    online = [g for g in self.gateways.values() if g.online]
                    entries = tuple(
                        GatewayEntry(g.name, g.public_host, g.public_port) for g in online
                    )
                    await chan.send(GatewayList(entries))
                case Ping() | Pong():
                    await chan.answer_ping(msg)
                case _:
                    await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a HALB request")
                    return

    async def _gateway_link(self, chan: Channel, gateway: str, reg: GatewayRegister) -> None:
        if reg.name != gateway:
            await chan.fail(
                ErrorCode.FORBIDDEN, f"certificate is for {gateway!r}, not {reg.name!r}"
            )
            return
        info = self.gateways.get(gateway)
        if info is None or (info.public_host, info.public_port) != (
            reg.public_host,
            reg.public_port,
        ):
            info = GatewayInfo(gateway, reg.public_host, reg.public_port, time.time())
            self.gateways[gateway] = info
        if not info.online:
            info.since = time.time()
        info.links += 1
        log.info(
            "gateway online name=%s public=%s:%d links=%d",
            gateway,
            reg.public_host,
            reg.public_port,
            info.links,
        )
        await chan.send(Registered(gateway, self.config.report_interval_s))
        try:
            await self.links.attach(gateway, chan)
            while True:
                with trio.fail_after(self.config.host_timeout_s):
                    msg = await chan.receive()
                await chan.answer_ping(msg)  # the gateway's keepalive; nothing else is asked
        finally:
            info.links -= 1
            self.links.detach(gateway, chan)
            log.info("gateway link closed name=%s links=%d", gateway, info.links)
            if not info.online:
                log.info("gateway offline name=%s", gateway)

    async def _client_session(self, chan: Channel, gateway: str, origin: ClientSession) -> None:
        client = origin.address
        user: User | None = None
        while True:
            msg = await chan.receive()
            if isinstance(msg, (Authenticate, Resume)):  # its own deadlines (a user types codes)
                if isinstance(msg, Authenticate):
                    result = await self.login.authenticate(chan, msg, client, gateway)
                else:
                    result = await self.login.resume(msg, client, gateway)
                if isinstance(result, User):
                    token, user = self.login.resume_token(result, client)
                    await chan.send(AuthOk(user.name, user.groups, token))
                else:
                    user = None
                    await chan.refuse(*result)
                continue
            if user is not None and isinstance(msg, (ListResources, Launch, Route, RdpToken)):
                try:
                    ended = await self.login.logged_out(user)
                except RasError as exc:  # a shared store (etcd) out of reach: deny
                    log.error("request refused user=%s reason=state: %s", user.name, exc)
                    await chan.refuse(ErrorCode.UNAVAILABLE, "the farm's state cannot be reached")
                    continue
                if ended:  # logged out through another connection (another gateway's portal)
                    user = None
                    await chan.refuse(ErrorCode.AUTH_REQUIRED, "logged out; log in again")
                    continue
            if isinstance(msg, (Route, RdpToken)):  # RDP load balancing: ras/broker/routing.py
                if await self.router.handle(chan, msg, user, client, gateway):
                    return  # a route holds the connection for the RDP connection's life
                continue
            with trio.fail_after(self.config.request_timeout_s):
                match msg:
                    case ListResources():
                        if user is None:
                            await chan.refuse(ErrorCode.AUTH_REQUIRED, "authenticate first")
                        else:
                            visible = self.catalog.visible(user, client, gateway)
                            await chan.send(
                                ResourceList(tuple(Resource(r.id, r.name, r.kind) for r in visible))
                            )
                    case Launch():
                        if user is None:
                            await chan.refuse(ErrorCode.AUTH_REQUIRED, "authenticate first")
                        else:
                            launched = await self.launches.launch(msg, user, client, gateway)
                            await chan.answer(launched)
                    case Logout():
                        if user is not None:
                            await self.login.logout(msg, user, client, gateway)
                        user = None
                        await chan.send(LoggedOut())
                    case RedeemTicket():
                        if msg.client and msg.client != client:
                            await chan.fail(
                                ErrorCode.UNEXPECTED, "redeem_ticket names another client"
                            )
                            return
                        await chan.answer(await self.launches.redeem(msg, client, gateway))
                    case Ping() | Pong():
                        await chan.answer_ping(msg)
                    case _:
                        await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a request")
                        return
