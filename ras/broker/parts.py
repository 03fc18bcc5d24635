"""The parts of a broker, as the admin API sees them (a protocol: ``Broker`` is one).

The admin API takes the parts it serves, not the daemon that owns them, so that neither
imports the other.
"""

from __future__ import annotations

from typing import Protocol

from ras.broker.agentlinks import AgentLinks
from ras.broker.catalog import Catalog
from ras.broker.certs import FarmCertificates
from ras.broker.config import BrokerConfig
from ras.broker.directory import Directory
from ras.broker.farmreport import FarmReports
from ras.broker.front import GatewayInfo
from ras.broker.gatewaylink import GatewayLinks
from ras.broker.history import History
from ras.broker.hosts import HostRegistry
from ras.broker.launches import Launches
from ras.broker.roles import Roles
from ras.broker.sessions import SessionTable
from ras.broker.store import Store
from ras.broker.throttle import LoginThrottle

__all__ = ["BrokerParts"]


class BrokerParts(Protocol):
    """What one broker is made of: its configuration, state and the objects doing its jobs."""

    config: BrokerConfig
    store: Store
    directory: Directory
    throttle: LoginThrottle  # the farm's failed logins (the admin API counts its own apart)
    hosts: HostRegistry
    sessions: SessionTable
    catalog: Catalog
    launches: Launches
    agents: AgentLinks
    gateways: dict[str, GatewayInfo]
    links: GatewayLinks
    certificates: FarmCertificates
    history: History  # logins and launches, for reports
    reports: FarmReports  # reports of the farm (this broker's history and the others')
    roles: Roles | None  # several brokers on etcd; None: one broker, always the primary
