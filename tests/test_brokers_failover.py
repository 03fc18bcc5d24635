"""Two brokers on a real three-member etcd cluster; a gateway and an agent that know both.

The broker a gateway prefers goes away (its task cancelled: its sockets close, as when the
process dies): a session already tunnelled goes on, new logins and launches go to the other
broker at once (it knows the host: the agent reports to both), and when the first broker is
back, new sessions go to it again. Real processes: run under ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

from pathlib import Path

import trio
from etcdkit import Brokers, Cluster, etcd_config, needs_etcd
from farmkit import PASSWORD, USER, Farm, Listener, add_agent, add_gateway, until

from ras.broker.config import ResourceConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.model import SessionRecord
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.protocol import Mode

pytestmark = needs_etcd


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


async def test_a_gateway_and_an_agent_fail_over_to_the_other_broker_and_come_back(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    etcd = etcd_config(cluster, "failover")
    EtcdStore(etcd).put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    brokers = Brokers(tmp_path, etcd, nursery, resources=(ResourceConfig("desktop", "Desktop"),))
    a = await brokers.start("broker-a")
    b = await brokers.start("broker-b")
    host = Listener()
    rdp_port = await nursery.start(host.serve)
    f = brokers.farm("broker-a")
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
