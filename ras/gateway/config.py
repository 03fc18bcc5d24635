"""The Secure Gateway's configuration (``gateway.toml``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive

__all__ = ["GatewayConfig"]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Ports, certificates (public and farm), the broker, and the session limits.

    ``trusted_proxies``: networks (CIDR) or addresses of the proxies in front of the gateway
    (HALB nodes, forwarding gateways, haproxy) whose PROXY v2 header names the real client.
    A PROXY v2 header from any other source is refused.
    """

    name: str
    public_cert_file: Path
    public_key_file: Path
    cert_file: Path
    key_file: Path
    ca_file: Path
    listen_host: str = "0.0.0.0"
    plain_port: int = 80
    tls_port: int = 443
    plain_enabled: bool = True
    tls_enabled: bool = True
    public_host: str = "localhost"
    public_port: int = 443
    broker_host: str = "127.0.0.1"
    broker_port: int = 20002
    handshake_timeout_s: float = 10.0
    preauth_timeout_s: float = 60.0
    session_idle_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    broker_timeout_s: float = 30.0
    link_ping_interval_s: float = 5.0
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise Invalid("name", "must not be empty")
        for key in ("listen_host", "public_host", "broker_host"):
            check_host(key, getattr(self, key))
        for key in ("plain_port", "tls_port", "broker_port", "public_port"):
            check_port(key, getattr(self, key))
        for key in (
            "handshake_timeout_s",
            "preauth_timeout_s",
            "session_idle_timeout_s",
            "connect_timeout_s",
            "broker_timeout_s",
            "link_ping_interval_s",
        ):
            check_positive(key, getattr(self, key))
        if isinstance(self.trusted_proxies, str):
            raise Invalid("trusted_proxies", "must be a list of networks, not one string")
        for i, network in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(network)
            except ValueError as exc:
                why = str(exc)
                if "host bits" in why:  # 10.0.0.1/8: say which network was meant
                    why += f" (the network is {ipaddress.ip_network(network, strict=False)})"
                raise Invalid(f"trusted_proxies[{i}]", why) from None
        if not (self.plain_enabled or self.tls_enabled):
            raise Invalid(
                "tls_enabled", "at least one of plain_enabled and tls_enabled must be true"
            )
