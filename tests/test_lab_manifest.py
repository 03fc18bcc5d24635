"""The topology manifest (ras/lab/manifest.py) and the network it builds (ras/lab/network.py).

Parsing is checked on plain text: every shipped scenario parses, and each kind of mistake is
refused with the source and the dotted key. Then the network in a lab, without daemons:
segments joined by two firewalls pass exactly the flows the manifest allows, and nothing
else, in either direction; a farm whose firewall misses one rule fails to come up, naming
the step and what the firewall dropped.
"""

from __future__ import annotations

import json
import subprocess
from importlib import resources

import pytest
from conftest import require_peers
from labkit import echo, reachable, start_echo_server

from ras.errors import ConfigError
from ras.lab.deployment import deploy
from ras.lab.manifest import ClientMode, Role, load_manifest, parse_manifest, scenario_names
from ras.lab.network import build_network, dropped, firewall_rules

SCENARIOS = {
    "single-server",
    "several-rdsh",
    "dual-gateways",
    "halb-pair",
    "dmz-one-firewall",
    "dmz-two-firewalls",
    "two-sites",
    "broker-redundancy",
}

# Three segments in a row, two firewalls; roles so that the manifest is a farm's, though the
# network tests below start no daemon. "srv" listens on 7000 and 7001; only 7000 is allowed.
CHAIN = """
name = "chain"
[segments]
outside = "10.213.1.0/24"
middle = "10.213.2.0/24"
inside = "10.213.3.0/24"

[hosts.client]
role = "client"
segment = "outside"
servers = ["gw"]

[hosts.fw1]
role = "firewall"
segments = ["outside", "middle"]
allow = [{ from = "outside", to = "srv", ports = [7000] }]

[hosts.fw2]
role = "firewall"
segments = ["middle", "inside"]
allow = [{ from = "client", to = ["srv"], ports = [7000] }]

[hosts.gw]
role = "gateway"
segment = "middle"

[hosts.srv]
role = ["broker", "agent"]
segment = "inside"
"""


def _broken(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_manifest(text, source="m.toml")
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Parsing


def test_every_shipped_scenario_parses():
    assert set(scenario_names()) == SCENARIOS
    for name in SCENARIOS:
        m = load_manifest(name)
        assert m.name == name
        assert m.summary
        assert m.having(Role.CLIENT)
        assert m.having(Role.AGENT)


def test_a_manifest_file_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(CHAIN.replace('name = "chain"\n', ""))
    m = load_manifest(path)
    assert m.name == "mine"  # the file's stem
    assert m.hosts["srv"].roles == (Role.BROKER, Role.AGENT)
    assert m.hosts["client"].modes == (ClientMode.GATEWAY, ClientMode.GATEWAY_SSL)


def test_no_such_scenario_names_the_scenarios():
    with pytest.raises(ConfigError, match="halb-pair"):
        load_manifest("halb-pear")


@pytest.mark.parametrize(
    ("old", "new", "wanted"),
    [
        ('name = "chain"', 'name = "chain"\nsummery = "x"', "unknown key 'summery'"),
        ('segment = "middle"', 'segment = "middle"\nport = 80', "unknown key 'hosts.gw.port'"),
        ('role = "gateway"', 'role = "gateway"\nnext_hops = ["gw"]',
         "'hosts.gw.next_hops': only for a host with role forwarder"),
        ('role = "gateway"', 'role = "gatway"', "'hosts.gw.role[0]': 'gatway' is not one of"),
        ('segment = "middle"', 'segment = "midle"', "'hosts.gw.segments[0]': no segment"),
        ('segment = "middle"', 'segments = ["middle", "inside"]',
         "only a firewall is on several segments"),
        ('to = "srv", ports = [7000]', 'to = "srv", ports = [70000]', "allow[0].ports[0]"),
        ('to = "srv", ports', 'to = "nowhere", ports', "'nowhere' is no segment, host or VIP"),
        ('inside = "10.213.3.0/24"', 'inside = "10.213.2.0/23"', "overlaps segments.middle"),
        ('servers = ["gw"]', 'servers = ["srv"]', "'srv' is no gateway or VIP"),
        ('role = ["broker", "agent"]', 'role = "agent"', "has no broker for"),
        ('role = ["broker", "agent"]', 'role = "broker"', "no host with role agent"),
        ('segments = ["middle", "inside"]', 'segments = ["middle"]', "joins two segments"),
        ("[hosts.gw]", '[vips.front]\nsegment = "middle"\nnodes = ["gw"]\nbackends = ["gw"]\n'
         "[hosts.gw]", "'vips.front.nodes[0]': 'gw' is no host with role halb"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_naming_the_file_and_key(old, new, wanted):
    message = _error(_broken(CHAIN, old, new))
    assert message.startswith("m.toml: ")
    assert wanted in message


# a second broker beside srv's, and what several brokers need
SECOND = '[hosts.b2]\nrole = "broker"\nsegment = "inside"\n'
ETCD = "".join(f'[hosts.e{i}]\nrole = "etcd"\nsegment = "inside"\n' for i in range(3))


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        (CHAIN + SECOND, "has 2 brokers and no etcd member"),
        (CHAIN + SECOND + ETCD.split("[hosts.e2]")[0], "has 2 etcd members: 1, 3 or 5"),
        (CHAIN + SECOND + ETCD + "priority = 1001\n",
         "'hosts.e2.priority': only for a host with role broker"),
        (CHAIN + ETCD + SECOND + "priority = 1001\n", "'hosts.b2.priority': 1001: a whole number"),
        (CHAIN + SECOND + ETCD + '[hosts.e3]\nrole = ["etcd", "agent"]\nsegment = "inside"\n',
         "'hosts.e3.role': client, firewall, halb and etcd hosts have one role only"),
        (_broken(CHAIN, 'role = ["broker", "agent"]', 'role = "agent"') + ETCD,
         "has etcd members and no broker"),
    ],
)  # fmt: skip
def test_several_brokers_need_etcd_and_priorities_are_checked(text, wanted):
    message = _error(text)
    assert message.startswith("m.toml: ")
    assert wanted in message


def test_brokers_are_ordered_by_priority_then_manifest_order():
    m = parse_manifest(CHAIN + ETCD + SECOND + "priority = 0\n" + SECOND.replace("b2", "b3"),
                       source="m.toml")  # fmt: skip
    assert [b.name for b in m.brokers_of("")] == ["srv", "b2", "b3"]  # srv: 0 by default
    m = load_manifest("broker-redundancy")
    assert [b.name for b in m.brokers_of("")] == ["broker1", "broker2", "broker3"]
    assert [e.name for e in m.etcd_of("")] == ["etcd1", "etcd2", "etcd3"]


def test_not_toml():
    assert "not valid TOML" in _error("[hosts\n")


def test_firewall_rules_drop_all_but_the_flows():
    m = parse_manifest(CHAIN, source="m.toml")
    rules = firewall_rules(m.hosts["fw1"], {"outside": ["10.213.1.0/24"], "srv": ["1.2.3.4/32"]})
    assert ":FORWARD DROP" in rules
    assert ":INPUT DROP" in rules
    assert "-s 10.213.1.0/24 -d 1.2.3.4/32 -m multiport --dports 7000 " in rules
    assert rules.rstrip().endswith("COMMIT")


# ---------------------------------------------------------------------------------------------
# The network in a lab


@pytest.fixture
def chain(make_lab):
    m = parse_manifest(CHAIN, source="chain")
    lab = make_lab(subnet="10.213.1.0/24", segment="outside")
    return build_network(m, lab)


def _root_network() -> tuple[str, str]:
    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    return ip("-j", "link", "show"), ip("-j", "route", "show")


def test_two_firewalls_pass_exactly_the_allowed_flow(chain, make_lab):
    lab = chain.lab
    client, srv, gw = lab.hosts["client"], lab.hosts["srv"], lab.hosts["gw"]
    for port in (7000, 7001):
        start_echo_server(srv, port)
    start_echo_server(client, 7000)
    # firewalls take .1 on each of their segments, the others .10 up
    assert str(lab.hosts["fw1"].address_on("middle")) == "10.213.2.1"
    assert str(lab.hosts["fw2"].address_on("middle")) == "10.213.2.2"
    assert str(srv.address) == "10.213.3.10"
    # through both firewalls on the allowed port, with the client's own address
    assert echo(client, srv.address, 7000) == b"hello lab\n"
    before = {name: dropped(lab.hosts[name]) for name in ("fw1", "fw2")}
    assert not reachable(client, srv.address, 7001)  # a port no rule allows
    assert not reachable(srv, client.address, 7000)  # the other way round
    assert not reachable(gw, srv.address, 7000)  # fw2 allows the client only
    after = {name: dropped(lab.hosts[name]) for name in ("fw1", "fw2")}
    assert after["fw1"] > before["fw1"]
    assert after["fw2"] > before["fw2"]
    assert not reachable(client, lab.hosts["fw1"].address, 22)  # nothing to the firewall
    # no host has a default route; each reaches the other segments through a firewall
    routes = json.loads(client.run(["ip", "-j", "-4", "route"]).stdout)
    assert {r["dst"] for r in routes} == {"10.213.1.0/24", "10.213.2.0/24", "10.213.3.0/24"}
    assert {r.get("gateway") for r in routes if r["dst"] != "10.213.1.0/24"} == {"10.213.1.1"}
    fw1 = json.loads(lab.hosts["fw1"].run(["ip", "-j", "-4", "route"]).stdout)
    assert {r["dst"]: r.get("gateway") for r in fw1}["10.213.3.0/24"] == "10.213.2.2"
    assert lab.hosts["fw1"].read_sysctl("net.ipv4.ip_forward") == "1"
    assert client.read_sysctl("net.ipv4.ip_forward") == "0"


def test_the_machine_network_is_untouched(make_lab):
    before = _root_network()
    m = load_manifest("dmz-two-firewalls")
    lab = make_lab(subnet=str(m.segments["internet"]), segment="internet")
    build_network(m, lab)
    assert _root_network() == before
    lab.close()
    assert _root_network() == before


@pytest.mark.peers
def test_a_missing_rule_is_a_failed_lab(make_lab, tmp_path):
    """dmz-one-firewall without the gateways' rule to the broker: the gateways never
    register, and the error says so and what the firewall dropped."""
    require_peers(xrdp=False)  # the RDP host's demo desktop
    scenario = (resources.files("ras.lab") / "scenarios" / "dmz-one-firewall.toml").read_text()
    broken = _broken(scenario, '  { from = ["gw1", "gw2"], to = "broker", ports = [20002] },\n', "")
    m = parse_manifest(broken, source="broken")
    lab = make_lab(subnet=str(m.segments["internet"]), segment="internet")
    with pytest.raises(AssertionError) as info:
        deploy(m, lab, tmp_path / "farm", step_timeout_s=5)
    message = str(info.value)
    assert "gw1 registered with broker: not in 5 s" in message
    assert "firewalls dropped: fw " in message
    assert "fw 0 packets" not in message
