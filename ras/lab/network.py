"""A manifest's network in a lab: segments, hosts, routes through the firewalls, and what
each firewall lets through.

- Every segment of the manifest is a segment of the lab (its first is the lab's first).
  Hosts are on their segment with automatic addresses (.10, .11, ... in manifest order); a
  firewall takes .1 (then .2, ...) on each segment it joins, as a router usually does, and
  an interface on each (``eth0``, ``eth1``...). Each VIP takes a spare address of its segment
  (.254, .253, ...).
- Routes: every host reaches every other segment through the firewalls, by the fewest
  firewalls; only firewalls forward (``net.ipv4.ip_forward=1`` in their namespace only).
- A firewall's ``FORWARD`` chain drops everything but the TCP flows its ``allow`` lists
  (new connections from a source to a destination port, and the packets of connections
  already allowed); its ``INPUT`` chain drops every new connection to the firewall itself.
  A final counted DROP rule says how many packets it refused (`dropped`), which is how a
  missing rule shows.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ras.errors import ConfigError
from ras.lab.manifest import Flow, HostSpec, Manifest, Role
from ras.lab.netns import Host, Lab

__all__ = ["DROP_COMMENT", "LabNetwork", "build_network", "dropped", "firewall_rules", "routes"]

DROP_COMMENT = "ras-lab: no rule allows this"
_FIRST_ROUTER = 1


@dataclass(frozen=True, slots=True)
class LabNetwork:
    """The network a manifest describes, built: the lab, and each VIP's address."""

    lab: Lab
    manifest: Manifest
    vips: Mapping[str, ipaddress.IPv4Address]

    def host(self, name: str) -> Host:
        return self.lab.hosts[name]

    def address(self, name: str) -> ipaddress.IPv4Address:
        """The address of a VIP, or of a host on its first segment."""
        if name in self.vips:
            return self.vips[name]
        return self.lab.hosts[name].address


def build_network(manifest: Manifest, lab: Lab) -> LabNetwork:
    """Build ``manifest``'s network in ``lab``, which must be empty and have the manifest's
    first segment as its own (``Lab(subnet=..., segment=...)``)."""
    names = list(manifest.segments)
    first = names[0]
    if lab.segment.name != first or lab.subnet != manifest.segments[first] or lab.hosts:
        raise ConfigError(f"{manifest.source}: the lab is not an empty lab on segment {first}")
    for name in names[1:]:
        lab.add_segment(name, str(manifest.segments[name]))
    routers = manifest.having(Role.FIREWALL)
    next_router = dict.fromkeys(names, _FIRST_ROUTER)
    for spec in routers:
        for i, seg in enumerate(spec.segments):
            address = manifest.segments[seg].network_address + next_router[seg]
            next_router[seg] += 1
            if i == 0:
                host = lab.add_host(spec.name, address, segment=seg)
            else:
                lab.attach(host, seg, address)
    for seg in names:
        on = [
            h.name for h in manifest.hosts.values() if h.segment == seg and not h.has(Role.FIREWALL)
        ]
        if on:
            lab.add_hosts(*on, segment=seg)
    vips = {name: lab.spare_address(vip.segment) for name, vip in manifest.vips.items()}
    lab.add_routes({lab.hosts[h]: pairs for h, pairs in routes(manifest, lab.hosts).items()})
    net = LabNetwork(lab, manifest, vips)
    for spec in manifest.hosts.values():
        # explicitly: a new namespace may inherit the machine's setting
        lab.hosts[spec.name].sysctl("net.ipv4.ip_forward", int(spec.has(Role.FIREWALL)))
    for spec in routers:
        rules = firewall_rules(spec, _addresses(net))
        lab.hosts[spec.name].run(["iptables-restore"], input=rules)
    return net


def routes(
    manifest: Manifest, hosts: Mapping[str, Host]
) -> dict[str, list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]]]:
    """For each host, the segments it is not on and the router address to reach each by: the
    first firewall on a shortest path (breadth first over segments)."""
    routers = manifest.having(Role.FIREWALL)
    out = {}
    for spec in manifest.hosts.values():
        hop: dict[str, tuple[str, str] | None] = dict.fromkeys(spec.segments)
        queue = collections.deque(spec.segments)
        while queue:
            seg = queue.popleft()
            for router in routers:
                if router.name == spec.name or seg not in router.segments:
                    continue
                for beyond in router.segments:
                    if beyond not in hop:
                        hop[beyond] = hop[seg] or (router.name, seg)
                        queue.append(beyond)
        out[spec.name] = [
            (manifest.segments[seg], hosts[via[0]].address_on(via[1]))
            for seg, via in hop.items()
            if via is not None
        ]
    return out


def _addresses(net: LabNetwork) -> dict[str, list[str]]:
    """Every name a flow may use, as networks in CIDR: a segment's subnet, a host's
    addresses, a VIP's."""
    out: dict[str, list[str]] = {n: [str(s)] for n, s in net.manifest.segments.items()}
    for name, host in net.lab.hosts.items():
        out[name] = [f"{i.address}/32" for i in host.interfaces.values()]
    for name, address in net.vips.items():
        out[name] = [f"{address}/32"]
    return out


def firewall_rules(spec: HostSpec, addresses: Mapping[str, Iterable[str]]) -> str:
    """The ``iptables-restore`` input for firewall ``spec``: default DROP, the flows its
    ``allow`` lists, the packets of allowed connections, and a final counted DROP."""
    lines = [
        "*filter",
        ":INPUT DROP [0:0]",
        ":FORWARD DROP [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    for i, flow in enumerate(spec.allow):
        lines += _flow_rules(i, flow, addresses)
    lines += [f'-A FORWARD -m comment --comment "{DROP_COMMENT}" -j DROP', "COMMIT", ""]
    return "\n".join(lines)


def _flow_rules(index: int, flow: Flow, addresses: Mapping[str, Iterable[str]]) -> list[str]:
    ports = ",".join(str(p) for p in flow.ports)
    comment = f"allow[{index}] {'+'.join(flow.sources)} -> {'+'.join(flow.destinations)}"
    return [
        f"-A FORWARD -p tcp -s {src} -d {dst} -m multiport --dports {ports} "
        f'-m conntrack --ctstate NEW -m comment --comment "{comment}" -j ACCEPT'
        for source in flow.sources
        for src in addresses[source]
        for destination in flow.destinations
        for dst in addresses[destination]
    ]


def dropped(host: Host) -> int:
    """How many packets firewall ``host`` has refused (its final DROP rule's counter)."""
    out = host.iptables("-L", "FORWARD", "-v", "-n", "-x").stdout
    for line in out.splitlines():
        if DROP_COMMENT in line:
            return int(line.split()[0])
    return 0
