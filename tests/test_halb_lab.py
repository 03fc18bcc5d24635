"""HALB in a network-namespace lab: real `ras halb` nodes elect a master by VRRP, move the VIP,
and balance a client's connections over real `ras gateway` processes.

Every wait is a poll with a generous deadline; timings are measured in benchmarks/, not here.
"""

from __future__ import annotations

import ssl
import time

import pytest
from halbkit import OFFLOAD_PORT, RAS, SERVICE_PORT, Probe, Session, build, probe, wait_probe
from labkit import require_lab, wait_until

pytestmark = pytest.mark.lab


@pytest.fixture
def halb(make_lab, tmp_path):
    require_lab("keepalived")
    return build(make_lab, tmp_path)


def _one_master(hl, expected: str, timeout: float = 15.0) -> None:
    wait_until(
        lambda: hl.holders() == [expected],
        timeout,
        what=f"only {expected} holds the VIP",
        ignore=(OSError,),
    )


def test_three_nodes_elect_the_highest_and_fail_over_on_crash(halb):
    halb.start_halb("h1", 150)
    halb.start_halb("h2", 100)
    halb.start_halb("h3", 50)
    _one_master(halb, "h1")
    wait_probe(halb, 15)
    status = halb.status("h1")
    assert status["state"] == "MASTER"
    assert {g["name"]: g["healthy"] for g in status["gateways"]} == {"gw1": True, "gw2": True}
    assert halb.status("h2")["state"] == "BACKUP"

    halb.kill_node("h1")  # SIGKILL and link down: no priority-0 advert
    wait_until(lambda: "h2" in halb.holders(), 10, what="h2 takes the VIP")
    wait_probe(halb, 10)  # a client's new connections reach a gateway again
    assert halb.status("h2")["state"] == "MASTER"
    assert halb.status("h3")["state"] == "BACKUP"


def test_the_old_master_preempts_when_it_comes_back_without_a_failed_connection(halb):
    halb.start_halb("h1", 150)
    halb.start_halb("h2", 100)
    _one_master(halb, "h1")
    assert halb.stop("h1") == 0  # graceful: priority 0, the VIP released at once
    _one_master(halb, "h2")
    wait_probe(halb, 10)
    halb.start_halb("h1", 150)
    results = []
    deadline = time.monotonic() + 15
    while halb.holders() != ["h1"] and time.monotonic() < deadline:
        results.append(halb.probe_result(timeout=2.0))  # new connections all through the move
        time.sleep(0.01)
    _one_master(halb, "h1")
    results += [halb.probe_result(timeout=2.0) for _ in range(30)]
    # No new connection fails while the VIP moves back. The one connection (at most) that is in
    # flight at the instant the VIP moves is cut, as with any VRRP pair: its next packet
    # reaches the new master, which has no such connection.
    assert Probe.NOT_CONNECTED not in results, results
    assert results.count(Probe.CUT) <= 1, results
    assert results.count(Probe.OK) >= 30


def test_without_preempt_the_old_master_stays_backup(halb):
    halb.start_halb("h1", 150, preempt=False)
    _one_master(halb, "h1")  # h1 first: without preempt, whoever is master first stays master
    halb.start_halb("h2", 100, preempt=False)
    wait_until(
        lambda: halb.status("h2")["state"] == "BACKUP", 10, what="h2 BACKUP", ignore=(Exception,)
    )
    halb.stop("h1")
    _one_master(halb, "h2")
    halb.start_halb("h1", 150, preempt=False)
    wait_until(
        lambda: halb.status("h1")["state"] == "BACKUP",
        10,
        what="h1 back as BACKUP",
        ignore=(Exception,),
    )
    assert halb.holders() == ["h2"]
    wait_probe(halb, 5)


def test_a_partition_makes_two_masters_and_healing_leaves_one(halb):
    halb.start_halb("h1", 150)
    halb.start_halb("h2", 100)
    halb.start_halb("h3", 50)
    _one_master(halb, "h1")
    h1 = halb.nodes["h1"]
    for chain in ("INPUT", "OUTPUT"):
        h1.iptables("-A", chain, "-p", "112", "-j", "DROP")
    wait_until(lambda: sorted(halb.holders()) == ["h1", "h2"], 10, what="two masters (h1, h2)")
    for chain in ("INPUT", "OUTPUT"):
        h1.iptables("-D", chain, "-p", "112", "-j", "DROP")
    _one_master(halb, "h1")
    assert halb.status("h2")["state"] == "BACKUP"
    wait_probe(halb, 5)


def test_a_dead_gateway_gets_no_new_connections_after_the_fall_threshold(halb):
    halb.start_halb("h1", 150)
    _one_master(halb, "h1")
    wait_until(
        lambda: all(g["healthy"] for g in halb.status("h1")["gateways"]),
        10,
        what="both gateways healthy",
        ignore=(Exception,),
    )
    halb.kill("gw1")
    wait_until(
        lambda: (
            {g["name"]: g["healthy"] for g in halb.status("h1")["gateways"]}
            == {"gw1": False, "gw2": True}
        ),
        10,
        what="gw1 down, gw2 up",
        ignore=(Exception,),
    )
    before = {g["name"]: g["total"] for g in halb.status("h1")["gateways"]}
    assert all(halb.probe() for _ in range(20))
    after = {g["name"]: g["total"] for g in halb.status("h1")["gateways"]}
    assert after["gw1"] == before["gw1"]
    assert after["gw2"] >= before["gw2"] + 20


def test_draining_a_gateway_sends_it_no_new_connections_and_keeps_its_tunnels(halb):
    halb.start_halb("h1", 150)
    _one_master(halb, "h1")
    wait_until(
        lambda: all(g["healthy"] for g in halb.status("h1")["gateways"]),
        10,
        what="both gateways healthy",
        ignore=(Exception,),
    )
    node = halb.nodes["h1"]
    node.run([*RAS, "halb", "drain", "gw1"])
    held = Session(halb.client, halb.vip, SERVICE_PORT)  # a long-lived connection: to gw2
    node.run([*RAS, "halb", "undrain", "gw1"])
    node.run([*RAS, "halb", "drain", "gw2"])
    before = {g["name"]: g["total"] for g in halb.status("h1")["gateways"]}
    assert all(halb.probe() for _ in range(10))
    after = {g["name"]: g["total"] for g in halb.status("h1")["gateways"]}
    assert after["gw2"] == before["gw2"]
    assert after["gw1"] == before["gw1"] + 10
    assert held.ping(), "the drained gateway's open connection was cut"
    held.close()


# -- keepalived interop --------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs", "winner"), [(150, 100, "h1"), (100, 150, "h2")])
def test_keepalived_and_ras_the_higher_priority_wins(halb, ours, theirs, winner):
    halb.start_halb("h1", ours)
    halb.start_keepalived("h2", theirs)
    _one_master(halb, winner)
    if winner == "h1":
        wait_probe(halb, 10)  # our master balances to the gateways
    # each takes over when the other dies
    loser = "h2" if winner == "h1" else "h1"
    halb.kill_node(winner)
    _one_master(halb, loser, timeout=10)
    if loser == "h1":
        wait_probe(halb, 10)


@pytest.mark.parametrize("ours", ["h1", "h2"])
def test_keepalived_and_ras_equal_priority_breaks_on_the_address(halb, ours):
    """Two masters at once (partitioned), then healed: the higher primary address (h2) stays."""
    theirs = "h2" if ours == "h1" else "h1"
    h1 = halb.nodes["h1"]
    for chain in ("INPUT", "OUTPUT"):
        h1.iptables("-A", chain, "-p", "112", "-j", "DROP")
    halb.start_halb(ours, 100)
    halb.start_keepalived(theirs, 100)
    wait_until(lambda: sorted(halb.holders()) == ["h1", "h2"], 15, what="both master")
    for chain in ("INPUT", "OUTPUT"):
        h1.iptables("-D", chain, "-p", "112", "-j", "DROP")
    _one_master(halb, "h2")


def test_tls_offload_terminates_at_the_halb_and_reaches_the_plain_port(halb):
    halb.start_halb("h1", 150, offload=True)
    _one_master(halb, "h1")
    wait_probe(halb, 10)
    cert, _ = halb.offload_cert()
    ctx = ssl.create_default_context(cafile=str(cert))
    assert probe(halb.client, halb.vip, OFFLOAD_PORT, 2.0, tls=ctx) is Probe.OK
    # a client that does not trust the certificate gets no service
    assert (
        probe(halb.client, halb.vip, OFFLOAD_PORT, 2.0, tls=ssl.create_default_context())
        is Probe.NOT_CONNECTED
    )


def test_reload_takes_a_new_gateway_list_without_a_restart(halb):
    halb.start_halb("h1", 150)
    _one_master(halb, "h1")
    conf = halb.tmp / "h1.toml"
    text = conf.read_text()
    gw1 = f'[[gateways]]\nname = "gw1"\nhost = "{halb.gateways["gw1"].address}"\n'
    assert gw1 in text
    conf.write_text(text.replace(gw1, ""))
    out = halb.nodes["h1"].run([*RAS, "halb", "reload"])
    assert '"reloaded": "1 gateways"' in out.stdout
    assert [g["name"] for g in halb.status("h1")["gateways"]] == ["gw2"]
    assert halb.status("h1")["state"] == "MASTER"  # the election went on
    wait_probe(halb, 5)
    # a change that needs a restart is refused with the reason, and nothing changes
    conf.write_text(conf.read_text().replace(f"vrid = {51}", "vrid = 52"))
    refused = halb.nodes["h1"].run([*RAS, "halb", "reload"], check=False)
    assert refused.returncode == 2
    assert "vrid change only with a restart" in refused.stderr


def test_a_slow_vip_move_is_never_cut_short_by_a_timer(halb):
    """h2's `ip` takes 0.3 s, three advert intervals: when h1 preempts it, h2 must still finish
    removing the VIP (a timer firing meanwhile once cancelled the removal half-way)."""
    halb.start_halb("h2", 100, slow_ip_s=0.3)
    _one_master(halb, "h2")
    halb.start_halb("h1", 150)
    _one_master(halb, "h1")
    wait_probe(halb, 5)


# -- gateway tracking: the VIP follows the gateways ----------------------------------------------


def _block_gateways(node, on: bool) -> None:
    """The node's own connections to the gateways' port are reset (only from this node)."""
    rule = ["OUTPUT", "-p", "tcp", "--dport", str(SERVICE_PORT), "-j", "REJECT"]
    node.iptables("-A" if on else "-D", *rule, "--reject-with", "tcp-reset")


def _priority(hl, name: str) -> int:
    return hl.status(name)["priority"]  # type: ignore[return-value]


@pytest.mark.parametrize("fault", ["stopped", "unreachable"])
def test_a_master_without_gateways_hands_the_vip_to_a_backup_that_has_one(halb, fault):
    """stopped: h1 balances over gw1 alone, h2 over gw2 alone, and gw1 dies. unreachable: both
    list both gateways, and only h1 loses its way to them. Either way h1 (150) has no healthy
    gateway, drops to its no-gateway priority, and h2 (100) preempts it; when h1's gateways
    come back, h1 (150 again, preempt on) takes the VIP back."""
    if fault == "stopped":
        halb.start_halb("h1", 150, gateways=["gw1"])
        halb.start_halb("h2", 100, gateways=["gw2"])
    else:
        halb.start_halb("h1", 150, no_gateway_priority=90)
        halb.start_halb("h2", 100)
    _one_master(halb, "h1")
    wait_probe(halb, 10)
    assert _priority(halb, "h1") == 150

    if fault == "stopped":
        halb.kill("gw1")
    else:
        _block_gateways(halb.nodes["h1"], on=True)
    _one_master(halb, "h2")
    low = 1 if fault == "stopped" else 90
    assert _priority(halb, "h1") == low
    assert halb.status("h1")["state"] == "BACKUP"
    assert halb.status("h2")["state"] == "MASTER"
    wait_probe(halb, 10)
    assert all(halb.probe(timeout=2.0) for _ in range(10))  # served through h2

    if fault == "stopped":
        halb.start_gateway("gw1", wait=True)
    else:
        _block_gateways(halb.nodes["h1"], on=False)
    _one_master(halb, "h1")
    assert _priority(halb, "h1") == 150
    wait_probe(halb, 10)
    assert "vrrp priority name=h1 150->" in halb.log("h1")


def test_a_node_whose_gateways_are_not_up_yet_does_not_keep_the_vip(halb):
    """Cold start: h1 (150) balances over gw1, which is not running yet; h2 (100) over gw2,
    which serves. h1 starts at priority 1, so h2 holds the VIP and clients are served (h1 may
    hold it for a moment if it starts first and hears nobody, and yields at h2's first
    advert); once gw1 serves, h1 takes the VIP (preempt)."""
    halb.kill("gw1")
    halb.start_halb("h1", 150, gateways=["gw1"])
    halb.start_halb("h2", 100, gateways=["gw2"])
    _one_master(halb, "h2")
    wait_probe(halb, 10)
    # h1 runs, hears h2's adverts and still leaves it the VIP: 20 adverts is many
    # Master_Down_Intervals (each about 3.4 adverts) in which it could have preempted.
    wait_until(
        lambda: halb.status("h1")["adverts_received"] >= 20,
        15,
        what="h1 hears h2",
        ignore=(Exception,),
    )
    assert halb.holders() == ["h2"]
    status = halb.status("h1")
    assert (status["state"], status["priority"], status["base_priority"]) == ("BACKUP", 1, 150)
    shown = halb.nodes["h1"].run([*RAS, "halb", "status"]).stdout
    assert "BACKUP" in shown
    assert "priority=1 (no healthy gateway; 150 with one)" in shown

    halb.start_gateway("gw1", wait=True)
    _one_master(halb, "h1")
    wait_probe(halb, 10)
    assert _priority(halb, "h1") == 150
