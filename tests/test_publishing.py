"""Publishing: which resources a login sees (filters by user, group, client address and
gateway), the records' strict JSON, and what a launch tells the client to start. The last
tests go through a real broker over mutual TLS, with resources from broker.toml and from the
store together."""

from __future__ import annotations

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, broker_session, farm, login

from ras.broker.config import FactorRuleConfig, ResourceConfig
from ras.broker.model import (
    Factor,
    FactorRule,
    Filter,
    GroupRecord,
    HostRecord,
    PoolRecord,
    ResourceKind,
    ResourceRecord,
)
from ras.broker.passwords import hash_password
from ras.broker.policy import factor_for, groups_of, visible
from ras.broker.store import UserRecord
from ras.config import Invalid
from ras.errors import ErrorCode
from ras.protocol import Launch, LaunchOk, ListResources, Mode, ResourceList

RESOURCES = [
    ResourceRecord("desktop", "Desktop"),
    ResourceRecord(
        "calc", "Calculator", ResourceKind.APPLICATION, command=r"C:\Windows\calc.exe",
        filter=Filter(groups=("Staff",)),
    ),
    ResourceRecord(
        "payroll", "Payroll", ResourceKind.APPLICATION, command="/opt/payroll/run",
        arguments="--year 2024", working_dir="/srv/payroll",
        filter=Filter(users=("carol",), groups=("finance",), clients=("10.1.0.0/16",)),
    ),
    ResourceRecord(
        "handbook", "Handbook", ResourceKind.DOCUMENT, target="/srv/docs/handbook.odt",
        application="writer", filter=Filter(gateways=("gw-internal",)),
    ),
    ResourceRecord(
        "writer", "Writer", ResourceKind.APPLICATION, command="/usr/bin/lowriter",
        filter=Filter(groups=("staff",), gateways=("gw-internal",)),
    ),
    ResourceRecord(
        "shared", "Shared files", ResourceKind.FOLDER, target="/srv/shared",
        filter=Filter(clients=("10.0.0.0/8", "2001:db8::/32")),
    ),
    ResourceRecord("old", "Retired", enabled=False),
]  # fmt: skip

# user, groups, client address, gateway -> exactly what the user sees, in order
CASES = [
    ("alice", (), "198.51.100.1", "gw-dmz", ["desktop"]),
    ("alice", ("staff",), "198.51.100.1", "gw-dmz", ["desktop", "calc"]),
    ("alice", ("STAFF",), "10.2.3.4", "gw-internal", ["desktop", "calc", "handbook", "writer",
                                                       "shared"]),
    ("carol", (), "10.1.9.9", "gw-dmz", ["desktop", "payroll", "shared"]),
    ("Carol", (), "10.2.9.9", "gw-dmz", ["desktop", "shared"]),  # payroll: not from 10.2/16
    ("dave", ("finance",), "10.1.0.1", "GW-INTERNAL", ["desktop", "payroll", "handbook",
                                                       "shared"]),
    ("erin", ("finance",), "2001:db8::5", "gw-dmz", ["desktop", "shared"]),
    ("erin", ("finance",), "::ffff:10.1.2.3", "gw-dmz", ["desktop", "payroll", "shared"]),
    ("erin", (), "not-an-address", "gw-dmz", ["desktop"]),
]  # fmt: skip


@pytest.mark.parametrize(("user", "groups", "client", "gateway", "expected"), CASES)
def test_a_user_sees_exactly_what_the_filters_allow(user, groups, client, gateway, expected):
    assert [r.id for r in visible(RESOURCES, user, groups, client, gateway)] == expected


def test_builtin_groups_add_to_the_directorys():
    records = [GroupRecord("Staff", ("alice", "bob")), GroupRecord("finance", ("ALICE",))]
    assert groups_of("alice", ("users",), records) == ("users", "Staff", "finance")
    assert groups_of("bob", ("staff",), records) == ("staff",)  # no duplicate
    assert groups_of("carol", (), records) == ()


def test_filter_explains_which_criterion_refuses():
    f = Filter(groups=("staff",), clients=("10.0.0.0/8",), gateways=("gw1",))
    assert f.why_not("a", ("staff",), "10.0.0.1", "gw1") == ""
    assert f.why_not("a", (), "10.0.0.1", "gw1") == "user and groups not in the filter"
    assert f.why_not("a", ("staff",), "192.0.2.1", "gw1") == (
        "client address 192.0.2.1 not in the filter"
    )
    assert f.why_not("a", ("staff",), "10.0.0.1", "gw2") == "gateway 'gw2' not in the filter"


def test_factor_rules_first_match_by_order_then_enrolment():
    rules = [
        FactorRule("outside", Factor.RADIUS, Filter(clients=("0.0.0.0/0",)), order=20),
        FactorRule("lan", Factor.NONE, Filter(clients=("10.0.0.0/8",)), order=10),
        FactorRule("admins", Factor.TOTP, Filter(groups=("admins",)), order=1),
    ]
    assert factor_for(rules, "a", ("admins",), "10.0.0.1", "g", has_totp=False) == (
        Factor.TOTP, "rule admins",
    )  # fmt: skip
    assert factor_for(rules, "a", (), "10.0.0.1", "g", has_totp=True)[0] is Factor.NONE
    assert factor_for(rules, "a", (), "192.0.2.1", "g", has_totp=True)[0] is Factor.RADIUS
    assert factor_for(rules, "a", (), "2001:db8::1", "g", has_totp=True) == (
        Factor.TOTP, "enrolled in TOTP",
    )  # fmt: skip
    assert factor_for([], "a", (), "2001:db8::1", "g", has_totp=False) == (Factor.NONE, "no rule")


RECORDS = [
    *RESOURCES, HostRecord("h1", pools=("p",), max_sessions=3), PoolRecord("p"),
    GroupRecord("Domain Users", ("a",)), FactorRule("r", Factor.RADIUS, Filter(users=("x",))),
]  # fmt: skip


@pytest.mark.parametrize("record", RECORDS)
def test_records_round_trip_through_json(record):
    assert type(record).from_json(record.to_json()) == record


@pytest.mark.parametrize(
    ("data", "field", "why"),
    [
        ({"id": "x"}, "name", "missing"),
        ({"id": "x", "name": "X", "colour": "red"}, "colour", "unknown field"),
        ({"id": "x y", "name": "X"}, "id", "not a valid name"),
        ({"id": "x", "name": "X", "kind": "game"}, "kind", "is not one of"),
        ({"id": "x", "name": "X", "kind": "folder"}, "target", "needs the path"),
        ({"id": "x", "name": "X", "hosts": "h1"}, "hosts", "expected a list"),
        ({"id": "x", "name": "X", "enabled": 1}, "enabled", "expected bool"),
        ({"id": "x", "name": "X", "filter": {"clients": ["10.0.0.300/8"]}}, "filter.clients[0]",
         "not an address"),
        ({"id": "x", "name": "X", "filter": {"group": ["a"]}}, "filter.group", "unknown field"),
        ({"id": "x", "name": "X", "description": "a\nb"}, "description", "control characters"),
    ],
)  # fmt: skip
def test_bad_records_are_refused_naming_the_field(data, field, why):
    with pytest.raises(Invalid) as info:
        ResourceRecord.from_json(data)
    assert info.value.field == field
    assert why in info.value.why


# -- through the broker -----------------------------------------------------------------------


async def resources_of(chan) -> list[str]:
    await chan.send(ListResources())
    reply = await chan.receive_reply()
    assert isinstance(reply, ResourceList), reply
    return [r.id for r in reply.resources]


async def test_the_broker_publishes_config_and_store_resources_through_the_filters(
    tmp_path, nursery
):
    host = Listener()
    await nursery.start(host.serve)
    config = (
        ResourceConfig("desktop", "Desktop"),
        ResourceConfig("lan-only", "LAN", clients=("10.0.0.0/8",)),
    )
    async with farm(
        tmp_path, gateways=(), resources=config, rdp_hosts=[("host1", "127.0.0.1", host.port)]
    ) as f:
        f.store.put_user(UserRecord("bob", hash_password("bob pw", log2_n=10)))
        for record in RESOURCES[1:]:
            f.store.put_object(record)
        f.store.put_object(ResourceRecord("desktop", "Shadowed by broker.toml's"))
        f.store.put_object(GroupRecord("staff", ("bob",)))  # a built-in group
        async with broker_session(f, gateway="gw-internal", client="10.1.2.3") as chan:
            assert await login(chan, "bob", "bob pw") == (None, "bob")
            # broker.toml's in its order, then the store's by id
            assert await resources_of(chan) == [
                "desktop", "lan-only", "calc", "handbook", "shared", "writer",
            ]  # fmt: skip
            # The document opens with its application's program.
            await chan.send(Launch("handbook", Mode.DIRECT))
            ok = await chan.receive_reply()
            assert isinstance(ok, LaunchOk), ok
            assert (ok.command, ok.target) == ("/usr/bin/lowriter", "/srv/docs/handbook.odt")
            await chan.send(Launch("calc", Mode.DIRECT))
            ok = await chan.receive_reply()
            assert isinstance(ok, LaunchOk)
            assert (ok.command, ok.arguments, ok.target) == (r"C:\Windows\calc.exe", "", "")
        async with broker_session(f, gateway="gw-dmz", client="198.51.100.4") as chan:
            assert await login(chan, USER, PASSWORD) == (None, USER)
            assert await resources_of(chan) == ["desktop"]
            # What a user does not see cannot be launched either.
            await chan.send(Launch("calc", Mode.DIRECT))
            refused = await chan.receive_reply()
            assert getattr(refused, "code", None) is ErrorCode.NOT_FOUND
        # broker.toml's resources come first and are marked as such.
        origins = f.broker.catalog.resource_origins()
        assert origins["desktop"] == "config"
        assert origins["calc"] == "store"
        assert [r.name for r in f.broker.catalog.resources() if r.id == "desktop"] == ["Desktop"]
    await trio.lowlevel.checkpoint()


async def test_factor_rules_from_the_config_file_apply(tmp_path):
    rules = (FactorRuleConfig("lan-needs-totp", Factor.TOTP, clients=("10.0.0.0/8",)),)
    async with farm(tmp_path, gateways=(), factor_rules=rules) as f:
        async with broker_session(f, client="10.0.0.5") as chan:
            # The rule asks for TOTP; alice has none enrolled: refused, never let through.
            assert (await login(chan, USER, PASSWORD))[0] is ErrorCode.AUTH_FAILED
        async with broker_session(f, client="192.0.2.5") as chan:
            assert await login(chan, USER, PASSWORD) == (None, USER)
