"""Failed-login throttling shared by the brokers of a farm on a real three-member etcd cluster.

Failures counted on two brokers lock the user out on both; an unlock through either broker's
admin API frees both; concurrent failures on two brokers are all counted (compare-and-swap,
no lost update); with etcd out of reach a login is refused, never let through uncounted.
Real processes: run under the heavy-test lock (``flock /tmp/ras-heavy.lock``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from etcdkit import Brokers, Cluster, etcd_cluster, etcd_config, needs_etcd
from farmkit import PASSWORD, USER

from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.directory import BuiltinDirectory
from ras.broker.etcd import Etcd
from ras.broker.etcdstore import EtcdStore
from ras.broker.etcdthrottle import EtcdThrottle
from ras.broker.passwords import hash_password
from ras.broker.server import Broker
from ras.broker.store import SQLiteStore, UserRecord
from ras.broker.throttle import Lockout
from ras.errors import ErrorCode, RasError
from ras.pki import FarmPKI
from ras.protocol import Authenticate

pytestmark = needs_etcd


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _prefix() -> str:
    return f"/ras-throttle-{time.time_ns()}/"


def _throttle(
    cluster: Cluster, prefix: str, clock: Clock, *, rotate: int, per_user: int = 3
) -> EtcdThrottle:
    """One broker's throttle, talking first to etcd member ``rotate``."""
    return EtcdThrottle(
        Etcd(etcd_config(cluster, first=rotate, prefix=prefix)),
        prefix,
        max_failures_per_user=per_user,
        max_failures_per_address=10,
        window_s=60.0,
        lockout_s=300.0,
        clock=clock,
    )


def test_failures_on_two_brokers_lock_the_user_out_on_both(cluster: Cluster) -> None:
    clock, prefix = Clock(), _prefix()
    a = _throttle(cluster, prefix, clock, rotate=0)
    b = _throttle(cluster, prefix, clock, rotate=1)
    assert a.failed("alice", "192.0.2.1") is None
    assert b.failed("Alice", "192.0.2.2") is None  # any spelling, on the other broker
    assert a.failed("ALICE", "192.0.2.3") == Lockout("user", 300.0)
    assert b.check("alice", "198.51.100.9") == Lockout("user", 300.0)
    assert a.check("alice", "198.51.100.9") == Lockout("user", 300.0)
    assert b.check("bob", "192.0.2.1") is None  # others are not affected
    clock.now += 299
    assert b.check("alice", "192.0.2.1") == Lockout("user", pytest.approx(1.0))
    clock.now += 1
    assert b.check("alice", "192.0.2.1") is None  # the lockout ends on both
    assert a.check("alice", "192.0.2.1") is None

    # failures older than the window are forgotten, whichever broker counted them
    a.failed("carol", "192.0.2.4")
    b.failed("carol", "192.0.2.4")
    clock.now += 61
    assert a.failed("carol", "192.0.2.4") is None
    # an address is locked on both, whatever name it tries
    for i in range(10):
        (a if i % 2 else b).failed(f"user{i}", "203.0.113.7")
    assert a.check("dave", "203.0.113.7") == Lockout("address", 300.0)
    assert b.check("erin", "203.0.113.7") == Lockout("address", 300.0)

    # a successful login clears the name's failures on every broker
    a.failed("frank", "192.0.2.5")
    a.failed("frank", "192.0.2.5")
    b.succeeded("FRANK")
    assert a.failed("frank", "192.0.2.5") is None


def test_unlock_on_one_broker_frees_the_user_on_both(cluster: Cluster) -> None:
    clock, prefix = Clock(), _prefix()
    a = _throttle(cluster, prefix, clock, rotate=0)
    b = _throttle(cluster, prefix, clock, rotate=2)
    for t in (a, b, a):
        t.failed("alice", "192.0.2.1")
    assert a.check("alice", "192.0.2.9") is not None
    assert b.unlock("ALICE") is True
    assert a.check("alice", "192.0.2.9") is None
    assert b.check("alice", "192.0.2.9") is None
    assert a.unlock("alice") is False  # nothing left to lift


async def test_concurrent_failures_on_two_brokers_are_all_counted(cluster: Cluster) -> None:
    clock, prefix = Clock(), _prefix()
    limit = 40
    brokers = [_throttle(cluster, prefix, clock, rotate=i, per_user=limit) for i in (0, 1)]
    threads = trio.CapacityLimiter(8)

    async def fail(i: int) -> None:
        t = brokers[i % 2]
        await trio.to_thread.run_sync(t.failed, "alice", f"192.0.2.{i}", limiter=threads)

    async with trio.open_nursery() as nursery:  # one less than the limit, all at once
        for i in range(limit - 1):
            nursery.start_soon(fail, i)
    # a lost update would leave the count short: the next failure would not lock
    assert brokers[0].check("alice", "192.0.2.200") is None
    assert brokers[1].failed("alice", "192.0.2.200") == Lockout("user", 300.0)
    assert brokers[0].check("alice", "192.0.2.201") == Lockout("user", 300.0)


async def test_a_lockout_holds_on_both_brokers_and_ras_admin_unlock_on_either_frees_it(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    brokers = Brokers(
        tmp_path, etcd_config(cluster, "throttle"), nursery, admin=True,
        max_failures_per_user=3, resources=(ResourceConfig("desktop", "Desktop"),),
    )  # fmt: skip
    a, b = await brokers.start_in_order("broker-a", "broker-b")
    a.store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))

    async def log_in(broker: Broker, password: str) -> Any:
        # a password login has no challenge round: the gateway channel is never used
        return await broker.login.authenticate(
            None,  # type: ignore[arg-type]
            Authenticate(USER, password),
            "192.0.2.1",
            "gw",
        )

    assert (await log_in(a, "wrong"))[0] is ErrorCode.AUTH_FAILED
    assert (await log_in(b, "wrong"))[0] is ErrorCode.AUTH_FAILED
    assert (await log_in(a, "wrong"))[0] is ErrorCode.AUTH_FAILED
    for broker in (a, b):  # locked on both, the right password too
        code, text = await log_in(broker, PASSWORD)
        assert code is ErrorCode.THROTTLED
        assert text == "too many failed logins; try again in 5 min"

    # `ras admin user unlock` on the secondary (the counters are not configuration)
    assert b.roles is not None
    assert not b.roles.is_primary
    on_b = brokers.api("broker-b")
    got = await trio.to_thread.run_sync(on_b.request, "POST", f"users/{USER}/unlock")
    assert got == {"user": USER, "unlocked": True}
    for broker in (a, b):
        assert (await log_in(broker, PASSWORD)).name == USER


async def test_without_etcd_a_login_is_refused_with_a_clear_answer(tmp_path: Path) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    cert, key = pki.ensure("broker-a", ("127.0.0.1",))
    # the directory is up (its own SQLite store): only the throttle's counters are away
    users = SQLiteStore(tmp_path / "users.sqlite3")
    users.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    with etcd_cluster(tmp_path / "solo", members=1) as solo:
        etcd = solo.config(prefix="/ras-throttle-down/", timeout_s=1.0)
        cfg = BrokerConfig(
            name="broker-a", database=tmp_path / "b.sqlite3", cert_file=cert, key_file=key,
            ca_file=pki.ca_path, admin_enabled=False, etcd=etcd,
        )  # fmt: skip
        broker = Broker(cfg, EtcdStore(etcd), directory=BuiltinDirectory(users))
        msg = Authenticate(USER, PASSWORD)
        got = await broker.login.authenticate(None, msg, "192.0.2.1", "gw")  # type: ignore[arg-type]
        assert got.name == USER
        solo.kill(0)
        got = await broker.login.authenticate(None, msg, "192.0.2.1", "gw")  # type: ignore[arg-type]
        assert got == (
            ErrorCode.UNAVAILABLE,
            "the farm's failed-login counters cannot be reached; try again later",
        )
        with pytest.raises(RasError):  # and an unlock cannot claim it worked
            await trio.to_thread.run_sync(broker.throttle.unlock, USER)
