"""Remote PC assignments across two brokers sharing a real three-member etcd cluster.

Two users launch the same Remote PC through two brokers at the same instant, many rounds:
exactly one gets it each round, the other a clear "in use"; once the winner has logged off,
the other gets it through their own broker. The host's reports go to both brokers (as a real
agent's do: it reports to every broker). The admin view (the API and ``ras admin host``) of
either broker names whoever holds the host through any broker, and nobody once it is
released. Real processes: run under ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from etcdkit import ADMIN, Brokers, Cluster, etcd_config, make_broker, needs_etcd

from ras.broker.catalog import User
from ras.broker.config import ResourceConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.server import Broker
from ras.cli.main import main
from ras.errors import ErrorCode
from ras.pki import FarmPKI
from ras.protocol import (
    HostKind,
    Launch,
    LaunchOk,
    LoadReport,
    Mode,
    SessionInfo,
    SessionState,
)

pytestmark = needs_etcd


PC1 = (ResourceConfig("pc", "My PC", hosts=("pc1",)),)


def _store(cluster: Cluster, prefix: str, rotate: int) -> EtcdStore:
    return EtcdStore(etcd_config(cluster, first=rotate, prefix=prefix))


def _with_pc1(broker: Broker) -> Broker:
    """``broker`` knowing pc1 (10.0.0.9:3389), as its agent's registration makes it."""
    broker.hosts.register("pc1", HostKind.REMOTE_PC, "10.0.0.9", 3389, 1, time.monotonic())
    return broker


def _broker(tmp: Path, store: EtcdStore, name: str, pki: FarmPKI) -> Broker:
    return _with_pc1(make_broker(tmp, pki, name, store, resources=PC1))


def _report(brokers: tuple[Broker, ...], users: list[str]) -> None:
    """pc1's agent reports who is logged on, to every broker (as a real agent does)."""
    detail = tuple(SessionInfo(str(i + 10), u, SessionState.ACTIVE) for i, u in enumerate(users))
    for broker in brokers:
        broker.agents._report("pc1", LoadReport(1.0, 10.0, len(detail), 0, detail, True))


def test_the_store_claims_a_host_for_one_user_and_releases_it(cluster: Cluster) -> None:
    store = _store(cluster, f"/ras-assign-{time.time_ns()}/", 0)
    owner, first = store.claim_host("PC1", "alice")
    assert owner == "alice"
    assert store.claim_host("pc1", "bob") == ("alice", first)  # taken
    assert store.claim_host("pc1", "bob", stale=first - 1) == ("alice", first)  # not that claim
    owner, again = store.claim_host("pc1", "ALICE")  # theirs already: a fresh claim
    assert (owner, again > first) == ("ALICE", True)
    assert store.claim_host("pc1", "bob", stale=first) == ("ALICE", again)  # not the one freed
    assert not store.release_host("pc1", first)  # a newer claim stays
    owner, bobs = store.claim_host("pc1", "bob", stale=again)  # alice's claim was released
    assert owner == "bob"
    assert store.claim_host("pc1", "carol")[0] == "bob"
    assert store.release_host("pc1", bobs)
    assert store.claim_host("pc1", "carol")[0] == "carol"


async def test_two_users_launching_one_remote_pc_through_two_brokers_at_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    prefix = f"/ras-assign-{time.time_ns()}/"
    a = _broker(tmp_path, _store(cluster, prefix, 0), "broker-a", pki)
    b = _broker(tmp_path, _store(cluster, prefix, 1), "broker-b", pki)
    both = (a, b)
    _report(both, [])
    wins = {"alice": 0, "bob": 0}
    rounds = 40
    for n in range(rounds):
        # alice and bob swap brokers every round
        via = {"alice": a, "bob": b} if n % 2 else {"alice": b, "bob": a}
        replies: dict[str, object] = {}

        async def go(user: str, replies: dict[str, object] = replies, via=via) -> None:
            msg = Launch("pc", Mode.DIRECT)
            replies[user] = await via[user].launches.launch(msg, User(user, ()), "10.1.1.1", "")

        async with trio.open_nursery() as race:  # the same instant, through two brokers
            race.start_soon(go, "alice")
            race.start_soon(go, "bob")
        winners = [u for u, r in replies.items() if isinstance(r, LaunchOk)]
        assert len(winners) == 1, (n, replies)
        winner = winners[0]
        loser = "bob" if winner == "alice" else "alice"
        code, why = replies[loser]  # type: ignore[misc]
        assert code is ErrorCode.NO_HOST
        assert why.startswith("in use: pc1 is another user's"), why
        wins[winner] += 1

        _report(both, [winner])  # the winner connects: still in use for the other
        again = await via[loser].launches.launch(Launch("pc", Mode.DIRECT), User(loser, ()), "", "")
        assert isinstance(again, tuple), again
        assert again[1].startswith("in use: pc1"), again
        _report(both, [])  # the winner logs off: the other gets it, through their broker
        got = await via[loser].launches.launch(Launch("pc", Mode.DIRECT), User(loser, ()), "", "")
        assert isinstance(got, LaunchOk), (n, got)
        assert got.host == "10.0.0.9"  # pc1
        _report(both, [loser])
        _report(both, [])  # and logs off: free for the next round
    assert sum(wins.values()) == rounds


async def test_every_brokers_admin_view_names_who_holds_a_remote_pc_through_any_broker(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    brokers = Brokers(tmp_path, etcd_config(cluster, "assign"), nursery, admin=True, resources=PC1)
    names = ("broker-a", "broker-b")
    a, b = [_with_pc1(await brokers.start(name)) for name in names]
    apis = [brokers.api(name) for name in names]
    urls = [brokers.url(name) for name in names]
    pki = brokers.pki
    admin_cert, admin_key = pki.ensure(ADMIN)

    async def assigned_to() -> list[str]:
        """pc1's owner in each broker's admin API."""
        got = [await trio.to_thread.run_sync(api.request, "GET", "hosts/pc1") for api in apis]
        return [g["assigned_to"] for g in got]

    async def ras_admin(url: str, *args: str) -> str:
        common = ["admin", "--url", url, "--ca-file", str(pki.ca_path)]
        common += ["--cert", str(admin_cert), "--key", str(admin_key)]
        capsys.readouterr()
        code = await trio.to_thread.run_sync(main, [*common, *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    _report((a, b), [])
    assert await assigned_to() == ["", ""]
    got = await a.launches.launch(Launch("pc", Mode.DIRECT), User("alice", ()), "10.1.1.1", "")
    assert isinstance(got, LaunchOk), got
    # b has not seen alice anywhere yet (no report of her session): the store says she has it
    assert await assigned_to() == ["alice", "alice"]
    shown = json.loads(await ras_admin(urls[1], "--json", "host", "show", "pc1"))
    assert shown["assigned_to"] == "alice"
    listed = (await ras_admin(urls[1], "host", "list")).splitlines()
    assert "ASSIGNED_TO" in listed[0].split()
    assert listed[1].split()[-1] == "alice", listed

    _report((a, b), ["alice"])  # she connects, then logs off: released farm-wide
    assert await assigned_to() == ["alice", "alice"]
    _report((a, b), [])
    with trio.fail_after(30):  # the releasing broker's next round (every 2 s) frees the store
        while (seen := await assigned_to()) != ["", ""]:  # noqa: ASYNC110 (another broker's loop)
            await trio.sleep(0.2)
    assert seen == ["", ""]
    assert b.store.assigned_hosts() == {}  # type: ignore[attr-defined]
    listed = (await ras_admin(urls[0], "host", "list")).splitlines()
    assert listed[1].split()[-1] == "-", listed

    # the other way round: bob through b, named at a
    got = await b.launches.launch(Launch("pc", Mode.DIRECT), User("bob", ()), "10.1.1.2", "")
    assert isinstance(got, LaunchOk), got
    assert await assigned_to() == ["bob", "bob"]
    nursery.cancel_scope.cancel()
