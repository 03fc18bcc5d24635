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

Shared by the lab tests and ``benchmarks/failover.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ras.broker.passwords import hash_password
from ras.broker.store import SQLiteStore, UserRecord
from ras.lab.daemons import (
    Probe,
    halb_config,
    haproxy_config,
    keepalived_argv,
    keepalived_config,
    probe,
)
from ras.lab.netns import Host, Lab
from ras.pki import FarmPKI

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

RAS = [sys.executable, "-m", "ras"]
PLAIN_PORT = 8080
TLS_PORT = 8443
RDP_PORT = 3389
BROKER_GATEWAYS = 20002
BROKER_AGENTS = 20003
PUBLIC_NAME = "farm.lab"
USER = "alice"
PASSWORD = "lab password 7"
VRID = 52
FRONTS = ("ras", "keepalived")  # what holds the VIP: `ras halb`, or keepalived + haproxy


@dataclass
class FarmLab:
    lab: Lab
    tmp: Path
    vip: str
    rdp_port: int
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    gateways: list[str] = field(default_factory=list)
    forwarders: list[str] = field(default_factory=list)
    halbs: list[str] = field(default_factory=list)
    crashed: set[str] = field(default_factory=set)  # hosts whose link is down
    killed: set[str] = field(default_factory=set)  # daemons killed or stopped on purpose
    front: str = "ras"
    # A node's other processes, killed with it by crash_node: pid files of the children its
    # daemon forked (keepalived's VRRP child), and further processes started here (haproxy).
    node_pidfiles: dict[str, list[Path]] = field(default_factory=dict)
    node_procs: dict[str, list[str]] = field(default_factory=dict)
    starters: dict[str, Callable[[], None]] = field(default_factory=dict)  # for restart()

    @property
    def pki(self) -> FarmPKI:
        return FarmPKI(self.tmp / "pki")

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

    # -- processes ----------------------------------------------------------------------------

    def start(self, name: str, role: str, conf: Path) -> None:
        self.procs[name] = self.hosts[name].popen([*RAS, role, "--config", str(conf)])

    def kill(self, name: str) -> None:
        """Crash a daemon (SIGKILL): no drain, no goodbye."""
        proc = self.procs[name]
        self.killed.add(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def crash_node(self, name: str) -> None:
        """A machine that dies: its daemon killed and its link down (a crashed HALB master
        leaves the VIP on its interface; with the link down nobody reaches it there). The
        daemon's children go first: keepalived's VRRP child, told of its parent's death,
        would send a priority-0 advert and turn the crash into a graceful stop."""
        for path in self.node_pidfiles.get(name, []):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(path.read_text().strip()), signal.SIGKILL)
        self.kill(name)
        for other in self.node_procs.get(name, []):
            self.kill(other)
        self.hosts[name].run(["ip", "link", "set", "eth0", "down"])
        self.crashed.add(name)

    def restart(self, name: str) -> None:
        """Bring a killed daemon back, or a crashed node up again as a rebooted machine comes
        back (without the VIP its crash left on the interface), with the same config."""
        if name in self.crashed:
            host = self.hosts[name]
            if self.vip in host.addresses():
                host.run(
                    ["ip", "addr", "del", f"{self.vip}/{self.lab.subnet.prefixlen}", "dev", "eth0"]
                )
            host.run(["ip", "link", "set", "eth0", "up"])
            self.crashed.discard(name)
        self.starters[name]()

    def stop(self, name: str, timeout: float = 30.0) -> int:
        proc = self.procs[name]
        self.killed.add(name)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def log(self, name: str) -> str:
        return self.lab.log_of(self.procs[name]).read_text(errors="replace")

    def holders(self) -> list[str]:
        """The live HALB nodes that hold the VIP now (a crashed one keeps it on its dead
        interface)."""
        live = [n for n in self.halbs if n not in self.crashed]
        return [n for n in live if self.vip in self.hosts[n].addresses()]

    def master(self) -> str:
        held = self.holders()
        if len(held) != 1:
            raise AssertionError(f"VIP held by {held or 'nobody'}")
        return held[0]

    # -- waiting ------------------------------------------------------------------------------

    def serves(self, name: str) -> bool:
        return probe(self.client, str(self.hosts[name].address), PLAIN_PORT, 0.5) is Probe.OK

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for name, proc in self.procs.items():
                if name not in self.killed and proc.poll() is not None:
                    raise AssertionError(
                        f"{name} exited {proc.returncode} while waiting for {what}:\n"
                        + self.lab.log_tail(proc)
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not in {timeout:g} s")
            time.sleep(0.02)

    def broker_knows_gateways(self) -> bool:
        log = self.log("broker")
        return all(f"gateway online name={g} " in log for g in self.gateways)

    def agent_registered(self) -> bool:
        return "agent registered host=rdp1 " in self.log("broker")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _broker(fl: FarmLab) -> None:
    host = fl.hosts["broker"]
    cert, key = fl.pki.ensure("broker", [str(host.address)])
    database = fl.tmp / "broker.sqlite3"
    store = SQLiteStore(database)
    try:
        store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    finally:
        store.close()
    fl.password_file.write_text(PASSWORD + "\n")
    fl.password_file.chmod(0o600)
    conf = _write(
        fl.tmp / "broker.toml",
        f"""
name = "broker"
listen_host = "0.0.0.0"
gateway_port = {BROKER_GATEWAYS}
agent_port = {BROKER_AGENTS}
admin_enabled = false
database = "{database}"
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{fl.pki.ca_path}"
report_interval_s = 1
host_timeout_s = 5

[[resources]]
id = "desktop"
name = "Desktop"
kind = "desktop"
""",
    )
    fl.start("broker", "broker", conf)


def _agent(fl: FarmLab) -> None:
    cert, key = fl.pki.ensure("rdp1")
    broker = fl.hosts["broker"].address
    conf = _write(
        fl.tmp / "agent.toml",
        f"""
name = "rdp1"
kind = "rdsh"
rdp_host = "{fl.rdp.address}"
rdp_port = {fl.rdp_port}
max_sessions = 1000
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{fl.pki.ca_path}"
broker_host = "{broker}"
broker_port = {BROKER_AGENTS}
connect_timeout_s = 5
retry_max_s = 1
""",
    )
    fl.procs["agent"] = fl.rdp.popen([*RAS, "agent", "--config", str(conf)])


def _gateway(fl: FarmLab, name: str) -> None:
    host = fl.hosts[name]
    cert, key = fl.pki.ensure(name, [str(host.address)])
    pub_cert, pub_key = fl.pki.ensure_self_signed("farm-public", [PUBLIC_NAME, fl.vip])
    conf = _write(
        fl.tmp / f"{name}.toml",
        f"""
name = "{name}"
listen_host = "0.0.0.0"
plain_port = {PLAIN_PORT}
tls_port = {TLS_PORT}
rdp_lb_enabled = true
rdp_port = {RDP_PORT}
public_host = "{PUBLIC_NAME}"
public_port = {TLS_PORT}
public_cert_file = "{pub_cert}"
public_key_file = "{pub_key}"
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{fl.pki.ca_path}"
broker_host = "{fl.hosts["broker"].address}"
broker_port = {BROKER_GATEWAYS}
trusted_proxies = ["{fl.lab.subnet}"]
""",
    )
    fl.start(name, "gateway", conf)


def _forwarder(fl: FarmLab, name: str, next_hops: list[str]) -> None:
    hops = "".join(
        f'\n[[next_hops]]\nhost = "{fl.hosts[g].address}"\nplain_port = {PLAIN_PORT}\n'
        f"tls_port = {TLS_PORT}\nrdp_port = {RDP_PORT}\n"
        for g in next_hops
    )
    conf = _write(
        fl.tmp / f"{name}.toml",
        f"""
name = "{name}"
mode = "forwarding"
listen_host = "0.0.0.0"
plain_port = {PLAIN_PORT}
tls_port = {TLS_PORT}
rdp_lb_enabled = true
rdp_port = {RDP_PORT}
trusted_proxies = ["{fl.lab.subnet}"]
health_interval_s = 0.2
{hops}""",
    )
    fl.start(name, "gateway", conf)


def _halb(fl: FarmLab, name: str, priority: int, backends: list[str]) -> None:
    extra = "".join(
        f"\n[[services]]\nlisten_port = {port}\nbackend_port = {port}\n"
        for port in (TLS_PORT, RDP_PORT)
    )
    conf = halb_config(
        fl.tmp / f"{name}.toml",
        name,
        vip_cidr=f"{fl.vip}/{fl.lab.subnet.prefixlen}",
        vrid=VRID,
        priority=priority,
        advert_s=0.1,
        gateways={g: fl.hosts[g] for g in backends},
        listen_port=PLAIN_PORT,
        backend_port=PLAIN_PORT,
        health_port=PLAIN_PORT,
        extra_services=extra,
    )
    fl.start(name, "halb", conf)


def _keepalived_haproxy(fl: FarmLab, name: str, priority: int, backends: list[str]) -> None:
    """The reference front on node ``name``: keepalived (VRRP, the VIP) and haproxy."""
    host = fl.hosts[name]
    host.sysctl("net.ipv4.ip_nonlocal_bind", 1)  # haproxy binds the VIP before holding it
    rundir = fl.tmp / f"{name}-front"
    rundir.mkdir(exist_ok=True)
    for stale in rundir.glob("*.pid"):  # a crashed run's: keepalived would not start
        stale.unlink()
    conf = keepalived_config(
        rundir / "keepalived.conf",
        router_id=name,
        vrid=VRID,
        priority=priority,
        advert_s=0.1,
        vip_cidr=f"{fl.vip}/{fl.lab.subnet.prefixlen}",
    )
    balancer = haproxy_config(
        rundir / "haproxy.cfg",
        vip=fl.vip,
        ports={port: port for port in (PLAIN_PORT, TLS_PORT, RDP_PORT)},
        servers={b: fl.hosts[b].address for b in backends},
        health_interval_s=0.2,
        idle_timeout_s=3600,  # sessions live long; a dead peer shows as a reset
        redispatch=True,
    )
    fl.procs[f"{name}-haproxy"] = host.popen(["haproxy", "-db", "-f", str(balancer)])
    fl.procs[name] = host.popen(keepalived_argv(conf, rundir))
    fl.node_procs[name] = [f"{name}-haproxy"]
    fl.node_pidfiles[name] = [rundir / "vrrp.pid", rundir / "chk.pid"]


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
    fl = FarmLab(lab, tmp, str(lab.spare_address()), rdp_port, dict(lab.hosts), front=front)
    fl.gateways = [f"gw{i + 1}" for i in range(gateways)]
    fl.forwarders = [f"fw{i + 1}" for i in range(forwarders)]
    fl.halbs = [f"halb{i + 1}" for i in range(halbs)]
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
    fl.wait(lambda: probe(fl.client, fl.vip, PLAIN_PORT, 0.5) is Probe.OK, "the VIP serves", 30.0)
    return fl


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
