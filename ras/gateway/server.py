"""The Secure Gateway daemon: one front door per port, client sessions, ticketed tunnels.

Each accepted connection is sniffed (``ras.net.sniff``) under the pre-authentication deadline,
which runs from accept and which trickled bytes never extend (``preauth_timeout_s``; the
handshake part of it is capped by ``handshake_timeout_s``), and takes a pre-authentication
slot of its client address (``ras.gateway.limits``). A PROXY v2 header first (a HALB node or
forwarding gateway relaying a client, before any TLS) is read only from a trusted proxy
(``trusted_proxies``): the client it names is the session's client from then on, for the
broker, the limits and the logs, and the rest of the stream is sniffed again; from anyone else
it is refused. On the TLS port a ClientHello is terminated with the public certificate and the
plaintext sniffed again.

A normal gateway gives the control protocol a client session; HTTP on the plain port gets ACME
HTTP-01 answers or a redirect to HTTPS; anything else is closed with a log line. A client
session answers ``hello`` itself, relays the client's requests to the broker over mutual TLS
(``client_session`` first, so the broker knows the client's address), and on ``open_tunnel``
redeems the ticket at the broker (on one of a few pooled connections, ``ras.gateway.brokerpool``,
naming the client) and connects to the host:port the broker names, never to anything the
client names. Then it relays bytes unchanged until either side ends, and audits
the tunnel. A forwarding gateway passes every connection on instead (``ras.gateway.forward``).

The long-lived link to the broker registers the gateway, keeps it alive with pings and takes
what the broker pushes: ACME tokens and a new public certificate. ``stop`` starts a graceful
drain: no new connections, the link closed (the broker marks the gateway offline), sessions
ended, tunnels left to run up to ``drain_timeout_s`` and then closed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from ras import __version__
from ras.errors import ErrorCode, PKIError, RemoteProtocolError, TransportError
from ras.gateway.acme import Challenges
from ras.gateway.brokerpool import RedeemPool
from ras.gateway.config import GatewayConfig
from ras.gateway.forward import Forwarder, path_of
from ras.gateway.http import plain_http, refuse_http
from ras.gateway.limits import Refusal, Slot, SourceLimits
from ras.gateway.rdplb import RdpBalancer
from ras.gateway.tunnels import Tunnels, format_path
from ras.net.channel import Channel, PeerError, greet
from ras.net.fastio import server_tls
from ras.net.listen import serve_tcp
from ras.net.relay import relay, socket_of
from ras.net.sniff import Kind, PrefixedStream, sniff
from ras.net.tasks import race, reconnecting
from ras.net.tls import connect_tcp, connect_tls
from ras.pki import client_context, server_context
from ras.protocol import (
    AcmeChallenge,
    AcmeWithdraw,
    Authenticate,
    AuthOk,
    AuthResponse,
    ClientSession,
    Error,
    GatewayRegister,
    Hello,
    Launch,
    ListResources,
    OpenTunnel,
    Ping,
    Pong,
    ProxyCommand,
    ProxyHeader,
    PublicCertificate,
    RdpToken,
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
_TO_BROKER = (Authenticate, AuthResponse, ListResources, Launch, RdpToken)
_PROXY_READ = 4096
Peer = tuple[str, int]


@dataclass(slots=True, eq=False)
class _Conn:
    """One accepted connection on its way in: who it is from, its deadline, its slot."""

    peer: Peer
    client: Peer
    deadline: float  # pre-authentication, absolute from accept
    path: tuple[str, ...] = ()
    tls: bool = False
    slot: Slot | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def release(self) -> None:
        """Authenticated (or a tunnel opened, or forwarded): the pre-auth slot is free."""
        if self.slot is not None:
            self.slot.release()
            self.slot = None


@dataclass(frozen=True, slots=True)
class _Front:
    kind: Kind
    stream: PrefixedStream
    client: Peer
    path: tuple[str, ...]


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        cfg = config
        self._public_tls: ssl.SSLContext | None = None
        if cfg.public_cert_file is not None and cfg.public_key_file is not None:
            self._public_tls = server_context(cfg.public_cert_file, cfg.public_key_file)
        self._farm_tls: ssl.SSLContext | None = None
        if cfg.ca_file is not None and cfg.cert_file is not None:
            self._farm_tls = client_context(
                cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file
            )
        self._forwarder: Forwarder | None = None
        if cfg.forwarding:
            upstream: ssl.SSLContext | None = None
            if cfg.terminate_tls:
                ca = cfg.next_hop_ca_file or cfg.ca_file
                assert ca is not None  # the config checks it
                upstream = client_context(ca)
            self._forwarder = Forwarder(cfg, upstream)
        self._trusted_proxies = tuple(ipaddress.ip_network(n) for n in cfg.trusted_proxies)
        self.registered = trio.Event()
        self.challenges = Challenges()
        self.limits = SourceLimits(
            per_ip=cfg.max_preauth_per_ip,
            total=cfg.max_preauth_total,
            rate_per_s=cfg.max_new_per_ip_per_s,
            burst=cfg.max_new_per_ip_burst,
        )
        self.tunnels = Tunnels()
        # tickets are redeemed on a few long-lived broker connections (ras.gateway.brokerpool)
        self.redeemer = RedeemPool(self._open_redeemer)
        self._sessions: set[trio.CancelScope] = set()
        self._stopping = trio.Event()

    def stop(self) -> None:
        """Begin a graceful drain; ``serve`` returns when it is done."""
        self._stopping.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._serve_all(task_status)
        finally:
            await self.redeemer.aclose()  # its connections end with the gateway, however it ends

    async def _serve_all(self, task_status: trio.TaskStatus[dict[str, Peer]]) -> None:
        cfg = self.config
        bound: dict[str, tuple[str, int]] = {}
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                listen = partial(serve_tcp, host=cfg.listen_host, log=log, handler_nursery=handlers)
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
                if cfg.rdp_lb_enabled:  # RDP load balancing: ras/gateway/rdplb.py
                    rdp = RdpBalancer(cfg, self._open_broker, self._sniff_front)
                    addrs = await nursery.start(
                        partial(listen, rdp.handle, port=cfg.rdp_port, what="rdp")
                    )
                    bound["rdp"] = addrs[0]
                if self._forwarder is None:
                    nursery.start_soon(self._broker_link)
                    log.info(
                        "gateway ready name=%s broker=%s:%d",
                        cfg.name,
                        cfg.broker_host,
                        cfg.broker_port,
                    )
                else:
                    nursery.start_soon(self._forwarder.health_loop)
                    log.info(
                        "gateway ready name=%s mode=forwarding next_hops=%s terminate_tls=%s",
                        cfg.name,
                        ",".join(map(str, cfg.next_hops)),
                        cfg.terminate_tls,
                    )
                if cfg.tunnel_idle_timeout_s > 0:
                    nursery.start_soon(self.tunnels.sweep_idle, cfg.tunnel_idle_timeout_s)
                task_status.started(bound)
                await self._stopping.wait()
                nursery.cancel_scope.cancel()  # stop accepting; the link closes: unregistered
            await self._drain(handlers)

    async def _drain(self, handlers: trio.Nursery) -> None:
        cfg = self.config
        self.registered = trio.Event()
        log.info(
            "draining name=%s tunnels=%d sessions=%d timeout=%.0fs",
            cfg.name,
            len(self.tunnels),
            len(self._sessions),
            cfg.drain_timeout_s,
        )
        for scope in list(self._sessions):  # sessions and logins: the client goes elsewhere
            scope.cancel()
        with trio.move_on_after(cfg.drain_timeout_s):
            await self.tunnels.wait_empty()
        if closing := self.tunnels.shut_all("drain timeout"):
            log.warning("drain timeout: closing tunnels=%d", closing)
            with trio.move_on_after(5):
                await self.tunnels.wait_empty()
        handlers.cancel_scope.cancel()
        log.info("stopped name=%s", cfg.name)

    # -- front doors -----------------------------------------------------------------------

    async def _handle_plain(self, stream: trio.abc.Stream, peer: Peer) -> None:
        await self._front_door(stream, peer, tls_port=False)

    async def _handle_tls(self, stream: trio.abc.Stream, peer: Peer) -> None:
        await self._front_door(stream, peer, tls_port=True)

    async def _front_door(self, stream: trio.abc.Stream, peer: Peer, *, tls_port: bool) -> None:
        cfg = self.config
        now = trio.current_time()
        conn = _Conn(peer, peer, now + cfg.preauth_timeout_s)
        self._sessions.add(conn.scope)
        try:
            with conn.scope:
                await self._serve(
                    stream, conn, tls_port, min(now + cfg.handshake_timeout_s, conn.deadline)
                )
        finally:
            self._sessions.discard(conn.scope)
            conn.release()
        if conn.scope.cancelled_caught:
            log.info("connection closed client=%s:%d reason=gateway stopping", *conn.client)

    async def _serve(
        self, stream: trio.abc.Stream, conn: _Conn, tls_port: bool, handshake_deadline: float
    ) -> None:
        trusted = self._is_trusted_proxy(conn.peer[0])
        if not trusted and not self._admit(conn):  # proxies: their clients are counted
            return
        inner: trio.abc.Stream | None = None
        try:
            with trio.fail_at(handshake_deadline):
                front = await self._read_front(stream, conn.peer)
                if front is None:
                    return
                kind, sniffed, conn.client, conn.path = (
                    front.kind, front.stream, front.client, front.path
                )  # fmt: skip
                if trusted and not self._admit(conn):
                    return
                if tls_port:
                    if kind is not Kind.TLS:
                        log.info(
                            "refused client=%s:%d reason=not TLS on the TLS port (%s)",
                            *conn.client,
                            kind.value,
                        )
                        return
                    if self._forwarder is None or self.config.terminate_tls:
                        inner = await self._terminate_tls(sniffed)
                        conn.tls = True
                        if self._forwarder is None:
                            kind, sniffed = await sniff(inner)
        except trio.TooSlowError:
            log.info("pre-auth deadline client=%s:%d phase=handshake: closing", *conn.client)
            return
        if self._forwarder is not None:
            await self._forward(inner or sniffed, conn, tls_port=tls_port, kind=kind)
            return
        await self._dispatch(kind, sniffed, conn)

    async def _terminate_tls(self, sniffed: trio.abc.Stream) -> trio.abc.Stream:
        """The client's TLS, ended here with the public certificate (the one current now: a
        reload changes it for the next handshake only)."""
        assert self._public_tls is not None
        tls = server_tls(sniffed, self._public_tls)  # lean TLS the relay drives
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise TransportError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        return tls

    def _admit(self, conn: _Conn) -> bool:
        address = conn.client[0]
        got = self.limits.admit(address)
        if isinstance(got, Refusal):
            log.warning("refused client=%s:%d reason=limit: %s", *conn.client, got)
            return False
        conn.slot = got
        return True

    async def _sniff_front(
        self, stream: trio.abc.Stream, peer: Peer
    ) -> tuple[Kind, PrefixedStream, Peer] | None:
        """Sniff a new connection; return (kind, stream, client). See ``_read_front``."""
        front = await self._read_front(stream, peer)
        return None if front is None else (front.kind, front.stream, front.client)

    async def _read_front(self, stream: trio.abc.Stream, peer: Peer) -> _Front | None:
        """Sniff a new connection. A PROXY v2 header from a trusted proxy is read, the client it
        names becomes the client (after LOCAL, a health check, the proxy itself stays the
        client), its gateway path is kept, and the stream behind it is sniffed. None when
        refused (logged). The caller owns the deadline."""
        kind, sniffed = await sniff(stream)
        if kind is not Kind.PROXY_V2:
            return _Front(kind, sniffed, peer, ())
        if not self._is_trusted_proxy(peer[0]):
            log.info("refused peer=%s:%d reason=PROXY v2 from an untrusted source", *peer)
            return None
        try:
            header, rest = await _read_proxy_header(sniffed)
        except RemoteProtocolError as exc:
            log.info("refused peer=%s:%d reason=bad PROXY v2 header: %s", *peer, exc)
            return None
        path = path_of(header.tlvs, peer[0])
        if path is None:
            log.info("refused peer=%s:%d reason=bad gateway path in the PROXY v2 header", *peer)
            return None
        client = peer if header.source is None else header.source
        log.debug(
            "proxy header peer=%s:%d command=%s client=%s:%d path=%s",
            *peer,
            header.command.name.lower(),
            *client,
            format_path(path),
        )
        try:
            kind, sniffed = await sniff(rest)
        except TransportError:
            if header.command is not ProxyCommand.LOCAL:
                raise
            # a proxy's TCP health check: connect, LOCAL header, close; not worth an info line
            log.debug("health check peer=%s:%d", *peer)
            return None
        return _Front(kind, sniffed, client, path)

    def _is_trusted_proxy(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # "unknown": no socket address to trust
            return False
        return any(address in network for network in self._trusted_proxies)

    async def _dispatch(self, kind: Kind, stream: PrefixedStream, conn: _Conn) -> None:
        cfg = self.config
        match kind:
            case Kind.CONTROL:
                await self._client_session(stream, conn)
            case Kind.HTTP if not conn.tls:
                with trio.fail_at(conn.deadline):
                    await plain_http(stream, cfg.public_host, cfg.public_port, self.challenges)
            case Kind.HTTP:
                with trio.fail_at(conn.deadline):
                    await refuse_http(stream)
            case _:
                log.info(
                    "refused client=%s:%d reason=%s is not served here", *conn.client, kind.value
                )

    # -- forwarding mode -------------------------------------------------------------------

    async def _forward(
        self, stream: trio.abc.Stream, conn: _Conn, *, tls_port: bool, kind: Kind
    ) -> None:
        cfg = self.config
        assert self._forwarder is not None
        if not tls_port and kind not in (Kind.CONTROL, Kind.HTTP, Kind.TPKT):
            log.info("refused client=%s:%d reason=%s is not served here", *conn.client, kind.value)
            return
        if cfg.name in conn.path:
            log.warning(
                "refused client=%s:%d reason=forwarding loop path=%s",
                *conn.client,
                format_path(conn.path),
            )
            return
        path = (*conn.path, cfg.name)
        try:
            upstream, hop = await self._forwarder.connect(
                conn.client, _local_address(stream), path, tls_port=tls_port
            )
        except TransportError as exc:
            log.warning("forward failed client=%s:%d reason=%s", *conn.client, exc)
            return
        conn.release()  # the next gateway holds the client to its own deadline from here
        self._sessions.discard(conn.scope)  # a drain lets it run like a tunnel
        with self.tunnels.track(conn.client, path, stream, upstream) as tunnel:
            stats = await relay(stream, upstream)
        log.info(
            "forward closed client=%s:%d next_hop=%s path=%s tls=%s bytes_up=%d bytes_down=%d "
            "seconds=%.1f reset=%s%s",
            *conn.client,
            hop,
            format_path(path),
            tls_port,
            stats.a_to_b,
            stats.b_to_a,
            tunnel.seconds,
            stats.reset,
            f" ended_by={tunnel.ended_by}" if tunnel.ended_by else "",
        )

    # -- client sessions -------------------------------------------------------------------

    async def _open_redeemer(self) -> Channel:
        """A redemption connection: mutual TLS and hello/welcome; its first request is a
        ``redeem_ticket`` naming the client (no ``client_session``)."""
        cfg = self.config
        assert self._farm_tls is not None
        stream = await connect_tls(cfg.broker_host, cfg.broker_port, self._farm_tls)
        return await greet(stream, Role.GATEWAY, SOFTWARE)

    async def _open_broker(self, peer: Peer) -> Channel:
        """A connection to the broker for one client's session (its login state lives at the
        broker, on this connection): ``client_session`` first."""
        chan = await self._open_redeemer()
        try:
            await chan.send(ClientSession(peer[0], peer[1]))
        except BaseException:
            await chan.aclose()
            raise
        return chan

    async def _client_session(self, stream: trio.abc.Stream, conn: _Conn) -> None:
        cfg = self.config
        peer = conn.client
        chan = Channel(stream, Side.SERVER)
        broker: Channel | None = None
        user: str | None = None
        try:
            with trio.move_on_at(conn.deadline) as waited:
                hello = await chan.receive()
                if not isinstance(hello, Hello) or hello.role is not Role.CLIENT:
                    await chan.fail(ErrorCode.FORBIDDEN, "only clients connect here")
                    return
                assert chan.conn.version is not None
                await chan.send(Welcome(chan.conn.version, SOFTWARE))
            if waited.cancelled_caught:
                log.info("pre-auth deadline client=%s:%d phase=hello: closing", *peer)
                await chan.fail(ErrorCode.TIMEOUT, "session timed out")
                return
            while True:
                # Before authentication the deadline is absolute from accept (trickled bytes
                # do not extend it); after, an idle timeout that every message resets.
                deadline = (
                    conn.deadline
                    if user is None
                    else trio.current_time() + cfg.session_idle_timeout_s
                )
                with trio.move_on_at(deadline) as idle:
                    msg = await chan.receive()
                if idle.cancelled_caught:
                    if user is None:
                        log.info("pre-auth deadline client=%s:%d phase=login: closing", *peer)
                    else:
                        log.info("session timeout client=%s:%d user=%s", *peer, user)
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
                        if isinstance(msg, OpenTunnel):
                            granted = await self._redeem(msg, peer)
                        else:
                            if broker is None:
                                broker = await self._open_broker(peer)
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
                    if broker is not None:  # the client logged in on this connection first
                        await broker.aclose()
                        broker = None
                    conn.release()  # a redeemed ticket authenticates the connection
                    self._sessions.discard(conn.scope)  # a drain lets the tunnel run
                    await self._tunnel(chan, granted, conn)
                    return
                if isinstance(reply, AuthOk):
                    user = reply.user
                    conn.release()
                await chan.send(reply)
        finally:
            if broker is not None:
                await broker.aclose()

    async def _redeem(self, msg: OpenTunnel, peer: Peer) -> TicketOk:
        try:
            granted = await self.redeemer.request(RedeemTicket(msg.ticket, peer[0]))
        except PeerError as exc:
            log.warning("tunnel refused client=%s:%d reason=%s", *peer, exc)
            raise
        if not isinstance(granted, TicketOk):
            raise TransportError(f"broker answered redeem_ticket with {granted.TYPE}")
        return granted

    async def _tunnel(self, chan: Channel, granted: TicketOk, conn: _Conn) -> None:
        cfg = self.config
        peer = conn.client
        path = (*conn.path, cfg.name)
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
            "tunnel open user=%s resource=%s client=%s:%d rdp=%s:%d gateway=%s path=%s tls=%s",
            granted.user,
            granted.resource,
            *peer,
            granted.host,
            granted.port,
            cfg.name,
            format_path(path),
            conn.tls,
        )
        with self.tunnels.track(peer, path, client, host) as tunnel:
            stats = await relay(client, host)
        # The audit line: one per tunnel, when it ends.
        log.info(
            "tunnel closed user=%s resource=%s client=%s:%d rdp=%s:%d gateway=%s path=%s "
            "bytes_up=%d bytes_down=%d seconds=%.1f reset=%s%s",
            granted.user,
            granted.resource,
            *peer,
            granted.host,
            granted.port,
            cfg.name,
            format_path(path),
            stats.a_to_b,
            stats.b_to_a,
            tunnel.seconds,
            stats.reset,
            f" ended_by={tunnel.ended_by}" if tunnel.ended_by else "",
        )

    # -- the public certificate ------------------------------------------------------------

    def reload_certificate(self) -> bool:
        """Read the public certificate and key files again (SIGHUP); new TLS connections get
        them, open ones keep theirs. A bad pair is logged and the current one kept."""
        cfg = self.config
        if cfg.public_cert_file is None or cfg.public_key_file is None:
            return False
        try:
            self._public_tls = server_context(cfg.public_cert_file, cfg.public_key_file)
        except PKIError as exc:
            log.error("public certificate not reloaded reason=%s", exc)
            return False
        log.info("public certificate reloaded file=%s", cfg.public_cert_file)
        return True

    async def install_certificate(self, cert_pem: str, key_pem: str) -> bool:
        """Take a certificate the broker distributed: checked, written over the public
        certificate files (so a restart keeps it), presented to new TLS connections."""
        cfg = self.config
        if cfg.public_cert_file is None or cfg.public_key_file is None:
            log.warning("public certificate ignored reason=no public_cert_file configured")
            return False
        try:
            context = await trio.to_thread.run_sync(
                _write_certificate, cfg.public_cert_file, cfg.public_key_file, cert_pem, key_pem
            )
        except (PKIError, OSError) as exc:
            log.error("public certificate from the broker refused reason=%s", exc)
            return False
        self._public_tls = context
        log.info("public certificate installed file=%s", cfg.public_cert_file)
        return True

    # -- the long-lived link to the broker -------------------------------------------------

    async def _broker_link(self) -> None:
        cfg = self.config

        def down() -> None:
            self.registered = trio.Event()

        try:
            await reconnecting(
                self._link_session,
                log=log,
                on_down=down,
                what=f"gateway broker={cfg.broker_host}:{cfg.broker_port}",
            )
        finally:
            if self._stopping.is_set():
                log.info("unregistered from broker=%s:%d", cfg.broker_host, cfg.broker_port)

    async def _link_session(self) -> None:
        """One life of the long-lived link: register, then ping and take pushes until it
        breaks."""
        cfg = self.config
        assert self._farm_tls is not None
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
            self.challenges.clear()  # the broker sends the current ones again
            self.registered.set()
            heard = [trio.current_time()]
            await race(partial(self._link_pings, chan, heard), partial(self._link_in, chan, heard))

    async def _link_pings(self, chan: Channel, heard: list[float]) -> None:
        cfg = self.config
        nonce = 0
        while True:
            await trio.sleep(cfg.link_ping_interval_s)
            if trio.current_time() - heard[0] > cfg.broker_timeout_s:
                raise TransportError(f"the broker was silent for {cfg.broker_timeout_s:g}s")
            nonce += 1
            await chan.send(Ping(nonce))

    async def _link_in(self, chan: Channel, heard: list[float]) -> None:
        while True:
            msg = await chan.receive()
            heard[0] = trio.current_time()
            match msg:
                case Pong():
                    pass
                case Ping():
                    await chan.send(Pong(msg.nonce))
                case AcmeChallenge():
                    self.challenges.add(msg)
                case AcmeWithdraw():
                    self.challenges.withdraw(msg.token)
                case PublicCertificate():
                    await self.install_certificate(msg.cert_pem, msg.key_pem)
                case Error():
                    raise PeerError(msg)
                case _:
                    await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not sent on a link")
                    raise TransportError(f"the broker sent {msg.TYPE} on the link")


def _local_address(stream: trio.abc.Stream) -> Peer:
    sock = socket_of(stream)
    if sock is not None:
        try:
            host, port = sock.getsockname()[:2]
            return str(host), int(port)
        except OSError:
            pass
    return ("0.0.0.0", 0)


def _write_certificate(
    cert_file: Path, key_file: Path, cert_pem: str, key_pem: str
) -> ssl.SSLContext:
    """Write the pair next to the files, check it loads and matches, then move it in place."""
    new_cert = cert_file.with_name(cert_file.name + ".new")
    new_key = key_file.with_name(key_file.name + ".new")
    fd = os.open(new_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key_pem)
    new_cert.write_text(cert_pem)
    try:
        server_context(new_cert, new_key)
    except PKIError:
        new_cert.unlink(missing_ok=True)
        new_key.unlink(missing_ok=True)
        raise
    os.replace(new_key, key_file)
    os.replace(new_cert, cert_file)
    return server_context(cert_file, key_file)


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
