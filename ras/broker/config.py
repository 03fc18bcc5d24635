"""The broker's configuration (``broker.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.protocol import ResourceKind

__all__ = ["BrokerConfig", "ResourceConfig"]


@dataclass(frozen=True, slots=True)
class ResourceConfig:
    """A published resource. Empty ``hosts`` means every registered host; empty ``groups`` and
    ``users`` mean every authenticated user."""

    id: str
    name: str
    kind: ResourceKind = ResourceKind.DESKTOP
    hosts: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise Invalid("id", f"{self.id!r} must be letters, digits, '.', '-' or '_'")
        if not self.name:
            raise Invalid("name", "must not be empty")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker listens, its certificates, its state and what it publishes."""

    database: Path
    cert_file: Path
    key_file: Path
    ca_file: Path
    name: str = "broker"
    listen_host: str = "127.0.0.1"
    gateway_port: int = 20002
    agent_port: int = 20003
    ticket_ttl_s: float = 60.0
    report_interval_s: float = 5.0
    host_timeout_s: float = 20.0
    handshake_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    challenge_timeout_s: float = 60.0
    resources: tuple[ResourceConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_host("listen_host", self.listen_host)
        check_port("gateway_port", self.gateway_port)
        check_port("agent_port", self.agent_port)
        for key in (
            "ticket_ttl_s",
            "report_interval_s",
            "host_timeout_s",
            "handshake_timeout_s",
            "request_timeout_s",
            "challenge_timeout_s",
        ):
            check_positive(key, getattr(self, key))
        if self.ticket_ttl_s > 3600:
            raise Invalid("ticket_ttl_s", "must be at most 3600 (tickets are short-lived)")
        if self.host_timeout_s <= self.report_interval_s:
            raise Invalid("host_timeout_s", "must be longer than report_interval_s")
        ids = [r.id for r in self.resources]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise Invalid("resources", f"resource id {sorted(dup)[0]!r} is used twice")
