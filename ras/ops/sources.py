"""What each daemon's state looks like at scrape time (``ras.ops.metrics.add_source``).

Each function takes the daemon object and yields samples read from it, in the event loop's
thread; the daemons call ``metrics.source(partial(broker_state, self))`` while they serve.
Label values are configured or registered names (hosts, gateways, VRIDs) and fixed states,
never users or client addresses.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ras.ops.metrics import Sample

if TYPE_CHECKING:
    from ras.agents.agent import Agent
    from ras.broker.server import Broker
    from ras.gateway.server import Gateway
    from ras.halb.daemon import Halb

__all__ = ["agent_state", "broker_state", "gateway_state", "halb_state", "host_state"]

HOST_STATES = ("reporting", "silent", "lying", "drained", "offline")


def host_state(online: bool, silent: bool, insane: str, drained: bool) -> str:
    """One word for a registered host (the worst first: offline beats silent beats lying)."""
    if not online:
        return "offline"
    if silent:
        return "silent"
    if insane:
        return "lying"
    if drained:
        return "drained"
    return "reporting"


def broker_state(broker: Broker) -> Iterator[Sample]:
    now = time.monotonic()
    timeout = broker.config.host_timeout_s
    states = Counter(
        host_state(h.online, now - h.last_report > timeout, h.insane, h.drained)
        for h in broker.hosts.hosts.values()
    )
    for state in HOST_STATES:
        yield "ras_broker_agents", (state,), float(states.get(state, 0))
    per_host: Counter[tuple[str, str]] = Counter()
    per_gateway: Counter[str] = Counter()
    for session in broker.sessions.list():
        per_host[session.host, str(session.state)] += 1
        if session.gateway:
            per_gateway[session.gateway] += 1
    for (host, state), n in per_host.items():
        yield "ras_broker_sessions", (host, state), float(n)
    for name, info in broker.gateways.items():
        yield "ras_broker_gateway_links", (name,), float(info.links)
        yield "ras_broker_gateway_sessions", (name,), float(per_gateway.get(name, 0))
    me = (broker.config.name,)
    roles = broker.roles
    yield "ras_broker_primary", me, 1.0 if roles is None else float(roles.is_primary)
    if roles is not None:  # brokers on etcd
        yield "ras_broker_etcd_up", me, float(roles.store.etcd.reachable)


def gateway_state(gateway: Gateway) -> Iterator[Sample]:
    name = gateway.config.name
    yield "ras_gateway_preauth_connections", (name,), float(gateway.limits.held)
    forwarder = gateway.forwarder
    if forwarder is None:
        yield "ras_gateway_broker_link_up", (name,), float(gateway.registered.is_set())
    else:
        for hop in forwarder.hops:
            yield "ras_gateway_next_hop_up", (name, str(hop.hop)), float(hop.healthy is True)


def agent_state(agent: Agent) -> Iterator[Sample]:
    yield "ras_agent_broker_connected", (agent.config.name,), float(agent.registered.is_set())


def halb_state(halb: Halb) -> Iterator[Sample]:
    vrid = str(halb.config.vrid)
    election = halb.election
    current = election.state.value
    for state in ("initialize", "backup", "master"):
        yield "ras_halb_vrrp_state", (vrid, state), float(state == current)
    yield "ras_halb_vrrp_priority", (vrid,), float(election.priority)
    healthy = 0
    for backend in halb.balancer.backends.values():
        healthy += backend.healthy
        yield "ras_halb_backend_up", (vrid, backend.name), float(backend.healthy)
        yield "ras_halb_backend_active", (vrid, backend.name), float(backend.active)
    yield "ras_halb_healthy_backends", (vrid,), float(healthy)
