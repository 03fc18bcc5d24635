"""Sessions: the broker's table (pure), the agent's utmp reading, and log off / disconnect
going from the broker to a real agent over its mutual-TLS link, which runs its command."""

from __future__ import annotations

import sys

import pytest
import trio
from farmkit import PASSWORD, USER, broker_session, farm, login, until
from utmpkit import start_agent, utmp_record, write_utmp

from ras.agents.load import utmp_sessions
from ras.broker.model import SessionState as Broker
from ras.broker.sessions import SessionTable
from ras.errors import ErrorCode, RasError
from ras.net.channel import PeerError
from ras.protocol import HostKind, Launch, LaunchOk, Mode, SessionInfo, SessionState


def test_utmp_lists_user_processes_only(tmp_path):
    path = tmp_path / "utmp"
    write_utmp(path, (4242, "alice", ":10"), (4243, "bob", "pts/1"))
    with path.open("ab") as f:
        f.write(utmp_record(8, 4244, "gone", "pts/2") + b"\0" * 100)  # DEAD_PROCESS, torn tail
    found = utmp_sessions(path)
    assert [(s.pid, s.user, s.line, s.host) for s in found] == [
        (4242, "alice", ":10", "10.0.0.9"), (4243, "bob", "pts/1", "10.0.0.9"),
    ]  # fmt: skip
    assert utmp_sessions(tmp_path / "missing") == []


def test_a_launch_becomes_the_reported_session_and_ends_with_it():
    table = SessionTable(launch_timeout_s=60)
    launch = table.launched(user="alice", host="h1", resource="desk", gateway="gw1",
                            client="192.0.2.7", now=100.0)  # fmt: skip
    assert table.list() == [launch]
    assert launch.state is Broker.LAUNCHING
    table.reported(
        "h1",
        [SessionInfo("9", "ALICE", SessionState.ACTIVE),
         SessionInfo("3", "bob", SessionState.DISCONNECTED)],
        now=110.0,
    )  # fmt: skip
    alice, bob = table.get("h1:9"), table.get("h1:3")
    assert alice is not None
    assert bob is not None
    # alice's session keeps what the launch knew: resource, gateway, client, since
    assert (alice.resource, alice.gateway, alice.client, alice.since, alice.state) == (
        "desk", "gw1", "192.0.2.7", 100.0, Broker.ACTIVE,
    )  # fmt: skip
    assert (bob.user, bob.gateway, bob.since, bob.state) == ("bob", "", 110.0, Broker.DISCONNECTED)
    assert table.affinity("bob", {"h1": HostKind.RDSH}) == [
        ("h1", "affinity: disconnected session h1:3")
    ]
    assert table.affinity("alice", {"h1": HostKind.RDSH}) == []  # active on an RDSH: no pull
    assert table.affinity("alice", {"h1": HostKind.VDI}) == [
        ("h1", "affinity: your active session h1:9")
    ]
    table.reported("h1", [SessionInfo("3", "bob", SessionState.ACTIVE)], now=120.0)
    assert [s.id for s in table.list()] == ["h1:3"]  # alice logged off
    assert SessionTable.agent_id(table.list()[0]) == "3"


def test_a_web_launch_stays_a_web_session_once_reported():
    table = SessionTable(launch_timeout_s=60)
    table.launched(user="alice", host="h1", resource="desk", gateway="gw1", client="192.0.2.7",
                   now=100.0, kind="web")  # fmt: skip
    table.reported("h1", [SessionInfo("9", "alice", SessionState.ACTIVE)], now=110.0)
    session = table.get("h1:9")
    assert session is not None
    assert session.kind == "web"
    assert session.to_json()["kind"] == "web"  # what the admin API and `ras admin sessions` show


def test_unconfirmed_launches_expire():
    table = SessionTable(launch_timeout_s=60)
    table.launched(user="a", host="h", resource="r", gateway="g", client="c", now=0.0)
    table.expire(60.0)
    assert len(table.list()) == 1
    table.expire(60.5)
    assert table.list() == []


def test_a_report_touches_only_its_host_and_a_confirmed_launch_no_longer_expires():
    table = SessionTable(launch_timeout_s=60)
    table.launched(user="alice", host="h1", resource="desk", gateway="g", client="c", now=0.0)
    table.launched(user="alice", host="h2", resource="desk", gateway="g", client="c", now=1.0)
    table.reported("h2", [SessionInfo("5", "carol", SessionState.DISCONNECTED)], now=2.0)
    table.reported("h1", [SessionInfo("7", "Alice", SessionState.DISCONNECTED)], now=3.0)
    # h1's report took over alice's launch there; h2's launch and carol are untouched
    assert sorted((s.id, s.user, s.state) for s in table.list()) == [
        ("h1:7", "Alice", "disconnected"), ("h2:5", "carol", "disconnected"),
        ("launch-2", "alice", "launching"),
    ]  # fmt: skip
    kinds = {"h1": HostKind.RDSH, "h2": HostKind.RDSH}
    assert table.affinity("ALICE", kinds) == [("h1", "affinity: disconnected session h1:7")]
    table.expire(61.5)  # h2's launch is old; h1's was confirmed, so it stays
    assert sorted(s.id for s in table.list()) == ["h1:7", "h2:5"]
    table.reported("h1", [], now=70.0)  # alice logged off: gone from the list and the affinity
    assert table.affinity("alice", kinds) == []
    assert [s.id for s in table.list()] == ["h2:5"]
    table.remove("h2:5")
    assert table.list() == []
    assert len(table) == 0
    assert table.affinity("carol", kinds) == []


# -- through a real broker and agent -------------------------------------------------------------

# The "log off" a test host can do: take the session's entry out of utmp (what a real session
# ending does), and note it.
LOGOFF = """
import struct, sys
path, pid = sys.argv[1], int(sys.argv[2])
size = struct.calcsize("<hhi32s4s32s256shhiii16s20s")
data = open(path, "rb").read()
kept = [data[i:i + size] for i in range(0, len(data), size)
        if struct.unpack_from("<hhi", data, i)[2] != pid]
open(path, "wb").write(b"".join(kept))
"""


async def test_log_off_and_disconnect_go_to_the_agent(tmp_path, nursery):
    utmp = tmp_path / "utmp"
    write_utmp(utmp)
    async with farm(tmp_path, gateways=(), report_interval_s=0.1) as f:
        agent = await start_agent(
            f, nursery, utmp,
            logoff_command=(sys.executable, "-c", LOGOFF, str(utmp), "{pid}"),
        )  # fmt: skip
        await until(lambda: "rdsh1" in f.broker.hosts.hosts)
        async with broker_session(f, gateway="gw-test", client="192.0.2.44") as chan:
            assert (await login(chan, USER, PASSWORD))[0] is None
            await chan.send(Launch("desktop", Mode.DIRECT))
            assert isinstance(await chan.receive_reply(), LaunchOk)
        [launching] = f.broker.sessions.list()
        assert (launching.user, launching.host, launching.state) == (USER, "rdsh1", "launching")
        # The user's RDP session starts on the host (xrdp writes utmp); the agent reports it.
        write_utmp(utmp, (4242, USER, ":10"), (4243, "bob", ":11"))
        await until(lambda: f.broker.sessions.get("rdsh1:4242") is not None)
        mine = f.broker.sessions.get("rdsh1:4242")
        assert mine is not None
        assert (mine.user, mine.gateway, mine.client, mine.state, mine.resource) == (
            USER, "gw-test", "192.0.2.44", "active", "desktop",
        )  # fmt: skip
        assert mine.since == launching.since
        # Log off: the agent runs its command, the session is gone from the host and the list.
        assert await f.broker.agents.session_action("rdsh1:4242", "logoff") == {
            "host": "rdsh1", "user": USER,
        }  # fmt: skip
        assert [s.user for s in utmp_sessions(utmp)] == ["bob"]
        assert f.broker.sessions.get("rdsh1:4242") is None
        # This agent has no disconnect command: the broker says the agent refused.
        with pytest.raises(PeerError) as refused:
            await f.broker.agents.session_action("rdsh1:4243", "disconnect")
        assert refused.value.code is ErrorCode.FORBIDDEN
        assert "does not disconnect" in str(refused.value)
        with pytest.raises(LookupError):
            await f.broker.agents.session_action("rdsh1:9999", "logoff")
        f.agents["rdsh1"] = agent


async def test_a_session_action_to_an_absent_agent_is_a_clear_error(tmp_path, nursery):
    utmp = tmp_path / "utmp"
    write_utmp(utmp, (7, USER, ":10"))
    async with farm(tmp_path, gateways=(), report_interval_s=0.1) as f:
        async with trio.open_nursery() as agents:
            await start_agent(f, agents, utmp)
            await until(lambda: f.broker.sessions.get("rdsh1:7") is not None)
            agents.cancel_scope.cancel()
        await until(lambda: not f.broker.hosts.hosts["rdsh1"].online)
        with pytest.raises(RasError, match="the agent of host rdsh1 is not connected"):
            await f.broker.agents.session_action("rdsh1:7", "logoff")
