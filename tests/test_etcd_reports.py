"""The farm's report from any broker of a farm on a real three-member etcd cluster.

Each broker keeps the history of what went through it in its own file; the broker asked for
a report asks the others for their parts over mutual TLS and merges them
(``ras/broker/farmreport.py``). Logins and launches through broker-a and broker-b: the report
from either counts them all. With broker-b stopped, broker-a's report says broker-b is missing
and still gives its own figures. Real processes: run under ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from etcdkit import ADMIN, Brokers, Cluster, etcd_config, needs_etcd
from farmkit import PASSWORD, Listener, add_agent, broker_session, login, until

from ras.broker.config import ResourceConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.cli.adminclient import AdminApiError, AdminClient
from ras.cli.main import main
from ras.errors import ErrorCode
from ras.protocol import Launch, LaunchOk, Mode

pytestmark = needs_etcd

DESKTOP = (ResourceConfig("desktop", "Desktop", hosts=("rdsh1",)),)


async def _session(brokers: Brokers, via: str, gateway: str, user: str, password: str) -> bool:
    """A login through ``gateway`` to broker ``via`` and, if it succeeds, a launch."""
    async with broker_session(brokers.farm(via), gateway=gateway) as chan:
        code, _ = await login(chan, user, password)
        if code is not None:
            assert code is ErrorCode.AUTH_FAILED
            return False
        await chan.send(Launch("desktop", Mode.DIRECT))
        assert isinstance(await chan.receive_reply(), LaunchOk)
        return True


async def _report(api: AdminClient, by: str = "gateway") -> dict[str, Any]:
    query = {"by": by, "from": "1h"}
    got: dict[str, Any] = await trio.to_thread.run_sync(
        lambda: api.request("GET", "reports", query=query)
    )
    return got


async def test_a_report_from_any_broker_covers_the_farm(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    brokers = Brokers(
        tmp_path, etcd_config(cluster, "reports"), nursery, admin=True, resources=DESKTOP
    )
    a = await brokers.start("broker-a")
    b = await brokers.start("broker-b")
    rdp = Listener()
    rdp_port = await nursery.start(rdp.serve)
    both = brokers.addresses(1)
    await add_agent(brokers.farm("broker-a"), nursery, "rdsh1", "127.0.0.1", rdp_port, brokers=both)
    await until(lambda: all("rdsh1" in x.hosts.hosts for x in (a, b)))
    store = EtcdStore(brokers.etcd)
    for user in ("alice", "bob"):
        store.put_user(UserRecord(user, hash_password(PASSWORD), ("users",)))
    # both brokers have listed themselves among the farm's brokers with history
    with trio.fail_after(30):
        while len(await trio.to_thread.run_sync(a.reports.brokers)) < 2:  # noqa: ASYNC110
            await trio.sleep(0.05)

    assert await _session(brokers, "broker-a", "gw1", "alice", PASSWORD)
    assert await _session(brokers, "broker-a", "gw1", "alice", PASSWORD)
    assert not await _session(brokers, "broker-b", "gw2", "bob", "wrong")
    assert await _session(brokers, "broker-b", "gw2", "bob", PASSWORD)
    assert await _session(brokers, "broker-b", "gw1", "alice", PASSWORD)

    farm_rows = [
        {"gateway": "gw1", "sessions": 3, "users": 1, "logins": {"ok": 3}, "ended": 0,
         "session_s": 0.0, "mean_s": None},
        {"gateway": "gw2", "sessions": 1, "users": 1, "logins": {"ok": 1, "failed": 1},
         "ended": 0, "session_s": 0.0, "mean_s": None},
    ]  # fmt: skip
    for name in ("broker-a", "broker-b"):
        report = await _report(brokers.api(name))
        assert report["rows"] == farm_rows, name
        assert report["totals"]["sessions"] == 4
        assert report["totals"]["users"] == 2  # alice went through both: one user
        assert report["totals"]["logins"] == {"ok": 4, "failed": 1}
        assert report["brokers"] == {"included": ["broker-a", "broker-b"], "missing": []}
    # a broker's own part is only its own
    part = await trio.to_thread.run_sync(
        lambda: brokers.api("broker-b").request(
            "GET", "reports/part", query={"by": "user", "from": "1h"}
        )
    )
    assert {name: r["sessions"] for name, r in part["rows"].items()} == {"alice": 1, "bob": 1}
    # another certificate of the farm (a gateway's) is not a broker: no part for it
    cert, key = brokers.pki.ensure("gw1")
    gateway = AdminClient(brokers.url("broker-a"), brokers.pki.ca_path, cert_file=cert,
                          key_file=key)  # fmt: skip
    with pytest.raises(AdminApiError) as refused:
        await trio.to_thread.run_sync(lambda: gateway.request("GET", "reports/part"))
    assert refused.value.status == 401

    brokers.stop("broker-b")
    report = await _report(brokers.api("broker-a"))
    assert report["brokers"]["included"] == ["broker-a"]
    [missing] = report["brokers"]["missing"]
    assert missing["name"] == "broker-b"
    assert "unreachable" in missing["why"] or "refused" in missing["why"], missing
    assert report["rows"] == [
        {"gateway": "gw1", "sessions": 2, "users": 1, "logins": {"ok": 2}, "ended": 0,
         "session_s": 0.0, "mean_s": None},
    ]  # fmt: skip
    assert report["totals"]["logins"] == {"ok": 2}

    # ras admin report says which broker it lacks
    admin_cert, admin_key = brokers.pki.ensure(ADMIN)
    common = ["admin", "--url", brokers.url("broker-a"), "--ca-file", str(brokers.pki.ca_path)]
    common += ["--cert", str(admin_cert), "--key", str(admin_key)]
    capsys.readouterr()
    code = await trio.to_thread.run_sync(main, [*common, "report", "--by", "host", "--from", "1h"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["rdsh1", "2", "1"]
    assert lines[-1].startswith("brokers: broker-a; NOT INCLUDED: broker-b ("), lines[-1]
    code = await trio.to_thread.run_sync(main, [*common, "--json", "report"])
    assert json.loads(capsys.readouterr().out)["brokers"]["included"] == ["broker-a"]
    nursery.cancel_scope.cancel()


async def test_a_broker_that_does_not_answer_is_named_not_waited_for(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A broker of the farm whose admin port takes the connection and never answers (a hung
    process): the report comes within the request's deadline and names it."""
    brokers = Brokers(
        tmp_path, etcd_config(cluster, "hung"), nursery, admin=True, resources=DESKTOP,
        request_timeout_s=2.0,  # a broker waits at most half of it for another's part
    )  # fmt: skip
    await brokers.start("broker-a")
    with socket.create_server(("127.0.0.1", 0)) as hung:  # listens, never accepts
        store = EtcdStore(brokers.etcd)
        entry = {"url": f"https://127.0.0.1:{hung.getsockname()[1]}", "seen": time.time()}
        store.etcd.put(store.key("reports", "brokers", "broker-z"), json.dumps(entry).encode())
        report = await _report(brokers.api("broker-a"))
    assert report["brokers"]["included"] == ["broker-a"]
    [missing] = report["brokers"]["missing"]
    assert missing["name"] == "broker-z"
    assert "no answer" in missing["why"], missing
    assert report["totals"]["sessions"] == 0
    nursery.cancel_scope.cancel()
