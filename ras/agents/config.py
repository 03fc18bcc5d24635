"""The host agent's configuration (``agent.toml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.protocol import HostKind

__all__ = ["AgentConfig"]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The host this agent speaks for (``name`` must be the name in its certificate)."""

    name: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    kind: HostKind = HostKind.RDSH
    rdp_host: str = "127.0.0.1"
    rdp_port: int = 3389
    max_sessions: int = 50
    broker_host: str = "127.0.0.1"
    broker_port: int = 20003
    connect_timeout_s: float = 10.0
    retry_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.name:
            raise Invalid("name", "must not be empty")
        check_host("rdp_host", self.rdp_host)
        check_host("broker_host", self.broker_host)
        check_port("rdp_port", self.rdp_port, zero_ok=False)
        check_port("broker_port", self.broker_port, zero_ok=False)
        if not 1 <= self.max_sessions <= 100_000:
            raise Invalid("max_sessions", "must be between 1 and 100000")
        check_positive("connect_timeout_s", self.connect_timeout_s)
        check_positive("retry_max_s", self.retry_max_s)
