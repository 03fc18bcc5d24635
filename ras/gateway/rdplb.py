"""RDP load balancing on the gateway's RDP port (3389, opt-in with ``rdp_lb_enabled``).

Theory of operation. A native RDP client (mstsc, xfreerdp) connects straight to the gateway's
RDP port, with no ras client. Its first message is the TPKT/X.224 Connection Request; the
gateway reads exactly that (at most 259 bytes, under one absolute deadline,
``handshake_timeout_s``, that trickled bytes cannot extend; a PROXY v2 header first is read
from trusted proxies only, as on the other ports) and takes the route from its cookie line:

- ``Cookie: msts=TOKEN``: a routing token the broker issued (an exported .rdp file's
  ``loadbalanceinfo``); the gateway asks the broker ``route{token}``;
- ``Cookie: mstshash=USER``: only where ``rdp_lb_mstshash`` is on (and the broker's
  ``mstshash_routing``): ``route{user}``, the broker's least-loaded choice with affinity;
- anything else (no cookie, ``tsv://``, a mstshash cookie where it is off): refused.

The gateway never reads an address out of a cookie: a Windows-style ``msts=<ip>.<port>.0000``
cookie is just a token the broker does not know. It connects only to the ``route_ok`` host:port
that the broker names, sends it the Connection Request bytes unchanged (and anything the client
sent after them), then relays both ways with :func:`ras.net.relay.relay`. It keeps the broker
connection open, idle, for the RDP connection's life (the broker's session affinity lasts as
long), and writes an audit line when the connection ends. A refused connection is closed
without an answer: the RDP client reports a connection failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from ras.errors import RemoteProtocolError, TransportError
from ras.gateway.config import GatewayConfig
from ras.net.channel import Channel, PeerError
from ras.net.relay import relay
from ras.net.sniff import Kind, PrefixedStream
from ras.net.tls import connect_tcp
from ras.protocol import Route, RouteOk
from ras.protocol.x224 import MAX_CONNECTION_REQUEST, ConnectionRequest, parse_connection_request

__all__ = ["RdpBalancer", "read_connection_request"]

log = logging.getLogger("ras.gateway")

Peer = tuple[str, int]
OpenBroker = Callable[[Peer], Awaitable[Channel]]
Front = Callable[[trio.abc.Stream, Peer], Awaitable[tuple[Kind, PrefixedStream, Peer] | None]]


async def read_connection_request(stream: trio.abc.Stream) -> tuple[ConnectionRequest, bytes]:
    """Read the client's Connection Request; return it and every byte read (the request and
    whatever followed it in the same reads). Bad bytes raise ``RemoteProtocolError`` as soon
    as they arrive; the caller owns the deadline."""
    buffer = b""
    while (request := parse_connection_request(buffer)) is None:
        try:
            data = await stream.receive_some(MAX_CONNECTION_REQUEST - len(buffer))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportError(f"connection lost in the Connection Request: {exc}") from exc
        if not data:
            raise TransportError("connection closed before a whole Connection Request")
        buffer += data
    return request, buffer


class RdpBalancer:
    """Serves one gateway's RDP port; ``handle`` is its connection handler."""

    def __init__(self, config: GatewayConfig, open_broker: OpenBroker, front: Front) -> None:
        self.config = config
        self._open_broker = open_broker
        self._front = front

    async def handle(self, stream: trio.abc.Stream, peer: Peer) -> None:
        cfg = self.config
        with trio.fail_after(cfg.handshake_timeout_s):  # absolute, from the accept
            front = await self._front(stream, peer)
            if front is None:
                return
            kind, sniffed, client = front
            if kind is not Kind.TPKT:
                log.info("rdp refused client=%s:%d reason=not RDP (%s)", *client, kind.value)
                return
            try:
                request, head = await read_connection_request(sniffed)
            except RemoteProtocolError as exc:
                log.info("rdp refused client=%s:%d reason=%s", *client, exc)
                return
        route = self._route_for(request, client)
        if route is None:
            return
        await self._connect(route, PrefixedStream(sniffed, head), client)

    def _route_for(self, request: ConnectionRequest, client: Peer) -> Route | None:
        token, user = request.routing_token, request.mstshash
        if token is not None:
            return Route(token, "")
        if user is not None and self.config.rdp_lb_mstshash:
            return Route("", user)
        if user is not None:
            why = f"mstshash cookie (user={user}) and rdp_lb_mstshash is off"
        elif request.cookie is not None:
            why = "the routing line is not a ras routing token"
        else:
            why = "no routing token or cookie"
        log.info("rdp refused client=%s:%d reason=%s", *client, why)
        return None

    async def _connect(self, route: Route, client_stream: trio.abc.Stream, client: Peer) -> None:
        cfg = self.config
        via = "token" if route.token else "mstshash"
        broker: Channel | None = None
        try:
            try:
                with trio.fail_after(cfg.broker_timeout_s):
                    broker = await self._open_broker(client)
                    granted = await broker.request(route)
            except PeerError as exc:
                log.warning("rdp route refused client=%s:%d via=%s reason=%s", *client, via, exc)
                return
            except (TransportError, trio.TooSlowError) as exc:
                log.warning("broker unavailable client=%s:%d reason=%s", *client, exc or "timeout")
                return
            if not isinstance(granted, RouteOk):
                raise TransportError(f"broker answered route with {granted.TYPE}")
            try:
                with trio.fail_after(cfg.connect_timeout_s):
                    host = await connect_tcp(granted.host, granted.port)
            except (TransportError, trio.TooSlowError) as exc:
                log.warning(
                    "rdp tunnel failed user=%s client=%s:%d rdp=%s:%d reason=%s",
                    granted.user,
                    *client,
                    granted.host,
                    granted.port,
                    exc or "connect timeout",
                )
                return
            await self._relay(client_stream, host, granted, client, via)
        finally:
            if broker is not None:
                await broker.aclose()

    async def _relay(
        self,
        client_stream: trio.abc.Stream,
        host: trio.abc.Stream,
        granted: RouteOk,
        client: Peer,
        via: str,
    ) -> None:
        name = self.config.name
        log.info(
            "rdp tunnel open user=%s resource=%s client=%s:%d rdp=%s:%d gateway=%s via=%s",
            granted.user,
            granted.resource,
            *client,
            granted.host,
            granted.port,
            name,
            via,
        )
        started = time.monotonic()
        stats = await relay(client_stream, host)
        log.info(
            "rdp tunnel closed user=%s resource=%s client=%s:%d rdp=%s:%d gateway=%s via=%s "
            "bytes_up=%d bytes_down=%d seconds=%.1f reset=%s",
            granted.user,
            granted.resource,
            *client,
            granted.host,
            granted.port,
            name,
            via,
            stats.a_to_b,
            stats.b_to_a,
            time.monotonic() - started,
            stats.reset,
        )
