"""The Connection Broker daemon: gateways and agents over mutual TLS.

Two listeners. Gateways (``gateway_port``) open a long-lived link (``gateway_register``) and one
connection per client session (``client_session``), on which they relay the client's requests,
and a few redemption connections, on which they redeem the tickets of the tunnels they are asked
to open (each ``redeem_ticket`` naming its client). Agents (``agent_port``) register
the host they run on and report its load. Both present a certificate from the farm CA; the
name in it is who they are (an agent may only register the host its certificate names; a
ticket is redeemed by a gateway of the farm, any of them with ``ticket_scope = "farm"``, the
default, so that a client's tunnel may land on another gateway behind a HALB VIP, or only the
one it was issued through with ``"gateway"``).

A login goes: throttle (refused before the directory is asked), the directory (built-in or
LDAP), the second factor the rules name (TOTP or RADIUS, in challenge rounds). The published
resources, hosts, pools, groups and factor rules come from ``broker.toml`` and from the store
(the admin API); the store's are re-read whenever it changed (``Store.generation``). What the
broker decides and why is in ``docs/broker.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from ras import __version__
from ras.broker import policy, portal, routing
from ras.broker.certs import FarmCertificates
from ras.broker.config import BrokerConfig
from ras.broker.directory import Directory, DirectoryUnavailable, open_directory
from ras.broker.gatewaylink import GatewayLinks
from ras.broker.hosts import Choice, HostRegistry
from ras.broker.model import (
    Factor,
    FactorRule,
    GroupRecord,
    HostKind,
    HostRecord,
    PoolRecord,
    ResourceRecord,
    SessionState,
    TicketScope,
)
from ras.broker.programs import program_fields
from ras.broker.radius import Accept, Challenge, RadiusClient, RadiusUnavailable
from ras.broker.sessions import SessionTable
from ras.broker.store import Store
from ras.broker.throttle import Throttle, wait_text
from ras.broker.tickets import ResumeTokens, TicketAuthority
from ras.broker.totp import verify_totp
from ras.errors import (
    ErrorCode,
    PeerError,
    RasError,
    RemoteProtocolError,
    TicketError,
    TransportError,
)
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
    Error,
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
    RdpToken,
    RedeemTicket,
    Registered,
    Resource,
    ResourceList,
    Resume,
    Role,
    Route,
    SessionAction,
    SessionActionKind,
    SessionActionOk,
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
    links: int = 0  # registered links: one per worker process of the gateway

    @property
    def online(self) -> bool:
        return self.links > 0


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


@dataclass(slots=True)
class _AgentLink:
    """An agent's connection, for the broker's requests to it (one at a time)."""

    chan: Channel
    lock: trio.Lock
    replies: trio.MemorySendChannel[Message]
    answers: trio.MemoryReceiveChannel[Message]
    waiting: bool = False


MAX_CHALLENGE_ROUNDS = 5
# Thousands of agent links make a large heap of long-lived objects. With CPython's default
# thresholds (700, 10, 10) the collector walked all of it every few seconds, stalling every
# launch for 0.3-3 s with 5,000 agents (benchmarks/README.md, "Broker"); young garbage still
# goes at every 20,000 allocations, the full walks come far less often. The ``ras`` command
# applies them (``ras.net.workers.tune_gc``) when it runs a broker.
GC_THRESHOLDS = (20_000, 20, 10)
_REDEMPTION_IDLE_S = 120.0  # a gateway's redemption connection idle this long is closed
_PROMPT_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]+")


class Broker:
    """State and request handling of one broker; ``serve`` runs its listeners.

    ``directory`` and ``radius`` default to what ``config`` names (tests give their own)."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        *,
        directory: Directory | None = None,
        radius: RadiusClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.hosts = HostRegistry(
            config.host_timeout_s, (config.weight_sessions, config.weight_memory, config.weight_cpu)
        )
        self.sessions = SessionTable(launch_timeout_s=max(120.0, 2 * config.ticket_ttl_s))
        self.directory: Directory = directory or open_directory(config, store)
        self.throttle = Throttle(
            max_failures_per_user=config.max_failures_per_user,
            max_failures_per_address=config.max_failures_per_address,
            window_s=config.failure_window_s,
            lockout_s=config.lockout_s,
            clock=clock,
        )
        # made now, so a bad [radius] (its secret file) stops the broker at start, not a login
        self._radius = radius or (RadiusClient(config.radius) if config.radius else None)
        self._agents: dict[str, _AgentLink] = {}
        self._config_resources = tuple(r.record() for r in config.resources)
        self._config_rules = tuple(r.rule() for r in config.factor_rules)
        self._generation = -1
        self._configured = self._load_configured()
        self.gateways: dict[str, GatewayInfo] = {}
        self.tickets = TicketAuthority(store.secret("ticket-key"))
        self.resume = ResumeTokens(store.secret("resume-key"))
        # ACME tokens, the public certificate and the portal settings, pushed to gateways
        self.links = GatewayLinks(partial(portal.update_for, store))
        self.certificates = FarmCertificates(config, store, self.links)  # ras/broker/certs.py
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
            addrs = {"gateways": gw[0], "agents": ag[0]}
            nursery.start_soon(self.certificates.run)  # ACME orders and renewals
            if cfg.admin_enabled:  # the HTTPS admin API (ras.broker.admin)
                from ras.broker.admin import serve_admin

                addrs["admin"] = await nursery.start(partial(serve_admin, self))
            log.info("broker ready name=%s resources=%d", cfg.name, len(cfg.resources))
            task_status.started(addrs)

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
                        await chan.answer(await self._redeem(msg, msg.client, gateway))
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
        user: _User | None = None
        while True:
            msg = await chan.receive()
            if isinstance(msg, (Authenticate, Resume)):  # its own deadlines (a user types codes)
                if isinstance(msg, Authenticate):
                    result = await self._authenticate(chan, msg, client, gateway)
                else:
                    result = await self._resume(msg, client, gateway)
                if isinstance(result, _User):
                    user = result
                    await chan.send(
                        AuthOk(user.name, user.groups, self._resume_token(user, client))
                    )
                else:
                    user = None
                    await chan.refuse(*result)
                continue
            if isinstance(msg, (Route, RdpToken)):  # RDP load balancing: ras/broker/routing.py
                if await routing.handle(self, chan, msg, user, client, gateway):
                    return  # a route holds the connection for the RDP connection's life
                continue
            with trio.fail_after(self.config.request_timeout_s):
                match msg:
                    case ListResources():
                        if user is None:
                            await chan.refuse(ErrorCode.AUTH_REQUIRED, "authenticate first")
                        else:
                            visible = self._visible(user, client, gateway)
                            await chan.send(
                                ResourceList(tuple(Resource(r.id, r.name, r.kind) for r in visible))
                            )
                    case Launch():
                        if user is None:
                            await chan.refuse(ErrorCode.AUTH_REQUIRED, "authenticate first")
                        else:
                            await chan.answer(self._launch(msg, user, client, gateway))
                    case RedeemTicket():
                        if msg.client and msg.client != client:
                            await chan.fail(
                                ErrorCode.UNEXPECTED, "redeem_ticket names another client"
                            )
                            return
                        await chan.answer(await self._redeem(msg, client, gateway))
                    case Ping() | Pong():
                        await chan.answer_ping(msg)
                    case _:
                        await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a request")
                        return

    # -- logins -----------------------------------------------------------------------------

    async def _authenticate(
        self, chan: Channel, msg: Authenticate, client: str, gateway: str
    ) -> _User | tuple[ErrorCode, str]:
        """Throttle, password, then the second factor the rules name (challenge rounds)."""
        where = f"client={client} gateway={gateway}"
        lock = self.throttle.check(msg.username, client)
        if lock is not None:  # refused before the directory is asked anything
            log.warning(
                "auth throttled user=%s %s locked=%s retry_in=%.0fs",
                msg.username, where, lock.what, lock.retry_after_s,
            )  # fmt: skip
            return ErrorCode.THROTTLED, (
                f"too many failed logins; try again in {wait_text(lock.retry_after_s)}"
            )
        try:
            with trio.fail_after(self.config.request_timeout_s):
                identity = await self.directory.authenticate(msg.username, msg.password)
        except (DirectoryUnavailable, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, DirectoryUnavailable) else "no answer in time"
            log.error("auth unavailable user=%s %s reason=directory: %s", msg.username, where, why)
            return ErrorCode.UNAVAILABLE, "the directory cannot be reached; try again later"
        if identity is None:
            return self._failed(msg.username, where, "unknown user or wrong password", client)
        cfg = self._config()
        groups = policy.groups_of(identity.name, identity.groups, cfg.groups)
        record = await trio.to_thread.run_sync(self.store.get_user, identity.name)
        secret = record.totp_secret if record is not None and record.enabled else None
        factor, rule = policy.factor_for(
            (*self._config_rules, *cfg.rules), identity.name, groups, client, gateway,
            has_totp=secret is not None,
        )  # fmt: skip
        if factor is Factor.TOTP:
            if secret is None:
                return self._failed(
                    identity.name, where, f"needs TOTP ({rule}), none enrolled", client
                )
            why = await self._totp(chan, identity.name, secret)
        elif factor is Factor.RADIUS:
            try:
                why = await self._radius_rounds(chan, identity.name, client)
            except RadiusUnavailable as exc:
                log.error(
                    "auth unavailable user=%s %s reason=radius: %s", identity.name, where, exc
                )
                return ErrorCode.UNAVAILABLE, "the second-factor server cannot be reached"
        else:
            why = ""
        if why:
            return self._failed(identity.name, where, why, client)
        self.throttle.succeeded(msg.username)
        self.throttle.succeeded(identity.name)
        factors = "password" if factor is Factor.NONE else f"password+{factor}"
        log.info(
            "auth ok user=%s %s factors=%s source=%s rule=%s",
            identity.name, where, factors, identity.source, rule,
        )  # fmt: skip
        return _User(identity.name, groups)

    def _resume_token(self, user: _User, client: str) -> str:
        """A token to log in again after a lost connection ("" when resume is off)."""
        if self.config.resume_ttl_s <= 0:
            return ""
        token, _ = self.resume.issue(
            user=user.name, client=client, now=time.time(), ttl_s=self.config.resume_ttl_s
        )
        return token

    async def _resume(
        self, msg: Resume, client: str, gateway: str
    ) -> _User | tuple[ErrorCode, str]:
        """Log in again with a resume token: genuine, unexpired, from the same client address,
        and the user still known to the directory and enabled (its groups read again)."""
        where = f"client={client} gateway={gateway}"
        try:
            claims = self.resume.verify(msg.token, now=time.time())
            if claims.client != client:
                raise TicketError(f"it was issued to client {claims.client}")
            with trio.fail_after(self.config.request_timeout_s):
                identity = await self.directory.lookup(claims.user)
            if identity is None:
                raise TicketError(f"user {claims.user} is unknown or disabled now")
        except TicketError as exc:
            log.warning("resume refused %s reason=%s", where, exc)
            return ErrorCode.AUTH_FAILED, "the session cannot be resumed; log in again"
        except (DirectoryUnavailable, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, DirectoryUnavailable) else "no answer in time"
            log.error("resume unavailable user=%s %s reason=directory: %s", claims.user, where, why)
            return ErrorCode.UNAVAILABLE, "the directory cannot be reached; try again later"
        groups = policy.groups_of(identity.name, identity.groups, self._config().groups)
        log.info(
            "auth ok user=%s %s factors=resume source=%s", identity.name, where, identity.source
        )
        return _User(identity.name, groups)

    def _failed(self, user: str, where: str, why: str, client: str) -> tuple[ErrorCode, str]:
        lock = self.throttle.failed(user, client)
        locked = f" now locked={lock.what} for={lock.retry_after_s:.0f}s" if lock else ""
        log.warning("auth failed user=%s %s reason=%s%s", user, where, why, locked)
        return ErrorCode.AUTH_FAILED, "wrong user name or password"

    async def _answer(self, chan: Channel, prompt: str, echo: bool) -> str:
        """One challenge round: show ``prompt``, return what the user typed."""
        prompt = _PROMPT_CONTROL.sub(" ", prompt).strip()[:512] or "Answer:"
        await chan.send(AuthChallenge(prompt, echo))
        with trio.fail_after(self.config.challenge_timeout_s):
            answer = await chan.receive_reply()
        if not isinstance(answer, AuthResponse):
            await chan.fail(ErrorCode.UNEXPECTED, "expected auth_response")
            raise RemoteProtocolError("expected auth_response", ErrorCode.UNEXPECTED)
        return answer.answer

    async def _totp(self, chan: Channel, user: str, secret: bytes) -> str:
        """Why the TOTP round failed ("" if it passed)."""
        code = await self._answer(chan, "Verification code from your authenticator app:", True)
        step = verify_totp(secret, code, time.time())
        if step is None:
            return "wrong one-time code"
        if not await trio.to_thread.run_sync(self.store.use_totp_step, user, step):
            return "one-time code already used"
        return ""

    async def _radius_rounds(self, chan: Channel, user: str, client: str) -> str:
        """Why the RADIUS rounds failed ("" if the server accepted). The first answer (the
        code the user types) is the RADIUS password; Access-Challenges are further rounds."""
        if self._radius is None:  # a rule from the admin API on a broker with no [radius]
            raise RadiusUnavailable("a factor rule needs RADIUS but broker.toml has no [radius]")
        answer = await self._answer(chan, "Verification code:", False)
        state: bytes | None = None
        for _ in range(MAX_CHALLENGE_ROUNDS):
            result = await self._radius.authenticate(
                user, answer, state=state, calling_station=client
            )
            if isinstance(result, Accept):
                return ""
            if not isinstance(result, Challenge):
                return "RADIUS server rejected the code"
            answer = await self._answer(chan, result.prompt, result.echo)
            state = result.state
        return f"more than {MAX_CHALLENGE_ROUNDS} RADIUS challenge rounds"

    # -- what is published, and where -------------------------------------------------------

    def _load_configured(self) -> Configured:
        generation = self.store.generation
        stored = tuple(self.store.list_objects(ResourceRecord))
        config_ids = {r.id.casefold() for r in self._config_resources}
        origins = {r.id.casefold(): "config" for r in self._config_resources}
        extra = tuple(r for r in stored if r.id.casefold() not in config_ids)
        origins.update({r.id.casefold(): "store" for r in extra})
        hosts = tuple(self.store.list_objects(HostRecord))
        self.hosts.configure(hosts)
        members: dict[str, list[str]] = {}
        for host in hosts:
            for pool in host.pools:
                members.setdefault(pool.casefold(), []).append(host.name)
        self._generation = generation
        return Configured(
            resources=self._config_resources + extra,
            origins=origins,
            groups=tuple(self.store.list_objects(GroupRecord)),
            hosts=hosts,
            pools=tuple(self.store.list_objects(PoolRecord)),
            rules=tuple(self.store.list_objects(FactorRule)),
            pool_members=members,
        )

    def _config(self) -> Configured:
        """The configuration now (re-read from the store when it changed since last time)."""
        if self.store.generation != self._generation:
            self._configured = self._load_configured()
        return self._configured

    def resources(self) -> list[ResourceRecord]:
        """Every published resource: broker.toml's (read-only), then the store's."""
        return list(self._config().resources)

    def resource_origins(self) -> dict[str, str]:
        """Where each resource comes from: case-folded id -> "config" or "store"."""
        return dict(self._config().origins)

    def _visible(
        self, user: _User, client: str | None = None, gateway: str | None = None
    ) -> list[ResourceRecord]:
        """What this login may see. An unknown ``client`` or ``gateway`` (None) fails every
        filter that names client networks or gateways."""
        return policy.visible(
            self._config().resources, user.name, user.groups, client or "", gateway or ""
        )

    def choose_host(self, resource: ResourceRecord, user: str, *, dry_run: bool = False) -> Choice:
        """The host for ``user``'s launch of ``resource`` (counted as used unless dry_run)."""
        cfg = self._config()
        place = policy.placement(resource, cfg.pools, cfg.pool_members, self.config.balancing)
        return self.hosts.choose(
            time.monotonic(),
            place.hosts,
            method=place.method,
            turn_key=place.turn_key,
            affinity=self.sessions.affinity(user, self.hosts.kinds),
            dry_run=dry_run,
        )

    def _launch(
        self, msg: Launch, user: _User, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        resource = next(
            (r for r in self._visible(user, client, gateway) if r.id == msg.resource), None
        )
        if resource is None:
            return ErrorCode.NOT_FOUND, f"no resource {msg.resource!r} is published to you"
        now = time.time()
        choice = self.choose_host(resource, user.name)
        host = choice.host
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
        if choice.method != "affinity":
            self.sessions.launched(
                user=user.name, host=host.name, resource=resource.id, gateway=gateway,
                client=client, now=now,
            )  # fmt: skip
        log.info(
            "launch user=%s resource=%s host=%s rdp=%s:%d mode=%s client=%s gateway=%s "
            "score=%.3f why=%s",
            user.name, resource.id, host.name, host.rdp_host, host.rdp_port, msg.mode, client,
            gateway, host.score, choice.why,
        )  # fmt: skip
        return LaunchOk(
            msg.mode, host.rdp_host, host.rdp_port, ticket, int(self.config.ticket_ttl_s),
            **program_fields(resource, self._config().resources, host.apps),
        )  # fmt: skip

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
        cfg = self._config()
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
        choice = self.choose_host(record, identity.name, dry_run=True)
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

    # -- sessions ---------------------------------------------------------------------------

    async def session_action(self, session_id: str, action: str) -> dict[str, object]:
        """Ask the agent of the session's host to log it off or disconnect it. LookupError if
        there is no such session; a RasError if the agent is away or refuses."""
        session = self.sessions.get(session_id)
        if session is None:
            raise LookupError(f"no session {session_id!r}")
        try:
            kind = SessionActionKind(action)
        except ValueError:
            raise RasError(f"{action!r} is not logoff or disconnect") from None
        if session.state is SessionState.LAUNCHING:
            raise RasError(f"session {session_id} has not started on host {session.host} yet")
        link = self._agents.get(session.host)
        if link is None:
            raise TransportError(f"the agent of host {session.host} is not connected")
        agent_id = SessionTable.agent_id(session)
        async with link.lock:
            link.waiting = True
            try:
                await link.chan.send(SessionAction(agent_id, kind))
                with trio.fail_after(self.config.request_timeout_s):
                    reply = await link.answers.receive()
            except trio.TooSlowError:
                raise TransportError(f"the agent of host {session.host} did not answer") from None
            except trio.EndOfChannel:
                raise TransportError(f"the agent of host {session.host} went away") from None
            finally:
                link.waiting = False
        if isinstance(reply, Error):
            log.warning(
                "session %s refused id=%s host=%s reason=%s", kind, session_id, session.host,
                reply.message,
            )  # fmt: skip
            raise PeerError(reply)
        log.info("session %s id=%s user=%s host=%s", kind, session_id, session.user, session.host)
        if kind is SessionActionKind.LOGOFF:
            self.sessions.remove(session_id)
        return {"host": session.host, "user": session.user}

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

    async def _redeem(
        self, msg: RedeemTicket, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        try:
            claims = self.tickets.verify(msg.ticket, now=time.time())
            self._check_redeeming_gateway(claims.gateway, claims.resource, gateway)
            if claims.client != client:
                raise TicketError(f"ticket was issued to client {claims.client}")
            if not await trio.to_thread.run_sync(self.store.redeem_once, claims.id, claims.expires):
                raise TicketError("ticket was already used")
        except TicketError as exc:
            log.warning("ticket refused client=%s gateway=%s reason=%s", client, gateway, exc)
            return ErrorCode.TICKET_INVALID, "ticket is not valid"
        log.info(
            "ticket redeemed user=%s resource=%s rdp=%s:%d client=%s gateway=%s issued_via=%s",
            claims.user,
            claims.resource,
            claims.host,
            claims.port,
            client,
            gateway,
            claims.gateway,
        )
        return TicketOk(claims.host, claims.port, claims.user, claims.resource)

    def _check_redeeming_gateway(self, issued_via: str, resource: str, gateway: str) -> None:
        """A ticket or routing token issued through ``issued_via`` redeemed through ``gateway``
        (``TicketError`` if not allowed): with ``ticket_scope = "farm"`` any gateway of the farm
        may, so long as the resource is still published through it."""
        if issued_via == gateway:
            return
        if self.config.ticket_scope is TicketScope.GATEWAY:
            raise TicketError(f"it was issued through gateway {issued_via!r}")
        record = next((r for r in self._config().resources if r.id == resource), None)
        if record is None or not record.enabled:
            raise TicketError(f"resource {resource!r} is no longer published")
        if not record.filter.allows_gateway(gateway):
            raise TicketError(f"resource {resource!r} is not published through this gateway")

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
            reg.name, reg.kind, reg.rdp_host, reg.rdp_port, reg.max_sessions, time.monotonic(),
            apps=reg.apps,
        )  # fmt: skip
        log.info(
            "agent registered host=%s kind=%s rdp=%s:%d max_sessions=%d",
            reg.name,
            reg.kind,
            reg.rdp_host,
            reg.rdp_port,
            reg.max_sessions,
        )
        await chan.send(Registered(reg.name, self.config.report_interval_s))
        replies, answers = trio.open_memory_channel[Message](1)
        link = _AgentLink(chan, trio.Lock(), replies, answers)
        self._agents[reg.name] = link
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
                        self._report(reg.name, msg)
                    case SessionActionOk() | Error() if link.waiting:
                        replies.send_nowait(msg)
                    case Ping() | Pong():
                        await chan.answer_ping(msg)
                    case _:
                        await chan.fail(
                            ErrorCode.UNEXPECTED, f"{msg.TYPE} is not expected from an agent"
                        )
                        return
        finally:
            if self._agents.get(reg.name) is link:
                del self._agents[reg.name]
            replies.close()
            self.hosts.disconnect(reg.name, host)
            log.info("agent gone host=%s", reg.name)

    def _report(self, name: str, load: LoadReport) -> None:
        host = self.hosts.hosts[name]
        was = host.insane
        why = self.hosts.report(name, load, time.monotonic())
        if why:
            if why != was:
                log.warning("agent report refused host=%s reason=%s (no new sessions)", name, why)
            return
        if was:
            log.info("agent report sane again host=%s", name)
        if load.sessions_detail or load.sessions == 0:
            self.sessions.reported(name, load.sessions_detail, time.time())
