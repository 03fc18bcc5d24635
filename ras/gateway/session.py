"""A normal gateway's client sessions: the control protocol on the plain and TLS ports.

Theory of operation. A session answers ``hello`` itself, relays the client's requests to the
broker (``ras.gateway.link.BrokerClient.open_session``: ``client_session`` first, so the broker
knows the client's address) and on ``open_tunnel`` redeems the ticket at the broker, naming
the client, and connects to the host:port the broker names, never to anything the client
names. Then the connection carries RDP bytes unchanged, registered in the gateway's tunnels
(``ras.gateway.tunnels``) until either side ends.

Before the user logged in, every wait is bounded by the connection's pre-authentication
deadline (absolute from the accept: trickled bytes do not extend it); after, by an idle
timeout that every message resets. A session that only said hello and pinged is a health
check (a HALB node's or a forwarding gateway's): its end is logged at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from ras.errors import ErrorCode, PeerError, TransportError
from ras.gateway.config import GatewayConfig
from ras.gateway.front import Conn
from ras.gateway.link import SOFTWARE, BrokerClient
from ras.gateway.tunnels import TunnelInfo, Tunnels, Via
from ras.net.channel import Channel
from ras.net.sniff import PrefixedStream
from ras.net.tls import Connect, connect_tcp
from ras.protocol import (
    Authenticate,
    AuthOk,
    AuthResponse,
    Hello,
    Launch,
    ListResources,
    OpenTunnel,
    RdpToken,
    Resume,
    Role,
    Side,
    TicketOk,
    TunnelOpen,
    Welcome,
)  # fmt: skip

__all__ = ["ClientSessions"]

log = logging.getLogger("ras.gateway")
_TO_BROKER = (Authenticate, Resume, AuthResponse, ListResources, Launch, RdpToken)


class ClientSessions:
    """Serves control-protocol clients: ``serve`` takes one sniffed connection."""

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

    async def serve(self, stream: trio.abc.Stream, conn: Conn) -> None:
        chan = Channel(stream, Side.SERVER)
        with trio.move_on_at(conn.deadline) as waited:
            hello = await chan.receive()
            if not isinstance(hello, Hello) or hello.role is not Role.CLIENT:
                await chan.fail(ErrorCode.FORBIDDEN, "only clients connect here")
                return
            assert chan.conn.version is not None
            await chan.send(Welcome(chan.conn.version, SOFTWARE))
        if waited.cancelled_caught:
            log.info("pre-auth deadline client=%s:%d phase=hello: closing", *conn.client)
            await chan.fail(ErrorCode.TIMEOUT, "session timed out")
            return
        async with contextlib.AsyncExitStack() as owned:  # the broker connection, if opened
            await self._requests(chan, conn, owned)

    async def _requests(self, chan: Channel, conn: Conn, owned: contextlib.AsyncExitStack) -> None:
        """Answer the client until the session ends or becomes a tunnel."""
        cfg = self.config
        peer = conn.client
        broker: Channel | None = None  # the client's own connection to the broker
        user: str | None = None
        asked = False  # anything but pings: a health check asks nothing
        while True:
            # Before authentication the deadline is absolute from accept (trickled bytes
            # do not extend it); after, an idle timeout that every message resets.
            deadline = (
                conn.deadline if user is None else trio.current_time() + cfg.session_idle_timeout_s
            )
            with trio.move_on_at(deadline) as idle:
                try:
                    msg = await chan.receive()
                except TransportError as exc:
                    if asked:
                        raise
                    log.debug("health check client=%s:%d ended: %s", *peer, exc)
                    return
            if idle.cancelled_caught:
                if user is None:
                    log.info("pre-auth deadline client=%s:%d phase=login: closing", *peer)
                else:
                    log.info("session timeout client=%s:%d user=%s", *peer, user)
                await chan.fail(ErrorCode.TIMEOUT, "session timed out")
                return
            if await chan.answer_ping(msg):
                continue
            asked = True
            if not isinstance(msg, (*_TO_BROKER, OpenTunnel)):
                await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a client request")
                return
            try:
                with trio.fail_after(cfg.broker_timeout_s):
                    if isinstance(msg, OpenTunnel):
                        granted = await self._broker.redeem(msg.ticket, peer)
                    else:
                        if broker is None:
                            opened = await self._broker.open_session(peer)
                            broker = await owned.enter_async_context(opened)
                        await broker.send(msg)
                        reply = await broker.receive_reply()
            except (TransportError, trio.TooSlowError) as exc:
                if isinstance(exc, PeerError) and isinstance(msg, OpenTunnel):
                    # the broker refused the ticket
                    await chan.fail(exc.code, exc.error.message)
                    return
                log.warning("broker unavailable client=%s:%d reason=%s", *peer, exc or "timeout")
                await chan.fail(ErrorCode.UNAVAILABLE, "the broker is not available")
                return
            if isinstance(msg, OpenTunnel):
                await owned.aclose()  # the client may have logged in on this connection first
                conn.tunnelled()  # a redeemed ticket authenticates the connection
                await self._tunnel(chan, granted, conn)
                return
            if isinstance(reply, AuthOk):
                user = reply.user
                conn.release()
            await chan.send(reply)

    async def _tunnel(self, chan: Channel, granted: TicketOk, conn: Conn) -> None:
        cfg = self.config
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                host = await self._dial(granted.host, granted.port)
        except (TransportError, trio.TooSlowError) as exc:
            log.warning(
                "tunnel failed user=%s client=%s:%d rdp=%s:%d session=%s reason=%s",
                granted.user,
                *conn.client,
                granted.host,
                granted.port,
                granted.session or "-",
                exc or "connect timeout",
            )
            await chan.fail(
                ErrorCode.HOST_UNREACHABLE, f"cannot reach {granted.host}:{granted.port}"
            )
            return
        try:
            await chan.send(TunnelOpen(granted.host, granted.port))
        except BaseException:
            await host.aclose()
            raise
        client = PrefixedStream(chan.stream, chan.into_tunnel())
        info = TunnelInfo(
            via=Via.TICKET,
            client=conn.client,
            target=(granted.host, granted.port),
            gateway=cfg.name,
            path=(*conn.path, cfg.name),
            tls=conn.tls,
            user=granted.user,
            resource=granted.resource,
            session=granted.session,
        )
        await self._tunnels.run(info, client, host)
