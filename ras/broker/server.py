"""The Connection Broker daemon: gateways and agents over mutual TLS.

Two listeners. Gateways and HALB nodes (``gateway_port``) are served by
:class:`~ras.broker.front.GatewayFront`, agents (``agent_port``) by
:class:`~ras.broker.agentlinks.AgentLinks`. Both present a certificate from the farm CA; the
name in it is who they are. This module accepts (TLS, hello/welcome) and puts the parts
together: the catalogue and placement (:mod:`ras.broker.catalog`), logins
(:mod:`ras.broker.login`), launches and tickets (:mod:`ras.broker.launches`), RDP load
balancing (:mod:`ras.broker.routing`) and the admin API (:mod:`ras.broker.admin`), which takes
the parts (:class:`~ras.broker.parts.BrokerParts`). What the broker decides and why is in
``docs/broker.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from ras import __version__
from ras.broker import portal
from ras.broker.admin import serve_admin
from ras.broker.agentlinks import AgentLinks
from ras.broker.catalog import Catalog
from ras.broker.certs import FarmCertificates
from ras.broker.config import BrokerConfig
from ras.broker.directory import Directory, open_directory
from ras.broker.etcdstore import EtcdStore
from ras.broker.etcdthrottle import EtcdThrottle
from ras.broker.farmreport import FarmReports
from ras.broker.front import GatewayFront, GatewayInfo
from ras.broker.gatewaylink import GatewayLinks
from ras.broker.history import History
from ras.broker.hosts import HostRegistry
from ras.broker.launches import Launches
from ras.broker.launchshare import SharedLaunches
from ras.broker.login import Login
from ras.broker.radius import RadiusClient
from ras.broker.roles import Roles
from ras.broker.routing import Router
from ras.broker.sessions import SessionTable
from ras.broker.store import Store
from ras.broker.throttle import LoginThrottle, Throttle
from ras.broker.tickets import ResumeTokens, TicketAuthority
from ras.errors import ErrorCode, TransportError
from ras.net.channel import Channel
from ras.net.listen import serve_tcp
from ras.ops.listener import start_metrics
from ras.ops.metrics import watch_certificate
from ras.ops.sources import broker_state
from ras.pki import peer_name, server_context
from ras.protocol import Hello, Role, Side, Welcome

__all__ = ["GC_THRESHOLDS", "Broker"]

log = logging.getLogger("ras.broker")
SOFTWARE = f"ras-broker/{__version__}"

# Thousands of agent links make a large heap of long-lived objects. With CPython's default
# thresholds (700, 10, 10) the collector walked all of it every few seconds, stalling every
# launch for 0.3-3 s with 5,000 agents (benchmarks/README.md, "Broker"); young garbage still
# goes at every 20,000 allocations, the full walks come far less often. The ``ras`` command
# applies them (``ras.net.workers.tune_gc``) when it runs a broker.
GC_THRESHOLDS = (20_000, 20, 10)


class Broker:
    """One broker: its parts, and ``serve`` runs its listeners.

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
        limits: dict[str, Any] = {
            "max_failures_per_user": config.max_failures_per_user,
            "max_failures_per_address": config.max_failures_per_address,
            "window_s": config.failure_window_s,
            "lockout_s": config.lockout_s,
        }
        # several brokers on etcd count failed logins together: a lockout holds on all of them
        self.throttle: LoginThrottle = (
            EtcdThrottle(store.etcd, store.prefix, **limits)
            if isinstance(store, EtcdStore)
            else Throttle(**limits, clock=clock)
        )
        # made now, so a bad [radius] (its secret file) stops the broker at start, not a login
        radius = radius or (RadiusClient(config.radius) if config.radius else None)
        self.tickets = TicketAuthority(store.secret("ticket-key"))
        self.resume = ResumeTokens(store.secret("resume-key"))
        # ACME tokens, the public certificate and the portal settings, pushed to gateways
        self.links = GatewayLinks(partial(portal.update_for, store))
        self.certificates = FarmCertificates(config, store, self.links)  # ras/broker/certs.py
        self.catalog = Catalog(config, store, self.hosts, self.sessions)
        # logins and launches for reports (ras.broker.history; GET /api/reports)
        self.history = History(config.history_path, keep_days=config.history_days)
        self.sessions.on_end = self.history.ended  # session time in reports
        self.login = Login(
            config, store, self.catalog, self.directory, self.throttle, radius, self.resume,
            self.history,
        )  # fmt: skip
        self.launches = Launches(
            config, store, self.catalog, self.directory, self.tickets, self.history
        )
        # several brokers on etcd: launches in flight known to all (ras/broker/launchshare.py)
        self.shared_launches: SharedLaunches | None = None
        if isinstance(store, EtcdStore):
            self.shared_launches = SharedLaunches(config.name, store, self.catalog)
            self.launches.on_launch = self.shared_launches.launched
        watch_certificate("broker", "farm", config.cert_file)
        self.router = Router(config, store, self.catalog, self.history)
        self.agents = AgentLinks(
            config, self.hosts, self.sessions, on_sessions=self.catalog.sessions_reported
        )
        self.front = GatewayFront(
            config, self.catalog, self.login, self.launches, self.router, self.links
        )
        self.gateways: dict[str, GatewayInfo] = self.front.gateways
        # several brokers on etcd: the primary takes admin writes (one broker: always primary)
        self.roles: Roles | None = None
        if isinstance(store, EtcdStore):
            url = f"https://{config.name}:{config.admin_port}"
            self.roles = Roles(config.name, store, config.roles, admin_url=url)
        # reports of the whole farm: this broker's history and the others' (ras.broker.farmreport)
        self.reports = FarmReports(
            config,
            self.history,
            store if isinstance(store, EtcdStore) else None,
            self.roles.me.admin_url if self.roles is not None else "",
        )
        self._ssl = server_context(config.cert_file, config.key_file, client_ca_file=config.ca_file)

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            listen = partial(serve_tcp, host=cfg.listen_host, log=log, ssl_context=self._ssl)
            gw = await nursery.start(
                partial(listen, self.handle_gateway, port=cfg.gateway_port, what="gateways")
            )
            ag = await nursery.start(
                partial(listen, self.handle_agent, port=cfg.agent_port, what="agents")
            )
            addrs = {"gateways": gw[0], "agents": ag[0]}
            nursery.start_soon(self._on_the_primary, self.certificates.run)  # ACME, renewals
            nursery.start_soon(self.store.follow)  # other brokers' changes (a shared store)
            if self.roles is not None:  # brokers sharing their state (etcd)
                nursery.start_soon(self.catalog.run)  # Remote PCs released: in etcd too
                nursery.start_soon(self.certificates.follow)  # one saved by another broker
            nursery.start_soon(self.history.run)
            if cfg.admin_enabled:
                nursery.start_soon(self.reports.run)  # listed among the farm's brokers
            metrics = await start_metrics(nursery, cfg.metrics, partial(broker_state, self))
            if metrics is not None:
                addrs["metrics"] = metrics
            if self.roles is not None:
                nursery.start_soon(self.roles.run)  # primary or secondary (ras.broker.roles)
            if self.shared_launches is not None:
                nursery.start_soon(self.shared_launches.run)
            if cfg.admin_enabled:  # the HTTPS admin API (ras.broker.admin)
                addrs["admin"] = await nursery.start(partial(serve_admin, self))
            log.info("broker ready name=%s resources=%d", cfg.name, len(cfg.resources))
            task_status.started(addrs)

    async def _on_the_primary(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task`` while this broker is the primary (always, for a broker alone): what
        writes farm settings on its own, as ACME renewals do, runs on one broker at a time."""
        roles = self.roles
        if roles is None:
            await task()
            return
        while True:
            while not roles.is_primary:
                await roles.changed.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task)
                while roles.is_primary:
                    await roles.changed.wait()
                nursery.cancel_scope.cancel()

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

    async def handle_gateway(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        """A connection to the gateway port (a gateway or a HALB node)."""
        chan, name, role = await self._accept(stream, Role.GATEWAY, Role.HALB)
        await self.front.serve(chan, name, role)

    async def handle_agent(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        """A connection to the agent port."""
        chan, name, _ = await self._accept(stream, Role.AGENT)
        await self.agents.serve(chan, name, peer)
