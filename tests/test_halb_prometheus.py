"""A real Prometheus scrapes the two `ras halb` nodes of a VRRP pair in a network-namespace lab.

Prometheus runs on a monitoring host of the lab and scrapes each node's `[metrics]` listener on
the node's own address, as an operator's would: HTTPS with the node's farm certificate, and an
allow-list that names the Prometheus host only. It loads the shipped alert rules
(deploy/prometheus/ras-rules.yml). The test asks Prometheus's HTTP API, from inside the lab,
what an operator would look at: one master for the VRID, every gateway healthy; a split brain
(two masters), a crashed master (the other node's state series turns to master, its
transitions counter grows), gateways that stop (their backend health goes to 0). The HALB
rules are checked as Prometheus evaluates them (`/api/v1/alerts`): an alert whose expression
holds is `pending` from the first evaluation, so no test waits out a rule's `for:`.
"""

from __future__ import annotations

import http.client
import json
import ssl

import promkit
import pytest
from halbkit import build
from labkit import connect, require_lab, wait_until

from ras.lab import Host
from ras.pki import FarmPKI

pytestmark = [pytest.mark.lab, pytest.mark.peers]

METRICS_PORT = 9472  # the HALB's suggested port (docs/operations.md)
WEB_PORT = 9090


class _Api:
    """Prometheus's HTTP API, asked from inside the lab host it runs on."""

    def __init__(self, host: Host, address: str) -> None:
        self.host = host
        self.address = address

    def get(self, path: str) -> dict[str, object]:
        conn = http.client.HTTPConnection(self.address, WEB_PORT, timeout=5)
        conn.sock = self.host.socket()  # made in the lab host: the request goes from there
        try:
            conn.sock.settimeout(5)
            conn.sock.connect((self.address, WEB_PORT))
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status == 503:  # starting: not ready to answer yet
                raise _NotReady(body.decode(errors="replace"))
            return json.loads(body)  # type: ignore[no-any-return]
        finally:
            conn.close()

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        return promkit.series(self.get(promkit.query_path(expr)))

    def by_node(self, expr: str) -> dict[str, float]:
        """``expr``'s value per scraped node (the ``node`` label the scrape config adds)."""
        return {labels.get("node", ""): value for labels, value in self.query(expr)}

    def until(self, expr: str, expected: object, timeout: float = 20.0) -> None:
        """Ask until ``by_node(expr)`` is ``expected`` (Prometheus scrapes every second)."""
        wait_until(
            lambda: self.by_node(expr) == expected,
            timeout,
            step=0.2,
            what=f"Prometheus: {expr} == {expected}",
            ignore=_UNREACHABLE,
        )

    def alerts(self, name: str) -> dict[str, tuple[str, float]]:
        """Alert ``name`` as the rules evaluate it now: per node (or per VRID, for a rule that
        sums over the nodes) its state (pending, firing) and its expression's value."""
        answer = self.get("/api/v1/alerts")
        return {
            alert["labels"].get("node", alert["labels"].get("vrid", "")): (
                alert["state"],
                float(alert["value"]),
            )
            for alert in answer["data"]["alerts"]  # type: ignore[index]
            if alert["labels"]["alertname"] == name
        }

    def until_alerts(self, name: str, expected: dict[str, tuple[str, float]]) -> None:
        wait_until(
            lambda: self.alerts(name) == expected,
            20,
            step=0.2,
            what=f"Prometheus: alert {name} is {expected}",
            ignore=_UNREACHABLE,
        )


class _NotReady(Exception):
    pass


_UNREACHABLE = (OSError, http.client.HTTPException, _NotReady)


def _handshakes(client: Host, node: Host, pki: FarmPKI) -> bool:
    """Whether a TLS handshake from ``client`` with ``node``'s metrics listener completes."""
    trusting = ssl.create_default_context(cafile=pki.ca_path)
    with connect(client, node.address, METRICS_PORT) as sock:
        try:
            trusting.wrap_socket(sock, server_hostname=str(node.address)).close()
        except (ssl.SSLError, ConnectionError):
            return False
    return True


def test_a_real_prometheus_follows_the_halb_pair_through_failover(make_lab, tmp_path):
    require_lab()
    promkit.require_prometheus()
    hl = build(make_lab, tmp_path, nodes=2, gateways=2)
    prom = hl.lab.add_host("prom")
    pki = FarmPKI(tmp_path / "pki")
    for name, priority in (("h1", 150), ("h2", 100)):
        address = str(hl.nodes[name].address)
        cert, key = pki.ensure(f"{name}-metrics", [address])
        hl.start_halb(
            name,
            priority,
            extra=(
                f'[metrics]\nport = {METRICS_PORT}\nlisten_host = "{address}"\n'
                f'cert_file = "{cert}"\nkey_file = "{key}"\nallow = ["{prom.address}"]\n'
            ),
        )
    targets = {n: [f"{h.address}:{METRICS_PORT}"] for n, h in hl.nodes.items()}
    config = promkit.write_config(
        tmp_path / "prometheus.yml", {"ras-halb": targets}, rules=promkit.RULES, ca_file=pki.ca_path
    )
    prom.popen(promkit.argv(config, tmp_path / "tsdb", f"{prom.address}:{WEB_PORT}"))
    api = _Api(prom, str(prom.address))
    master, backup = 'ras_halb_vrrp_state{state="master"}', 'ras_halb_vrrp_state{state="backup"}'

    # Both nodes scraped over TLS; exactly one master for the VRID, h1 (the higher priority).
    api.until('up{job="ras-halb"}', {"h1": 1, "h2": 1}, timeout=30)
    api.until(master, {"h1": 1, "h2": 0})
    api.until(backup, {"h1": 0, "h2": 1})
    api.until('sum by (vrid) (ras_halb_vrrp_state{state="master"})', {"": 1})
    api.until("ras_halb_vrrp_priority", {"h1": 150, "h2": 100})
    # Every gateway healthy on both nodes, named by the gateway label.
    api.until("ras_halb_healthy_backends", {"h1": 2, "h2": 2})
    up = api.query("ras_halb_backend_up")
    assert sorted((s["node"], s["gateway"], s["vrid"], v) for s, v in up) == [
        (node, gateway, "51", 1) for node in ("h1", "h2") for gateway in ("gw1", "gw2")
    ]
    assert hl.holders() == ["h1"]  # what Prometheus says is what the interfaces say
    # Only the Prometheus host may scrape: from the client host a node closes the connection
    # before the TLS handshake ends.
    assert _handshakes(prom, hl.nodes["h2"], pki)
    assert not _handshakes(hl.client, hl.nodes["h2"], pki)
    # The HALB rules hold nothing against a healthy pair (once evaluated on its data: the
    # cold start may have had two masters for a moment, see test_halb_lab).
    api.until_alerts("RasNoVrrpMaster", {})
    api.until_alerts("RasNoHealthyGateway", {})

    # A split brain: h2 hears no adverts (and sends none), takes the VIP as well: two masters,
    # and RasNoVrrpMaster's expression holds (pending) with the count. Healed: one again.
    h2 = hl.nodes["h2"]
    for chain in ("INPUT", "OUTPUT"):
        h2.iptables("-A", chain, "-p", "112", "-j", "DROP")
    api.until(master, {"h1": 1, "h2": 1})
    api.until_alerts("RasNoVrrpMaster", {"51": ("pending", 2)})
    for chain in ("INPUT", "OUTPUT"):
        h2.iptables("-D", chain, "-p", "112", "-j", "DROP")
    api.until(master, {"h1": 1, "h2": 0})
    api.until_alerts("RasNoVrrpMaster", {})

    # h2 entered master at least once (the split brain), and maybe also at the cold start
    # (whichever node is ready first holds the VIP until the other's first advert).
    transitions = "sum by (node) (ras_halb_vrrp_transitions_total)"
    entered_master = 'ras_halb_vrrp_transitions_total{state="master"}'
    before, mastered = api.by_node(transitions)["h2"], api.by_node(entered_master)["h2"]
    assert mastered >= 1
    assert before >= 2 * mastered + 1  # initialize->backup, then ->master and back each time

    # The master crashes (SIGKILL, link down): h1's target goes down, its series with it (no
    # stale "master" left counted), and h2's state series turns to master.
    hl.kill_node("h1")
    api.until('up{job="ras-halb"}', {"h1": 0, "h2": 1})
    api.until(master, {"h2": 1})
    api.until(backup, {"h2": 0})
    api.until('sum by (vrid) (ras_halb_vrrp_state{state="master"})', {"": 1})
    api.until(entered_master, {"h2": mastered + 1})
    assert api.by_node(transitions)["h2"] == before + 1
    assert hl.holders() == ["h2"]
    api.until_alerts("RasNoVrrpMaster", {})

    # A gateway stops: its backend health goes to 0 on the master, the other stays 1.
    hl.kill("gw1")
    api.until('ras_halb_backend_up{gateway="gw1"}', {"h2": 0})
    api.until('ras_halb_backend_up{gateway="gw2"}', {"h2": 1})
    api.until("ras_halb_healthy_backends", {"h2": 1})
    assert api.alerts("RasNoHealthyGateway") == {}
    # The last one stops: no healthy gateway behind the VIP on the node holding it.
    hl.kill("gw2")
    api.until("ras_halb_healthy_backends", {"h2": 0})
    api.until_alerts("RasNoHealthyGateway", {"h2": ("pending", 0)})
