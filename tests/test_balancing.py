"""Hosts and load balancing: the registry's choice (pure, clock given), then a real broker
with real agents over mutual TLS whose load is scripted: launches spread as the rule says,
reconnection lands on the disconnected session's host, a lying or drained host gets nothing,
and ``explain`` says why."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import trio
from farmkit import PASSWORD, USER, Farm, broker_session, farm, login, until

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig
from ras.broker.config import ResourceConfig
from ras.broker.hosts import HostRegistry, check_report
from ras.broker.model import Balancing, HostRecord, PoolRecord
from ras.net.channel import Channel
from ras.protocol import HostKind, Launch, LaunchOk, LoadReport, Mode, SessionInfo, SessionState


def load(cpu: float = 0.0, mem: float = 0.0, sessions: int = 0, disc: int = 0,
         detail: tuple[SessionInfo, ...] = ()) -> LoadReport:  # fmt: skip
    return LoadReport(cpu, mem, sessions, disc, detail)


def registry(*names: str, max_sessions: int = 10, kind: HostKind = HostKind.RDSH) -> HostRegistry:
    reg = HostRegistry(timeout_s=20.0)
    for name in names:
        reg.register(name, kind, "10.0.0.1", 3389, max_sessions, 0.0)
    return reg


# -- the registry --------------------------------------------------------------------------------


def _unchecked(**fields: object) -> LoadReport:
    """A report past the constructor's checks: what a broken agent could hand in-process."""
    report = LoadReport(0.0, 0.0, 0, 0)
    for key, value in fields.items():
        object.__setattr__(report, key, value)
    return report


@pytest.mark.parametrize(
    ("report", "why"),
    [
        (_unchecked(cpu_percent=math.nan), "cpu_percent nan is not a percentage"),
        (_unchecked(memory_percent=math.inf), "memory_percent inf is not a percentage"),
        (_unchecked(cpu_percent=-1.0), "cpu_percent -1.0 is not a percentage"),
        (_unchecked(cpu_percent=100.5), "cpu_percent 100.5 is not a percentage"),
        (_unchecked(sessions=-2), "sessions -2 is not a count"),
        (load(sessions=21), "21 sessions on a host of at most 10"),
        (load(sessions=2, disc=3), "3 disconnected of 2 sessions"),
        (load(sessions=2, detail=(SessionInfo("1", "a", SessionState.ACTIVE),)),
         "1 sessions listed, 2 counted"),
        (load(sessions=1, disc=0, detail=(SessionInfo("1", "a", SessionState.DISCONNECTED),)),
         "1 disconnected sessions listed, 0 counted"),
    ],
)  # fmt: skip
def test_nonsense_reports_are_named(report, why):
    assert check_report(report, 10) == why


def test_a_lying_host_gets_nothing_until_it_reports_sanely():
    reg = registry("liar", "honest")
    reg.report("honest", load(cpu=90, mem=90, sessions=5), now=1)
    why = reg.report("liar", _unchecked(cpu_percent=math.nan), now=1)
    assert why == "cpu_percent nan is not a percentage"
    assert [reg.pick(now=2).name for _ in range(2)] == ["honest"] * 2  # type: ignore[union-attr]
    assert reg.report("liar", load(sessions=3, disc=9), now=3)
    assert reg.pick(now=3).name == "honest"  # type: ignore[union-attr]
    assert reg.report("liar", load(sessions=3, disc=1), now=4) == ""
    assert reg.pick(now=4).name == "liar"  # type: ignore[union-attr]


def test_resource_based_fills_hosts_to_equal_load():
    reg = registry("h1", "h2", "h3")
    reg.report("h1", load(sessions=6), now=1)
    reg.report("h2", load(sessions=2), now=1)
    picks = Counter(reg.pick(now=1).name for _ in range(10))  # type: ignore[union-attr]
    # 18 sessions on three hosts of 10: six each, so h1 gets none, h2 four, h3 six.
    assert picks == {"h2": 4, "h3": 6}


def test_weights_choose_the_counters():
    reg = HostRegistry(timeout_s=20, weights=(0.0, 0.0, 1.0))  # CPU only
    for name in ("a", "b"):
        reg.register(name, HostKind.RDSH, "10.0.0.1", 3389, 10, 0)
    reg.report("a", load(cpu=10, sessions=9), now=1)
    reg.report("b", load(cpu=50, sessions=0), now=1)
    assert reg.pick(now=1).name == "a"  # type: ignore[union-attr]


def test_round_robin_takes_turns_whatever_the_load():
    reg = registry("h1", "h2", "h3")
    reg.report("h1", load(cpu=95, mem=95, sessions=9), now=1)
    names = [
        reg.choose(1, None, method=Balancing.ROUND_ROBIN, turn_key="p").host.name  # type: ignore[union-attr]
        for _ in range(5)
    ]
    assert names == ["h1", "h2", "h3", "h2", "h3"]  # h1 is full after its one


def test_drained_and_disabled_hosts_take_no_new_sessions_but_drained_keep_their_users():
    reg = registry("d", "x", "ok")
    reg.configure([HostRecord("d", drained=True), HostRecord("X", enabled=False)])
    reg.report("ok", load(sessions=9), now=1)
    explained = reg.choose(1, None, dry_run=True)  # what explain shows
    reasons = {c.host: c.reason for c in explained.candidates}
    assert reasons == {"d": "drained: takes no new sessions", "x": "disabled by an administrator",
                       "ok": ""}  # fmt: skip
    choice = reg.choose(1, None)
    assert choice.host is not None
    assert choice.host.name == explained.host.name == "ok"  # type: ignore[union-attr]
    assert choice.candidates == []  # a launch does not judge every host for explain
    back = reg.choose(1, None, affinity=[("d", "affinity: disconnected session d:1")])
    assert back.host is not None
    assert back.host.name == "d"
    assert back.method == "affinity"
    refused = reg.choose(1, None, affinity=[("x", "affinity: disconnected session x:1")])
    assert refused.host is None  # "ok" is full now (pending), "x" disabled, "d" drained


def test_vdi_and_remote_pc_hosts_take_one_user_and_admins_cap_hosts():
    reg = registry("pc1", "pc2", kind=HostKind.REMOTE_PC, max_sessions=50)
    assert {reg.pick(now=0).name, reg.pick(now=0).name} == {"pc1", "pc2"}  # type: ignore[union-attr]
    assert reg.pick(now=0) is None
    reg2 = registry("rdsh", max_sessions=50)
    reg2.configure([HostRecord("rdsh", max_sessions=2)])
    assert [reg2.pick(now=0) is not None for _ in range(3)] == [True, True, False]


def test_unknown_hosts_are_listed_as_candidates():
    reg = registry("h1")
    choice = reg.choose(0, ["h1", "ghost"], dry_run=True)
    assert [(c.host, c.reason) for c in choice.candidates] == [
        ("h1", ""), ("ghost", "unknown: no agent registered"),
    ]  # fmt: skip
    assert reg.hosts["h1"].pending == 0  # a dry run counts nothing


# -- a real broker with scripted agents ---------------------------------------------------------


class ScriptedAgent(Agent):
    """A real agent (mTLS, registration, reports every report_interval_s) reporting ``load``."""

    def __init__(self, config: AgentConfig, report: LoadReport) -> None:
        super().__init__(config)
        self.report = report

    paused = False

    def measure(self) -> LoadReport:
        return self.report

    async def _report(self, chan: Channel, interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            if not self.paused:
                await chan.send(self.measure())


def frozen(f: Farm) -> None:
    """Stop the reports, so that launches stay counted (a report replaces them) while a test
    counts where they went."""
    for agent in f.agents.values():
        assert isinstance(agent, ScriptedAgent)
        agent.paused = True


async def add_scripted(
    f: Farm, nursery: trio.Nursery, name: str, report: LoadReport, *, max_sessions: int = 10,
    kind: HostKind = HostKind.RDSH,
) -> ScriptedAgent:  # fmt: skip
    """An agent for host ``name``; its RDP address 127.0.1.<n> tells the launches apart."""
    cert, key = f.pki.ensure(name)
    cfg = AgentConfig(
        name=name, cert_file=cert, key_file=key, ca_file=f.pki.ca_path, kind=kind,
        rdp_host=f"127.0.1.{len(f.agents) + 1}", rdp_port=3389, max_sessions=max_sessions,
        broker_port=f.broker_addrs["agents"][1],
    )  # fmt: skip
    agent = ScriptedAgent(cfg, report)
    f.agents[name] = agent
    await nursery.start(agent.run)
    await until(lambda: name in f.broker.hosts.hosts and f.broker.hosts.hosts[name].online)
    await until(lambda: f.broker.hosts.hosts[name].sessions == report.sessions)
    return agent


async def reported(f: Farm, agent: ScriptedAgent, report: LoadReport) -> None:
    """Change what ``agent`` reports and wait until the broker has it."""
    agent.report = report
    host = f.broker.hosts.hosts[agent.config.name]
    await until(lambda: (host.sessions, host.cpu_percent, host.insane, host.pending)
                == (report.sessions, report.cpu_percent, "", 0))  # fmt: skip


async def launches(f: Farm, resource: str, count: int, user: str = USER) -> list[str]:
    """Launch ``count`` times as ``user``; the hosts the broker chose, in order."""
    by_address = {a.config.rdp_host: name for name, a in f.agents.items()}
    picked = []
    async with broker_session(f) as chan:
        assert (await login(chan, user, PASSWORD))[0] is None
        for _ in range(count):
            await chan.send(Launch(resource, Mode.DIRECT))
            reply = await chan.receive_reply()
            assert isinstance(reply, LaunchOk), reply
            picked.append(by_address[reply.host])
    return picked


# report_interval_s short so that a changed script reaches the broker soon; the deadlines above
# are hang guards only.
FAST = {"report_interval_s": 0.1, "host_timeout_s": 30.0}


async def test_resource_based_launches_fill_the_free_capacity(tmp_path, nursery):
    async with farm(tmp_path, gateways=(), **FAST) as f:  # type: ignore[arg-type]
        await add_scripted(f, nursery, "h1", load(sessions=0))
        await add_scripted(f, nursery, "h2", load(sessions=5))
        await add_scripted(f, nursery, "h3", load(cpu=100, mem=100, sessions=10))  # full
        frozen(f)
        picks = await launches(f, "desktop", 9)
        # h1 catches up with h2, then they take turns: both end with 7 of 10.
        assert Counter(picks) == {"h1": 7, "h2": 2}
        assert picks[:5] == ["h1"] * 5


async def test_round_robin_pool_takes_turns(tmp_path, nursery):
    resources = (ResourceConfig("pooled", "Pooled desktop", pools=("rr",)),)
    async with farm(tmp_path, gateways=(), resources=resources, **FAST) as f:  # type: ignore[arg-type]
        f.store.put_object(PoolRecord("rr", Balancing.ROUND_ROBIN))
        for name in ("a1", "a2", "a3"):
            f.store.put_object(HostRecord(name, pools=("rr",)))
        await add_scripted(f, nursery, "a1", load(cpu=90, mem=90, sessions=5))
        await add_scripted(f, nursery, "a2", load())
        await add_scripted(f, nursery, "a3", load())
        await add_scripted(f, nursery, "outside", load())  # not in the pool: never chosen
        assert await launches(f, "pooled", 6) == ["a1", "a2", "a3", "a1", "a2", "a3"]


async def test_reconnection_goes_back_to_the_disconnected_session(tmp_path, nursery):
    async with farm(tmp_path, gateways=(), **FAST) as f:  # type: ignore[arg-type]
        await add_scripted(f, nursery, "idle", load())
        mine = (SessionInfo("77", USER, SessionState.DISCONNECTED),
                SessionInfo("78", "bob", SessionState.ACTIVE))  # fmt: skip
        await add_scripted(f, nursery, "busy", load(cpu=80, mem=80, sessions=2, disc=1,
                                                    detail=mine))  # fmt: skip
        await until(lambda: f.broker.sessions.get("busy:77") is not None)
        assert await launches(f, "desktop", 2) == ["busy", "busy"]
        why = await f.broker.launches.explain(USER, "desktop", "192.0.2.7", "gw-test")
        assert why["pick"] == "busy"
        assert why["method"] == "affinity"
        assert why["why"] == "affinity: disconnected session busy:77"
        assert (await f.broker.launches.explain("nobody", "desktop"))["why"] == (
            "no such user in the directory"
        )


async def test_lying_and_drained_hosts_get_nothing_and_explain_says_why(tmp_path, nursery):
    async with farm(tmp_path, gateways=(), **FAST) as f:  # type: ignore[arg-type]
        await add_scripted(f, nursery, "honest", load(cpu=70, mem=70, sessions=6))
        liar = await add_scripted(f, nursery, "liar", load())
        await add_scripted(f, nursery, "drained", load())
        await f.broker.catalog.drain_host("drained", True)
        # More disconnected sessions than sessions: the broker does not believe it.
        liar.report = load(sessions=1, disc=4)
        await until(lambda: bool(f.broker.hosts.hosts["liar"].insane))
        assert await launches(f, "desktop", 3) == ["honest"] * 3
        why = await f.broker.launches.explain(USER, "desktop")
        reasons = {c["host"]: c["reason"] for c in why["candidates"]}  # type: ignore[union-attr]
        assert reasons == {
            "drained": "drained: takes no new sessions",
            "honest": "",
            "liar": "lying: its last report was refused (4 disconnected of 1 sessions)",
        }
        assert why["pick"] == "honest"
        # Sane again: it takes sessions again (it is the least loaded).
        await reported(f, liar, load(sessions=1, disc=1))
        assert await launches(f, "desktop", 1) == ["liar"]
