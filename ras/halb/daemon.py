"""The HALB daemon: an ``Election`` (VRRP) for the VIPs and a ``Balancer`` over the gateways,
with the admin port. Every node balances on the VIPs all the time; only the master receives
traffic for them, since only the master holds the addresses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from ras.config import load
from ras.errors import ConfigError, RasError
from ras.halb.admin import serve_admin
from ras.halb.balancer import Balancer
from ras.halb.config import HalbConfig
from ras.halb.election import Election
from ras.halb.vip import missing_capabilities

__all__ = ["Halb"]

log = logging.getLogger("ras.halb")


class Halb:
    def __init__(self, config: HalbConfig, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.election = Election(config)
        self.balancer = Balancer(config)

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
            # Take part in the election only once we know which gateways serve: a node that
            # won the VIP before its first health checks would refuse the first clients.
            await self.balancer.ready.wait()
            await nursery.start(self.election.run)
            log.info(
                "halb ready name=%s services=%s admin=%s:%d",
                cfg.name,
                ",".join(f"{h}:{p}" for h, p in services),
                *admin,
            )
            task_status.started({"services": services, "admin": admin})

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
            "priority": self.config.priority,
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
            for k in ("vips", "vrid", "interface", "services")
            if getattr(new, k) != getattr(self.config, k)
        ]
        if changed:
            raise ConfigError(
                f"{self.config_path}: {', '.join(changed)} change only with a restart"
            )
        self.balancer.set_gateways(new.gateways)
        log.info("config reloaded gateways=%s", ",".join(g.name for g in new.gateways))
        return f"{len(new.gateways)} gateways"
