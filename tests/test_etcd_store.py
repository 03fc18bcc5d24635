"""The broker's state on a real three-member etcd cluster (Debian's etcd-server).

The store interface is the same as SQLite's: the same checks run on both. Then what only a
shared store has: two brokers redeeming the same tickets at the same instant (exactly one
success per ticket), a change made on one broker served by the other, and the cluster
losing a member. Real processes: run under the heavy-test lock (``flock /tmp/ras-heavy.lock``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from etcdkit import Cluster, etcd_cluster, etcd_config, make_broker, needs_etcd

from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.directory import DirectoryUnavailable
from ras.broker.etcdstore import EtcdStore, FencedOut
from ras.broker.model import HostKind, HostRecord, ResourceRecord
from ras.broker.passwords import hash_password
from ras.broker.server import Broker
from ras.broker.state import open_store
from ras.broker.store import SQLiteStore, Store, UserRecord
from ras.config import load
from ras.errors import ConfigError, ErrorCode
from ras.pki import FarmPKI
from ras.protocol import RedeemTicket, TicketOk

pytestmark = needs_etcd


def _etcd_store(cluster: Cluster, *, rotate: int = 0, prefix: str | None = None) -> EtcdStore:
    """A store on its own key prefix (one per test), talking first to member ``rotate``."""
    return EtcdStore(etcd_config(cluster, "store", first=rotate, prefix=prefix))


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "broker.sqlite3")
    else:
        s = _etcd_store(request.getfixturevalue("cluster"))
    yield s
    s.close()


def test_users_secrets_and_single_use_behave_alike_on_both_stores(store: Store) -> None:
    store.put_user(UserRecord("Alice", hash_password("pw"), ("users",), totp_secret=b"s" * 20))
    got = store.get_user("alice")  # names without regard to case
    assert got is not None
    assert got.name == "Alice"
    assert got.groups == ("users",)
    assert got.totp_secret == b"s" * 20
    store.put_user(UserRecord("bob", "h"))
    assert [u.name for u in store.list_users()] == ["Alice", "bob"]
    # a TOTP step works once, and an older one never again
    assert store.use_totp_step("alice", 100)
    assert not store.use_totp_step("alice", 100)
    assert not store.use_totp_step("alice", 99)
    assert store.use_totp_step("alice", 101)
    # a new secret forgets the steps used with the old one
    store.put_user(UserRecord("Alice", "h", totp_secret=b"t" * 20))
    assert store.use_totp_step("alice", 50)
    assert store.delete_user("ALICE")
    assert store.get_user("alice") is None
    assert not store.delete_user("alice")
    # secrets: made once, then the same
    key = store.secret("ticket-key")
    assert len(key) == 32
    assert store.secret("ticket-key") == key
    # a ticket is redeemed once
    expires = time.time() + 60
    assert not store.was_redeemed("t1")
    assert store.redeem_once("t1", expires)
    assert store.was_redeemed("t1")  # a logged-out resume token is looked up so
    assert not store.redeem_once("t1", expires)
    assert store.redeem_once("t2", expires)


def test_configured_objects_behave_alike_on_both_stores(store: Store) -> None:
    before = store.generation
    store.put_object(HostRecord("rdsh2", HostKind.RDSH))
    store.put_object(HostRecord("RDSH1", HostKind.RDSH, drained=True))
    assert store.generation > before
    assert [h.name for h in store.list_objects(HostRecord)] == ["RDSH1", "rdsh2"]
    got = store.get_object(HostRecord, "rdsh1")
    assert got is not None
    assert got.drained
    assert store.delete_object(HostRecord, "Rdsh1")
    assert not store.delete_object(HostRecord, "rdsh1")
    assert store.get_object(HostRecord, "rdsh1") is None
    assert store.list_objects(ResourceRecord) == []


def test_a_change_on_one_broker_is_seen_by_the_other(cluster: Cluster) -> None:
    one = _etcd_store(cluster, rotate=0)
    other = _etcd_store(cluster, rotate=2, prefix=one._prefix.decode())
    other.poll_changes()
    seen = other.generation
    one.put_object(HostRecord("rdsh1", HostKind.RDSH, drained=True))
    assert other.poll_changes()
    assert other.generation > seen
    got = other.get_object(HostRecord, "rdsh1")
    assert got is not None
    assert got.drained
    assert not other.poll_changes()  # nothing new since
    assert one.secret("resume-key") == other.secret("resume-key")


def test_a_fenced_write_is_refused_once_the_fence_moved(cluster: Cluster) -> None:
    store = _etcd_store(cluster)
    fence = store.key("primary")
    revision = store.etcd.put(fence, b"broker-a")
    store.fence = (fence, revision)
    store.put_object(HostRecord("rdsh1", HostKind.RDSH))  # still the primary: written
    store.etcd.put(fence, b"broker-b")  # another broker won the key since
    with pytest.raises(FencedOut):
        store.put_object(HostRecord("rdsh1", HostKind.RDSH, drained=True))
    with pytest.raises(FencedOut):
        store.delete_object(HostRecord, "rdsh1")
    got = store.get_object(HostRecord, "rdsh1")
    assert got is not None
    assert not got.drained


def _broker(tmp: Path, store: EtcdStore, name: str, pki: FarmPKI) -> Broker:
    return make_broker(tmp, pki, name, store, resources=(ResourceConfig("desktop", "Desktop"),))


async def test_two_brokers_redeem_the_same_tickets_at_once_and_each_works_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    a_store = _etcd_store(cluster, rotate=0)
    b_store = _etcd_store(cluster, rotate=1, prefix=a_store._prefix.decode())
    a = _broker(tmp_path, a_store, "broker-a", pki)
    b = _broker(tmp_path, b_store, "broker-b", pki)
    tickets = []
    for i in range(1000):  # issued by broker a, redeemed through gateways of both brokers
        ticket, _ = a.tickets.issue(
            user="alice", resource="desktop", host="10.0.0.5", port=3389, gateway="gw",
            client=f"192.0.2.{i % 250}", now=time.time(), ttl_s=300,
        )  # fmt: skip
        tickets.append((ticket, f"192.0.2.{i % 250}"))
    wins: list[int] = [0] * len(tickets)
    refused = 0
    limit = trio.CapacityLimiter(16)

    async def redeem(broker: Broker, index: int) -> None:
        nonlocal refused
        ticket, client = tickets[index]
        async with limit:
            got = await broker.launches.redeem(RedeemTicket(ticket, client), client, "gw")
        if isinstance(got, TicketOk):
            assert (got.host, got.port) == ("10.0.0.5", 3389)
            wins[index] += 1
        else:
            assert got == (ErrorCode.TICKET_INVALID, "ticket is not valid")
            refused += 1

    async def both(index: int) -> None:
        async with trio.open_nursery() as pair:  # the same ticket on both, at the same instant
            pair.start_soon(redeem, a, index)
            pair.start_soon(redeem, b, index)

    async with trio.open_nursery() as nursery:
        for index in range(len(tickets)):
            nursery.start_soon(both, index)
    assert sum(wins) == 1000
    assert wins == [1] * 1000  # each ticket exactly once
    assert refused == 1000


async def test_redemptions_go_on_when_a_member_dies(cluster: Cluster, tmp_path: Path) -> None:
    store = _etcd_store(cluster, rotate=0)
    expires = time.time() + 60
    assert store.redeem_once("before", expires)
    cluster.kill(0)  # the member this store talks to first
    try:
        assert await trio.to_thread.run_sync(store.redeem_once, "after", expires)
        assert not await trio.to_thread.run_sync(store.redeem_once, "before", expires)
    finally:
        cluster.start(0)
        cluster.wait_ready()


def test_broker_toml_names_the_etcd_cluster_and_a_bad_member_is_refused(tmp_path: Path) -> None:
    base = (
        'name = "broker"\ndatabase = "b.sqlite3"\ncert_file = "b.pem"\nkey_file = "b.key"\n'
        'ca_file = "ca.pem"\n'
    )
    good = tmp_path / "broker.toml"
    good.write_text(
        base + '[etcd]\nendpoints = ["10.0.0.1:2379", "[fd00::2]:2379"]\nprefix = "/farm1/"\n'
    )
    cfg = load(BrokerConfig, good)
    assert cfg.etcd is not None
    assert cfg.etcd.endpoints == ("10.0.0.1:2379", "[fd00::2]:2379")
    assert isinstance(open_store(dataclasses.replace(cfg, etcd=None)), SQLiteStore)
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '[etcd]\nendpoints = ["10.0.0.1"]\n')
    with pytest.raises(ConfigError) as info:
        load(BrokerConfig, bad)
    assert "bad.toml" in str(info.value)
    assert "etcd.endpoints[0]" in str(info.value)


async def test_without_etcd_logins_and_redemptions_are_refused_not_crashed(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path / "solo", members=1) as solo:
        store = EtcdStore(solo.config(prefix="/ras-down/", timeout_s=1.0))
        store.put_user(UserRecord("alice", hash_password("pw"), ("users",)))
        pki = FarmPKI(tmp_path / "pki")
        pki.init_ca()
        broker = _broker(tmp_path, store, "broker-a", pki)
        ticket, _ = broker.tickets.issue(
            user="alice", resource="desktop", host="10.0.0.5", port=3389, gateway="gw",
            client="192.0.2.1", now=time.time(), ttl_s=300,
        )  # fmt: skip
        solo.kill(0)  # no etcd at all: no majority
        got = await broker.launches.redeem(RedeemTicket(ticket, "192.0.2.1"), "192.0.2.1", "gw")
        assert got == (ErrorCode.UNAVAILABLE, "the farm's state cannot be reached; try again")
        with pytest.raises(DirectoryUnavailable):
            await broker.directory.authenticate("alice", "pw")
        solo.start(0)
        solo.wait_ready()  # back: the ticket was never used, so it redeems now
        got = await broker.launches.redeem(RedeemTicket(ticket, "192.0.2.1"), "192.0.2.1", "gw")
        assert isinstance(got, TicketOk)
