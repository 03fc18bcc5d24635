"""The farm certificate across two brokers sharing a real three-member etcd cluster.

A certificate imported through one broker (or renewed there, as ACME renewals run on the
primary) is served by a gateway linked only to the *other* broker within seconds, with no
restart: each broker follows the store's changes and pushes a changed record to its gateways.
What is checked is what the gateway's TLS port presents. Real processes: run under
``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

from pathlib import Path

import trio
from adminkit import presents, serial_of
from etcdkit import Brokers, Cluster, etcd_config, needs_etcd
from farmkit import add_gateway, until

from ras.broker.config import ResourceConfig
from ras.pki import self_signed_certificate

pytestmark = needs_etcd


async def test_a_certificate_imported_on_one_broker_is_served_by_the_others_gateway(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    etcd = etcd_config(cluster, "cert")
    brokers = Brokers(tmp_path, etcd, nursery, resources=(ResourceConfig("desktop", "Desktop"),))
    a = await brokers.start("broker-a")
    b = await brokers.start("broker-b")
    f = brokers.farm("broker-b")
    only_b = [f"127.0.0.1:{brokers.ports['broker-b'][0]}"]
    await add_gateway(f, nursery, "gateway", brokers=only_b)  # linked to broker b alone
    await until(lambda: bool(b.gateways.get("gateway")) and b.gateways["gateway"].online)
    assert "gateway" not in a.gateways

    pair = self_signed_certificate(["rds.example.com"])
    await a.certificates.import_(pair.cert_pem + pair.key_pem, None)  # on broker a
    await presents(f, serial_of(pair.cert_pem))  # served through broker b's link
    assert b.certificates.record.cert_pem == pair.cert_pem.decode()

    await a.certificates.self_signed(["rds.example.com"], 30)  # made on a
    made = a.certificates.record.cert_pem
    await presents(f, serial_of(made))
    await a.certificates.renew()  # renewed on a (the primary): a new certificate again
    renewed = a.certificates.record.cert_pem
    assert serial_of(renewed) != serial_of(made)
    await presents(f, serial_of(renewed))
