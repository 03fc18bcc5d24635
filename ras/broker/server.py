"""The Connection Broker daemon: gateways and agents over mutual TLS.

Two listeners. Gateways (``gateway_port``) open a long-lived link (``gateway_register``) and one
connection per client session (``client_session``), on which they relay the client's requests
and redeem the tickets of the tunnels they are asked to open. Agents (``agent_port``) register
the host they run on and report its load. Both present a certificate from the farm CA; the
name in it is who they are (an agent may only register the host its certificate names; a
ticket can only be redeemed by the gateway it was issued through).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import trio

from ras import __version__
from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.hosts import HostRegistry
from ras.broker.passwords import verify_password
from ras.broker.store import Store
from ras.broker.tickets import TicketAuthority
from ras.broker.totp import verify_totp
from ras.errors import ErrorCode, RemoteProtocolError, TicketError, TransportError
from ras.net.channel import Channel
from ras.net.listen import serve_tcp
from ras.pki import peer_name, server_context
from ras.protocol import (
    AgentRegister,
    AuthChallenge,
    Authenticate,
    AuthOk,
    AuthResponse,
    ClientSession,
    GatewayEntry,
    GatewayList,
    GatewayRegister,
    Hello,
    Launch,
    LaunchOk,
    ListGateways,
    ListResources,
    LoadReport,
    Message,
    Ping,
    Pong,
    RedeemTicket,
    Registered,
    Resource,
    ResourceList,
    Role,
    Side,
    TicketOk,
    Welcome,
)  # fmt: skip

__all__ = ["Broker"]

log = logging.getLogger("ras.broker")
SOFTWARE = f"ras-broker/{__version__}"


@dataclass(slots=True)
class _User:
    name: str
    groups: tuple[str, ...]


@dataclass(slots=True)
class GatewayInfo:
    name: str
    public_host: str
    public_port: int
    since: float
    online: bool = True


class Broker:
    """State and request handling of one broker; ``serve`` runs its listeners."""

    def __init__(self, config: BrokerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.hosts = HostRegistry(config.host_timeout_s)
        self.gateways: dict[str, GatewayInfo] = {}
        self.tickets = TicketAuthority(store.secret("ticket-key"))
        self._ssl = server_context(config.cert_file, config.key_file, client_ca_file=config.ca_file)

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            listen = partial(serve_tcp, host=cfg.listen_host, log=log, ssl_context=self._ssl)
            gw = await nursery.start(
                partial(listen, self._handle_gateway, port=cfg.gateway_port, what="gateways")
            )
            ag = await nursery.start(
                partial(listen, self._handle_agent, port=cfg.agent_port, what="agents")
            )
            log.info("broker ready name=%s resources=%d", cfg.name, len(cfg.resources))
            task_status.started({"gateways": gw[0], "agents": ag[0]})

    async def _accept(self, stream: trio.abc.Stream, *roles: Role) -> tuple[Channel, str, Role]:
        """TLS handshake, the peer's certificate name, hello/welcome; ``roles`` this port serves."""
        assert isinstance(stream, trio.SSLStream)
        with trio.fail_after(self.config.handshake_timeout_s):
            await stream.do_handshake()
            name = peer_name(stream.getpeercert(binary_form=True))
            chan = Channel(stream, Side.SERVER)
            hello = await chan.receive()
            if not isinstance(hello, Hello) or hello.role not in roles:
                served = " and ".join(roles)
                await chan.fail(ErrorCode.FORBIDDEN, f"this port serves {served} connections")
                raise TransportError(f"{name} is not a {served}")
            assert chan.conn.version is not None
            await chan.send(Welcome(chan.conn.version, SOFTWARE))
        return chan, name, hello.role

    # -- gateways ---------------------------------------------------------------------------

    async def _handle_gateway(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        chan, gateway, role = await self._accept(stream, Role.GATEWAY, Role.HALB)
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
            case _:
                await chan.fail(ErrorCode.UNEXPECTED, "expected gateway_register or client_session")

    async def _halb(self, chan: Channel, name: str) -> None:
        """A HALB node asking which gateways are online, as often as it likes."""
        log.info("halb connected name=%s", name)
        while True:
            msg = await chan.receive()
            match msg:
                case ListGateways():
                    online = [g for g in self.gateways.values() if g.online]
                    entries = tuple(
                        GatewayEntry(g.name, g.public_host, g.public_port) for g in online
                    )
                    await chan.send(GatewayList(entries))
                case Ping():
                    await chan.send(Pong(msg.nonce))
                case Pong():
                    pass
                case _:
                    await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a HALB request")
                    return

    async def _gateway_link(self, chan: Channel, gateway: str, reg: GatewayRegister) -> None:
        if reg.name != gateway:
            await chan.fail(
                ErrorCode.FORBIDDEN, f"certificate is for {gateway!r}, not {reg.name!r}"
            )
            return
        info = GatewayInfo(gateway, reg.public_host, reg.public_port, time.time())
        self.gateways[gateway] = info
        log.info("gateway online name=%s public=%s:%d", gateway, reg.public_host, reg.public_port)
        await chan.send(Registered(gateway, self.config.report_interval_s))
        try:
            while True:
                with trio.fail_after(self.config.host_timeout_s):
                    msg = await chan.receive()
                if isinstance(msg, Ping):
                    await chan.send(Pong(msg.nonce))
        finally:
            info.online = False
            log.info("gateway offline name=%s", gateway)

    async def _client_session(self, chan: Channel, gateway: str, origin: ClientSession) -> None:
        client = origin.address
        user: _User | None = None
        while True:
            msg = await chan.receive()
            if isinstance(msg, Authenticate):  # it keeps its own deadlines (a user types codes)
                user = await self._authenticate(chan, msg, client, gateway)
                if user is None:
                    await chan.refuse(ErrorCode.AUTH_FAILED, "wrong user name or password")
                else:
                    await chan.send(AuthOk(user.name, user.groups))
                continue
            with trio.fail_after(self.config.request_timeout_s):
                match msg:
                    case ListResources():
                        if user is None:
                            await chan.refuse(ErrorCode.AUTH_REQUIRED, "authenticate first")
                        else:
                            await chan.send(
                                ResourceList(
                                    tuple(
                                        Resource(r.id, r.name, r.kind) for r in self._visible(user)
                                    )
                                )
                            )
                    case Launch():
                        if user is None:
                            await chan.refuse(ErrorCode.AUTH_REQUIRED, "authenticate first")
                        else:
                            await chan.answer(self._launch(msg, user, client, gateway))
                    case RedeemTicket():
                        await chan.answer(await self._redeem(msg, client, gateway))
                    case Ping():
                        await chan.send(Pong(msg.nonce))
                    case Pong():
                        pass
                    case _:
                        await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a request")
                        return

    async def _authenticate(
        self, chan: Channel, msg: Authenticate, client: str, gateway: str
    ) -> _User | None:
        """Password, then the second factor if the user has one (a challenge round)."""
        with trio.fail_after(self.config.request_timeout_s):
            record = await trio.to_thread.run_sync(self.store.get_user, msg.username)
            stored = record.password_hash if record is not None and record.enabled else None
            ok = await trio.to_thread.run_sync(verify_password, msg.password, stored)
        where = f"client={client} gateway={gateway}"
        if not ok or record is None:
            reason = "unknown or disabled user" if stored is None else "wrong password"
            log.warning("auth failed user=%s %s reason=%s", msg.username, where, reason)
            return None
        if record.totp_secret is not None:
            await chan.send(AuthChallenge("Verification code from your authenticator app:", True))
            with trio.fail_after(self.config.challenge_timeout_s):
                answer = await chan.receive()
            if not isinstance(answer, AuthResponse):
                await chan.fail(ErrorCode.UNEXPECTED, "expected auth_response")
                raise RemoteProtocolError("expected auth_response", ErrorCode.UNEXPECTED)
            step = verify_totp(record.totp_secret, answer.answer, time.time())
            if step is None or not await trio.to_thread.run_sync(
                self.store.use_totp_step, record.name, step
            ):
                why = "wrong one-time code" if step is None else "one-time code already used"
                log.warning("auth failed user=%s %s reason=%s", record.name, where, why)
                return None
        factors = "password+totp" if record.totp_secret is not None else "password"
        log.info("auth ok user=%s %s factors=%s", record.name, where, factors)
        return _User(record.name, record.groups)

    def _visible(self, user: _User) -> list[ResourceConfig]:
        return [
            r for r in self.config.resources
            if (not r.users and not r.groups) or user.name.lower() in (u.lower() for u in r.users)
            or set(r.groups) & set(user.groups)
        ]  # fmt: skip

    def _launch(
        self, msg: Launch, user: _User, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        resource = next((r for r in self._visible(user) if r.id == msg.resource), None)
        if resource is None:
            return ErrorCode.NOT_FOUND, f"no resource {msg.resource!r} is published to you"
        now = time.time()
        host = self.hosts.pick(time.monotonic(), resource.hosts)
        if host is None:
            log.warning(
                "launch failed user=%s resource=%s reason=no host available", user.name, resource.id
            )
            return ErrorCode.NO_HOST, "no host is available for this resource right now"
        ticket = ""
        if msg.mode.tunnelled:
            ticket, _ = self.tickets.issue(
                user=user.name,
                resource=resource.id,
                host=host.rdp_host,
                port=host.rdp_port,
                gateway=gateway,
                client=client,
                now=now,
                ttl_s=self.config.ticket_ttl_s,
            )
        log.info(
            "launch user=%s resource=%s host=%s rdp=%s:%d mode=%s client=%s gateway=%s score=%.3f",
            user.name,
            resource.id,
            host.name,
            host.rdp_host,
            host.rdp_port,
            msg.mode,
            client,
            gateway,
            host.score,
        )
        return LaunchOk(
            msg.mode, host.rdp_host, host.rdp_port, ticket, int(self.config.ticket_ttl_s)
        )

    async def _redeem(
        self, msg: RedeemTicket, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        try:
            claims = self.tickets.verify(msg.ticket, now=time.time())
            if claims.gateway != gateway:
                raise TicketError(f"ticket was issued through gateway {claims.gateway!r}")
            if claims.client != client:
                raise TicketError(f"ticket was issued to client {claims.client}")
            if not await trio.to_thread.run_sync(self.store.redeem_once, claims.id, claims.expires):
                raise TicketError("ticket was already used")
        except TicketError as exc:
            log.warning("ticket refused client=%s gateway=%s reason=%s", client, gateway, exc)
            return ErrorCode.TICKET_INVALID, "ticket is not valid"
        log.info(
            "ticket redeemed user=%s resource=%s rdp=%s:%d client=%s gateway=%s",
            claims.user,
            claims.resource,
            claims.host,
            claims.port,
            client,
            gateway,
        )
        return TicketOk(claims.host, claims.port, claims.user, claims.resource)

    # -- agents -----------------------------------------------------------------------------

    async def _handle_agent(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        chan, name, _ = await self._accept(stream, Role.AGENT)
        with trio.fail_after(self.config.handshake_timeout_s):
            reg = await chan.receive()
        if not isinstance(reg, AgentRegister):
            await chan.fail(ErrorCode.UNEXPECTED, "expected agent_register")
            return
        if reg.name != name:
            log.warning("agent refused cert=%s claimed=%s peer=%s", name, reg.name, peer[0])
            await chan.fail(ErrorCode.FORBIDDEN, f"certificate is for {name!r}, not {reg.name!r}")
            return
        host = self.hosts.register(
            reg.name, reg.kind, reg.rdp_host, reg.rdp_port, reg.max_sessions, time.monotonic()
        )
        log.info(
            "agent registered host=%s kind=%s rdp=%s:%d max_sessions=%d",
            reg.name,
            reg.kind,
            reg.rdp_host,
            reg.rdp_port,
            reg.max_sessions,
        )
        await chan.send(Registered(reg.name, self.config.report_interval_s))
        try:
            while True:
                with trio.move_on_after(self.config.host_timeout_s) as idle:
                    msg = await chan.receive()
                if idle.cancelled_caught:
                    log.warning(
                        "agent silent host=%s for=%.0fs", reg.name, self.config.host_timeout_s
                    )
                    await chan.fail(ErrorCode.TIMEOUT, "no load report in time")
                    return
                match msg:
                    case LoadReport():
                        self.hosts.report(reg.name, msg, time.monotonic())
                    case Ping():
                        await chan.send(Pong(msg.nonce))
                    case Pong():
                        pass
                    case _:
                        await chan.fail(
                            ErrorCode.UNEXPECTED, f"{msg.TYPE} is not expected from an agent"
                        )
                        return
        finally:
            self.hosts.disconnect(reg.name, host)
            log.info("agent gone host=%s", reg.name)
