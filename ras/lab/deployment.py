"""The farm a topology manifest describes, running in a lab: every daemon a real process in its
host, with its own certificate and config, and a demo desktop on every RDP host.

`deploy` builds the network (:mod:`ras.lab.network`), starts every daemon at once, then waits
for each step in the order a real farm comes up, as its logs and probes show it:

1. each agent host's RDP host: a demo desktop (:mod:`ras.demohost`: Xvfb mirrored by
   freerdp-shadow-cli with NLA, RDP user ``demo``) on port 3389 of the host; every RDP host
   knows the same password (``demo-rdp.password``);
2. the brokers (one per site, or several on the site's etcd members, started by priority so
   that the first is the primary), each knowing the farm user (``alice``, password in
   ``user.password``) and publishing one desktop on every host of its site;
3. the agents and the normal gateways, which register with their site's broker;
4. the forwarding gateways, with their next hops in the manifest's order;
5. each VIP's HALB nodes (``ras halb``, or keepalived + haproxy), the first the master;
6. from each client host, a control-protocol probe to each of its servers: the path through
   the firewalls works.

A step that does not come true in time fails naming it (and what the firewalls dropped):
a missing firewall rule is a failed lab, as on a real network. The daemons use the ports of
`ras.lab.manifest.PORTS` (the defaults of docs/architecture.md). Config writers and process
handling are :mod:`ras.lab.roles`, shared with :mod:`ras.lab.farmlab`.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ras.broker.etcd import Etcd, EtcdConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.errors import RasError
from ras.lab.daemons import Probe, probe
from ras.lab.etcdcluster import member_argv
from ras.lab.manifest import PORTS, ClientMode, HostSpec, Manifest, Role
from ras.lab.netns import Host, Lab
from ras.lab.network import LabNetwork, build_network, dropped
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

__all__ = ["PUBLIC_NAME", "RDP_USER", "USER", "ManifestFarm", "deploy"]

PUBLIC_NAME = "farm.lab"
USER = "alice"
RDP_USER = "demo"
LAB_PORTS = Ports(
    plain=PORTS["gateway_plain"],
    tls=PORTS["gateway_tls"],
    rdp=PORTS["gateway_rdp"],
    broker_gateways=PORTS["broker_gateways"],
    broker_agents=PORTS["broker_agents"],
)
_FIRST_VRID = 60
_RDP_READY = "demo RDP host ready"


def daemon_name(spec: HostSpec, role: Role) -> str:
    """The name of ``spec``'s daemon for ``role`` (its certificate's): the host's own, or
    ``<host>-<role>`` on a host with several roles."""
    return spec.name if len(spec.roles) == 1 else f"{spec.name}-{role.value}"


@dataclass(kw_only=True)
class ManifestFarm(LabFarm):
    """A running farm of a manifest. ``procs`` holds every daemon by name (`daemon_name`;
    an agent host's demo desktop is ``<host>-rdp``)."""

    net: LabNetwork
    daemons_of: dict[str, list[str]]  # host -> its daemons, in start order

    @property
    def manifest(self) -> Manifest:
        return self.net.manifest

    @property
    def password_file(self) -> Path:
        """The farm user's password (``USER``)."""
        return self.tmp / "user.password"

    @property
    def rdp_password_file(self) -> Path:
        """The RDP user's password (``RDP_USER``) on every RDP host."""
        return self.tmp / "demo-rdp.password"

    @property
    def public_cert(self) -> Path:
        """The gateways' public certificate, which clients trust (for ``PUBLIC_NAME``)."""
        return self.pki.directory / "farm-public.pem"

    def client(self, name: str | None = None) -> Host:
        """A client host (default: the manifest's first)."""
        return self.hosts[name or self.manifest.having(Role.CLIENT)[0].name]

    def address(self, name: str) -> str:
        return str(self.net.address(name))

    def master(self, vip: str) -> str:
        held = self.holders_of(vip)
        if len(held) != 1:
            raise AssertionError(f"VIP {vip} held by {held or 'nobody'}")
        return held[0]

    def rdp_log(self, host: str) -> Path:
        """The demo desktop's log on RDP host ``host`` (freerdp-shadow-cli's output)."""
        return self.tmp / host / "demo-rdp.log"

    def rdp_log_tails(self, lines: int = 15) -> str:
        """The last lines of every RDP host's log, for an error message."""
        return "\n".join(
            f"--- last lines of {h.name}'s RDP server:\n"
            + "\n".join(_read(self.rdp_log(h.name)).splitlines()[-lines:])
            for h in self.manifest.having(Role.AGENT)
        )

    def refusals(self) -> int:
        """The logins the RDP hosts themselves refused (their NLA check), as their logs say."""
        return sum(
            _read(self.rdp_log(h.name)).count("client authentication failure")
            for h in self.manifest.having(Role.AGENT)
        )

    def crash_host(self, name: str) -> None:
        """A machine that dies as when its power fails: its links down, then every daemon on
        it killed (no FIN or RST gets out)."""
        self.crash_node(name, self.daemons_of.get(name, []), links_first=True)

    def crash_site(self, site: str) -> None:
        """Every host of ``site`` dies at once."""
        for name in self.manifest.members(site):
            self.crash_host(name)

    def client_config(self, mode: ClientMode, client: str | None = None) -> Path:
        """The ``ras client --config`` file of a client host for ``mode`` (written by
        `deploy`; the RDP port mode logs in as gateway mode does)."""
        name = client or self.client().name
        wanted = ClientMode.GATEWAY if mode is ClientMode.RDP else mode
        return self.tmp / f"{name}-{wanted.value}.toml"

    def dropped(self) -> dict[str, int]:
        """How many packets each firewall has refused so far."""
        return {h.name: dropped(self.hosts[h.name]) for h in self.manifest.having(Role.FIREWALL)}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def deploy(
    manifest: Manifest,
    lab: Lab,
    workdir: Path,
    *,
    password: str | None = None,
    step_timeout_s: float = 30.0,
) -> ManifestFarm:
    """Build ``manifest``'s network in ``lab`` (empty, on the manifest's first segment) and
    start its farm, its state (certificates, configs, passwords, demo desktops) in
    ``workdir``; return once every client host reaches every one of its servers.
    `AssertionError` names the first step not done in ``step_timeout_s``."""
    net = build_network(manifest, lab)
    workdir.mkdir(parents=True, exist_ok=True)
    farm = ManifestFarm(lab=lab, tmp=workdir, hosts=dict(lab.hosts), net=net, daemons_of={})
    _Starter(farm, password or secrets.token_urlsafe(12), step_timeout_s).run()
    return farm


class _Starter:
    def __init__(self, farm: ManifestFarm, password: str, timeout: float) -> None:
        self.farm = farm
        self.m = farm.manifest
        self.password = password
        self.timeout = timeout

    def wait(self, check: Callable[[], bool], what: str) -> None:
        try:
            self.farm.wait(check, what, self.timeout)
        except AssertionError as exc:  # what the firewalls refused shows a missing rule
            raise AssertionError(f"{exc} (firewalls dropped: {self.dropped()})") from None

    def dropped(self) -> str:
        counts = self.farm.dropped()
        return ", ".join(f"{fw} {n} packets" for fw, n in counts.items()) or "no firewall"

    def run(self) -> None:
        farm, m = self.farm, self.m
        farm.pki.init_ca()
        _secret(farm.password_file, self.password)
        _secret(farm.rdp_password_file, secrets.token_urlsafe(12))
        served = [h for h in m.hosts.values() if h.has(Role.GATEWAY) or h.has(Role.FORWARDER)]
        names = [PUBLIC_NAME, *(farm.address(h.name) for h in served)]
        names += [farm.address(v) for v in m.vips]
        self.public = farm.pki.ensure_self_signed("farm-public", names)
        self.vrid: dict[str, int] = {}
        for i, (name, vip) in enumerate(m.vips.items()):
            seg = m.segments[vip.segment]
            ifaces = {node: farm.hosts[node].iface_on(vip.segment) for node in vip.nodes}
            farm.vips[name] = Vip(farm.address(name), seg.prefixlen, ifaces)
            self.vrid[name] = _FIRST_VRID + i
        # Everything starts at once (each daemon retries what it needs: agents and gateways
        # their broker, forwarders and HALB nodes their health checks), then the waits, in the
        # order a farm comes up, so that a failure names the first step that did not happen.
        agents = m.having(Role.AGENT)
        for spec in agents:
            self.start(spec, f"{spec.name}-rdp", self.rdp_host)
        for site in m.sites or ("",):
            self.brokers(site)
        for spec in agents:
            self.start(spec, daemon_name(spec, Role.AGENT), self.agent)
        for role, how in ((Role.GATEWAY, self.gateway), (Role.FORWARDER, self.forwarder)):
            for spec in m.having(role):
                self.start(spec, daemon_name(spec, role), how)
        for name, vip in m.vips.items():
            for i, node in enumerate(vip.nodes):
                self.start(m.hosts[node], node, partial(self.halb, name, priority=200 - 10 * i))
        for spec in agents:
            ready = partial(self.logged, f"{spec.name}-rdp", _RDP_READY)
            self.wait(ready, f"the RDP host of {spec.name}")
        for spec in m.having(Role.GATEWAY):
            self.wait_registered(spec, Role.GATEWAY)
        for spec in agents:
            self.wait_registered(spec, Role.AGENT)
        for role in (Role.GATEWAY, Role.FORWARDER):
            for spec in m.having(role):
                self.wait_serves(spec, role)
        for name, vip in m.vips.items():
            master = partial(self.held_by, name, vip.nodes[0])
            self.wait(master, f"{vip.nodes[0]} holds VIP {name} alone")
        for client in m.having(Role.CLIENT):
            self.client_configs(client)
            for server in client.servers:
                self.wait_reaches(client, server)

    # -- each role

    def start(self, spec: HostSpec, name: str, how: Callable[[HostSpec, str], None]) -> None:
        """Start daemon ``name`` on ``spec``'s host with ``how``, which `restart` calls again."""
        starter = partial(how, spec, name)
        self.farm.starters[name] = starter
        self.farm.daemons_of.setdefault(spec.name, []).append(name)
        starter()

    def rdp_host(self, spec: HostSpec, name: str) -> None:
        directory = self.farm.tmp / spec.name
        directory.mkdir(exist_ok=True)
        shutil.copy(self.farm.rdp_password_file, directory / "demo-rdp.password")
        argv = [sys.executable, "-m", "ras.demohost", "--dir", str(directory)]
        argv += ["--port", str(PORTS["rdp_host"]), "--bind", "0.0.0.0"]
        self.farm.start(name, argv, spec.name)

    def brokers(self, site: str) -> None:
        """The site's broker; or its etcd members, then its brokers by priority, the first
        primary before the others start."""
        members = self.m.etcd_of(site)
        for spec in members:
            self.start(spec, spec.name, self.etcd_member)
        if members:
            config = self.etcd_config(site)
            etcd = Etcd(config)
            where = self.farm.hosts[self.m.brokers_of(site)[0].name]
            self.wait(partial(_answers, where, etcd), f"the etcd members {_names(members)}")
            user = UserRecord(USER, hash_password(self.password), ("users",))
            where.call(EtcdStore(config).put_user, user)
        for i, spec in enumerate(self.m.brokers_of(site)):
            name = daemon_name(spec, Role.BROKER)
            self.start(spec, name, self.broker)
            if members and i == 0:
                line = f"broker role=primary name={name} "
                self.wait(partial(self.logged, name, line), f"{name} is the primary")

    def etcd_config(self, site: str) -> EtcdConfig:
        endpoints = [
            f"{self.farm.address(e.name)}:{PORTS['etcd_client']}" for e in self.m.etcd_of(site)
        ]
        return EtcdConfig(endpoints=tuple(endpoints), prefix="/ras/", timeout_s=2.0)

    def etcd_member(self, spec: HostSpec, name: str) -> None:
        members = {e.name: self.farm.address(e.name) for e in self.m.etcd_of(spec.site)}
        data = self.farm.tmp / f"{name}.etcd"
        self.farm.start(name, member_argv(name, data, members[name], members), spec.name)

    def broker(self, spec: HostSpec, name: str) -> None:
        brokers = self.m.brokers_of(spec.site)
        conf = broker_config(
            self.farm.tmp / f"{name}.toml",
            name=name,
            pki=self.farm.pki,
            address=self.farm.address(spec.name),
            ports=LAB_PORTS,
            users={USER: self.password},
            etcd=self.etcd_config(spec.site).endpoints if self.m.etcd_of(spec.site) else (),
            priority=brokers.index(spec),
        )
        self.farm.start_ras(name, "broker", conf, spec.name)

    def broker_address(self, spec: HostSpec) -> str:
        return self.farm.address(self.m.broker_of(spec).name)

    def broker_addresses(self, spec: HostSpec) -> list[str]:
        """Every broker of ``spec``'s site when it has several (by priority), else none."""
        brokers = self.m.brokers_of(spec.site)
        return [self.farm.address(b.name) for b in brokers] if len(brokers) > 1 else []

    def agent(self, spec: HostSpec, name: str) -> None:
        conf = agent_config(
            self.farm.tmp / f"{name}.toml",
            name=name,
            pki=self.farm.pki,
            rdp=(self.farm.address(spec.name), PORTS["rdp_host"]),
            broker=self.broker_address(spec),
            ports=LAB_PORTS,
            brokers=self.broker_addresses(spec),
        )
        self.farm.start_ras(name, "agent", conf, spec.name)

    def trusted(self, spec: HostSpec) -> list[str]:
        """Who may send ``spec`` a PROXY v2 header: the HALB nodes and VIPs in front of it,
        the forwarders that name it as a next hop."""
        fronts = [self.farm.address(n) for n in self.m.fronting(spec.name)]
        vips = [self.farm.address(v) for v, vip in self.m.vips.items() if spec.name in vip.backends]
        return fronts + vips

    def gateway(self, spec: HostSpec, name: str) -> None:
        conf = normal_gateway_config(
            self.farm.tmp / f"{name}.toml",
            name=name,
            pki=self.farm.pki,
            address=self.farm.address(spec.name),
            public=self.public,
            public_name=PUBLIC_NAME,
            broker=self.broker_address(spec),
            ports=LAB_PORTS,
            trusted=self.trusted(spec),
            rdp_lb=not spec.has(Role.AGENT),  # an RDP host owns 3389
            brokers=self.broker_addresses(spec),
        )
        self.farm.start_ras(name, "gateway", conf, spec.name)

    def forwarder(self, spec: HostSpec, name: str) -> None:
        conf = forwarder_config(
            self.farm.tmp / f"{name}.toml",
            name=name,
            next_hops=[self.farm.address(hop) for hop in spec.next_hops],
            ports=LAB_PORTS,
            trusted=self.trusted(spec),
        )
        self.farm.start_ras(name, "gateway", conf, spec.name)

    def halb(self, vip: str, node_spec: HostSpec, node: str, *, priority: int) -> None:
        spec = self.m.vips[vip]
        group = self.farm.vips[vip]
        if spec.front == "ras":
            hosts = {b: self.farm.hosts[b] for b in spec.backends}
            start_halb(
                self.farm, node, vip=group, vrid=self.vrid[vip], priority=priority,
                backends=hosts, ports=LAB_PORTS,
            )  # fmt: skip
        else:
            servers = {b: self.farm.hosts[b].address for b in spec.backends}
            start_keepalived_haproxy(
                self.farm, node, vip=group, vrid=self.vrid[vip], priority=priority,
                backends=servers, ports=LAB_PORTS,
            )  # fmt: skip

    # -- waiting

    def logged(self, name: str, line: str) -> bool:
        return line in self.farm.log(name)

    def held_by(self, vip: str, node: str) -> bool:
        return self.farm.holders_of(vip) == [node]

    def wait_registered(self, spec: HostSpec, role: Role) -> None:
        """Until ``spec``'s daemon is registered with its broker (every broker of its site)."""
        name = daemon_name(spec, role)
        if role is Role.GATEWAY:
            line = f"gateway online name={name} "
        else:
            line = f"agent registered host={name} "
        for b in self.m.brokers_of(spec.site):
            broker = daemon_name(b, Role.BROKER)
            check = partial(self.logged, broker, line)
            self.wait(check, f"{name} registered with {broker}")

    def wait_serves(self, spec: HostSpec, role: Role) -> None:
        host = self.farm.hosts[spec.name]
        self.wait(
            lambda: probe(host, "127.0.0.1", LAB_PORTS.plain, 0.5) is Probe.OK,
            f"{daemon_name(spec, role)} serves (on its own host)",
        )

    def wait_reaches(self, client: HostSpec, server: str) -> None:
        host = self.farm.hosts[client.name]
        address = self.farm.address(server)
        self.wait(
            lambda: probe(host, address, LAB_PORTS.plain, 0.5) is Probe.OK,
            f"{client.name} reaches {server} ({address}:{LAB_PORTS.plain})",
        )

    def client_configs(self, client: HostSpec) -> None:
        farm = self.farm
        primary, *others = [farm.address(s) for s in client.servers]
        for mode in (ClientMode.DIRECT, ClientMode.DIRECT_SSL, ClientMode.GATEWAY,
                     ClientMode.GATEWAY_SSL):  # fmt: skip
            port = LAB_PORTS.tls if mode.value.endswith("_ssl") else LAB_PORTS.plain
            secondaries = ", ".join(f'"{a}:{port}"' for a in others)
            farm.client_config(mode, client.name).write_text(
                f'server_host = "{primary}"\nserver_port = {port}\n'
                f"secondary_servers = [{secondaries}]\n"
                f'mode = "{mode.value}"\nserver_name = "{PUBLIC_NAME}"\n'
                f'ca_file = "{farm.public_cert}"\nusername = "{USER}"\nresource = "desktop"\n'
                "keepalive_s = 1\nconnect_timeout_s = 2\nrequest_timeout_s = 5\n"
            )


def _answers(host: Host, etcd: Etcd) -> bool:
    try:
        host.call(etcd.revision)
    except RasError:  # not up yet: the wait says when it gives up
        return False
    return True


def _names(specs: list[HostSpec]) -> str:
    return ", ".join(s.name for s in specs)


def _secret(path: Path, text: str) -> None:
    path.write_text(text + "\n")
    path.chmod(0o600)
