"""The farm certificate across two brokers sharing a real three-member etcd cluster.

A certificate imported through one broker (or renewed there, as ACME renewals run on the
primary) is served by a gateway linked only to the *other* broker within seconds, with no
restart: each broker follows the store's changes and pushes a changed record to its gateways.
What is checked is what the gateway's TLS port presents. Real processes: run under
``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from etcdkit import Cluster, etcd_cluster, needs_etcd
from farmkit import Farm, add_gateway, until
from test_admin_certs import _presents, _serial
from test_brokers_failover import Brokers

from ras.broker.etcd import EtcdConfig
from ras.broker.etcdstore import EtcdStore
from ras.pki import FarmPKI, self_signed_certificate

pytestmark = needs_etcd


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


async def test_a_certificate_imported_on_one_broker_is_served_by_the_others_gateway(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    etcd = EtcdConfig(endpoints=cluster.endpoints, prefix=f"/ras-cert-{time.time_ns()}/")
    brokers = Brokers(tmp_path, pki, etcd, nursery)
    a = await brokers.start("broker-a")
    b = await brokers.start("broker-b")
    gw, ag = brokers.ports["broker-b"]
    f = Farm(pki, b, EtcdStore(etcd), {"gateways": ("127.0.0.1", gw), "agents": ("127.0.0.1", ag)})
    only_b = [f"127.0.0.1:{gw}"]
    await add_gateway(f, nursery, "gateway", brokers=only_b)  # linked to broker b alone
    await until(lambda: bool(b.gateways.get("gateway")) and b.gateways["gateway"].online)
    assert "gateway" not in a.gateways

    pair = self_signed_certificate(["rds.example.com"])
    await a.certificates.import_(pair.cert_pem + pair.key_pem, None)  # on broker a
    await _presents(f, _serial(pair.cert_pem))  # served through broker b's link
    assert b.certificates.record.cert_pem == pair.cert_pem.decode()

    await a.certificates.self_signed(["rds.example.com"], 30)  # made on a
    made = a.certificates.record.cert_pem
    await _presents(f, _serial(made))
    await a.certificates.renew()  # renewed on a (the primary): a new certificate again
    renewed = a.certificates.record.cert_pem
    assert _serial(renewed) != _serial(made)
    await _presents(f, _serial(renewed))
