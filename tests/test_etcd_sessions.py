"""Sessions launched through one broker, known to the other brokers of a farm on etcd.

Agents report to every broker, so each broker's view of hosts and sessions is complete from
the next report on. A launch in flight (the client has not logged on yet) is not in any
report: it is shared through etcd (``ras/broker/launchshare.py``). Two brokers on a real
three-member cluster, two real agents reporting to both (every minute: no report comes in
between to hide what is shared). Real processes: run under ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

from pathlib import Path

import trio
from etcdkit import Brokers, Cluster, etcd_config, needs_etcd
from farmkit import Listener, add_agent, until

from ras.broker.catalog import User
from ras.broker.config import ResourceConfig
from ras.broker.model import SessionState
from ras.errors import ErrorCode
from ras.protocol import HostKind, Launch, LaunchOk, Mode

PC = HostKind.REMOTE_PC

pytestmark = needs_etcd


async def test_a_launch_through_one_broker_counts_in_the_others_view_and_placement(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    etcd = etcd_config(cluster, "sessions")
    brokers = Brokers(
        tmp_path, etcd, nursery,
        resources=(
            ResourceConfig("desktop", "Desktop", hosts=("rdsh1", "rdsh2")),
            ResourceConfig("pc", "My PC", hosts=("pc1",)),
        ),
        # placement by session count only; reports once a minute
        weight_memory=0.0, weight_cpu=0.0, report_interval_s=60.0, host_timeout_s=180.0,
    )  # fmt: skip
    a = await brokers.start("broker-a")
    b = await brokers.start("broker-b")
    rdp = Listener()
    rdp_port = await nursery.start(rdp.serve)
    f = brokers.farm("broker-a")
    both = brokers.addresses(1)
    for host, kind in (("rdsh1", HostKind.RDSH), ("rdsh2", HostKind.RDSH), ("pc1", PC)):
        await add_agent(f, nursery, host, "127.0.0.1", rdp_port, brokers=both, kind=kind)
    await until(lambda: all(len(x.hosts.hosts) == 3 for x in (a, b)))

    alice, bob = User("alice", ("users",)), User("bob", ("users",))
    first = await a.launches.launch(Launch("desktop", Mode.GATEWAY_SSL), alice, "192.0.2.1", "gw1")
    assert isinstance(first, LaunchOk)
    [launched] = a.sessions.list()
    assert launched.host == "rdsh1"  # both idle: the first by name

    # the other broker knows the launch: its admin view (GET /api/sessions lists this table)
    await until(lambda: b.sessions.get(first.session) is not None)
    seen = b.sessions.get(first.session)
    assert seen is not None
    assert (seen.user, seen.host, seen.resource, seen.gateway, seen.client) == (
        "alice", "rdsh1", "desktop", "gw1", "192.0.2.1",
    )  # fmt: skip
    assert seen.state is SessionState.LAUNCHING
    assert b.hosts.hosts["rdsh1"].pending == 1  # counted on the host's load there too

    # and its placement: bob's launch through b goes to the host nobody was sent to
    second = await b.launches.launch(Launch("desktop", Mode.GATEWAY_SSL), bob, "192.0.2.2", "gw2")
    assert isinstance(second, LaunchOk)
    placed = b.sessions.get(second.session)
    assert placed is not None
    assert placed.host == "rdsh2"
    await until(lambda: a.sessions.get(second.session) is not None)
    assert {s.id for s in a.sessions.list()} == {s.id for s in b.sessions.list()}

    # a Remote PC given to alice through a (claimed in the store, assigned/<host>): the shared
    # launch is listed on b but does not fill the PC there, so bob is told it is in use
    pc = await a.launches.launch(Launch("pc", Mode.GATEWAY_SSL), alice, "192.0.2.1", "gw1")
    assert isinstance(pc, LaunchOk)
    await until(lambda: b.sessions.get(pc.session) is not None)
    refused = await b.launches.launch(Launch("pc", Mode.GATEWAY_SSL), bob, "192.0.2.2", "gw2")
    assert refused == (
        ErrorCode.NO_HOST,
        "in use: pc1 is another user's; try again when it is free",
    )
