"""The HALB daemon: an ``Election`` (VRRP) for the VIPs and a ``Balancer`` over the gateways,
with the admin port. Every node balances on the VIPs all the time; only the master receives
traffic for them, since only the master holds the addresses.

Gateway tracking joins the two: while the balancer has no healthy gateway, the election
advertises ``no_gateway_priority`` instead of ``priority`` (see ``HalbConfig``), so the VIPs go
to a node that can serve them."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ras import __version__
from ras.config import load
from ras.errors import ConfigError, PeerError, RasError, TransportError
from ras.halb.admin import serve_admin
from ras.halb.balancer import Balancer
from ras.halb.config import GatewayRef, HalbConfig
from ras.halb.election import Election
from ras.halb.vip import missing_capabilities
from ras.net.brokers import BrokerChoice
from ras.net.channel import Channel, greet
from ras.net.tasks import race, reconnecting
from ras.net.tls import connect_tls
from ras.ops.listener import start_metrics
from ras.ops.metrics import watch_certificate
from ras.ops.sources import halb_state
from ras.pki import client_context
from ras.protocol import (
    AcmeChallenge,
    AcmeWithdraw,
    Error,
    GatewayList,
    ListGateways,
    Ping,
    Pong,
    PublicCertificate,
    Role,
)
from ras.protocol.vrrp import OWNER_PRIORITY

__all__ = ["Halb"]

log = logging.getLogger("ras.halb")
SOFTWARE = f"ras-halb/{__version__}"


class Halb:
    def __init__(self, config: HalbConfig, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.election = Election(config)
        self.balancer = Balancer(config)
        watch_certificate("halb", "farm", config.cert_file)
        self.gateways: tuple[GatewayRef, ...] = config.gateways  # from the config file
        self.from_broker: tuple[GatewayRef, ...] = ()
        self._brokers = BrokerChoice(config.broker_list or (("", 0),))

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        missing = missing_capabilities()
        if missing:
            raise RasError(f"the HALB needs {' and '.join(missing)}; run it as root or grant them")
        async with trio.open_nursery() as nursery:
            services = await nursery.start(self.balancer.serve)
            admin = await nursery.start(serve_admin, self, cfg.admin_host, cfg.admin_port)
            metrics = await start_metrics(nursery, cfg.metrics, partial(halb_state, self))
            # Take part in the election only once we know which gateways serve, and with the
            # priority that says so: a node that won the VIP before its first health checks
            # would refuse the first clients.
            await self.balancer.ready.wait()
            if cfg.broker_list:
                nursery.start_soon(self._broker_gateways)
            if cfg.tracked_priority is not None:
                self._track_gateways()
                nursery.start_soon(self._follow_gateways)
            elif cfg.priority == OWNER_PRIORITY:
                log.info(
                    "vrrp priority name=%s is 255 (the address owner): the node keeps the VIPs "
                    "even with no healthy gateway; give it 254 to make it follow its gateways",
                    cfg.name,
                )
            await nursery.start(self.election.run)
            log.info(
                "halb ready name=%s services=%s admin=%s:%d",
                cfg.name,
                ",".join(f"{h}:{p}" for h, p in services),
                *admin,
            )
            task_status.started({"services": services, "admin": admin, "metrics": metrics})

    # -- gateway tracking ------------------------------------------------------------------------

    async def _follow_gateways(self) -> None:
        while True:
            changed = self.balancer.health_changed
            self._track_gateways()
            await changed.wait()

    def _track_gateways(self) -> None:
        """The priority for the gateways' health now: ours, or the tracked one if none serves."""
        low = self.config.tracked_priority
        assert low is not None
        if self.balancer.any_healthy():
            self.election.want_priority(self.config.priority, "a gateway is healthy")
        else:
            why = "no healthy gateway" if self.balancer.backends else "no gateway listed"
            self.election.want_priority(low, why)

    # -- gateways from the broker ---------------------------------------------------------------

    async def _broker_gateways(self) -> None:
        brokers = ",".join(f"{h}:{p}" for h, p in self.config.broker_list)
        await reconnecting(self._poll_broker, log=log, what=f"halb brokers={brokers}")

    async def _poll_broker(self) -> None:
        """Ask the broker for its online gateways every ``broker_poll_interval_s``, and take
        what it pushes meanwhile (ACME tokens, the farm certificate). When the broker is away,
        the last list, tokens and certificate stay: balancing goes on with what was known."""
        cfg = self.config
        assert cfg.ca_file is not None
        ctx = client_context(cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file)

        async def open_at(host: str, port: int) -> Channel:
            stream = await connect_tls(host, port, ctx)
            return await greet(stream, Role.HALB, SOFTWARE)

        chan = await self._brokers.connect(open_at, attempt_s=cfg.connect_timeout_s)
        if len(cfg.broker_list) == 1:
            self.balancer.challenges.clear()  # the broker sends the current ones again
        answered = [trio.Event()]
        async with chan:
            await race(
                partial(self._ask_broker, chan, answered),
                partial(self._from_broker, chan, answered),
            )

    async def _ask_broker(self, chan: Channel, answered: list[trio.Event]) -> None:
        cfg = self.config
        while True:
            answered[0] = trio.Event()
            await chan.send(ListGateways())
            with trio.fail_after(cfg.connect_timeout_s):
                await answered[0].wait()
            await trio.sleep(cfg.broker_poll_interval_s)

    async def _from_broker(self, chan: Channel, answered: list[trio.Event]) -> None:
        while True:
            msg = await chan.receive()
            match msg:
                case GatewayList():
                    self.from_broker = tuple(GatewayRef(g.name, g.host) for g in msg.gateways)
                    self._apply_gateways()
                    answered[0].set()
                case AcmeChallenge():
                    self.balancer.challenges.add(msg)
                case AcmeWithdraw():
                    self.balancer.challenges.withdraw(msg.token)
                case PublicCertificate():
                    await self.balancer.install_certificate(msg.cert_pem, msg.key_pem)
                case Ping() | Pong():
                    await chan.answer_ping(msg)
                case Error():
                    raise PeerError(msg)
                case _:
                    raise TransportError(f"the broker sent {msg.TYPE} to a HALB")

    def _apply_gateways(self) -> None:
        """The configured gateways, then the broker's (a name in both: the config wins)."""
        configured = {g.name for g in self.gateways}
        merged = (*self.gateways, *(g for g in self.from_broker if g.name not in configured))
        if [(g.name, g.host) for g in merged] != [
            (b.name, b.host) for b in self.balancer.backends.values()
        ]:
            log.info("gateways now=%s", ",".join(f"{g.name}@{g.host}" for g in merged) or "-")
        self.balancer.set_gateways(merged)

    # -- the admin API ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        e = self.election
        return {
            "name": self.config.name,
            "state": e.state.name,
            "vips": list(self.config.vips),
            "holding_vips": e.holding,
            "primary": str(e.primary) if e.primary else None,
            "master": e.master,
            "vrid": self.config.vrid,
            "priority": e.priority,  # advertised now: no_gateway_priority while none is healthy
            "base_priority": self.config.priority,
            "adverts_sent": e.adverts_sent,
            "adverts_received": e.adverts_received,
            "dropped": dict(e.dropped),
            "gateways": self.balancer.status(),
            "connections": sum(b.active for b in self.balancer.backends.values()),
        }

    def drain(self, name: str, draining: bool) -> bool:
        backend = self.balancer.backends.get(name)
        if backend is None:
            return False
        backend.draining = draining
        log.warning(
            "gateway %s name=%s active=%d",
            "draining" if draining else "undrained",
            name,
            backend.active,
        )
        return True

    async def reload(self) -> str:
        if self.config_path is None:
            raise ConfigError("this HALB was not started from a config file")
        new = load(HalbConfig, self.config_path)
        changed = [
            k
            for k in ("vips", "vrid", "interface", "services", "priority", "no_gateway_priority")
            if getattr(new, k) != getattr(self.config, k)
        ]
        if changed:
            raise ConfigError(
                f"{self.config_path}: {', '.join(changed)} change only with a restart"
            )
        self.gateways = new.gateways
        self._apply_gateways()
        log.info("config reloaded gateways=%s", ",".join(g.name for g in new.gateways))
        return f"{len(new.gateways)} gateways"
