"""A farm's daemons in a lab: one config writer per role, and the processes they run as.

Shared by the fixed-shape farm lab (:mod:`ras.lab.farmlab`: one segment, ports 8080/8443) and
the farm a topology manifest describes (:mod:`ras.lab.deployment`: segments, firewalls, the
default ports), so that both run the same daemons with the same settings. Each writer takes
what differs between the two as arguments (names, addresses, ports, who is trusted) and writes
one TOML file for one daemon; `LabFarm` starts them in their hosts, kills and crashes them,
brings them back, and waits for what their logs say.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ras.broker.passwords import hash_password
from ras.broker.store import SQLiteStore, UserRecord
from ras.lab.daemons import halb_config, haproxy_config, keepalived_argv, keepalived_config
from ras.lab.netns import Host, Lab
from ras.pki import FarmPKI

__all__ = [
    "RAS",
    "LabFarm",
    "Ports",
    "Vip",
    "agent_config",
    "broker_config",
    "forwarder_config",
    "normal_gateway_config",
    "start_halb",
    "start_keepalived_haproxy",
]

RAS = [sys.executable, "-m", "ras"]


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports a farm's daemons listen on."""

    plain: int = 80
    tls: int = 443
    rdp: int = 3389  # the gateways' RDP port (load balancing), and the HALB's
    broker_gateways: int = 20002
    broker_agents: int = 20003


@dataclass(frozen=True, slots=True)
class Vip:
    """A HALB group's VIP: its address, the prefix length of its segment, and each node's
    interface on that segment."""

    address: str
    prefixlen: int
    ifaces: Mapping[str, str]


# ---------------------------------------------------------------------------------------------
# Config writers, one per role


def broker_config(
    path: Path,
    *,
    name: str,
    pki: FarmPKI,
    address: str,
    ports: Ports,
    users: Mapping[str, str],
    etcd: Sequence[str] = (),
    priority: int = 0,
) -> Path:
    """A `ras broker` listening on every address of its host, its SQLite store next to
    ``path`` holding ``users`` (name -> password), and one desktop on every host. With
    ``etcd`` (the members' ``host:port``), its state is there instead (docs/brokers.md: the
    caller puts the users there), with ``priority`` among the brokers and a 3 s primary lease."""
    cert, key = pki.ensure(name, [address])
    database = path.with_suffix(".sqlite3")
    store = SQLiteStore(database)
    try:
        for user, password in users.items():
            store.put_user(UserRecord(user, hash_password(password), ("users",)))
    finally:
        store.close()
    path.write_text(f"""
name = "{name}"
listen_host = "0.0.0.0"
gateway_port = {ports.broker_gateways}
agent_port = {ports.broker_agents}
admin_enabled = false
database = "{database}"
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{pki.ca_path}"
report_interval_s = 1
host_timeout_s = 5

[[resources]]
id = "desktop"
name = "Desktop"
kind = "desktop"
""")
    if etcd:
        with path.open("a") as out:
            out.write(
                f'\n[etcd]\nendpoints = {_toml_list(etcd)}\nprefix = "/ras/"\ntimeout_s = 2\n'
                f"\n[roles]\npriority = {priority}\nprimary_lease_s = 3\n"
            )
    return path


def agent_config(
    path: Path,
    *,
    name: str,
    pki: FarmPKI,
    rdp: tuple[str, int],
    broker: str,
    ports: Ports,
    brokers: Sequence[str] = (),
) -> Path:
    """A `ras agent` for the RDP host at ``rdp`` (host, port), registering with ``broker``,
    or with every one of ``brokers`` (addresses, by priority) when there are several."""
    cert, key = pki.ensure(name)
    every = [f"{b}:{ports.broker_agents}" for b in brokers]
    listed = f"brokers = {_toml_list(every)}" if brokers else ""
    path.write_text(f"""{listed}
name = "{name}"
kind = "rdsh"
rdp_host = "{rdp[0]}"
rdp_port = {rdp[1]}
max_sessions = 1000
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{pki.ca_path}"
broker_host = "{broker}"
broker_port = {ports.broker_agents}
connect_timeout_s = 5
retry_max_s = 1
""")
    return path


def normal_gateway_config(
    path: Path,
    *,
    name: str,
    pki: FarmPKI,
    address: str,
    public: tuple[Path, Path],
    public_name: str,
    broker: str,
    ports: Ports,
    trusted: Iterable[str],
    rdp_lb: bool = True,
    brokers: Sequence[str] = (),
) -> Path:
    """A normal `ras gateway` on every address of its host: plain, TLS and (``rdp_lb``) RDP
    ports, the farm's shared public certificate ``public`` (cert, key) for ``public_name``,
    PROXY v2 accepted from ``trusted`` (networks or addresses: HALB nodes, forwarders). With
    several ``brokers`` (addresses, by priority), it keeps links to all of them."""
    cert, key = pki.ensure(name, [address])
    every = [f"{b}:{ports.broker_gateways}" for b in brokers]
    listed = f"brokers = {_toml_list(every)}\nbroker_failover_s = 2" if brokers else ""
    path.write_text(f"""{listed}
name = "{name}"
listen_host = "0.0.0.0"
plain_port = {ports.plain}
tls_port = {ports.tls}
rdp_lb_enabled = {"true" if rdp_lb else "false"}
rdp_port = {ports.rdp}
public_host = "{public_name}"
public_port = {ports.tls}
public_cert_file = "{public[0]}"
public_key_file = "{public[1]}"
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{pki.ca_path}"
broker_host = "{broker}"
broker_port = {ports.broker_gateways}
trusted_proxies = {_toml_list(trusted)}
""")
    return path


def forwarder_config(
    path: Path,
    *,
    name: str,
    next_hops: Sequence[str],
    ports: Ports,
    trusted: Iterable[str],
) -> Path:
    """A forwarding `ras gateway`: every connection to its first healthy next hop (addresses,
    in order), with PROXY v2; TLS passes through."""
    hops = "".join(
        f'\n[[next_hops]]\nhost = "{hop}"\nplain_port = {ports.plain}\n'
        f"tls_port = {ports.tls}\nrdp_port = {ports.rdp}\n"
        for hop in next_hops
    )
    path.write_text(f"""
name = "{name}"
mode = "forwarding"
listen_host = "0.0.0.0"
plain_port = {ports.plain}
tls_port = {ports.tls}
rdp_lb_enabled = true
rdp_port = {ports.rdp}
trusted_proxies = {_toml_list(trusted)}
health_interval_s = 0.2
{hops}""")
    return path


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


# ---------------------------------------------------------------------------------------------
# The processes


@dataclass(kw_only=True)
class LabFarm:
    """The daemons of a farm in a lab, by name: started, killed, crashed and brought back.

    ``procs`` maps a daemon's name (its host's, for the one main daemon of a host) to its
    process; ``starters`` knows how to start each again with the same config (`restart`).
    """

    lab: Lab
    tmp: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    crashed: set[str] = field(default_factory=set)  # hosts whose links are down
    killed: set[str] = field(default_factory=set)  # daemons killed or stopped on purpose
    # A node's other processes, killed with it by crash_node: pid files of the children its
    # daemon forked (keepalived's VRRP child), and further processes started here (haproxy).
    node_pidfiles: dict[str, list[Path]] = field(default_factory=dict)
    node_procs: dict[str, list[str]] = field(default_factory=dict)
    starters: dict[str, Callable[[], None]] = field(default_factory=dict)  # for restart()
    vips: dict[str, Vip] = field(default_factory=dict)  # VIP name -> the VIP

    @property
    def pki(self) -> FarmPKI:
        return FarmPKI(self.tmp / "pki")

    def start(self, name: str, argv: Sequence[str], host: str | None = None) -> None:
        """Start daemon ``name`` in host ``host`` (default: the host called ``name``)."""
        self.procs[name] = self.hosts[host or name].popen(list(argv))
        self.killed.discard(name)

    def start_ras(self, name: str, role: str, conf: Path, host: str | None = None) -> None:
        self.start(name, [*RAS, role, "--config", str(conf)], host)

    def kill(self, name: str) -> None:
        """Crash a daemon (SIGKILL): no drain, no goodbye."""
        proc = self.procs[name]
        self.killed.add(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def crash_node(
        self, name: str, daemons: Iterable[str] | None = None, *, links_first: bool = False
    ) -> None:
        """A machine that dies: its daemons killed (``daemons``, default the one called
        ``name`` and its node processes) and its links down (a crashed HALB master leaves the
        VIP on its interface; with the link down nobody reaches it there). A daemon's children
        go first: keepalived's VRRP child, told of its parent's death, would send a
        priority-0 advert and turn the crash into a graceful stop. ``links_first``: the links
        go down before the daemons die, so not even the kernel's goodbyes (FIN, RST of the
        killed processes' connections) get out, as when power fails."""
        host = self.hosts[name]
        if links_first:
            for iface in host.interfaces:
                host.run(["ip", "link", "set", iface, "down"])
        for path in self.node_pidfiles.get(name, []):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(path.read_text().strip()), signal.SIGKILL)
        for daemon in [name] if daemons is None else daemons:
            if daemon in self.procs:
                self.kill(daemon)
        for other in self.node_procs.get(name, []):
            self.kill(other)
        if not links_first:
            for iface in host.interfaces:
                host.run(["ip", "link", "set", iface, "down"])
        self.crashed.add(name)

    def restart(self, name: str) -> None:
        """Bring a killed daemon back, or a crashed node up again as a rebooted machine comes
        back (without the VIP its crash left on the interface), with the same config."""
        if name in self.crashed:
            host = self.hosts[name]
            for vip in self.vips.values():
                iface = vip.ifaces.get(name)
                if iface is not None and vip.address in host.addresses(iface):
                    host.run(["ip", "addr", "del", f"{vip.address}/{vip.prefixlen}", "dev", iface])
            for iface in host.interfaces:
                host.run(["ip", "link", "set", iface, "up"])
            self.crashed.discard(name)
        self.starters[name]()

    def stop(self, name: str, timeout: float = 30.0) -> int:
        proc = self.procs[name]
        self.killed.add(name)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def log(self, name: str) -> str:
        return self.lab.log_of(self.procs[name]).read_text(errors="replace")

    def holders_of(self, vip: str) -> list[str]:
        """The live HALB nodes that hold VIP ``vip`` now (a crashed one keeps it on its dead
        interface)."""
        group = self.vips[vip]
        return [
            node
            for node, iface in group.ifaces.items()
            if node not in self.crashed and group.address in self.hosts[node].addresses(iface)
        ]

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ``check`` until it is true; `AssertionError` after ``timeout`` s, or at once
        with its log if a daemon not killed on purpose has exited meanwhile."""
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


# ---------------------------------------------------------------------------------------------
# HALB fronts: `ras halb`, or keepalived + haproxy


def start_halb(
    farm: LabFarm,
    name: str,
    *,
    vip: Vip,
    vrid: int,
    priority: int,
    backends: Mapping[str, Host],
    ports: Ports,
) -> None:
    """`ras halb` on node ``name``: VRRP for ``vip`` (100 ms adverts), balancing the plain,
    TLS and RDP ports to ``backends`` with PROXY v2 and 0.2 s health checks."""
    extra = "".join(
        f"\n[[services]]\nlisten_port = {port}\nbackend_port = {port}\n"
        for port in (ports.tls, ports.rdp)
    )
    conf = halb_config(
        farm.tmp / f"{name}.toml",
        name,
        vip_cidr=f"{vip.address}/{vip.prefixlen}",
        vrid=vrid,
        priority=priority,
        advert_s=0.1,
        gateways=dict(backends),
        listen_port=ports.plain,
        backend_port=ports.plain,
        health_port=ports.plain,
        extra_services=extra,
        interface=vip.ifaces[name],
    )
    farm.start_ras(name, "halb", conf)


def start_keepalived_haproxy(
    farm: LabFarm,
    name: str,
    *,
    vip: Vip,
    vrid: int,
    priority: int,
    backends: Mapping[str, ipaddress.IPv4Address | str],
    ports: Ports,
) -> None:
    """The reference front on node ``name``: keepalived (VRRP, the VIP; same VRID, priorities
    and 100 ms adverts as `start_halb`) and haproxy (least connections, PROXY v2, 0.2 s
    health checks) on the plain, TLS and RDP ports."""
    host = farm.hosts[name]
    host.sysctl("net.ipv4.ip_nonlocal_bind", 1)  # haproxy binds the VIP before holding it
    rundir = farm.tmp / f"{name}-front"
    rundir.mkdir(exist_ok=True)
    for stale in rundir.glob("*.pid"):  # a crashed run's: keepalived would not start
        stale.unlink()
    conf = keepalived_config(
        rundir / "keepalived.conf",
        router_id=name,
        vrid=vrid,
        priority=priority,
        advert_s=0.1,
        vip_cidr=f"{vip.address}/{vip.prefixlen}",
        interface=vip.ifaces[name],
    )
    balancer = haproxy_config(
        rundir / "haproxy.cfg",
        vip=vip.address,
        ports={port: port for port in (ports.plain, ports.tls, ports.rdp)},
        servers=backends,
        health_interval_s=0.2,
        idle_timeout_s=3600,  # sessions live long; a dead peer shows as a reset
        redispatch=True,
    )
    farm.start(f"{name}-haproxy", ["haproxy", "-db", "-f", str(balancer)], name)
    farm.start(name, keepalived_argv(conf, rundir))
    farm.node_procs[name] = [f"{name}-haproxy"]
    farm.node_pidfiles[name] = [rundir / "vrrp.pid", rundir / "chk.pid"]
