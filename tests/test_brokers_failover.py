"""Two brokers on a real three-member etcd cluster; a gateway and an agent that know both.

The broker a gateway prefers goes away (its task cancelled: its sockets close, as when the
process dies): a session already tunnelled goes on, new logins and launches go to the other
broker at once (it knows the host: the agent reports to both), and when the first broker is
back, new sessions go to it again. Real processes: run under ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from etcdkit import Cluster, etcd_cluster, free_ports, needs_etcd
from farmkit import LOOPBACK, PASSWORD, USER, Farm, Listener, add_agent, add_gateway, until

from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.etcd import EtcdConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.model import SessionRecord
from ras.broker.passwords import hash_password
from ras.broker.server import Broker
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.pki import FarmPKI
from ras.protocol import Mode

pytestmark = needs_etcd


class Brokers:
    """Brokers on fixed ports, each in a cancel scope of its own (stop and start again)."""

    def __init__(self, tmp: Path, pki: FarmPKI, etcd: EtcdConfig, nursery: trio.Nursery) -> None:
        self.tmp, self.pki, self.etcd, self.nursery = tmp, pki, etcd, nursery
        self.ports: dict[str, tuple[int, int]] = {}
        self.running: dict[str, Broker] = {}
        self._scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str) -> Broker:
        if name not in self.ports:
            gw, ag = free_ports(2)
            self.ports[name] = (gw, ag)
        cert, key = self.pki.ensure(name, LOOPBACK)
        cfg = BrokerConfig(
            name=name,
            database=self.tmp / f"{name}.sqlite3",
            cert_file=cert,
            key_file=key,
            ca_file=self.pki.ca_path,
            gateway_port=self.ports[name][0],
            agent_port=self.ports[name][1],
            admin_enabled=False,
            etcd=self.etcd,
            resources=(ResourceConfig("desktop", "Desktop"),),
        )
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

    def stop(self, name: str) -> None:
        self._scopes.pop(name).cancel()
        del self.running[name]

    def addresses(self, which: int) -> list[str]:
        return [f"127.0.0.1:{ports[which]}" for ports in self.ports.values()]


async def _launch(f: Farm) -> tuple[ClientSession, trio.abc.Stream]:
    session = await ClientSession.connect(f.client_config(mode=Mode.GATEWAY))
    await session.authenticate(USER, PASSWORD)
    launched = await session.launch("desktop")
    tunnel = await session.open_tunnel(launched.ticket)
    return session, tunnel


async def _echoes(tunnel: trio.abc.Stream, data: bytes) -> bool:
    await tunnel.send_all(data)
    got = b""
    with trio.fail_after(30):
        while len(got) < len(data):
            got += await tunnel.receive_some()
    return got == data


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


async def test_a_gateway_and_an_agent_fail_over_to_the_other_broker_and_come_back(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    etcd = EtcdConfig(endpoints=cluster.endpoints, prefix=f"/ras-failover-{time.time_ns()}/")
    EtcdStore(etcd).put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    brokers = Brokers(tmp_path, pki, etcd, nursery)
    a = await brokers.start("broker-a")
    b = await brokers.start("broker-b")
    host = Listener()
    rdp_port = await nursery.start(host.serve)
    gw, ag = brokers.ports["broker-a"]
    f = Farm(pki, a, EtcdStore(etcd), {"gateways": ("127.0.0.1", gw), "agents": ("127.0.0.1", ag)})
    await add_gateway(f, nursery, "gateway", brokers=brokers.addresses(0), broker_failover_s=2.0)
    await add_agent(f, nursery, "rdsh1", "127.0.0.1", rdp_port, brokers=brokers.addresses(1))
    await until(lambda: "rdsh1" in a.hosts.hosts and "rdsh1" in b.hosts.hosts)
    await until(lambda: all(x.gateways.get("gateway") for x in (a, b)))

    # the preferred broker serves while it is up
    first, long_tunnel = await _launch(f)
    assert len(a.sessions) == 1
    await until(lambda: len(b.sessions) == 1)  # the launch in flight is shared through etcd
    assert await _echoes(long_tunnel, b"before")

    brokers.stop("broker-a")  # the preferred broker goes away
    second, tunnel = await _launch(f)  # logs in and launches through the other one
    assert len(b.sessions) == 2  # the host was known there: the agent reports to both
    assert await _echoes(tunnel, b"through b")
    assert await _echoes(long_tunnel, b"still there")  # the running session is not cut
    await tunnel.aclose()
    await second.aclose()

    a2 = await brokers.start("broker-a")  # back, on its address
    made_here: list[str] = []  # launches made through a2 (it also learns b's from etcd)
    share = a2.launches.on_launch
    assert share is not None

    def note(record: SessionRecord) -> None:
        made_here.append(record.id)
        share(record)

    a2.launches.on_launch = note
    await until(lambda: "rdsh1" in a2.hosts.hosts)  # the agent registers again
    await until(lambda: bool(a2.gateways.get("gateway")) and a2.gateways["gateway"].online)
    with trio.fail_after(60):  # hang guard: new sessions come back to it once it is up
        while not made_here:
            session, extra = await _launch(f)
            await extra.aclose()
            await session.aclose()
            await trio.sleep(0.5)
    assert await _echoes(long_tunnel, b"and after")
    await long_tunnel.aclose()
    await first.aclose()
