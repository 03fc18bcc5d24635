"""A real etcd cluster for tests (``ras.lab.etcdcluster``) and the brokers of a farm on it.

Skipped where etcd-server is not installed (``scripts/install-peers`` installs it): mark a
module ``pytestmark = needs_etcd``. PYTEST_DONT_REWRITE (a plugin of tests/conftest.py, also
imported by the test modules).

- `cluster` (a fixture): one three-member cluster per test module, every member killed at its
  end. Each test keeps to a key prefix of its own: `etcd_config(cluster, "roles")`; a second
  broker of the same farm passes ``prefix=`` and ``first=`` (it talks to another member first).
- `Brokers`: brokers of one farm serving in the test's nursery, on ports of their own that a
  broker keeps when it is stopped (its task cancelled, as when its process dies) and started
  again; `Brokers.start_in_order` starts them so that the first one is the primary;
  `Brokers.farm` links gateways and agents to them, `Brokers.api` calls their admin APIs.
- `make_broker`: a broker that does not serve, whose logic (tickets, launches) a test calls.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from farmkit import LOOPBACK, Farm, until
from peerkit import skips

from ras.broker.config import BrokerConfig, RolesConfig
from ras.broker.etcd import EtcdConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.server import Broker
from ras.broker.store import Store
from ras.cli.admin import AdminClient
from ras.lab.etcdcluster import ETCD, Cluster, etcd_cluster, free_ports
from ras.pki import FarmPKI

__all__ = [
    "ADMIN",
    "Brokers",
    "Cluster",
    "cluster",
    "etcd_cluster",
    "etcd_config",
    "free_ports",
    "make_broker",
    "needs_etcd",
]

ADMIN = "ops-admin"  # the certificate name the brokers' admin APIs accept

needs_etcd = pytest.mark.skipif(
    skips(None if Path(ETCD).exists() else "etcd-server"),
    reason="etcd-server is not installed (scripts/install-peers)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-member etcd cluster on 127.0.0.1 for the tests of one module."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


_serial = itertools.count()


def etcd_config(
    cluster: Cluster, name: str = "test", *, first: int = 0, prefix: str | None = None
) -> EtcdConfig:
    """A farm's ``[etcd]`` on ``cluster``: under a key prefix of its own (``/ras-<name>-…/``)
    unless ``prefix`` names one, talking first to member ``first``."""
    endpoints = cluster.endpoints[first:] + cluster.endpoints[:first]
    prefix = prefix or f"/ras-{name}-{time.time_ns()}-{next(_serial)}/"
    return EtcdConfig(endpoints=endpoints, prefix=prefix)


def _config(tmp: Path, pki: FarmPKI, name: str, **settings: Any) -> BrokerConfig:
    cert, key = pki.ensure(name, LOOPBACK)
    return BrokerConfig(
        name=name, database=tmp / f"{name}.sqlite3", cert_file=cert, key_file=key,
        ca_file=pki.ca_path, **settings,
    )  # fmt: skip


def make_broker(tmp: Path, pki: FarmPKI, name: str, store: Store, **settings: Any) -> Broker:
    """A broker on ``store`` that does not serve (no port, no admin API): a test calls its
    logic directly. ``settings`` are more of its `BrokerConfig`."""
    return Broker(_config(tmp, pki, name, admin_enabled=False, **settings), store)


class Brokers:
    """Brokers of one farm on etcd, serving in ``nursery``, each in a cancel scope of its own.

    The farm's certificates are a new `FarmPKI` in ``tmp/pki`` (``pki``). ``settings`` are more
    of every broker's `BrokerConfig`; with ``admin`` each serves its admin API to the `ADMIN`
    certificate (`api`), its ``[roles]`` naming that API's address (``roles`` are more of its
    `RolesConfig`). ``ports[name]`` are its gateway, agent and admin ports, kept across a stop
    and a start.
    """

    def __init__(
        self,
        tmp: Path,
        etcd: EtcdConfig,
        nursery: trio.Nursery,
        *,
        admin: bool = False,
        roles: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        self.tmp, self.etcd, self.nursery = tmp, etcd, nursery
        self.pki = FarmPKI(tmp / "pki")
        self.pki.init_ca()
        self.admin, self.roles, self.settings = admin, roles or {}, settings
        self.ports: dict[str, tuple[int, int, int]] = {}
        self.running: dict[str, Broker] = {}
        self._scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str, priority: int | None = None) -> Broker:
        """Start ``name`` (again, on the same ports); ``priority`` is its ``[roles]`` one."""
        if name not in self.ports:
            gw, ag, admin = free_ports(3)
            self.ports[name] = (gw, ag, admin)
        gw, ag, admin = self.ports[name]
        settings = dict(self.settings, gateway_port=gw, agent_port=ag, admin_enabled=self.admin)
        roles = dict(self.roles)
        if priority is not None:
            roles["priority"] = priority
        if self.admin:
            roles["admin_url"] = self.url(name)
            settings.update(admin_port=admin, admin_cert_names=(ADMIN,))
        if roles:
            settings["roles"] = RolesConfig(**roles)
        cfg = _config(self.tmp, self.pki, name, etcd=self.etcd, **settings)
        broker = Broker(cfg, EtcdStore(self.etcd))
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(broker.serve)
                    task_status.started()

        await self.nursery.start(run)
        self.running[name] = broker
        self._scopes[name] = scope
        return broker

    async def start_in_order(self, *names: str) -> list[Broker]:
        """Start ``names`` with priorities 0, 1, …, each once the one before knows which broker
        is the primary: the first named is the primary."""
        started = []
        for priority, name in enumerate(names):
            broker = await self.start(name, priority)
            await until(lambda b=broker: b.roles is not None and bool(b.roles.primary))
            started.append(broker)
        return started

    def stop(self, name: str) -> None:
        """Stop ``name`` as its process dying would: its tasks cancelled, its sockets closed."""
        self._scopes.pop(name).cancel()
        del self.running[name]

    def addresses(self, which: int) -> list[str]:
        """Every broker's gateway (``which`` 0) or agent (1) address, as ``host:port``."""
        return [f"127.0.0.1:{ports[which]}" for ports in self.ports.values()]

    def farm(self, name: str) -> Farm:
        """A `farmkit.Farm` on broker ``name``: ``add_gateway`` and ``add_agent`` link to it
        (pass ``brokers=`` to link to more)."""
        gw, ag, _ = self.ports[name]
        addresses = {"gateways": ("127.0.0.1", gw), "agents": ("127.0.0.1", ag)}
        return Farm(self.pki, self.running[name], EtcdStore(self.etcd), addresses)  # type: ignore[arg-type]

    def url(self, name: str) -> str:
        """The address of ``name``'s admin API."""
        return f"https://127.0.0.1:{self.ports[name][2]}"

    def api(self, name: str) -> AdminClient:
        """``name``'s admin API as an administrator (`ADMIN`) calls it."""
        cert, key = self.pki.ensure(ADMIN)
        return AdminClient(self.url(name), self.pki.ca_path, cert_file=cert, key_file=key)
