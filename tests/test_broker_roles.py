"""Primary and secondary brokers on a real three-member etcd cluster (ras.broker.roles).

The role logic runs tick by tick with the clock given (the 15-minute minimum of automatic
promotion is not waited for); etcd is real, so leases, the primary key and the fence on
writes are etcd's own. Then the admin API of two running brokers: a secondary answers a
write with a redirect naming the primary, promotion through any broker moves the role, and
the deposed primary's late writes are refused. Real processes: ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from etcdkit import Brokers, Cluster, etcd_config, needs_etcd
from farmkit import until

from ras.broker.etcd import EtcdConfig
from ras.broker.etcdstore import EtcdStore, FencedOut
from ras.broker.model import HostKind, HostRecord
from ras.broker.roles import Roles, RolesConfig
from ras.cli.admin import AdminApiError

pytestmark = needs_etcd
DELAY = 900.0  # the shortest automatic promotion delay


def _roles(etcd: EtcdConfig, name: str, priority: int, **kw: object) -> Roles:
    cfg = RolesConfig(priority=priority, auto_promote_after_s=DELAY, primary_lease_s=3, **kw)  # type: ignore[arg-type]
    return Roles(name, EtcdStore(etcd), cfg, admin_url=f"https://{name}:20443")


def test_a_dead_primary_is_replaced_after_the_delay_and_its_late_writes_are_refused(
    cluster: Cluster,
) -> None:
    etcd = etcd_config(cluster, "roles")
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
    etcd = etcd_config(cluster, "roles")
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
    etcd = etcd_config(cluster, "roles")
    brokers = Brokers(tmp_path, etcd, nursery, admin=True, roles={"primary_lease_s": 3})
    broker_a, broker_b = await brokers.start_in_order("broker-a", "broker-b")
    apis = {name: brokers.api(name) for name in ("broker-a", "broker-b")}
    a, b = broker_a.roles, broker_b.roles
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
        broker_a.store.put_object(HostRecord("rdsh9", HostKind.RDSH, drained=True))
