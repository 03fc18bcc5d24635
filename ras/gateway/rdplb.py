"""RDP load balancing on the gateway's RDP port (3389, opt-in with ``rdp_lb_enabled``).

Theory of operation. A native RDP client (mstsc, xfreerdp) connects straight to the gateway's
RDP port, with no ras client. The port has the same front door as the others (the gateway's
``front_door``: per-address limits, a PROXY v2 header from trusted proxies only, deadlines
from the accept); a forwarding gateway passes the connection on to its next hop's RDP port.
A normal gateway then hands it here. Its first message is the TPKT/X.224 Connection Request;
the gateway reads exactly that (at most 259 bytes, within the handshake deadline, which
trickled bytes cannot extend) and takes the route from its cookie line:

- ``Cookie: msts=TOKEN``: a routing token the broker issued (an exported .rdp file's
  ``loadbalanceinfo``); the gateway asks the broker ``route{token}``;
- ``Cookie: mstshash=USER``: only where ``rdp_lb_mstshash`` is on (and the broker's
  ``mstshash_routing``): ``route{user}``, the broker's least-loaded choice with affinity;
- anything else (no cookie, ``tsv://``, a mstshash cookie where it is off): refused.

The gateway never reads an address out of a cookie: a Windows-style ``msts=<ip>.<port>.0000``
cookie is just a token the broker does not know. It connects only to the ``route_ok`` host:port
that the broker names, sends it the Connection Request bytes unchanged (and anything the client
sent after them), then relays both ways as a tunnel of the gateway (``ras.gateway.tunnels``:
idle timeout, drain, the audit line). The route frees the connection's pre-authentication
slot, as a redeemed ticket does. The broker connection stays open, idle, for the RDP
connection's life (the broker's session affinity lasts as long). A refused connection is
closed without an answer: the RDP client reports a connection failure.
"""

from __future__ import annotations

import logging

import trio

from ras.errors import PeerError, RemoteProtocolError, TransportError
from ras.gateway.config import GatewayConfig
from ras.gateway.front import Conn
from ras.gateway.link import BrokerClient
from ras.gateway.tunnels import TunnelInfo, Tunnels, Via
from ras.net.channel import Channel
from ras.net.reasons import transport_errors
from ras.net.sniff import PrefixedStream
from ras.net.tls import Connect, connect_tcp
from ras.protocol import Route, RouteOk
from ras.protocol.x224 import MAX_CONNECTION_REQUEST, ConnectionRequest, parse_connection_request

__all__ = ["RdpBalancer", "read_connection_request"]

log = logging.getLogger("ras.gateway")

Peer = tuple[str, int]


async def read_connection_request(stream: trio.abc.Stream) -> tuple[ConnectionRequest, bytes]:
    """Read the client's Connection Request; return it and every byte read (the request and
    whatever followed it in the same reads). Bad bytes raise ``RemoteProtocolError`` as soon
    as they arrive; the caller owns the deadline."""
    buffer = b""
    while (request := parse_connection_request(buffer)) is None:
        with transport_errors("connection lost in the Connection Request"):
            data = await stream.receive_some(MAX_CONNECTION_REQUEST - len(buffer))
        if not data:
            raise TransportError("connection closed before a whole Connection Request")
        buffer += data
    return request, buffer


class RdpBalancer:
    """Serves a normal gateway's RDP port: ``serve`` takes one sniffed TPKT connection."""

    def __init__(
        self,
        config: GatewayConfig,
        broker: BrokerClient,
        tunnels: Tunnels,
        *,
        connect: Connect = connect_tcp,
    ) -> None:
        self.config = config
        self._broker = broker
        self._tunnels = tunnels
        self._dial = connect

    async def serve(self, stream: PrefixedStream, conn: Conn) -> None:
        try:
            with trio.fail_at(conn.handshake_deadline):  # absolute, from the accept
                request, head = await read_connection_request(stream)
        except RemoteProtocolError as exc:
            log.info("rdp refused client=%s:%d reason=%s", *conn.client, exc)
            return
        except trio.TooSlowError:
            log.info(
                "pre-auth deadline client=%s:%d phase=connection request: closing", *conn.client
            )
            return
        route = self._route_for(request, conn.client)
        if route is None:
            return
        await self._connect(route, PrefixedStream(stream, head), conn)

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

    async def _connect(self, route: Route, client_stream: trio.abc.Stream, conn: Conn) -> None:
        cfg = self.config
        client = conn.client
        via = Via.TOKEN if route.token else Via.MSTSHASH
        broker: Channel | None = None
        try:
            try:
                with trio.fail_after(cfg.broker_timeout_s):
                    broker = await self._broker.open_session(client)
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
                    host = await self._dial(granted.host, granted.port)
            except (TransportError, trio.TooSlowError) as exc:
                log.warning(
                    "tunnel failed user=%s client=%s:%d rdp=%s:%d via=%s session=%s reason=%s",
                    granted.user,
                    *client,
                    granted.host,
                    granted.port,
                    via,
                    granted.session or "-",
                    exc or "connect timeout",
                )
                return
            conn.tunnelled()  # routed: the slot is free, and a drain lets it run
            info = TunnelInfo(
                via=via,
                client=client,
                target=(granted.host, granted.port),
                gateway=cfg.name,
                path=(*conn.path, cfg.name),
                user=granted.user,
                resource=granted.resource,
                session=granted.session,
            )
            await self._tunnels.run(info, client_stream, host)
        finally:
            if broker is not None:
                await broker.aclose()
