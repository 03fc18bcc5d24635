"""Each shipped scenario (ras/lab/scenarios/*.toml) built for real, a user logging in through
it, and one part of it killed.

Every scenario's farm runs as `ras lab up` runs it (ras.lab.deployment.deploy): real `ras`
daemons in their own network namespaces, segments joined by firewalls that pass only the
manifest's flows, and on each RDP host a demo desktop (Xvfb mirrored by freerdp-shadow-cli
with NLA). In the client host, for each client mode the scenario lists: `ras client launch
--listen` (or an .rdp file for the RDP port) and real xfreerdp with NLA: exit 0 with the right
password, 147 with a wrong one, and the RDP host's own log counting the refused login. Then
one part dies (the HALB master, a gateway, a forwarder, an RDP host, a whole site) under the
failover harness (ras/lab/failover.py, launches whose RDP server must answer an X.224
Connection Request); its report says how many launches failed and the longest outage, and the
forwarder started before the kill must still bring xfreerdp in afterwards.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from etcdkit import needs_etcd
from labkit import reachable

from ras.lab.deployment import PUBLIC_NAME, RDP_USER, USER, ManifestFarm, deploy
from ras.lab.manifest import PORTS, ClientMode, load_manifest

pytestmark = [pytest.mark.lab, pytest.mark.peers]
RAS = [sys.executable, "-m", "ras"]
WRONG = "not the password"
FIRST_PORT = 13389
AFTER_SETTLE = 20  # launches that must succeed after the kill before the harness stops
HARNESS_CAP_S = 60.0


@pytest.fixture
def scenario(make_lab, tmp_path) -> Callable[[str], ManifestFarm]:
    """``scenario("halb-pair")``: the scenario's farm, up; torn down with the lab."""

    def build(name: str) -> ManifestFarm:
        m = load_manifest(name)
        first = next(iter(m.segments))
        # stop_timeout: a gateway draining a tunnel to a crashed host is killed sooner
        lab = make_lab(subnet=str(m.segments[first]), segment=first, stop_timeout=2.0)
        return deploy(m, lab, tmp_path / "farm")

    return build


class Client:
    """What a user does on the scenario's client host."""

    def __init__(self, farm: ManifestFarm, display: str) -> None:
        self.farm = farm
        self.host = farm.client()
        self.display = display
        self.spec = farm.manifest.hosts[self.host.name]
        self.forwarders: dict[ClientMode, tuple[object, int]] = {}
        self.failures: list[str] = []

    def forward(self, mode: ClientMode, port: int):
        """`ras client launch --listen` in ``mode`` on 127.0.0.1:``port``."""
        proc = self.host.popen(
            [*RAS, "client", "--config", str(self.farm.client_config(mode)), "--password-file",
             str(self.farm.password_file), "launch", "desktop", "--listen", f"127.0.0.1:{port}"]
        )  # fmt: skip
        self.forwarders[mode] = (proc, port)
        return proc

    def wait_listening(self, mode: ClientMode) -> None:
        proc, _ = self.forwarders[mode]
        log = self.farm.lab.log_of(proc)
        self.farm.wait(lambda: "point an RDP client at" in log.read_text(), f"{mode} forwarder")

    def rdp_file(self) -> Path:
        path = self.farm.tmp / "desktop.rdp"
        server = self.farm.address(self.spec.servers[0])
        done = self.host.run(
            [*RAS, "client", "--config", str(self.farm.client_config(ClientMode.RDP)),
             "--password-file", str(self.farm.password_file), "rdp-file", "desktop", "-o",
             str(path), "--rdp-address", f"{server}:{PORTS['gateway_rdp']}"],
            check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return path

    def start_xfreerdp(self, target: list[str], password: str):
        """xfreerdp in the client host, NLA and +auth-only."""
        home = self.farm.tmp / "home"
        home.mkdir(exist_ok=True)
        argv = ["xfreerdp", *target, f"/u:{RDP_USER}", f"/p:{password}", "/cert:ignore"]
        env = {"DISPLAY": self.display, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "c")}
        return self.host.popen([*argv, "+auth-only"], env=env)

    def xfreerdp(self, target: list[str], password: str) -> int:
        """xfreerdp's exit code."""
        return _exit_code(self.start_xfreerdp(target, password))

    def through(self, mode: ClientMode) -> list[str]:
        if mode is ClientMode.RDP:
            return [str(self.rdp_file())]
        return [f"/v:127.0.0.1:{self.forwarders[mode][1]}"]

    def logins(self) -> dict[str, tuple[int, int]]:
        """Right and wrong password in every mode of the scenario: {mode: (exit, exit)}. The
        right ones all at once (each RDP connection is a launch of its own), then the wrong
        ones all at once; a right one that fails leaves its xfreerdp's, its forwarder's and
        the RDP hosts' last lines in ``self.failures``."""
        modes = [m for m in self.spec.modes if m is not ClientMode.RDP]
        for i, mode in enumerate(modes):
            self.forward(mode, FIRST_PORT + i)
        for mode in modes:
            self.wait_listening(mode)
        password = self.farm.rdp_password_file.read_text().strip()
        refused = self.farm.refusals()
        targets = {mode: self.through(mode) for mode in self.spec.modes}
        right = {mode: self.start_xfreerdp(t, password) for mode, t in targets.items()}
        right_codes = {mode: _exit_code(proc) for mode, proc in right.items()}
        wrong = {mode: self.start_xfreerdp(t, WRONG) for mode, t in targets.items()}
        wrong_codes = {mode: _exit_code(proc) for mode, proc in wrong.items()}
        self.failures = [
            self._why(mode, right[mode], code) for mode, code in right_codes.items() if code
        ]
        expected = refused + sum(1 for code in wrong_codes.values() if code == 147)
        self.farm.wait(lambda: self.farm.refusals() >= expected, "the RDP hosts' refusals")
        return {mode.value: (right_codes[mode], wrong_codes[mode]) for mode in targets}

    def _why(self, mode: ClientMode, proc, code: int) -> str:
        lab = self.farm.lab
        parts = [f"{mode.value}: xfreerdp exit {code}", lab.log_tail(proc, 15)]
        if mode in self.forwarders:
            parts.append(lab.log_tail(self.forwarders[mode][0], 15))
        parts.append(self.farm.rdp_log_tails())
        for daemon in (d for ds in self.farm.daemons_of.values() for d in ds):
            warned = [ln for ln in self.farm.log(daemon).splitlines() if " WARNING " in ln]
            parts.append(f"--- {daemon}'s last warnings:\n" + "\n".join(warned[-8:]))
        return "\n".join(parts)

    def harness(self, out: Path, *, interval_ms: int = 50):
        """The failover harness in gateway mode through the client's servers, until
        AFTER_SETTLE launches succeeded after the farm settled from the kill (or
        HARNESS_CAP_S, a cap, not a deadline: the report says whether it settled)."""
        servers = [f"{self.farm.address(s)}:{PORTS['gateway_plain']}" for s in self.spec.servers]
        argv = [
            sys.executable, "-m", "ras.lab.failover", "--server", servers[0],
            *(arg for s in servers[1:] for arg in ("--secondary", s)),
            "--mode", "gateway", "--probe", "rdp", "--server-name", PUBLIC_NAME,
            "--user", USER, "--password-file", str(self.farm.password_file),
            "--after-settle", str(AFTER_SETTLE), "--seconds", str(HARNESS_CAP_S),
            "--interval-ms", str(interval_ms), "--json", str(out),
        ]  # fmt: skip
        return self.host.popen(argv)


def _exit_code(proc) -> int:
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _kill_under_harness(client: Client, kill: Callable[[], None], *, clean: bool = True) -> dict:
    """Launch through the farm, ``kill``, and launch on until the farm has settled; the
    harness's report. ``clean``: no launch fails once the farm settled (not so where the
    broker keeps choosing a dead host until its agent falls silent)."""
    out = client.farm.tmp / "failover.json"
    proc = client.harness(out)
    log = client.farm.lab.log_of(proc)
    # launches under way before the kill (a fixed pause raced the kill on a loaded machine)
    client.farm.wait(lambda: "first launch ok" in log.read_text(), "the harness's first launch")
    kill()
    proc.send_signal(signal.SIGUSR1)
    code = proc.wait(HARNESS_CAP_S + 30)
    assert code == 0, client.farm.lab.log_tail(proc, 40)
    report = json.loads(out.read_text())
    print(
        f"\nkill report: launches={report['launches']} failed={report['failed']} "
        f"failed_after_settle={report['failed_after_settle']} "
        f"longest_outage_s={report['longest_outage_s']} settled_after_s="
        f"{report['settled_after_s']} client_reconnects={report['client_reconnects']} "
        f"failures={report['failures'][:3]}"
    )
    assert report["settled_after_s"] is not None, report  # the farm serves again
    if clean:
        assert report["failed_after_settle"] == 0, report["failures"]
    return report


def _after_kill_login(client: Client, mode: ClientMode, *, re_established: bool) -> None:
    """The forwarder started before the kill still brings an RDP client in."""
    proc, _ = client.forwarders[mode]
    log = client.farm.lab.log_of(proc)
    if re_established:
        client.farm.wait(lambda: "session re-established" in log.read_text(), "re-established")
    password = client.farm.rdp_password_file.read_text().strip()
    assert client.xfreerdp(client.through(mode), password) == 0, log.read_text()[-2000:]
    assert proc.poll() is None, client.farm.lab.log_tail(proc)


def _blocked(farm: ManifestFarm, source: str, target: str, port: int, firewall: str) -> None:
    """No rule lets ``source`` reach ``target``:``port``: the connection goes unanswered and
    ``firewall`` counts what it dropped."""
    before = farm.dropped()[firewall]
    assert not reachable(farm.hosts[source], farm.address(target), port, timeout=0.3)
    assert farm.dropped()[firewall] > before


def _logins_all_pass(client: Client, results: dict[str, tuple[int, int]]) -> None:
    print(f"\nlogins (right, wrong): {results}")
    assert all(codes == (0, 147) for codes in results.values()), "\n".join(
        [str(results), *client.failures]
    )


def test_single_server(scenario, display):
    """Broker, gateway and RDP host on one server: the four client modes; the gateway
    crashes and is started again (as systemd would)."""
    farm = scenario("single-server")
    client = Client(farm, display)
    results = client.logins()
    assert set(results) == {"gateway", "gateway_ssl", "direct", "direct_ssl"}
    _logins_all_pass(client, results)

    def kill() -> None:
        farm.kill("server-gateway")
        farm.restart("server-gateway")

    _kill_under_harness(client, kill)
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=True)


def test_several_rdsh(scenario, display):
    """Three RD Session Hosts behind one gateway: sessions spread over them; one host dies
    and the broker drops it when its agent falls silent."""
    farm = scenario("several-rdsh")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    _kill_under_harness(client, lambda: farm.crash_host("rdsh1"), clean=False)
    broker = farm.log("broker")
    for host in ("rdsh1", "rdsh2", "rdsh3"):  # the launches spread over every host
        assert f"rdp={farm.address(host)}:{PORTS['rdp_host']} " in broker, host
    farm.wait(lambda: "agent silent host=rdsh1 " in farm.log("broker"), "rdsh1 dropped", 10)
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=False)


def test_dual_gateways(scenario, display):
    """The client's primary gateway dies: the session moves to its secondary."""
    farm = scenario("dual-gateways")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    report = _kill_under_harness(client, lambda: farm.kill("gw1"))
    assert report["client_reconnects"] >= 1  # its session was on gw1, and moved to gw2
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=True)


def test_halb_pair(scenario, display):
    """The HALB master crashes: the other node takes the VIP."""
    farm = scenario("halb-pair")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    master = farm.master("front")
    _kill_under_harness(client, lambda: farm.crash_host(master))
    farm.wait(lambda: farm.holders_of("front") == ["halb2"], "halb2 holds the VIP")
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=True)


def test_dmz_one_firewall(scenario, display):
    """Gateways in a DMZ, broker and RDP host inside, one firewall: a gateway dies."""
    farm = scenario("dmz-one-firewall")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    _blocked(farm, "client", "rdsh", PORTS["rdp_host"], "fw")  # no way in but the gateways
    _blocked(farm, "gw1", "broker", PORTS["broker_agents"], "fw")  # only 20002 to the broker
    _kill_under_harness(client, lambda: farm.kill("gw1"))
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=True)


def test_dmz_two_firewalls(scenario, display):
    """HALB pair and forwarders in the DMZ, normal gateways inside: a forwarder dies."""
    farm = scenario("dmz-two-firewalls")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    _blocked(farm, "client", "fwd1", PORTS["gateway_plain"], "outer")  # only the VIP
    _blocked(farm, "fwd1", "broker", PORTS["broker_gateways"], "inner")  # the DMZ holds nothing
    _kill_under_harness(client, lambda: farm.kill("fwd1"))
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=False)


def test_two_sites(scenario, display):
    """The client's site dies as a whole: it logs in at the other site, whose broker and
    gateways serve the next RDP connection."""
    farm = scenario("two-sites")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    report = _kill_under_harness(client, lambda: farm.crash_site("east"))
    assert report["client_reconnects"] >= 1
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=True)
    assert "ticket redeemed" in farm.log("broker-west")


@needs_etcd
def test_broker_redundancy(scenario, display):
    """Three brokers on three etcd members: the primary broker is SIGKILLed, and launches go
    on through the next broker by priority, which redeems the tickets."""
    farm = scenario("broker-redundancy")
    client = Client(farm, display)
    _logins_all_pass(client, client.logins())
    assert "broker role=primary name=broker1 " in farm.log("broker1")
    redeemed_before = farm.log("broker2").count("ticket redeemed")
    _kill_under_harness(client, lambda: farm.kill("broker1"))
    # the forwarder's session was on broker1 through its gateway: its next launch gets
    # UNAVAILABLE on a closing connection, and it resumes the session (the resume key is
    # shared in etcd) and launches again, through broker2
    _after_kill_login(client, ClientMode.GATEWAY_SSL, re_established=False)
    log = client.farm.lab.log_of(client.forwarders[ClientMode.GATEWAY_SSL][0]).read_text()
    assert "session re-established" in log, log[-2000:]
    assert "cannot forward" not in log, log[-2000:]
    assert farm.log("broker2").count("ticket redeemed") > redeemed_before
