"""TCP balancing over the gateways: least connections, health checks, PROXY v2, draining.

Each service listens on the VIPs (with IP_FREEBIND, so a backup can listen before it holds the
address) and forwards every connection to the healthy, undrained gateway with the fewest
active connections, after a PROXY v2 header that tells the gateway the client's address. TLS
passes through untouched, or is terminated here (offload) with the service's certificate, which
the broker's distributed farm certificate replaces (``install_certificate``). On a service
with ``acme = true`` the first bytes of each connection are read: a GET or HEAD under
``/.well-known/acme-challenge/`` is answered here from the tokens the broker pushed
(``challenges``), anything else passes on with those bytes in front.

A gateway is healthy after ``rise`` successful checks in a row and unhealthy after ``fall``
failures; a check is a real control-protocol exchange (preface, hello, ping, pong), so it
proves the gateway serves, not only that its port accepts. Draining a gateway stops new
connections to it; its open tunnels run on.

A connection whose gateway cannot be reached (connect refused or timed out, or the PROXY
header cannot be written) is tried on the next healthy gateway in least-connections order,
each gateway once, before the client is given up; no client byte has been read by then, so
nothing is lost. Each such failure counts toward ``fall`` like a failed health check.

The health of the whole set is what gateway tracking follows: ``health_changed`` is set (and
replaced by a fresh event) whenever ``any_healthy()`` may have changed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ras import __version__
from ras.errors import RasError, TransportError
from ras.halb.config import GatewayRef, HalbConfig, ServiceConfig
from ras.net.acme import CHALLENGE_PREFIX, Challenges, serve_challenge
from ras.net.channel import aclose_quietly
from ras.net.health import probe
from ras.net.listen import peer_address
from ras.net.publictls import PublicTLS
from ras.net.reasons import BROKEN, transport_errors
from ras.net.relay import relay
from ras.net.sniff import PrefixedStream
from ras.net.tls import connect_tcp
from ras.ops.metrics import HALB_BACKEND_CONNECTIONS, HALB_NO_BACKEND, watch_certificate
from ras.protocol.proxy import encode_v2

__all__ = ["Backend", "Balancer"]

log = logging.getLogger("ras.halb")
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SOFTWARE = f"ras-halb/{__version__}"
_ACME_HEADS = (b"GET " + CHALLENGE_PREFIX.encode(), b"HEAD " + CHALLENGE_PREFIX.encode())


@dataclass(slots=True)
class Backend:
    name: str
    host: str
    healthy: bool = False
    draining: bool = False
    active: int = 0
    total: int = 0
    failures: int = 0
    successes: int = 0
    last_check: float = 0.0
    last_error: str = ""

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "healthy": self.healthy,
            "draining": self.draining,
            "active": self.active,
            "total": self.total,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class Balancer:
    config: HalbConfig
    backends: dict[str, Backend] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)  # the first health rounds are done
    # Set, then replaced, whenever a gateway goes up or down or the list changes.
    health_changed: trio.Event = field(default_factory=trio.Event)
    _turn: int = 0

    challenges: Challenges = field(default_factory=Challenges)  # ACME tokens from the broker
    _offload: dict[int, PublicTLS] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.set_gateways(self.config.gateways)
        for service in self.config.services:
            if service.tls_cert_file is not None and service.tls_key_file is not None:
                self._offload[service.listen_port] = PublicTLS(
                    service.tls_cert_file, service.tls_key_file
                )
                watch_certificate("halb", "public", service.tls_cert_file)

    async def install_certificate(self, cert_pem: str, key_pem: str) -> None:
        """The farm certificate the broker distributed: written over every offload service's
        files (so a restart keeps it) and presented to new TLS connections from now on."""
        for public in self._offload.values():
            await public.install(cert_pem, key_pem)

    def set_gateways(self, gateways: tuple[GatewayRef, ...]) -> None:
        """Take a new gateway list (config reload): keep the state of those that stay."""
        new = {}
        for ref in gateways:
            old = self.backends.get(ref.name)
            new[ref.name] = (
                old if old is not None and old.host == ref.host else Backend(ref.name, ref.host)
            )
        self.backends = new
        self._health_flipped()

    def any_healthy(self) -> bool:
        """Whether some gateway passes its health checks (drained or not)."""
        return any(b.healthy for b in self.backends.values())

    def _health_flipped(self) -> None:
        self.health_changed.set()
        self.health_changed = trio.Event()

    def pick(self, exclude: frozenset[str] = frozenset()) -> Backend | None:
        """The healthy, undrained gateway with the fewest active connections (ties rotate),
        other than those named in ``exclude``."""
        usable = [
            b
            for b in self.backends.values()
            if b.healthy and not b.draining and b.name not in exclude
        ]
        if not usable:
            return None
        fewest = min(b.active for b in usable)
        ties = [b for b in usable if b.active == fewest]
        self._turn += 1
        return ties[self._turn % len(ties)]

    # -- health ------------------------------------------------------------------------------

    async def check(self, backend: Backend) -> None:
        """One health check: a control-protocol ping through the gateway's plain port."""
        cfg = self.config
        try:
            with trio.fail_after(cfg.health_timeout_s):
                await probe(backend.host, cfg.health_port, software=SOFTWARE)
        except (RasError, trio.TooSlowError) as exc:
            why = str(exc) or "timed out"
            log.debug("health check gateway=%s ok=no reason=%s", backend.name, why)
            self._result(backend, ok=False, why=why)
        else:
            log.debug("health check gateway=%s ok=yes", backend.name)
            self._result(backend, ok=True, why="")

    def _result(self, backend: Backend, *, ok: bool, why: str) -> None:
        cfg = self.config
        backend.last_check = time.time()
        if ok:
            backend.successes += 1
            backend.failures = 0
            if not backend.healthy and backend.successes >= cfg.rise:
                backend.healthy = True
                self._health_flipped()
                log.warning(
                    "gateway up name=%s host=%s after=%d checks",
                    backend.name,
                    backend.host,
                    cfg.rise,
                )
        else:
            backend.failures += 1
            backend.successes = 0
            backend.last_error = why
            if backend.healthy and backend.failures >= cfg.fall:
                backend.healthy = False
                self._health_flipped()
                log.warning(
                    "gateway down name=%s host=%s after=%d failures reason=%s",
                    backend.name,
                    backend.host,
                    cfg.fall,
                    why,
                )

    async def health_loop(self) -> None:
        rounds = 0
        while True:
            async with trio.open_nursery() as nursery:
                for backend in list(self.backends.values()):
                    nursery.start_soon(self.check, backend)
            rounds += 1
            # Ready once a gateway is up, or once ``rise`` rounds have shown none can be.
            if self.any_healthy() or rounds >= self.config.rise:
                self.ready.set()
            await trio.sleep(self.config.health_interval_s)

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        bound: list[tuple[str, int]] = []
        async with trio.open_nursery() as nursery:
            for service in self.config.services:
                for vip in self.config.vip_interfaces:
                    listener = _freebind_listener(vip.ip, service.listen_port)
                    bound.append((str(vip.ip), listener.socket.getsockname()[1]))
                    nursery.start_soon(self._accept, listener, service, vip.ip)
            nursery.start_soon(self.health_loop)
            task_status.started(bound)

    async def _accept(
        self, listener: trio.SocketListener, service: ServiceConfig, vip: ipaddress.IPv4Address
    ) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            await self._forward(stream, service, vip)

        async with trio.open_nursery() as handlers:
            await trio.serve_listeners(handle, [listener], handler_nursery=handlers)

    async def _forward(
        self, client: trio.abc.Stream, service: ServiceConfig, vip: ipaddress.IPv4Address
    ) -> None:
        peer = peer_address(client)
        if service.acme:
            head = await self._first_bytes(client)
            if head is None:
                await aclose_quietly(client)
                return
            client = PrefixedStream(client, head)
            if head.startswith(_ACME_HEADS):
                try:
                    with trio.fail_after(self.config.tls_handshake_timeout_s):
                        await serve_challenge(client, self.challenges)
                except (trio.TooSlowError, *BROKEN):
                    pass
                finally:
                    await aclose_quietly(client)
                return
        offload = self._offload.get(service.listen_port)
        if offload is not None and offload.context is not None:
            tls = trio.SSLStream(client, offload.context, server_side=True)
            try:
                with (
                    trio.fail_after(self.config.tls_handshake_timeout_s),
                    transport_errors("TLS handshake", handshake=True),
                ):
                    await tls.do_handshake()
            except (TransportError, trio.TooSlowError) as exc:
                log.info("tls offload failed client=%s:%d reason=%s", *peer, exc or "timeout")
                await aclose_quietly(client)
                return
            client = tls
        tried: list[str] = []
        while (backend := self.pick(exclude=frozenset(tried))) is not None:
            tried.append(backend.name)
            backend.active += 1
            backend.total += 1
            HALB_BACKEND_CONNECTIONS.labels(backend.name).inc()
            try:
                upstream = await self._connect(backend, service, peer, vip)
                if upstream is None:
                    continue  # the next gateway, in least-connections order
                stats = await relay(client, upstream)
                log.debug(
                    "forward closed client=%s:%d gateway=%s up=%d down=%d",
                    *peer,
                    backend.name,
                    stats.a_to_b,
                    stats.b_to_a,
                )
                return
            finally:
                backend.active -= 1
        HALB_NO_BACKEND.inc()
        log.warning(
            "no gateway for client=%s:%d port=%d tried=%s",
            *peer,
            service.listen_port,
            ",".join(tried) or "-",
        )
        await aclose_quietly(client)

    async def _first_bytes(self, client: trio.abc.Stream) -> bytes | None:
        """Enough of the first bytes to tell an ACME challenge request (None: the client
        closed or broke). A client silent for ``tls_handshake_timeout_s`` passes on as is."""
        head = b""
        with trio.move_on_after(self.config.tls_handshake_timeout_s):
            while any(h.startswith(head) and len(head) < len(h) for h in _ACME_HEADS):
                try:
                    data = await client.receive_some(max(len(h) for h in _ACME_HEADS) - len(head))
                except BROKEN:
                    return None
                if not data:
                    return None
                head += data
        return head

    async def _connect(
        self,
        backend: Backend,
        service: ServiceConfig,
        peer: tuple[str, int],
        vip: ipaddress.IPv4Address,
    ) -> trio.abc.Stream | None:
        """A connection to ``backend`` with the PROXY v2 header sent; None (logged, and
        counted toward the gateway's ``fall``) if it cannot be had."""
        upstream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                upstream = await connect_tcp(backend.host, service.backend_port)
            if service.proxy_protocol:
                with transport_errors("cannot send the PROXY v2 header"):
                    await upstream.send_all(
                        encode_v2((peer[0], peer[1]), (str(vip), service.listen_port))
                    )
        except (RasError, trio.TooSlowError) as exc:
            why = str(exc) or "timeout"
            log.warning(
                "forward failed client=%s:%d gateway=%s reason=%s", *peer, backend.name, why
            )
            self._result(backend, ok=False, why=f"forward: {why}")
            if upstream is not None:
                await aclose_quietly(upstream)
            return None
        return upstream

    def status(self) -> list[dict[str, Any]]:
        return [b.status() for b in self.backends.values()]


def _freebind_listener(address: ipaddress.IPv4Address, port: int) -> trio.SocketListener:
    """Listen on ``address`` even before it is ours (IP_FREEBIND): a backup is ready the moment
    it takes the VIP."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        raw.bind((str(address), port))
        raw.listen(1024)
    except OSError as exc:
        raw.close()
        raise RasError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))
