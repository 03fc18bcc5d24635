"""Primary and secondary brokers on a real three-member etcd cluster (ras.broker.roles).

The role logic runs tick by tick with the clock given (the 15-minute minimum of automatic
promotion is not waited for); etcd is real, so leases, the primary key and the fence on
writes are etcd's own. Then the admin API of two running brokers: a secondary answers a
write with a redirect naming the primary, promotion through any broker moves the role, and
the deposed primary's late writes are refused. Real processes: ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from etcdkit import Cluster, etcd_cluster, free_ports, needs_etcd
from farmkit import LOOPBACK, until

from ras.broker.config import BrokerConfig
from ras.broker.etcd import EtcdConfig
from ras.broker.etcdstore import EtcdStore, FencedOut
from ras.broker.model import HostKind, HostRecord
from ras.broker.roles import Roles, RolesConfig
from ras.broker.server import Broker
from ras.cli.admin import AdminApiError, AdminClient
from ras.pki import FarmPKI

pytestmark = needs_etcd
DELAY = 900.0  # the shortest automatic promotion delay


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


def _etcd(cluster: Cluster) -> EtcdConfig:
    return EtcdConfig(endpoints=cluster.endpoints, prefix=f"/ras-roles-{time.time_ns()}/")


def _roles(etcd: EtcdConfig, name: str, priority: int, **kw: object) -> Roles:
    cfg = RolesConfig(priority=priority, auto_promote_after_s=DELAY, primary_lease_s=3, **kw)  # type: ignore[arg-type]
    return Roles(name, EtcdStore(etcd), cfg, admin_url=f"https://{name}:20443")


def test_a_dead_primary_is_replaced_after_the_delay_and_its_late_writes_are_refused(
    cluster: Cluster,
) -> None:
    etcd = _etcd(cluster)
    a, b, c = _roles(etcd, "a", 0), _roles(etcd, "b", 1, failback=True), _roles(etcd, "c", 2)
    for r in (a, b, c):
        r._tick(0.0)
    assert [r.is_primary for r in (a, b, c)] == [True, False, False]
    assert b.primary == "a"
    a.store.put_object(HostRecord("rdsh1", HostKind.RDSH))  # the primary writes

    a.store.etcd.revoke(a._lease)  # a's leases end (the process died, or lost the cluster)
    a.store.etcd.revoke(a._member_lease)
    for r in (b, c):
        r._tick(10.0)
    assert not any(r.is_primary for r in (b, c))  # vacant: no automatic promotion yet
    b._tick(10.0 + DELAY - 1)
    c._tick(10.0 + DELAY - 1)
    assert not b.is_primary
    c._tick(10.0 + DELAY)  # c's delay is up, but b has the better priority
    assert not c.is_primary
    b._tick(10.0 + DELAY)
    assert b.is_primary
    c._tick(10.0 + DELAY + 1)
    assert c.primary == "b"
    b.store.put_object(HostRecord("rdsh1", HostKind.RDSH, drained=True))  # the new primary

    with pytest.raises(FencedOut):  # the old primary's late write: refused by etcd
        a.store.put_object(HostRecord("rdsh1", HostKind.RDSH, drained=False))
    record = c.store.get_object(HostRecord, "rdsh1")
    assert record is not None
    assert record.drained

    a._tick(20.0 + DELAY)  # a is back: a secondary now (b was promoted)
    assert not a.is_primary
    assert a.primary == "b"
    b._tick(21.0 + DELAY)  # failback: b hands the role back to a, present again
    assert not b.is_primary
    a._tick(22.0 + DELAY)
    assert a.is_primary
    b._tick(23.0 + DELAY)
    c._tick(23.0 + DELAY)
    assert [r.primary for r in (a, b, c)] == ["a", "a", "a"]


def test_promotion_deposes_the_primary_at_once_and_four_brokers_never_auto_promote(
    cluster: Cluster,
) -> None:
    etcd = _etcd(cluster)
    brokers = [_roles(etcd, name, i) for i, name in enumerate("abcd")]
    for r in brokers:
        r._tick(0.0)
    a, b, c, d = brokers
    assert a.is_primary
    c.promote("c")  # any broker takes it
    a._tick(1.0)
    assert not a.is_primary  # deposed at once, its lease still alive
    with pytest.raises(FencedOut):
        a.store.put_object(HostRecord("rdsh1", HostKind.RDSH))
    c._tick(1.0)
    assert c.is_primary
    with pytest.raises(LookupError):
        c.promote("nobody")

    c.store.etcd.revoke(c._lease)  # the primary dies; four brokers: no automatic promotion
    c.store.etcd.revoke(c._member_lease)
    d2 = _roles(etcd, "e", 5)  # a fourth one present again
    d2._tick(1.5)
    for now in (2.0, 3.0 + DELAY, 4.0 + 2 * DELAY):
        for r in (a, b, d):
            r._tick(now)
    assert not any(r.is_primary for r in (a, b, d))
    assert a.status()["auto_promote"] is False


async def test_a_secondary_redirects_admin_writes_to_the_primary(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    etcd = _etcd(cluster)
    admin_cert, admin_key = pki.ensure("ops-admin")
    brokers: dict[str, Broker] = {}
    apis: dict[str, AdminClient] = {}
    for name, priority in (("broker-a", 0), ("broker-b", 1)):
        cert, key = pki.ensure(name, LOOPBACK)
        admin_port = free_ports(1)[0]
        cfg = BrokerConfig(
            name=name, database=tmp_path / f"{name}.sqlite3", cert_file=cert, key_file=key,
            ca_file=pki.ca_path, gateway_port=0, agent_port=0, admin_port=admin_port,
            admin_cert_names=("ops-admin",), etcd=etcd,
            roles=RolesConfig(
                priority=priority, primary_lease_s=3,
                admin_url=f"https://127.0.0.1:{admin_port}",
            ),
        )  # fmt: skip
        brokers[name] = Broker(cfg, EtcdStore(etcd))
        await nursery.start(brokers[name].serve)
        await until(lambda b=brokers[name]: b.roles is not None and bool(b.roles.primary))
        apis[name] = AdminClient(
            f"https://127.0.0.1:{admin_port}", pki.ca_path, cert_file=admin_cert,
            key_file=admin_key,
        )  # fmt: skip
    a, b = brokers["broker-a"].roles, brokers["broker-b"].roles
    assert a is not None
    assert b is not None
    assert a.is_primary
    assert not b.is_primary

    def call(api: str, method: str, path: str, body: object = None) -> object:
        return apis[api].request(method, path, body)

    host = {"name": "rdsh9", "kind": "rdsh"}
    await trio.to_thread.run_sync(call, "broker-a", "POST", "hosts", host)
    with pytest.raises(AdminApiError) as info:
        await trio.to_thread.run_sync(call, "broker-b", "POST", "pools", {"name": "p1"})
    assert info.value.status == 307
    assert info.value.code == "not_primary"
    assert "primary broker-a at https://127.0.0.1:" in str(info.value)
    listed = await trio.to_thread.run_sync(call, "broker-b", "GET", "brokers")
    assert isinstance(listed, dict)
    roles = {m["name"]: m["role"] for m in listed["brokers"]}
    assert roles == {"broker-a": "primary", "broker-b": "secondary"}
    # reads are served by every broker, from the shared state
    got = await trio.to_thread.run_sync(call, "broker-b", "GET", "hosts/rdsh9")
    assert isinstance(got, dict)

    await trio.to_thread.run_sync(call, "broker-b", "POST", "brokers/broker-b/promote")
    await until(lambda: b.is_primary and a.primary == "broker-b")
    await trio.to_thread.run_sync(call, "broker-b", "POST", "pools", {"name": "p1"})
    with pytest.raises(AdminApiError) as info:
        await trio.to_thread.run_sync(call, "broker-a", "DELETE", "pools/p1")
    assert info.value.status == 307
    assert "primary broker-b" in str(info.value)
    with pytest.raises(FencedOut):  # a's store refuses even a write past its API
        brokers["broker-a"].store.put_object(HostRecord("rdsh9", HostKind.RDSH, drained=True))
