"""The guide's host kinds: Remote PCs and VDI guests, one user at a time.

Two levels: the assignment rules as transcripts (time passed in), and the broker itself over
memory streams under the autojump clock, with agents that report their sessions: two users
racing for one Remote PC, release at logoff, a static assignment, a persistent VDI pool whose
members are listed by the pool, and a guest that is not ready.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import trio
import trio.testing
from farmkit import PASSWORD, USER, add_agent, login
from memkit import MemoryFarm, memory_farm

from ras.broker.assignments import Assignments, AssignPolicy, policy_of
from ras.broker.config import ResourceConfig
from ras.broker.model import HostRecord, PoolRecord
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.config import Invalid
from ras.errors import ErrorCode
from ras.net.channel import Channel
from ras.protocol import (
    AgentRegister,
    Error,
    HostKind,
    Launch,
    LaunchOk,
    LoadReport,
    Message,
    Mode,
    Registered,
    Role,
    SessionInfo,
    SessionState,
)

BOB, CAROL = "bob", "carol"

# -- the rules, as transcripts --------------------------------------------------------------------


def test_first_use_is_released_at_logoff_or_kept_for_the_owner():
    free, kept = AssignPolicy(), AssignPolicy(keep_s=600)
    a = Assignments(launch_grace_s=120)
    assert a.claim("pc1", "alice", free, now=0)
    assert not a.claim("pc1", "bob", free, now=1)  # alice's, launching
    a.reported("pc1", ["alice"], free, now=5)
    assert a.owner("pc1", free, now=500) == "alice"  # in use, however long
    a.reported("pc1", [], free, now=600)  # logged off: free at once
    assert a.claim("PC1", "bob", free, now=600)  # names compare without case
    a.reported("pc1", ["bob"], kept, now=601)
    a.reported("pc1", [], kept, now=700)  # logged off: kept for bob 600 s
    assert a.owner("pc1", kept, now=1299) == "bob"
    assert not a.free_for("pc1", "alice", kept, now=1299)
    assert a.free_for("pc1", "bob", kept, now=1299)
    assert a.owner("pc1", kept, now=1300) == ""


def test_a_launch_that_never_connects_frees_the_host_after_the_grace():
    a = Assignments(launch_grace_s=120)
    a.claim("pc1", "alice", AssignPolicy(), now=0)
    a.reported("pc1", [], AssignPolicy(), now=60)  # not yet connected: still hers
    assert a.owner("pc1", AssignPolicy(), now=119) == "alice"
    assert a.owner("pc1", AssignPolicy(), now=121) == ""


def test_static_and_persistent_assignments_never_free_and_sessions_without_launch_count():
    static = AssignPolicy(static_user="alice")
    a = Assignments()
    assert not a.claim("pc1", "bob", static, now=0)
    assert a.claim("pc1", "ALICE", static, now=0)
    forever = AssignPolicy(keep_s=math.inf)
    a.reported("vdi1", ["carol"], forever, now=0)  # carol logged in at the console
    a.reported("vdi1", [], forever, now=10)
    assert a.owner("vdi1", forever, now=10**9) == "carol"
    assert a.held({"pc1": static, "vdi1": forever}, now=10) == {"pc1": "alice", "vdi1": "carol"}


def test_policy_from_the_host_record_else_its_pools():
    pools = [
        PoolRecord("office"),
        PoolRecord("vdi", persistent=True),
        PoolRecord("lab", keep_assignment_s=60),
    ]
    assert policy_of(None, pools, ["office"]) == AssignPolicy()
    assert policy_of(None, pools, ["office", "lab"]) == AssignPolicy(keep_s=60)
    assert policy_of(None, pools, ["vdi", "lab"]).keep_s == math.inf
    record = HostRecord("pc1", HostKind.REMOTE_PC, assigned_user="alice", keep_assignment_s=5)
    assert policy_of(record, pools, ["vdi"]) == AssignPolicy("alice", 5)
    with pytest.raises(Invalid, match="keep_assignment_s"):
        PoolRecord("p", keep_assignment_s=-1)
    with pytest.raises(Invalid, match="members"):
        PoolRecord("p", members=("not a name",))


# -- the broker -----------------------------------------------------------------------------------


async def _agent(f: MemoryFarm, name: str, kind: HostKind) -> Channel:
    chan = await f.dial_broker(name, Role.AGENT, port=20003)
    reply = await chan.request(AgentRegister(name, kind, "10.0.0.9", 3389, 1))
    assert isinstance(reply, Registered), reply
    await _report(chan, [])
    return chan


async def _report(chan: Channel, users: list[str], *, ready: bool = True) -> None:
    detail = tuple(SessionInfo(str(i + 10), u, SessionState.ACTIVE) for i, u in enumerate(users))
    await chan.send(LoadReport(1.0, 10.0, len(detail), 0, detail, ready))
    await trio.testing.wait_all_tasks_blocked()  # the broker took it


async def _logged_in(f: MemoryFarm, user: str, stack: contextlib.AsyncExitStack) -> Channel:
    chan: Channel = await stack.enter_async_context(f.session())
    code, _ = await login(chan, user, PASSWORD if user == USER else f"{user} pw")
    assert code is None
    return chan


async def _launch(chan: Channel, resource: str) -> Message:
    await chan.send(Launch(resource, Mode.DIRECT))
    return await chan.receive_reply()


@pytest.fixture
async def farm(tmp_path, nursery, inline_threads):
    resources = (
        ResourceConfig("pc", "My PC", hosts=("pc1",)),
        ResourceConfig("vdi", "My desktop", pools=("vdi",)),
    )
    async with memory_farm(tmp_path, nursery, resources=resources) as f:
        for user in (BOB, CAROL):
            f.store.put_user(UserRecord(user, hash_password(f"{user} pw"), ("users",)))
        async with contextlib.AsyncExitStack() as sessions:
            yield f, sessions


async def test_two_users_racing_for_one_remote_pc_one_gets_it_the_other_in_use(
    farm, autojump_clock
):
    f, sessions = farm
    agent = await _agent(f, "pc1", HostKind.REMOTE_PC)
    alice, bob = await _logged_in(f, USER, sessions), await _logged_in(f, BOB, sessions)
    replies: dict[str, Message] = {}

    async def go(who: str, chan: Channel) -> None:
        replies[who] = await _launch(chan, "pc")

    async with trio.open_nursery() as race:  # both requests on the wire before either answer
        race.start_soon(go, USER, alice)
        race.start_soon(go, BOB, bob)
    winners = [w for w, r in replies.items() if isinstance(r, LaunchOk)]
    losers = [r for r in replies.values() if isinstance(r, Error)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert losers[0].code is ErrorCode.NO_HOST
    assert "in use: pc1 is another user's" in losers[0].message
    winner = winners[0]
    loser = bob if winner == USER else alice
    # the winner connects (reported), then logs off: the PC is free for the other at once
    await _report(agent, [winner])
    assert isinstance(await _launch(loser, "pc"), Error)
    await _report(agent, [])
    assert isinstance(await _launch(loser, "pc"), LaunchOk)


async def test_a_statically_assigned_pc_is_only_its_users(farm, autojump_clock):
    f, sessions = farm
    f.store.put_object(HostRecord("pc1", HostKind.REMOTE_PC, assigned_user=BOB))
    await _agent(f, "pc1", HostKind.REMOTE_PC)
    refused = await _launch(await _logged_in(f, USER, sessions), "pc")
    assert isinstance(refused, Error)
    assert "in use" in refused.message
    assert isinstance(await _launch(await _logged_in(f, BOB, sessions), "pc"), LaunchOk)


async def test_a_persistent_vdi_pool_listed_by_members_keeps_each_users_guest(farm, autojump_clock):
    f, sessions = farm
    f.store.put_object(PoolRecord("vdi", members=("vdi1", "vdi2"), persistent=True))
    guests = {n: await _agent(f, n, HostKind.VDI) for n in ("vdi1", "vdi2", "vdi3")}
    alice, bob, carol = [await _logged_in(f, u, sessions) for u in (USER, BOB, CAROL)]
    first = await _launch(alice, "vdi")
    second = await _launch(bob, "vdi")
    assert isinstance(first, LaunchOk)
    assert isinstance(second, LaunchOk)
    await _report(guests["vdi1"], [USER])
    await _report(guests["vdi2"], [BOB])
    await _report(guests["vdi1"], [])  # alice logs off; her guest stays hers
    full = await _launch(carol, "vdi")  # vdi3 is not a member of the pool
    assert isinstance(full, Error)
    assert "in use: vdi1, vdi2 are another user's" in full.message
    explained = await f.broker.launches.explain(USER, "vdi")
    assert explained["pick"] == "vdi1"
    assert str(explained["why"]).startswith("assigned to you")


async def test_a_vdi_guest_that_is_not_ready_takes_no_session(farm, autojump_clock):
    f, sessions = farm
    f.store.put_object(PoolRecord("vdi", members=("vdi1",)))
    guest = await _agent(f, "vdi1", HostKind.VDI)
    await _report(guest, [], ready=False)
    alice = await _logged_in(f, USER, sessions)
    refused = await _launch(alice, "vdi")
    assert isinstance(refused, Error)
    assert refused.code is ErrorCode.NO_HOST
    explained = await f.broker.launches.explain(USER, "vdi")
    assert "not ready" in str(explained["candidates"])
    await _report(guest, [], ready=True)
    assert isinstance(await _launch(alice, "vdi"), LaunchOk)


# -- the settings through `ras admin` -------------------------------------------------------------


async def test_ras_admin_sets_assignments_pool_members_and_sso(tmp_path, capsys):
    """The command's options, run in this process (a ``python -m ras`` start costs seconds)."""
    from farmkit import farm as real_farm
    from test_admin_api import ADMIN, ADMIN_PASSWORD, with_admin

    from ras.cli.main import main

    async with real_farm(tmp_path) as f, trio.open_nursery() as nursery:
        await add_agent(f, nursery, "pc1", "127.0.0.1", 3389, kind=HostKind.REMOTE_PC)
        with_admin(f)
        host, port = f.broker_addrs["admin"]
        pw = tmp_path / "admin.password"
        pw.write_text(ADMIN_PASSWORD + "\n")
        common = ["admin", "--url", f"https://{host}:{port}", "--ca-file", str(f.pki.ca_path)]
        common += ["--user", ADMIN, "--password-file", str(pw)]

        async def ras_admin(*args: str) -> int:
            return await trio.to_thread.run_sync(main, [*common, *args])

        for args in (
            ["pool", "add", "office", "--member", "pc1,pc2", "--keep-assignment", "3600"],
            ["pool", "add", "vdi", "--member", "vdi1", "--persistent"],
            ["host", "set", "pc1", "--kind", "remote_pc", "--assigned-user", "alice"],
            ["resource", "add", "legacy", "--no-sso", "--pools", "office"],
        ):
            assert await ras_admin(*args) == 0, (args, capsys.readouterr().err)
        office, vdi = sorted(f.store.list_objects(PoolRecord), key=lambda p: p.name)
        assert (office.members, office.keep_assignment_s, office.persistent) == (
            ("pc1", "pc2"), 3600, False,
        )  # fmt: skip
        assert (vdi.members, vdi.persistent) == (("vdi1",), True)
        record = f.store.get_object(HostRecord, "pc1")
        assert record is not None
        assert (record.kind, record.assigned_user) == (HostKind.REMOTE_PC, "alice")
        legacy = next(r for r in f.broker.catalog.resources() if r.id == "legacy")
        assert legacy.single_sign_on is False
        capsys.readouterr()
        assert await ras_admin("--json", "host", "show", "pc1") == 0
        assert json.loads(capsys.readouterr().out)["assigned_to"] == "alice"
        assert await ras_admin("host", "set", "pc1", "--keep-assignment=99999999999") == 2
        assert "keep_assignment_s" in capsys.readouterr().err
        nursery.cancel_scope.cancel()
