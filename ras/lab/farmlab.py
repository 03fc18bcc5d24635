"""A whole farm in a network-namespace lab: broker, agent, normal gateways, optional forwarding
gateways, a HALB pair with a VIP in front, and a client host.

Every daemon is a real ``ras`` process in its own host, with its own farm certificate and
config file, as on separate machines::

    client ──► VIP (halb1 | halb2) ──► [fw1, fw2 ──►] gw1, gw2, gw3 ──► rdp (agent + RDP host)
                                                       │
                                                     broker

The gateways share one public certificate (for the VIP and ``PUBLIC_NAME``), so a gateway SSL
client behind the VIP trusts whichever gateway it lands on. The HALB nodes balance the plain,
TLS and RDP ports (8080, 8443, 3389) with PROXY v2; gateways trust the lab subnet as proxies.
With ``front="keepalived"`` the same two nodes run the reference stack instead of ``ras halb``:
keepalived holding the VIP (same VRID, priorities and 100 ms adverts) and haproxy in ``mode
tcp`` balancing the three ports (least connections, PROXY v2, 0.2 s health checks).
The agent reports ``rdp_port`` on the ``rdp`` host; what listens there is the caller's choice
(an echo server for the failover harness, a bridge to a real RDP server for xfreerdp).

The config writers and the process handling are :mod:`ras.lab.roles`, shared with the farm
that a topology manifest describes (:mod:`ras.lab.deployment`). Shared by the lab tests and
``benchmarks/failover.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ras.lab.daemons import Probe, probe
from ras.lab.netns import Host, Lab
from ras.lab.roles import (
    LabFarm,
    Ports,
    Vip,
    agent_config,
    broker_config,
    forwarder_config,
    normal_gateway_config,
    start_halb,
    start_keepalived_haproxy,
)

__all__ = [
    "FRONTS",
    "PLAIN_PORT",
    "PUBLIC_NAME",
    "RDP_PORT",
    "TLS_PORT",
    "USER",
    "FarmLab",
    "build_farm_lab",
    "farm_hosts",
    "start_echo_server",
]

PLAIN_PORT = 8080
TLS_PORT = 8443
RDP_PORT = 3389
PORTS = Ports(plain=PLAIN_PORT, tls=TLS_PORT, rdp=RDP_PORT)
PUBLIC_NAME = "farm.lab"
USER = "alice"
PASSWORD = "lab password 7"
VRID = 52
FRONTS = ("ras", "keepalived")  # what holds the VIP: `ras halb`, or keepalived + haproxy


@dataclass(kw_only=True)
class FarmLab(LabFarm):
    vip: str
    rdp_port: int
    gateways: list[str] = field(default_factory=list)
    forwarders: list[str] = field(default_factory=list)
    halbs: list[str] = field(default_factory=list)
    front: str = "ras"

    @property
    def client(self) -> Host:
        return self.hosts["client"]

    @property
    def rdp(self) -> Host:
        return self.hosts["rdp"]

    @property
    def password_file(self) -> Path:
        return self.tmp / "user.password"

    @property
    def public_cert(self) -> Path:
        return self.pki.directory / "farm-public.pem"

    def holders(self) -> list[str]:
        """The live HALB nodes that hold the VIP now (a crashed one keeps it on its dead
        interface)."""
        return self.holders_of("vip")

    def master(self) -> str:
        held = self.holders()
        if len(held) != 1:
            raise AssertionError(f"VIP held by {held or 'nobody'}")
        return held[0]

    # -- waiting ------------------------------------------------------------------------------

    def serves(self, name: str) -> bool:
        return probe(self.client, str(self.hosts[name].address), PLAIN_PORT, 0.5) is Probe.OK

    def broker_knows_gateways(self) -> bool:
        log = self.log("broker")
        return all(f"gateway online name={g} " in log for g in self.gateways)

    def agent_registered(self) -> bool:
        return "agent registered host=rdp1 " in self.log("broker")


def _broker(fl: FarmLab) -> None:
    fl.password_file.write_text(PASSWORD + "\n")
    fl.password_file.chmod(0o600)
    address = str(fl.hosts["broker"].address)
    conf = broker_config(
        fl.tmp / "broker.toml",
        name="broker",
        pki=fl.pki,
        address=address,
        ports=PORTS,
        users={USER: PASSWORD},
    )
    fl.start_ras("broker", "broker", conf)


def _agent(fl: FarmLab) -> None:
    conf = agent_config(
        fl.tmp / "agent.toml",
        name="rdp1",
        pki=fl.pki,
        rdp=(str(fl.rdp.address), fl.rdp_port),
        broker=str(fl.hosts["broker"].address),
        ports=PORTS,
    )
    fl.start_ras("agent", "agent", conf, host="rdp")


def _gateway(fl: FarmLab, name: str) -> None:
    conf = normal_gateway_config(
        fl.tmp / f"{name}.toml",
        name=name,
        pki=fl.pki,
        address=str(fl.hosts[name].address),
        public=fl.pki.ensure_self_signed("farm-public", [PUBLIC_NAME, fl.vip]),
        public_name=PUBLIC_NAME,
        broker=str(fl.hosts["broker"].address),
        ports=PORTS,
        trusted=[str(fl.lab.subnet)],
    )
    fl.start_ras(name, "gateway", conf)


def _forwarder(fl: FarmLab, name: str, next_hops: list[str]) -> None:
    conf = forwarder_config(
        fl.tmp / f"{name}.toml",
        name=name,
        next_hops=[str(fl.hosts[g].address) for g in next_hops],
        ports=PORTS,
        trusted=[str(fl.lab.subnet)],
    )
    fl.start_ras(name, "gateway", conf)


def _halb(fl: FarmLab, name: str, priority: int, backends: list[str]) -> None:
    hosts = {b: fl.hosts[b] for b in backends}
    start_halb(
        fl, name, vip=fl.vips["vip"], vrid=VRID, priority=priority, backends=hosts, ports=PORTS
    )


def _keepalived_haproxy(fl: FarmLab, name: str, priority: int, backends: list[str]) -> None:
    servers = {b: fl.hosts[b].address for b in backends}
    start_keepalived_haproxy(
        fl, name, vip=fl.vips["vip"], vrid=VRID, priority=priority, backends=servers, ports=PORTS
    )


def build_farm_lab(
    lab: Lab,
    tmp: Path,
    *,
    gateways: int = 3,
    forwarders: int = 0,
    halbs: int = 2,
    rdp_port: int = RDP_PORT,
    front: str = "ras",
) -> FarmLab:
    """Start the farm in ``lab`` (which must have the hosts ``farm_hosts(...)`` names) and
    return once the VIP serves through every layer. ``front``: ``"ras"`` (``ras halb`` on the
    HALB nodes) or ``"keepalived"`` (keepalived + haproxy there, the reference stack)."""
    if front not in FRONTS:
        raise ValueError(f"front {front!r}: one of {', '.join(FRONTS)}")
    vip = str(lab.spare_address())
    fl = FarmLab(lab=lab, tmp=tmp, vip=vip, rdp_port=rdp_port, hosts=dict(lab.hosts), front=front)
    fl.gateways = [f"gw{i + 1}" for i in range(gateways)]
    fl.forwarders = [f"fw{i + 1}" for i in range(forwarders)]
    fl.halbs = [f"halb{i + 1}" for i in range(halbs)]
    fl.vips["vip"] = Vip(vip, lab.subnet.prefixlen, {name: "eth0" for name in fl.halbs})
    fl.pki.init_ca()
    _broker(fl)
    _agent(fl)
    for name in fl.gateways:
        fl.starters[name] = partial(_gateway, fl, name)
        fl.starters[name]()
    fl.wait(fl.broker_knows_gateways, "every gateway registered with the broker")
    fl.wait(fl.agent_registered, "the agent registered")
    for name in fl.gateways:
        fl.wait(partial(fl.serves, name), f"{name} serves")
    for i, name in enumerate(fl.forwarders):
        # each forwarder prefers its own gateway, then the others in turn (a DMZ chain)
        order = fl.gateways[i % gateways :] + fl.gateways[: i % gateways]
        fl.starters[name] = partial(_forwarder, fl, name, order)
        fl.starters[name]()
    for name in fl.forwarders:
        fl.wait(partial(fl.serves, name), f"{name} serves")
    backends = fl.forwarders or fl.gateways
    start_front = _halb if front == "ras" else _keepalived_haproxy
    for i, name in enumerate(fl.halbs):
        fl.starters[name] = partial(start_front, fl, name, 200 - 10 * i, backends)
        fl.starters[name]()
    fl.wait(lambda: len(fl.holders()) == 1 and fl.holders()[0] == fl.halbs[0], "halb1 master")
    try:
        fl.wait(lambda: probe(fl.client, fl.vip, PLAIN_PORT, 0.5) is Probe.OK, "the VIP serves")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_front_report(fl)}") from None
    return fl


def _front_report(fl: FarmLab) -> str:
    """What a failed wait for the VIP needs to be understood: who holds it, the client's ARP
    entry for it, the probe's answer, the nodes' logs."""
    lines = [
        f"holders: {fl.holders()}",
        "client neighbours: " + fl.client.run(["ip", "neigh"], check=False).stdout.strip(),
        f"probe: {probe(fl.client, fl.vip, PLAIN_PORT, 0.5)}",
    ]
    for name in fl.halbs:
        mac = fl.hosts[name].run(["ip", "-br", "link", "show", "eth0"], check=False).stdout
        lines.append(f"{name} eth0: {mac.strip()}")
        lines.append(fl.lab.log_tail(fl.procs[name], 30))
    return "\n".join(lines)


def farm_hosts(*, gateways: int = 3, forwarders: int = 0, halbs: int = 2) -> list[str]:
    """The host names ``build_farm_lab`` needs, for ``Lab.add_hosts``."""
    return [
        "client",
        "broker",
        "rdp",
        *(f"gw{i + 1}" for i in range(gateways)),
        *(f"fw{i + 1}" for i in range(forwarders)),
        *(f"halb{i + 1}" for i in range(halbs)),
    ]


ECHO_SERVER = """\
import socket, sys, threading

def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

server = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=128)
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


def start_echo_server(host: Host, port: int = RDP_PORT) -> subprocess.Popen[bytes]:
    """An echo server on ``port`` of ``host`` standing in for the RDP host (the failover
    harness checks its bytes come back); returns once it listens."""
    proc = host.popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    log = host.lab.log_of(proc)
    deadline = time.monotonic() + 10
    while "listening" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"echo server in {host.name}:{port}\n{host.lab.log_tail(proc)}")
        time.sleep(0.02)
    return proc
