"""The metrics of brokers on etcd: their link to etcd, failed requests, and who is primary.

``ras_broker_etcd_up`` and ``ras_broker_primary`` (one series per broker) are read from the
broker when Prometheus scrapes; ``ras_broker_etcd_failures_total`` counts by operation the
requests no member answered. First an etcd client whose only member is a closed port; then
two running brokers on a real three-member etcd cluster: the primary moves with a promotion,
both brokers lose etcd when every member is killed (and stop being primary), and get it back
when the members restart, with one primary again. Real processes: run under
``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from etcdkit import Brokers, Cluster, etcd_config, free_ports, needs_etcd

from ras.broker.etcd import Etcd, EtcdConfig, EtcdUnavailable
from ras.ops import metrics


def _failures(operation: str) -> float:
    got = metrics.REGISTRY.get_sample_value(
        "ras_broker_etcd_failures_total", {"operation": operation}
    )
    assert got is not None, f"no ras_broker_etcd_failures_total{{operation={operation!r}}}"
    return got


def _gauge(family: str, broker: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(family, {"broker": broker})


def test_requests_no_member_answers_are_counted_by_operation() -> None:
    etcd = Etcd(EtcdConfig(endpoints=(f"127.0.0.1:{free_ports(1)[0]}",), timeout_s=2))
    before = {op: _failures(op) for op in metrics.ETCD_OPERATIONS}  # every one exported at 0+
    with pytest.raises(EtcdUnavailable):
        etcd.get(b"/ras/x")
    with pytest.raises(EtcdUnavailable):
        etcd.txn([], [])
    with pytest.raises(EtcdUnavailable):
        etcd.keep_alive(1234)
    assert not etcd.reachable
    after = {op: _failures(op) for op in metrics.ETCD_OPERATIONS}
    grew = {op: after[op] - before[op] for op in after if after[op] != before[op]}
    assert grew == {"range": 1, "txn": 1, "lease_keepalive": 1}


async def _until(what: str, condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` (a deadline against a hang: the roles tick every second)."""
    with trio.move_on_after(60):
        while not condition():  # noqa: ASYNC110 (the brokers' own loops change it)
            await trio.sleep(0.1)
    assert condition(), what


@needs_etcd
async def test_the_gauges_follow_promotion_and_the_loss_of_etcd(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    farm = Brokers(tmp_path, etcd_config(cluster, "obs"), nursery, roles={"primary_lease_s": 3})
    a, _ = await farm.start_in_order("obs-a", "obs-b")
    brokers = farm.running

    def seen(family: str) -> dict[str, float | None]:
        return {name: _gauge(family, name) for name in brokers}

    await _until("obs-a primary", lambda: seen("ras_broker_primary") == {"obs-a": 1, "obs-b": 0})
    assert seen("ras_broker_etcd_up") == {"obs-a": 1, "obs-b": 1}

    roles = a.roles
    assert roles is not None
    await trio.to_thread.run_sync(roles.promote, "obs-b")
    await _until("obs-b primary", lambda: seen("ras_broker_primary") == {"obs-a": 0, "obs-b": 1})

    before = {op: _failures(op) for op in metrics.ETCD_OPERATIONS}
    for i in range(len(cluster.client_ports)):  # the whole cluster goes away
        cluster.kill(i)
    await _until("etcd down", lambda: seen("ras_broker_etcd_up") == {"obs-a": 0, "obs-b": 0})
    await _until("no primary", lambda: seen("ras_broker_primary") == {"obs-a": 0, "obs-b": 0})

    def failed(op: str) -> float:
        return _failures(op) - before[op]

    # the poll of changes (every second) and the roles' lease refresh (every third of 3 s)
    await _until("failures counted", lambda: failed("range") >= 1 <= failed("lease_keepalive"))

    for i in range(len(cluster.client_ports)):
        cluster.start(i)
    await trio.to_thread.run_sync(cluster.wait_ready)
    await _until("etcd back", lambda: seen("ras_broker_etcd_up") == {"obs-a": 1, "obs-b": 1})
    await _until("one primary", lambda: seen("ras_broker_primary") == {"obs-a": 0, "obs-b": 1})
    nursery.cancel_scope.cancel()
