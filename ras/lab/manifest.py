"""The topology manifest: a farm's networks, firewalls and hosts in one TOML file.

``ras lab up MANIFEST`` builds what a manifest describes (docs/lab.md has the format and the
shipped scenarios). The format, in short::

    name = "halb-pair"                       # the lab's name (default: the file's stem)
    summary = "one line for `ras lab list`"
    sites = ["east", "west"]                 # optional: each site a farm of its own

    [segments]                               # Ethernet segments and their subnets
    office = "10.213.1.0/24"
    farm = "10.213.2.0/24"

    [hosts.fw]                               # a firewall joins segments and routes between
    role = "firewall"                        # them, passing only the flows it allows
    segments = ["office", "farm"]
    allow = [{ from = "office", to = "front", ports = [80, 443, 3389] }]

    [hosts.gw1]
    role = "gateway"                         # broker | gateway | forwarder | halb | agent |
    segment = "farm"                         # client | firewall | etcd; a list for one
                                             # server with several roles
    [hosts.broker2]                          # several brokers in a site share their state
    role = "broker"                          # in the site's etcd members (1, 3 or 5 hosts
    segment = "farm"                         # with role etcd); priority orders them (lower
    priority = 2                             # first; default: manifest order), the first
                                             # started is the primary
    [hosts.client]
    role = "client"
    segment = "office"
    servers = ["front"]                      # the client profile: primary, then secondaries
    modes = ["gateway", "gateway_ssl", "rdp"]

    [vips.front]                             # a HALB group: its nodes share the VIP
    segment = "farm"
    nodes = ["halb1", "halb2"]               # the first is the master while it lives
    backends = ["gw1", "gw2", "gw3"]

Parsing is strict, as :mod:`ras.config` is for daemons: an unknown key, a key that does not
belong to the host's role, a name that points at nothing, is a `ConfigError` naming the file
and the dotted key. The checks here are about the manifest itself; whether the firewalls let
the farm work is found out by building it, as on a real network.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ras.errors import ConfigError

__all__ = [
    "PORTS",
    "ClientMode",
    "Flow",
    "HostSpec",
    "Manifest",
    "Role",
    "VipSpec",
    "load_manifest",
    "parse_manifest",
    "scenario_names",
]


class Role(enum.StrEnum):
    BROKER = "broker"
    GATEWAY = "gateway"  # a normal gateway: serves clients, talks to the broker
    FORWARDER = "forwarder"  # a forwarding gateway: passes connections to its next hops
    HALB = "halb"  # a node of a VIP's HALB group
    AGENT = "agent"  # an RDP host (the demo desktop) with its host agent
    CLIENT = "client"
    FIREWALL = "firewall"
    ETCD = "etcd"  # a member of the site's etcd cluster, where several brokers keep state


class ClientMode(enum.StrEnum):
    """How a lab's client reaches the desktop: the four modes of `ras client`, and the RDP
    port of the gateways with an .rdp file (routing token)."""

    DIRECT = "direct"
    DIRECT_SSL = "direct_ssl"
    GATEWAY = "gateway"
    GATEWAY_SSL = "gateway_ssl"
    RDP = "rdp"


# The ports every daemon of a lab listens on: the defaults of docs/architecture.md.
PORTS = {
    "gateway_plain": 80,
    "gateway_tls": 443,
    "gateway_rdp": 3389,
    "broker_gateways": 20002,
    "broker_agents": 20003,
    "rdp_host": 3389,
    "etcd_client": 2379,
    "etcd_peer": 2380,
}
ETCD_MEMBERS = (1, 3, 5)  # the sizes of a site's etcd cluster

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,12}")
_TOP_KEYS = ("name", "summary", "sites", "segments", "hosts", "vips")
_HOST_KEYS = {
    "role": None,
    "segment": None,
    "segments": None,
    "site": None,
    "servers": {Role.CLIENT},
    "modes": {Role.CLIENT},
    "next_hops": {Role.FORWARDER},
    "allow": {Role.FIREWALL},
    "priority": {Role.BROKER},
}
_VIP_KEYS = ("segment", "nodes", "backends", "front")
_FLOW_KEYS = ("from", "to", "ports")
FRONTS = ("ras", "keepalived")


@dataclass(frozen=True, slots=True)
class Flow:
    """TCP connections a firewall lets through: from any of ``sources`` to any of
    ``destinations`` (names of segments, hosts or VIPs) on any of ``ports``."""

    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    roles: tuple[Role, ...]
    segments: tuple[str, ...]
    site: str = ""
    servers: tuple[str, ...] = ()
    modes: tuple[ClientMode, ...] = (ClientMode.GATEWAY, ClientMode.GATEWAY_SSL)
    next_hops: tuple[str, ...] = ()
    allow: tuple[Flow, ...] = ()
    priority: int | None = None  # a broker's, among its site's brokers (lower first)

    def has(self, role: Role) -> bool:
        return role in self.roles

    @property
    def segment(self) -> str:
        """The host's first segment (where its ``eth0`` is)."""
        return self.segments[0]


@dataclass(frozen=True, slots=True)
class VipSpec:
    name: str
    segment: str
    nodes: tuple[str, ...]
    backends: tuple[str, ...]
    front: str = "ras"  # what holds it: `ras halb`, or keepalived + haproxy


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    summary: str
    source: str
    segments: Mapping[str, ipaddress.IPv4Network]
    hosts: Mapping[str, HostSpec]
    vips: Mapping[str, VipSpec]
    sites: tuple[str, ...] = ()

    def having(self, role: Role) -> list[HostSpec]:
        """The hosts with ``role``, in manifest order."""
        return [h for h in self.hosts.values() if h.has(role)]

    def broker_of(self, host: HostSpec) -> HostSpec:
        """The broker that ``host``'s gateway or agent prefers: its site's first."""
        return self.brokers_of(host.site)[0]

    def brokers_of(self, site: str) -> list[HostSpec]:
        """The brokers of ``site``, by priority (lower first; default: manifest order)."""
        brokers = [b for b in self.having(Role.BROKER) if b.site == site]
        order = {b.name: i for i, b in enumerate(brokers)}
        return sorted(brokers, key=lambda b: (b.priority or 0, order[b.name]))

    def etcd_of(self, site: str) -> list[HostSpec]:
        """The etcd members of ``site`` (none: its one broker keeps its state in SQLite)."""
        return [h for h in self.having(Role.ETCD) if h.site == site]

    def site_of(self, name: str) -> str:
        """The site of a host or of a VIP (its nodes')."""
        if name in self.vips:
            return self.hosts[self.vips[name].nodes[0]].site
        return self.hosts[name].site

    def members(self, site: str) -> list[str]:
        """The hosts of ``site``."""
        return [h.name for h in self.hosts.values() if h.site == site]

    def fronting(self, name: str) -> list[str]:
        """The hosts that send connections with a PROXY v2 header to gateway or forwarder
        ``name``: the HALB nodes of the VIPs it backs, the forwarders it is a next hop of."""
        fronts = [node for vip in self.vips.values() if name in vip.backends for node in vip.nodes]
        return fronts + [f.name for f in self.having(Role.FORWARDER) if name in f.next_hops]


# ---------------------------------------------------------------------------------------------
# Loading


def scenario_names() -> list[str]:
    """The scenarios shipped in the package (ras/lab/scenarios/*.toml)."""
    folder = resources.files("ras.lab") / "scenarios"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_manifest(what: str | Path) -> Manifest:
    """A manifest from a file path, or a shipped scenario by name (``halb-pair``)."""
    path = Path(what)
    if path.suffix == ".toml" or path.exists() or "/" in str(what):
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the manifest: {exc.strerror}") from None
        return parse_manifest(text, source=str(path), default_name=path.stem)
    name = str(what)
    if name not in scenario_names():
        raise ConfigError(
            f"no manifest file {name!r} and no such scenario (scenarios: "
            + ", ".join(scenario_names())
            + ")"
        )
    text = (resources.files("ras.lab") / "scenarios" / f"{name}.toml").read_text()
    return parse_manifest(text, source=f"scenario {name}", default_name=name)


def parse_manifest(text: str, *, source: str, default_name: str = "lab") -> Manifest:
    """Parse and check a manifest's TOML text; errors name ``source`` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return _Parser(source).manifest(data, default_name)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: key '{key}': {why}")

    def keys(self, table: Mapping[str, Any], allowed: Iterable[str], at: str) -> None:
        known_keys = tuple(allowed)
        for key in table:
            if key not in known_keys:
                known = ", ".join(sorted(known_keys))
                raise ConfigError(f"{self.source}: unknown key '{at}{key}' (known keys: {known})")

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {type(value).__name__}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}")
        return value

    def strings(self, value: Any, key: str, *, one_ok: bool = False) -> tuple[str, ...]:
        if one_ok and isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {type(value).__name__}")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))

    def name(self, value: str, key: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise self.error(key, f"{value!r}: 1 to 13 of a-z, 0-9 and '-', not starting with '-'")
        return value

    # -- the parts

    def manifest(self, data: Mapping[str, Any], default_name: str) -> Manifest:
        self.keys(data, _TOP_KEYS, "")
        name = self.string(data.get("name", default_name), "name")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", name):
            raise self.error("name", f"{name!r}: 1 to 40 of a-z, 0-9 and '-'")
        summary = self.string(data.get("summary", ""), "summary")
        sites = self.strings(data.get("sites", []), "sites")
        for i, site in enumerate(sites):
            self.name(site, f"sites[{i}]")
        segments = self.segments(self.table(data.get("segments", {}), "segments"))
        hosts = {
            self.name(n, f"hosts.{n}"): self.host(n, self.table(t, f"hosts.{n}"))
            for n, t in self.table(data.get("hosts", {}), "hosts").items()
        }
        vips = {
            self.name(n, f"vips.{n}"): self.vip(n, self.table(t, f"vips.{n}"))
            for n, t in self.table(data.get("vips", {}), "vips").items()
        }
        manifest = Manifest(name, summary, self.source, segments, hosts, vips, sites)
        _Checker(self, manifest).check()
        return manifest

    def segments(self, table: Mapping[str, Any]) -> dict[str, ipaddress.IPv4Network]:
        if not table:
            raise self.error("segments", "a manifest needs at least one segment")
        out: dict[str, ipaddress.IPv4Network] = {}
        for name, value in table.items():
            key = f"segments.{name}"
            self.name(name, key)
            try:
                net = ipaddress.IPv4Network(self.string(value, key))
            except ValueError as exc:
                raise self.error(key, str(exc)) from None
            if net.prefixlen > 24:
                raise self.error(key, f"{net} is smaller than a /24")
            for other, taken in out.items():
                if net.overlaps(taken):
                    raise self.error(key, f"{net} overlaps segments.{other} ({taken})")
            out[name] = net
        return out

    def host(self, name: str, table: Mapping[str, Any]) -> HostSpec:
        at = f"hosts.{name}"
        self.keys(table, _HOST_KEYS, f"{at}.")
        if "role" not in table:
            raise self.error(f"{at}.role", "missing: what the host is")
        roles = []
        for i, text in enumerate(self.strings(table["role"], f"{at}.role", one_ok=True)):
            try:
                roles.append(Role(text))
            except ValueError:
                allowed = ", ".join(r.value for r in Role)
                raise self.error(f"{at}.role[{i}]", f"{text!r} is not one of: {allowed}") from None
        if not roles or len(set(roles)) != len(roles):
            raise self.error(f"{at}.role", "one role, or a list of different roles")
        if len(roles) > 1 and {Role.CLIENT, Role.FIREWALL, Role.HALB, Role.ETCD} & set(roles):
            raise self.error(
                f"{at}.role", "client, firewall, halb and etcd hosts have one role only"
            )
        for key in table:
            needs = _HOST_KEYS[key]
            if needs is not None and not needs & set(roles):
                wanted = " or ".join(sorted(r.value for r in needs))
                raise self.error(f"{at}.{key}", f"only for a host with role {wanted}")
        if ("segment" in table) == ("segments" in table):
            raise self.error(f"{at}.segment", "give segment = NAME, or segments = [NAMES]")
        if "segment" in table:
            segments: tuple[str, ...] = (self.string(table["segment"], f"{at}.segment"),)
        else:
            segments = self.strings(table["segments"], f"{at}.segments")
        modes = []
        for i, text in enumerate(self.strings(table.get("modes", []), f"{at}.modes")):
            try:
                modes.append(ClientMode(text))
            except ValueError:
                allowed = ", ".join(m.value for m in ClientMode)
                raise self.error(f"{at}.modes[{i}]", f"{text!r} is not one of: {allowed}") from None
        allow = tuple(
            self.flow(self.table(flow, f"{at}.allow[{i}]"), f"{at}.allow[{i}]")
            for i, flow in enumerate(self.list(table.get("allow", []), f"{at}.allow"))
        )
        return HostSpec(
            name,
            tuple(roles),
            segments,
            site=self.string(table.get("site", ""), f"{at}.site"),
            servers=self.strings(table.get("servers", []), f"{at}.servers"),
            modes=tuple(modes) if modes else (ClientMode.GATEWAY, ClientMode.GATEWAY_SSL),
            next_hops=self.strings(table.get("next_hops", []), f"{at}.next_hops"),
            allow=allow,
            priority=self.priority(table, f"{at}.priority"),
        )

    def priority(self, table: Mapping[str, Any], key: str) -> int | None:
        if "priority" not in table:
            return None
        value = table["priority"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise self.error(key, f"{value!r}: a whole number from 0 to 1000")
        return value

    def list(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {type(value).__name__}")
        return value

    def flow(self, table: Mapping[str, Any], at: str) -> Flow:
        self.keys(table, _FLOW_KEYS, f"{at}.")
        for key in _FLOW_KEYS:
            if key not in table:
                raise self.error(f"{at}.{key}", "missing")
        ports = []
        for i, port in enumerate(self.list(table["ports"], f"{at}.ports")):
            if type(port) is not int or not 1 <= port <= 65535:
                raise self.error(f"{at}.ports[{i}]", f"{port!r} is not a TCP port (1-65535)")
            ports.append(port)
        if not ports:
            raise self.error(f"{at}.ports", "at least one port")
        return Flow(
            self.strings(table["from"], f"{at}.from", one_ok=True),
            self.strings(table["to"], f"{at}.to", one_ok=True),
            tuple(ports),
        )

    def vip(self, name: str, table: Mapping[str, Any]) -> VipSpec:
        at = f"vips.{name}"
        self.keys(table, _VIP_KEYS, f"{at}.")
        for key in ("segment", "nodes", "backends"):
            if key not in table:
                raise self.error(f"{at}.{key}", "missing")
        front = self.string(table.get("front", "ras"), f"{at}.front")
        if front not in FRONTS:
            raise self.error(f"{at}.front", f"{front!r} is not one of: {', '.join(FRONTS)}")
        return VipSpec(
            name,
            self.string(table["segment"], f"{at}.segment"),
            self.strings(table["nodes"], f"{at}.nodes"),
            self.strings(table["backends"], f"{at}.backends"),
            front,
        )


class _Checker:
    """The checks across the manifest: every name points at something of the right kind."""

    def __init__(self, parser: _Parser, manifest: Manifest) -> None:
        self.p = parser
        self.m = manifest

    def check(self) -> None:
        m = self.m
        clash = (set(m.hosts) & set(m.vips)) | ((set(m.hosts) | set(m.vips)) & set(m.segments))
        if clash:
            raise self.p.error("hosts", f"{', '.join(sorted(clash))}: one name for two things")
        for host in m.hosts.values():
            self.host(host)
        for vip in m.vips.values():
            self.vip(vip)
        for halb in m.having(Role.HALB):
            if not any(halb.name in vip.nodes for vip in m.vips.values()):
                raise self.p.error(f"hosts.{halb.name}.role", "a HALB node in no VIP's nodes")
        self.sites()

    def host(self, h: HostSpec) -> None:
        at = f"hosts.{h.name}"
        for i, seg in enumerate(h.segments):
            if seg not in self.m.segments:
                raise self.p.error(f"{at}.segments[{i}]", f"no segment {seg!r}")
        if len(set(h.segments)) != len(h.segments):
            raise self.p.error(f"{at}.segments", "a segment twice")
        if h.has(Role.FIREWALL):
            if len(h.segments) < 2:
                raise self.p.error(f"{at}.segments", "a firewall joins two segments or more")
        elif len(h.segments) != 1:
            raise self.p.error(f"{at}.segments", "only a firewall is on several segments")
        if h.site and h.site not in self.m.sites:
            raise self.p.error(f"{at}.site", f"{h.site!r} is not in sites")
        if self.m.sites and not h.site and not h.has(Role.CLIENT) and not h.has(Role.FIREWALL):
            raise self.p.error(f"{at}.site", "missing: the manifest has sites")
        known = set(self.m.segments) | set(self.m.hosts) | set(self.m.vips)
        for i, flow in enumerate(h.allow):
            for key, names in (("from", flow.sources), ("to", flow.destinations)):
                for j, name in enumerate(names):
                    if name not in known:
                        raise self.p.error(
                            f"{at}.allow[{i}].{key}[{j}]", f"{name!r} is no segment, host or VIP"
                        )
        for i, hop in enumerate(h.next_hops):
            if not self.serves(hop):
                raise self.p.error(f"{at}.next_hops[{i}]", f"{hop!r} is no gateway")
        if h.has(Role.FORWARDER) and not h.next_hops:
            raise self.p.error(f"{at}.next_hops", "missing: where the forwarder forwards to")
        if h.has(Role.CLIENT):
            self.client(h, at)

    def client(self, h: HostSpec, at: str) -> None:
        if not h.servers:
            raise self.p.error(f"{at}.servers", "missing: the gateways or VIPs to log in to")
        for i, name in enumerate(h.servers):
            if name in self.m.vips:
                continue
            if not self.serves(name):
                raise self.p.error(f"{at}.servers[{i}]", f"{name!r} is no gateway or VIP")
            if ClientMode.RDP in h.modes and self.m.hosts[name].has(Role.AGENT):
                raise self.p.error(
                    f"{at}.modes",
                    f"rdp: {name} is also an RDP host, which owns port 3389 (no RDP port "
                    "load balancing there)",
                )

    def serves(self, name: str) -> bool:
        """Whether host ``name`` is a gateway, normal or forwarding."""
        spec = self.m.hosts.get(name)
        return spec is not None and (spec.has(Role.GATEWAY) or spec.has(Role.FORWARDER))

    def vip(self, v: VipSpec) -> None:
        at = f"vips.{v.name}"
        if v.segment not in self.m.segments:
            raise self.p.error(f"{at}.segment", f"no segment {v.segment!r}")
        if not v.nodes:
            raise self.p.error(f"{at}.nodes", "at least one HALB node")
        for i, node in enumerate(v.nodes):
            spec = self.m.hosts.get(node)
            if spec is None or not spec.has(Role.HALB):
                raise self.p.error(f"{at}.nodes[{i}]", f"{node!r} is no host with role halb")
            if spec.segment != v.segment:
                raise self.p.error(f"{at}.nodes[{i}]", f"{node} is not on segment {v.segment}")
            if any(node in other.nodes for other in self.m.vips.values() if other is not v):
                raise self.p.error(f"{at}.nodes[{i}]", f"{node} is in another VIP's nodes")
        if not v.backends:
            raise self.p.error(f"{at}.backends", "at least one gateway")
        for i, name in enumerate(v.backends):
            if not self.serves(name):
                raise self.p.error(f"{at}.backends[{i}]", f"{name!r} is no gateway")

    def sites(self) -> None:
        m = self.m
        for site in m.sites or ("",):
            where = f"site {site}" if site else "the manifest"
            brokers = [b.name for b in m.having(Role.BROKER) if b.site == site]
            served = [
                h.name
                for h in m.hosts.values()
                if h.site == site and (h.has(Role.GATEWAY) or h.has(Role.AGENT))
            ]
            members = [e.name for e in m.etcd_of(site)]
            if len(brokers) > 1 and not members:
                raise self.p.error(
                    "hosts",
                    f"{where} has {len(brokers)} brokers and no etcd member: several brokers "
                    "keep their state in etcd (hosts with role etcd)",
                )
            if members and len(members) not in ETCD_MEMBERS:
                raise self.p.error("hosts", f"{where} has {len(members)} etcd members: 1, 3 or 5")
            if members and not brokers:
                raise self.p.error("hosts", f"{where} has etcd members and no broker")
            if served and not brokers:
                raise self.p.error("hosts", f"{where} has no broker for {', '.join(served)}")
        if not m.having(Role.AGENT):
            raise self.p.error("hosts", "no host with role agent (an RDP host)")
        if not m.having(Role.CLIENT):
            raise self.p.error("hosts", "no host with role client")
