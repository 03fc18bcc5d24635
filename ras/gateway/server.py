"""The Secure Gateway daemon: one front door for every port, then whoever serves the connection.

Theory of operation. The gateway listens on its plain port, its TLS port and, with
``rdp_lb_enabled``, its RDP port, and every accepted connection goes through the same front
door (``Gateway.front_door``), whatever the port and the mode:

1. A pre-authentication slot of its client address (``ras.gateway.limits``), and two deadlines,
   both absolute from the accept and never extended by trickled bytes: the handshake deadline
   (``handshake_timeout_s``: sniffing, a PROXY v2 header, the TLS handshake, an RDP client's
   Connection Request) and the pre-authentication deadline (``preauth_timeout_s``: until a
   login or a tunnel). ``ras.gateway.front``.
2. Sniffing (``ras.net.sniff``), a PROXY v2 header first from a trusted proxy only (its client
   is counted and served from then on; the proxy is not counted), and what each port takes:
   the control protocol and HTTP on the plain port, TLS on the TLS port (terminated here with
   the public certificate, then sniffed again), an X.224 Connection Request on the RDP port.
3. Then one of: a forwarding gateway passes the connection on (``ras.gateway.forward``); a
   normal one gives the control protocol a client session (``ras.gateway.session``), an RDP
   client the RDP load balancer (``ras.gateway.rdplb``), HTTP its ACME answers or a redirect.

Whatever becomes a tunnel (a ticketed tunnel, a routed RDP connection, a forwarded connection)
is registered in ``Gateway.tunnels`` (``ras.gateway.tunnels``): the idle timeout, the drain and
the one audit line apply to all alike. The broker is reached through ``ras.gateway.link``.

``stop`` starts a graceful drain: no new connections, the link to the broker closed (the broker
marks the gateway offline), connections that are not tunnels ended, tunnels left to run up to
``drain_timeout_s`` and then closed.
"""

from __future__ import annotations

import logging
import ssl
from functools import partial

import trio

from ras.errors import ConfigError
from ras.gateway.brokerpool import RedeemPool
from ras.gateway.config import GatewayConfig
from ras.gateway.forward import Forwarder
from ras.gateway.front import Conn, Port, TrustedProxies, read_front
from ras.gateway.http import plain_http
from ras.gateway.limits import Refusal, SourceLimits
from ras.gateway.link import BrokerClient, BrokerLink, Registrations
from ras.gateway.rdplb import RdpBalancer
from ras.gateway.session import ClientSessions
from ras.gateway.tunnels import Tunnels
from ras.gateway.webclient import WebClient
from ras.net.acme import Challenges
from ras.net.fastio import server_tls
from ras.net.listen import serve_tcp
from ras.net.publictls import PublicTLS
from ras.net.reasons import transport_errors
from ras.net.sniff import Kind, PrefixedStream, sniff
from ras.net.tls import Connect, connect_tcp
from ras.net.workers import worker_index
from ras.ops.listener import start_metrics
from ras.ops.metrics import GATEWAY_PREAUTH_REFUSALS, limit_reason, watch_certificate
from ras.ops.sources import gateway_state
from ras.pki import client_context
from ras.portal import Portal, PortalSite, serve_portal
from ras.portal.weblaunch import web_launch

__all__ = ["Gateway"]

log = logging.getLogger("ras.gateway")
Peer = tuple[str, int]

# What each port takes first (on the TLS port, what is inside the TLS is sniffed again).
_TAKES = {
    Port.PLAIN: (Kind.CONTROL, Kind.HTTP),
    Port.TLS: (Kind.TLS,),
    Port.RDP: (Kind.TPKT,),
}


class Gateway:
    """``connect``: how a normal gateway opens TCP connections to its broker and to RDP hosts
    (tests give a memory network's)."""

    def __init__(self, config: GatewayConfig, *, connect: Connect = connect_tcp) -> None:
        self.config = config
        cfg = config
        self.certificate = PublicTLS(cfg.public_cert_file, cfg.public_key_file)
        self.challenges = Challenges()
        self.limits = SourceLimits(
            per_ip=cfg.max_preauth_per_ip,
            total=cfg.max_preauth_total,
            rate_per_s=cfg.max_new_per_ip_per_s,
            burst=cfg.max_new_per_ip_burst,
        )
        self.tunnels = Tunnels()
        watch_certificate("gateway", "public", cfg.public_cert_file)
        watch_certificate("gateway", "farm", cfg.cert_file)
        self._trusted = TrustedProxies(cfg.trusted_proxies)
        self._forwarder: Forwarder | None = None
        self._broker: BrokerClient | None = None
        self._links: list[BrokerLink] = []  # one to each broker
        self._registrations = Registrations()
        self._sessions: ClientSessions | None = None
        self._rdp: RdpBalancer | None = None
        self.portal: Portal | None = None  # HTTP on the TLS port of a normal gateway
        self.web: WebClient | None = None  # the web client's WebSocket, from the portal's port
        if cfg.forwarding:
            upstream: ssl.SSLContext | None = None
            if cfg.terminate_tls:
                ca = cfg.next_hop_ca_file or cfg.ca_file
                assert ca is not None  # the config checks it
                upstream = client_context(ca)
            self._forwarder = Forwarder(cfg, upstream, self.tunnels)
        else:
            self._broker = BrokerClient(cfg, connect=connect)
            site = PortalSite(
                cfg.public_host, cfg.public_port, cfg.rdp_port, cfg.rdp_lb_enabled,
                cfg.broker_timeout_s,
            )  # fmt: skip
            self.web = WebClient(cfg, self._broker, self.tunnels, connect=connect)
            self.portal = Portal(site, self._broker.open_session, web_files=self.web.files)
            self.portal.web_launch = partial(web_launch, self.portal, styles=self.web.styles)
            self._links = [
                BrokerLink(
                    self._broker, self.challenges, self.certificate, self.portal,
                    address=address, registrations=self._registrations,
                )
                for address in cfg.broker_list
            ]  # fmt: skip
            self._sessions = ClientSessions(cfg, self._broker, self.tunnels, connect=connect)
            self._rdp = RdpBalancer(cfg, self._broker, self.tunnels, connect=connect)
        self._not_registered = trio.Event()  # a forwarding gateway has no broker
        self._open: set[trio.CancelScope] = set()  # connections a drain ends (not tunnels)
        self._stopping = trio.Event()

    @property
    def registered(self) -> trio.Event:
        """Set while a link to a broker is registered (to any, with several)."""
        return self._registrations.event if self._links else self._not_registered

    @property
    def forwarder(self) -> Forwarder | None:
        """The next hops of a forwarding gateway (None: a normal one)."""
        return self._forwarder

    @property
    def redeemer(self) -> RedeemPool:
        assert self._broker is not None, "a forwarding gateway redeems no tickets"
        return self._broker.redeemer

    def stop(self) -> None:
        """Begin a graceful drain; ``serve`` returns when it is done."""
        self._stopping.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._serve_all(task_status)
        except* ConfigError as group:  # the broker refuses this gateway: said plainly, not grouped
            fatal: BaseException = group
            while isinstance(fatal, BaseExceptionGroup):
                fatal = fatal.exceptions[0]
            raise fatal from None
        finally:
            if self._broker is not None:  # its connections end with the gateway, however
                await self._broker.aclose()

    async def _serve_all(self, task_status: trio.TaskStatus[dict[str, Peer]]) -> None:
        cfg = self.config
        ports = {
            Port.PLAIN: (cfg.plain_port, cfg.plain_enabled),
            Port.TLS: (cfg.tls_port, cfg.tls_enabled),
            Port.RDP: (cfg.rdp_port, cfg.rdp_lb_enabled),
        }
        bound: dict[str, tuple[str, int]] = {}
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                for port, (number, enabled) in ports.items():
                    if not enabled:
                        continue
                    listen = partial(
                        serve_tcp,
                        partial(self.front_door, port=port),  # the same door for every port
                        cfg.listen_host,
                        number,
                        log=log,
                        what=port.value,
                        tls=port is Port.TLS,  # the front door ends (or passes on) the TLS
                        handler_nursery=handlers,
                    )
                    bound[port.value] = (await nursery.start(listen))[0]
                metrics = await start_metrics(
                    nursery, cfg.metrics, partial(gateway_state, self), port_offset=worker_index()
                )
                if metrics is not None:
                    bound["metrics"] = metrics
                if self._links:
                    for link in self._links:
                        nursery.start_soon(link.run)
                    log.info(
                        "gateway ready name=%s brokers=%s",
                        cfg.name,
                        ",".join(f"{h}:{p}" for h, p in cfg.broker_list),
                    )
                else:
                    assert self._forwarder is not None
                    nursery.start_soon(self._forwarder.health_loop)
                    log.info(
                        "gateway ready name=%s mode=forwarding next_hops=%s terminate_tls=%s",
                        cfg.name,
                        ",".join(map(str, cfg.next_hops)),
                        cfg.terminate_tls,
                    )
                if self.portal is not None:
                    nursery.start_soon(self.portal.run)
                if cfg.tunnel_idle_timeout_s > 0:
                    nursery.start_soon(self.tunnels.sweep_idle, cfg.tunnel_idle_timeout_s)
                task_status.started(bound)
                await self._stopping.wait()
                nursery.cancel_scope.cancel()  # stop accepting; the link closes: unregistered
            for link in self._links:
                log.info("unregistered from broker=%s:%d", *link.address)
            await self._drain(handlers)

    async def _drain(self, handlers: trio.Nursery) -> None:
        cfg = self.config
        log.info(
            "draining name=%s tunnels=%d sessions=%d timeout=%.0fs",
            cfg.name,
            len(self.tunnels),
            len(self._open),
            cfg.drain_timeout_s,
        )
        for scope in list(self._open):  # sessions and logins: the client goes elsewhere
            scope.cancel()
        with trio.move_on_after(cfg.drain_timeout_s):
            await self.tunnels.wait_empty()
        if closing := self.tunnels.shut_all("drain timeout"):
            log.warning("drain timeout: closing tunnels=%d", closing)
            with trio.move_on_after(5):
                await self.tunnels.wait_empty()
        handlers.cancel_scope.cancel()
        log.info("stopped name=%s", cfg.name)

    # -- the front door ----------------------------------------------------------------------

    async def front_door(self, stream: trio.abc.Stream, peer: Peer, *, port: Port) -> None:
        """Serve one accepted connection from ``peer`` on ``port``, whatever it turns out to
        be; the listeners call it for every connection (tests, with a memory stream)."""
        cfg = self.config
        now = trio.current_time()
        deadline = now + cfg.preauth_timeout_s
        handshake = min(now + cfg.handshake_timeout_s, deadline)
        conn = Conn(port, peer, peer, deadline, handshake, self._open)
        try:
            with conn.scope:
                await self._serve(stream, conn)
        finally:
            conn.close()
        if conn.scope.cancelled_caught:
            log.info("connection closed client=%s:%d reason=gateway stopping", *conn.client)

    async def _serve(self, stream: trio.abc.Stream, conn: Conn) -> None:
        trusted = conn.peer[0] in self._trusted
        if not trusted and not self._admit(conn):  # proxies: their clients are counted
            return
        passed: trio.abc.Stream | None = None  # a forwarder's own TLS, ended here
        try:
            with trio.fail_at(conn.handshake_deadline):
                front = await read_front(stream, conn, trusted=trusted)
                if front is None:
                    return
                kind, sniffed = front
                if trusted and not self._admit(conn):
                    return
                if kind not in _TAKES[conn.port]:
                    log.info(
                        "refused client=%s:%d reason=%s is not served on the %s port",
                        *conn.client,
                        kind.value,
                        conn.port.value,
                    )
                    return
                if conn.port is Port.TLS and (self._forwarder is None or self.config.terminate_tls):
                    inner = await self._terminate_tls(sniffed)
                    conn.tls = True
                    if self._forwarder is None:
                        kind, sniffed = await sniff(inner)
                    else:
                        passed = inner
        except trio.TooSlowError:
            log.info("pre-auth deadline client=%s:%d phase=handshake: closing", *conn.client)
            return
        if self._forwarder is not None:
            await self._forwarder.serve(passed or sniffed, conn)
            return
        await self._dispatch(kind, sniffed, conn)

    async def _terminate_tls(self, sniffed: trio.abc.Stream) -> trio.abc.Stream:
        """The client's TLS, ended here with the public certificate (the one current now: a
        reload changes it for the next handshake only)."""
        context = self.certificate.context
        assert context is not None  # the config checks it
        tls = server_tls(sniffed, context)  # lean TLS the relay drives
        with transport_errors("TLS handshake failed", handshake=True):
            await tls.do_handshake()
        return tls

    def _admit(self, conn: Conn) -> bool:
        got = self.limits.admit(conn.client[0])
        if isinstance(got, Refusal):
            GATEWAY_PREAUTH_REFUSALS.labels(limit_reason(got)).inc()
            log.warning("refused client=%s:%d reason=limit: %s", *conn.client, got)
            return False
        conn.slot = got
        return True

    async def _dispatch(self, kind: Kind, stream: PrefixedStream, conn: Conn) -> None:
        assert self._sessions is not None  # a normal gateway
        assert self._rdp is not None
        match kind:
            case Kind.CONTROL:
                await self._sessions.serve(stream, conn)
            case Kind.TPKT if conn.port is Port.RDP:
                await self._rdp.serve(stream, conn)
            case Kind.HTTP if not conn.tls:
                with trio.fail_at(conn.deadline):
                    assert self.portal is not None  # browsers go to the portal's address
                    host, port = self.portal.public_address()
                    await plain_http(stream, host, port, self.challenges)
            case Kind.HTTP:  # the User Portal (ras.portal)
                assert self.portal is not None
                assert self.web is not None
                with trio.fail_at(conn.deadline):
                    upgrade = await serve_portal(self.portal, stream, conn.client)
                if upgrade is not None:  # the web client's WebSocket: it owns the deadlines
                    await self.web.serve(stream, upgrade, conn)
            case _:
                log.info(
                    "refused client=%s:%d reason=%s is not served here", *conn.client, kind.value
                )

    # -- the public certificate --------------------------------------------------------------

    def reload_certificate(self) -> bool:
        """Read the public certificate and key files again (SIGHUP); new TLS connections get
        them, open ones keep theirs. A bad pair is logged and the current one kept."""
        return self.certificate.reload()

    async def install_certificate(self, cert_pem: str, key_pem: str) -> bool:
        """Take a certificate the broker distributed (``ras.net.publictls``)."""
        return await self.certificate.install(cert_pem, key_pem)
