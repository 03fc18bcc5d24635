"""The Secure Gateway daemon: one front door per port, client sessions, ticketed tunnels.

Each accepted connection is sniffed (``ras.net.sniff``). A PROXY v2 header first (a HALB node
or forwarding gateway relaying a client, before any TLS) is read only from a trusted proxy
(``trusted_proxies``): the client it names is the session's client from then on, for the
broker and the logs, and the rest of the stream is sniffed again; from anyone else it is
refused. On the TLS port a ClientHello is terminated with the public certificate and the
plaintext sniffed again. The control protocol gets a client session; HTTP gets a redirect to
HTTPS on the plain port; anything else is closed with a log line. A client session answers
``hello`` itself, relays the client's requests to the broker over mutual TLS
(``client_session`` first, so the broker knows the client's address), and on ``open_tunnel``
redeems the ticket at the broker and connects to the host:port the broker names, never to
anything the client names. Then it relays bytes unchanged until either side ends, and audits
the tunnel.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from functools import partial

import trio

from ras import __version__
from ras.errors import ErrorCode, RemoteProtocolError, TransportError
from ras.gateway.config import GatewayConfig
from ras.gateway.http import redirect_to_https, refuse_http
from ras.net.channel import Channel, PeerError, greet
from ras.net.listen import serve_tcp
from ras.net.relay import relay
from ras.net.sniff import Kind, PrefixedStream, sniff
from ras.net.tasks import reconnecting
from ras.net.tls import connect_tcp, connect_tls
from ras.pki import client_context, server_context
from ras.protocol import (
    Authenticate,
    AuthOk,
    AuthResponse,
    ClientSession,
    GatewayRegister,
    Hello,
    Launch,
    ListResources,
    OpenTunnel,
    Ping,
    Pong,
    ProxyCommand,
    ProxyHeader,
    RedeemTicket,
    Registered,
    Role,
    Side,
    TicketOk,
    TunnelOpen,
    Welcome,
    parse_v2,
)  # fmt: skip

__all__ = ["Gateway"]

log = logging.getLogger("ras.gateway")
SOFTWARE = f"ras-gateway/{__version__}"
_TO_BROKER = (Authenticate, AuthResponse, ListResources, Launch)
_PROXY_READ = 4096


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._public_tls = server_context(config.public_cert_file, config.public_key_file)
        self._farm_tls = client_context(
            config.ca_file, cert_file=config.cert_file, key_file=config.key_file
        )
        self._trusted_proxies = tuple(ipaddress.ip_network(n) for n in config.trusted_proxies)
        self.registered = trio.Event()

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        bound: dict[str, tuple[str, int]] = {}
        async with trio.open_nursery() as nursery:
            listen = partial(serve_tcp, host=cfg.listen_host, log=log)
            if cfg.plain_enabled:
                addrs = await nursery.start(
                    partial(listen, self._handle_plain, port=cfg.plain_port, what="plain")
                )
                bound["plain"] = addrs[0]
            if cfg.tls_enabled:
                addrs = await nursery.start(
                    partial(listen, self._handle_tls, port=cfg.tls_port, what="tls")
                )
                bound["tls"] = addrs[0]
            nursery.start_soon(self._broker_link)
            log.info(
                "gateway ready name=%s broker=%s:%d", cfg.name, cfg.broker_host, cfg.broker_port
            )
            task_status.started(bound)

    # -- front doors -----------------------------------------------------------------------

    async def _handle_plain(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        with trio.fail_after(self.config.handshake_timeout_s):
            front = await self._sniff_front(stream, peer)
        if front is not None:
            kind, sniffed, client = front
            await self._dispatch(kind, sniffed, client, tls=False)

    async def _handle_tls(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        with trio.fail_after(self.config.handshake_timeout_s):
            front = await self._sniff_front(stream, peer)
            if front is None:
                return
            kind, sniffed, client = front
            if kind is not Kind.TLS:
                log.info(
                    "refused peer=%s:%d reason=not TLS on the TLS port (%s)", *client, kind.value
                )
                return
            tls = trio.SSLStream(sniffed, self._public_tls, server_side=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                raise TransportError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
            kind, inner = await sniff(tls)
        await self._dispatch(kind, inner, client, tls=True)

    async def _sniff_front(
        self, stream: trio.abc.Stream, peer: tuple[str, int]
    ) -> tuple[Kind, PrefixedStream, tuple[str, int]] | None:
        """Sniff a new connection; return (kind, stream, client). A PROXY v2 header from a
        trusted proxy is read, the client it names becomes the client (after LOCAL, a health
        check, the proxy itself stays the client), and the stream behind it is sniffed. None
        when refused (logged). The caller owns the deadline."""
        kind, sniffed = await sniff(stream)
        if kind is not Kind.PROXY_V2:
            return kind, sniffed, peer
        if not self._is_trusted_proxy(peer[0]):
            log.info("refused peer=%s:%d reason=PROXY v2 from an untrusted source", *peer)
            return None
        try:
            header, rest = await _read_proxy_header(sniffed)
        except RemoteProtocolError as exc:
            log.info("refused peer=%s:%d reason=bad PROXY v2 header: %s", *peer, exc)
            return None
        client = peer if header.source is None else header.source
        log.debug(
            "proxy header peer=%s:%d command=%s client=%s:%d",
            *peer,
            header.command.name.lower(),
            *client,
        )
        try:
            kind, sniffed = await sniff(rest)
        except TransportError:
            if header.command is not ProxyCommand.LOCAL:
                raise
            # a proxy's TCP health check: connect, LOCAL header, close; not worth an info line
            log.debug("health check peer=%s:%d", *peer)
            return None
        return kind, sniffed, client

    def _is_trusted_proxy(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # "unknown": no socket address to trust
            return False
        return any(address in network for network in self._trusted_proxies)

    async def _dispatch(
        self, kind: Kind, stream: PrefixedStream, peer: tuple[str, int], *, tls: bool
    ) -> None:
        match kind:
            case Kind.CONTROL:
                await self._client_session(stream, peer, tls=tls)
            case Kind.HTTP if not tls:
                await redirect_to_https(stream, self.config.public_host, self.config.public_port)
            case Kind.HTTP:
                await refuse_http(stream)
            case _:
                log.info("refused peer=%s:%d reason=%s is not served here", *peer, kind.value)

    # -- client sessions -------------------------------------------------------------------

    async def _open_broker(self, peer: tuple[str, int]) -> Channel:
        cfg = self.config
        stream = await connect_tls(cfg.broker_host, cfg.broker_port, self._farm_tls)
        chan = await greet(stream, Role.GATEWAY, SOFTWARE)
        try:
            await chan.send(ClientSession(peer[0], peer[1]))
        except BaseException:
            await chan.aclose()
            raise
        return chan

    async def _client_session(
        self, stream: trio.abc.Stream, peer: tuple[str, int], *, tls: bool
    ) -> None:
        cfg = self.config
        chan = Channel(stream, Side.SERVER)
        broker: Channel | None = None
        preauth = trio.current_time() + cfg.preauth_timeout_s
        user: str | None = None
        try:
            with trio.fail_at(preauth):
                hello = await chan.receive()
                if not isinstance(hello, Hello) or hello.role is not Role.CLIENT:
                    await chan.fail(ErrorCode.FORBIDDEN, "only clients connect here")
                    return
                assert chan.conn.version is not None
                await chan.send(Welcome(chan.conn.version, SOFTWARE))
            while True:
                # Before authentication the deadline is absolute (trickled bytes do not extend
                # it); after, an idle timeout that every message resets.
                deadline = (
                    preauth if user is None else trio.current_time() + cfg.session_idle_timeout_s
                )
                with trio.move_on_at(deadline) as idle:
                    msg = await chan.receive()
                if idle.cancelled_caught:
                    log.info("session timeout client=%s:%d user=%s", *peer, user or "-")
                    await chan.fail(ErrorCode.TIMEOUT, "session timed out")
                    return
                if isinstance(msg, Ping):
                    await chan.send(Pong(msg.nonce))
                    continue
                if isinstance(msg, Pong):
                    continue
                if not isinstance(msg, (*_TO_BROKER, OpenTunnel)):
                    await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a client request")
                    return
                try:
                    with trio.fail_after(cfg.broker_timeout_s):
                        if broker is None:
                            broker = await self._open_broker(peer)
                        if isinstance(msg, OpenTunnel):
                            granted = await self._redeem(broker, msg, peer)
                        else:
                            await broker.send(msg)
                            reply = await broker.receive_reply()
                except (TransportError, trio.TooSlowError) as exc:
                    if isinstance(exc, PeerError) and isinstance(msg, OpenTunnel):
                        # the broker refused the ticket
                        await chan.fail(exc.code, exc.error.message)
                        return
                    log.warning(
                        "broker unavailable client=%s:%d reason=%s", *peer, exc or "timeout"
                    )
                    await chan.fail(ErrorCode.UNAVAILABLE, "the broker is not available")
                    return
                if isinstance(msg, OpenTunnel):
                    await broker.aclose()
                    await self._tunnel(chan, granted, peer, tls=tls)
                    return
                if isinstance(reply, AuthOk):
                    user = reply.user
                await chan.send(reply)
        finally:
            if broker is not None:
                await broker.aclose()

    async def _redeem(self, broker: Channel, msg: OpenTunnel, peer: tuple[str, int]) -> TicketOk:
        try:
            granted = await broker.request(RedeemTicket(msg.ticket))
        except PeerError as exc:
            log.warning("tunnel refused client=%s:%d reason=%s", *peer, exc)
            raise
        if not isinstance(granted, TicketOk):
            raise TransportError(f"broker answered redeem_ticket with {granted.TYPE}")
        return granted

    async def _tunnel(
        self, chan: Channel, granted: TicketOk, peer: tuple[str, int], *, tls: bool
    ) -> None:
        cfg = self.config
        try:
            with trio.fail_after(cfg.connect_timeout_s):
                host = await connect_tcp(granted.host, granted.port)
        except (TransportError, trio.TooSlowError) as exc:
            log.warning(
                "tunnel failed user=%s client=%s:%d rdp=%s:%d reason=%s",
                granted.user,
                *peer,
                granted.host,
                granted.port,
                exc or "connect timeout",
            )
            await chan.fail(
                ErrorCode.HOST_UNREACHABLE, f"cannot reach {granted.host}:{granted.port}"
            )
            return
        await chan.send(TunnelOpen(granted.host, granted.port))
        client = PrefixedStream(chan.stream, chan.into_tunnel())
        log.info(
            "tunnel open user=%s resource=%s client=%s:%d rdp=%s:%d gateway=%s tls=%s",
            granted.user,
            granted.resource,
            *peer,
            granted.host,
            granted.port,
            cfg.name,
            tls,
        )
        started = time.monotonic()
        stats = await relay(client, host)
        log.info(
            "tunnel closed user=%s resource=%s client=%s:%d rdp=%s:%d gateway=%s "
            "bytes_up=%d bytes_down=%d seconds=%.1f reset=%s",
            granted.user,
            granted.resource,
            *peer,
            granted.host,
            granted.port,
            cfg.name,
            stats.a_to_b,
            stats.b_to_a,
            time.monotonic() - started,
            stats.reset,
        )

    # -- the long-lived link to the broker -------------------------------------------------

    async def _broker_link(self) -> None:
        cfg = self.config

        def down() -> None:
            self.registered = trio.Event()

        await reconnecting(
            self._link_session,
            log=log,
            on_down=down,
            what=f"gateway broker={cfg.broker_host}:{cfg.broker_port}",
        )

    async def _link_session(self) -> None:
        """One life of the long-lived link: register, then ping until it breaks."""
        cfg = self.config
        with trio.fail_after(cfg.broker_timeout_s):
            stream = await connect_tls(cfg.broker_host, cfg.broker_port, self._farm_tls)
            chan = await greet(stream, Role.GATEWAY, SOFTWARE)
        async with chan:
            with trio.fail_after(cfg.broker_timeout_s):
                reply = await chan.request(
                    GatewayRegister(cfg.name, cfg.public_host, cfg.public_port)
                )
            if not isinstance(reply, Registered):
                raise TransportError(f"broker answered gateway_register with {reply.TYPE}")
            log.info("registered with broker=%s:%d", cfg.broker_host, cfg.broker_port)
            self.registered.set()
            nonce = 0
            while True:
                await trio.sleep(cfg.link_ping_interval_s)
                nonce += 1
                with trio.fail_after(cfg.broker_timeout_s):
                    await chan.request(Ping(nonce))


async def _read_proxy_header(stream: PrefixedStream) -> tuple[ProxyHeader, PrefixedStream]:
    """Read a whole PROXY v2 header; return it and the stream that follows it (bytes read past
    the header are put back). A bad header is a ``RemoteProtocolError``; the caller owns
    the deadline."""
    buffer = b""
    while (header := parse_v2(buffer)) is None:
        try:
            data = await stream.receive_some(_PROXY_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportError(f"connection lost in the PROXY v2 header: {exc}") from exc
        if not data:
            raise TransportError("connection closed in the middle of the PROXY v2 header")
        buffer += data
    return header, PrefixedStream(stream, buffer[header.length :])
