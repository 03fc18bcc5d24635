"""RDP load balancing, the broker's side: routing tokens, routes and session affinity.

Theory of operation. A native RDP client (mstsc with an .rdp file, xfreerdp) connects straight
to a gateway's RDP port. The gateway reads the X.224 Connection Request and asks the broker
``route{token}`` (the ``Cookie: msts=`` value) or ``route{user}`` (the ``Cookie: mstshash=``
user name, where the farm allows it), on a per-client connection of its own. The broker
answers with the one host the connection may go to, and the gateway connects there only.

*Routing tokens* are issued to a logged-in user (``rdp_token``, relayed by a gateway like
``launch``) and end up in an .rdp file's ``loadbalanceinfo``. A token is bound to the user,
the resource, the gateway the request came through and an expiry, and MAC-signed under a key
only the broker holds (not the ticket key: a ticket is never a routing token, nor the
reverse). It is reusable until it expires, because an RDP client sends the same token on every
reconnect, and it carries no address: the broker picks the host at each use. It is compact
(binary claims, a 128-bit MAC, at most :data:`MAX_TOKEN_CHARS` characters), because the
Connection Request that carries it has a one-byte length. Form:
``r1.<base64url(claims || mac)>``; claims: version 1, expiry (u32 seconds), a 6-byte id for the
logs, then user, resource and gateway, each one length byte and UTF-8.

*Session affinity* (:class:`Affinity`, pure): the same user goes to the same host for the same
resource while one of its routed connections is open (the gateway keeps the broker connection
open for the RDP connection's life) and for :data:`AFFINITY_GRACE_S` after the last one closed,
so that RDP reconnects and disconnected sessions find their host. A host that is offline or
silent loses its affinity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import struct
import time
from dataclasses import dataclass

import trio

from ras.broker.catalog import Catalog, User
from ras.broker.config import BrokerConfig
from ras.broker.history import History
from ras.broker.hosts import Host
from ras.broker.model import ResourceRecord
from ras.broker.programs import program_fields
from ras.broker.store import Store
from ras.broker.tickets import new_session_id
from ras.errors import ErrorCode, TicketError, TransportError
from ras.net.channel import Channel
from ras.ops.metrics import BROKER_LAUNCHES, BROKER_TICKETS, ticket_reason
from ras.protocol import (
    Message,
    RdpToken,
    RdpTokenOk,
    ResourceKind,
    Route,
    RouteOk,
)  # fmt: skip

__all__ = [
    "AFFINITY_GRACE_S",
    "MAX_TOKEN_CHARS",
    "Affinity",
    "Router",
    "RoutingClaims",
    "RoutingTokens",
]

log = logging.getLogger("ras.broker")

_PREFIX = "r1."
_VERSION = 1
_HEAD = struct.Struct(">BI6s")  # version, expiry (unix seconds), id
_MAC_SIZE = 16
_MAC_CONTEXT = b"ras routing token\x00"
# A Connection Request is at most 259 bytes; with its fixed parts, "Cookie: msts=", CR LF, an
# rdpNegReq and an rdpCorrelationInfo around it, 189 characters are left for the token.
MAX_TOKEN_CHARS = 180
AFFINITY_GRACE_S = 600.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class RoutingClaims:
    id: str
    user: str
    resource: str
    gateway: str
    expires: int


class RoutingTokens:
    """Issues and checks routing tokens under one secret key (at least 32 bytes). Pure."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the routing key must be at least 32 bytes")
        self._key = key

    def _mac(self, claims: bytes) -> bytes:
        return hmac.new(self._key, _MAC_CONTEXT + claims, hashlib.sha256).digest()[:_MAC_SIZE]

    def issue(
        self, *, user: str, resource: str, gateway: str, now: float, ttl_s: float
    ) -> tuple[str, RoutingClaims]:
        """A token, or ``TicketError`` when the names are too long for a Connection Request."""
        claims = RoutingClaims(os.urandom(6).hex(), user, resource, gateway, int(now + ttl_s))
        body = _HEAD.pack(_VERSION, claims.expires, bytes.fromhex(claims.id))
        for text in (user, resource, gateway):
            raw = text.encode()
            if len(raw) > 255:
                raise TicketError("a name is too long for a routing token")
            body += bytes([len(raw)]) + raw
        token = _PREFIX + _b64(body + self._mac(body))
        if len(token) > MAX_TOKEN_CHARS:
            raise TicketError(
                f"user, resource and gateway names are too long for a routing token "
                f"({len(token)} characters, at most {MAX_TOKEN_CHARS})"
            )
        return token, claims

    def verify(self, token: str, *, now: float) -> RoutingClaims:
        """The claims of a genuine, unexpired token; ``TicketError`` otherwise."""
        if not token.isascii() or not token.startswith(_PREFIX) or len(token) > MAX_TOKEN_CHARS:
            raise TicketError("not a routing token")
        text = token[len(_PREFIX) :]
        try:
            blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise TicketError("not a routing token") from None
        # One spelling only: base64 ignores the unused low bits of the last character.
        if _b64(blob) != text or len(blob) < _HEAD.size + 3 + _MAC_SIZE:
            raise TicketError("not a routing token")
        body, mac = blob[:-_MAC_SIZE], blob[-_MAC_SIZE:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise TicketError("routing token signature is not valid")
        version, expires, ident = _HEAD.unpack_from(body)
        names: list[str] = []
        at = _HEAD.size
        try:
            for _ in range(3):
                size = body[at]
                names.append(body[at + 1 : at + 1 + size].decode())
                at += 1 + size
        except (IndexError, UnicodeDecodeError):
            raise TicketError("routing token claims are unreadable") from None
        if version != _VERSION or at != len(body) or not all(names):
            raise TicketError("routing token claims are unreadable")
        if now >= expires:
            raise TicketError("routing token has expired")
        return RoutingClaims(ident.hex(), names[0], names[1], names[2], expires)


@dataclass(slots=True)
class _Entry:
    host: str
    open: int
    until: float


class Affinity:
    """Which host a user's sessions of a resource are on (pure: the clock is an argument)."""

    def __init__(self, grace_s: float = AFFINITY_GRACE_S) -> None:
        self.grace_s = grace_s
        self._entries: dict[tuple[str, str], _Entry] = {}

    @staticmethod
    def _key(user: str, resource: str) -> tuple[str, str]:
        return user.casefold(), resource

    def host_for(self, user: str, resource: str, now: float) -> str | None:
        entry = self._entries.get(self._key(user, resource))
        if entry is None:
            return None
        if entry.open == 0 and now >= entry.until:
            del self._entries[self._key(user, resource)]
            return None
        return entry.host

    def opened(self, user: str, resource: str, host: str) -> None:
        key = self._key(user, resource)
        entry = self._entries.get(key)
        if entry is None or entry.host != host:
            # a new host (the old one went away): connections still open there keep their
            # sessions; from now on this user is sent here
            self._entries[key] = _Entry(host, 1, 0.0)
        else:
            entry.open += 1

    def closed(self, user: str, resource: str, host: str, now: float) -> None:
        entry = self._entries.get(self._key(user, resource))
        if entry is None or entry.host != host:
            return
        entry.open = max(0, entry.open - 1)
        if entry.open == 0:
            entry.until = now + self.grace_s
        self._sweep(now)

    def forget(self, user: str, resource: str) -> None:
        self._entries.pop(self._key(user, resource), None)

    def _sweep(self, now: float) -> None:
        stale = [k for k, e in self._entries.items() if e.open == 0 and now >= e.until]
        for key in stale:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class Router:
    """The broker's side of RDP load balancing: routing tokens, routes and their affinity."""

    def __init__(
        self, config: BrokerConfig, store: Store, catalog: Catalog, history: History | None = None
    ) -> None:
        self.config = config
        self.history = history  # routes are launches too; the end of one is its session's end
        self.store = store
        self.catalog = catalog
        self.hosts = catalog.hosts
        self.tokens = RoutingTokens(store.secret("routing-key"))
        self.affinity = Affinity()

    async def handle(
        self, chan: Channel, msg: Route | RdpToken, user: User | None, client: str, gateway: str
    ) -> bool:
        """Serve ``rdp_token`` or ``route`` on a gateway's per-client connection. True when
        the connection is over (a route holds it until the gateway closes it)."""
        if isinstance(msg, RdpToken):
            with trio.fail_after(self.config.request_timeout_s):
                await chan.answer(self._issue(msg, user, client, gateway))
            return False
        with trio.fail_after(self.config.request_timeout_s):
            result = await self._route(msg, client, gateway)
            await chan.answer(result)
        if not isinstance(result, tuple):
            await self._hold(chan, result, client, gateway)
            return True
        return False

    def _issue(
        self, msg: RdpToken, user: User | None, client: str, gateway: str
    ) -> Message | tuple[ErrorCode, str]:
        if user is None:
            return ErrorCode.AUTH_REQUIRED, "authenticate first"
        resource = next(
            (r for r in self.catalog.visible(user, client, gateway) if r.id == msg.resource), None
        )
        if resource is None:
            return ErrorCode.NOT_FOUND, f"no resource {msg.resource!r} is published to you"
        ttl = self.config.routing_token_ttl_s
        try:
            token, claims = self.tokens.issue(
                user=user.name, resource=msg.resource, gateway=gateway, now=time.time(), ttl_s=ttl
            )
        except TicketError as exc:
            log.warning("routing token refused user=%s reason=%s", user.name, exc)
            return ErrorCode.FORBIDDEN, str(exc)
        BROKER_TICKETS.labels("issued", "").inc()
        log.info(
            "routing token issued user=%s resource=%s token_id=%s client=%s gateway=%s "
            "expires_in=%d",
            user.name,
            msg.resource,
            claims.id,
            client,
            gateway,
            int(ttl),
        )
        program = program_fields(
            resource, self.catalog.configured().resources, self.catalog.start_for(resource)
        )
        return RdpTokenOk(token, int(ttl), **program)

    async def _route(
        self, msg: Route, client: str, gateway: str
    ) -> RouteOk | tuple[ErrorCode, str]:
        where = f"client={client} gateway={gateway}"
        if msg.token:
            try:
                claims = self.tokens.verify(msg.token, now=time.time())
                self.catalog.check_redeeming_gateway(claims.gateway, claims.resource, gateway)
            except TicketError as exc:
                BROKER_TICKETS.labels("refused", ticket_reason(str(exc))).inc()
                log.warning("route refused via=token %s reason=%s", where, exc)
                return ErrorCode.TICKET_INVALID, "routing token is not valid"
            BROKER_TICKETS.labels("redeemed", "").inc()
            name, via, resource_id = claims.user, f"token token_id={claims.id}", claims.resource
        else:
            if not self.config.mstshash_routing:
                log.warning("route refused via=mstshash %s reason=not enabled in this farm", where)
                return ErrorCode.FORBIDDEN, "mstshash routing is not enabled in this farm"
            name, via, resource_id = msg.user, "mstshash", None
        record = await trio.to_thread.run_sync(self.store.get_user, name)
        if record is None or not record.enabled:
            log.warning(
                "route refused via=%s user=%s %s reason=unknown or disabled user", via, name, where
            )
            if msg.token:
                return ErrorCode.TICKET_INVALID, "routing token is not valid"
            return ErrorCode.FORBIDDEN, "no route for this user"
        visible = self.catalog.visible(User(record.name, record.groups), client, gateway)
        resource = _choose_resource(visible, resource_id)
        if resource is None:
            why = "no desktop is published to the user" if resource_id is None else "resource gone"
            log.warning("route refused via=%s user=%s %s reason=%s", via, record.name, where, why)
            if msg.token:
                return ErrorCode.TICKET_INVALID, "routing token is not valid"
            return ErrorCode.FORBIDDEN, "no route for this user"
        host, sticky = await self._pick(record.name, resource)
        if host is None:
            log.warning(
                "route failed via=%s user=%s resource=%s %s reason=no host available",
                via,
                record.name,
                resource.id,
                where,
            )
            BROKER_LAUNCHES.labels("no_host", "rdp").inc()
            return ErrorCode.NO_HOST, "no host is available for this resource right now"
        session = new_session_id()
        BROKER_LAUNCHES.labels("ok", "rdp").inc()
        log.info(
            "route user=%s resource=%s host=%s rdp=%s:%d via=%s affinity=%s %s session=%s",
            record.name,
            resource.id,
            host.name,
            host.rdp_host,
            host.rdp_port,
            via,
            sticky,
            where,
            session,
        )
        if self.history is not None:
            self.history.launch(
                session=session, user=record.name, resource=resource.id, host=host.name,
                gateway=gateway, mode="rdp",
            )  # fmt: skip
        return RouteOk(host.rdp_host, host.rdp_port, record.name, resource.id, session)

    async def _pick(self, user: str, resource: ResourceRecord) -> tuple[Host | None, bool]:
        """The host of the user's routed connections if it still serves, else the broker's
        choice for a launch (pools, balancing method, the user's disconnected sessions)."""
        now = time.monotonic()
        name = self.affinity.host_for(user, resource.id, now)
        if name is not None:
            host = self.hosts.hosts.get(name)
            alive = (
                host is not None
                and host.online
                and now - host.last_report <= self.hosts.timeout_s
                # chosen for this resource before: still one of its hosts (pools: their members)
                and (not resource.hosts or name in resource.hosts or bool(resource.pools))
            )
            if alive:
                return host, True
            self.affinity.forget(user, resource.id)
        return (await self.catalog.launch_host(resource, user)).host, False

    async def _hold(self, chan: Channel, granted: RouteOk, client: str, gateway: str) -> None:
        """Keep the affinity while the gateway keeps this connection (its RDP connection) open."""
        host = next(
            (
                h.name
                for h in self.hosts.hosts.values()
                if (h.rdp_host, h.rdp_port) == (granted.host, granted.port)
            ),
            f"{granted.host}:{granted.port}",
        )
        self.affinity.opened(granted.user, granted.resource, host)
        started = time.monotonic()
        try:
            while True:
                msg = await chan.receive()
                if not await chan.answer_ping(msg):
                    await chan.fail(ErrorCode.UNEXPECTED, "nothing more is expected after route_ok")
                    return
        except TransportError:
            pass  # the gateway closed: the RDP connection ended
        finally:
            self.affinity.closed(granted.user, granted.resource, host, time.monotonic())
            if self.history is not None:
                self.history.ended(granted.session)
            log.info(
                "route ended user=%s resource=%s host=%s client=%s gateway=%s seconds=%.1f",
                granted.user,
                granted.resource,
                host,
                client,
                gateway,
                time.monotonic() - started,
            )


def _choose_resource(
    visible: list[ResourceRecord], resource_id: str | None
) -> ResourceRecord | None:
    if resource_id is not None:
        return next((r for r in visible if r.id == resource_id), None)
    return next((r for r in visible if r.kind is ResourceKind.DESKTOP), None)
