"""The Secure Gateway's configuration (``gateway.toml``)."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.net.brokers import broker_addresses
from ras.ops.config import LogFormat, MetricsConfig

__all__ = ["GatewayConfig", "GatewayMode", "NextHop"]


class GatewayMode(enum.StrEnum):
    """``normal``: serves clients with the broker. ``forwarding``: passes every connection on
    to the next gateway of ``next_hops`` (a DMZ front), needing no broker."""

    NORMAL = "normal"
    FORWARDING = "forwarding"


@dataclass(frozen=True, slots=True)
class NextHop:
    """The gateway a forwarding gateway passes connections to: its plain, TLS and RDP ports
    (the RDP port only for a forwarder with ``rdp_lb_enabled``)."""

    host: str
    plain_port: int = 80
    tls_port: int = 443
    rdp_port: int = 3389

    def __post_init__(self) -> None:
        check_host("host", self.host)
        check_port("plain_port", self.plain_port, zero_ok=False)
        check_port("tls_port", self.tls_port, zero_ok=False)
        check_port("rdp_port", self.rdp_port, zero_ok=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.plain_port}/{self.tls_port}"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Ports, certificates (public and farm), the broker, the session limits, forwarding.

    ``trusted_proxies``: networks (CIDR) or addresses of the proxies in front of the gateway
    (HALB nodes, forwarding gateways, haproxy) whose PROXY v2 header names the real client.
    A PROXY v2 header from any other source is refused.

    Forwarding mode (``mode = "forwarding"``) needs ``next_hops`` and no broker, farm
    certificate or public certificate, unless ``terminate_tls``: then the public certificate
    is presented to clients and the next hop's certificate is verified against
    ``next_hop_ca_file`` (default: the farm CA, ``ca_file``). With ``rdp_lb_enabled`` a
    forwarding gateway passes its RDP port's connections on to the next hops' ``rdp_port``.
    """

    name: str
    public_cert_file: Path | None = None
    public_key_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    mode: GatewayMode = GatewayMode.NORMAL
    listen_host: str = "0.0.0.0"
    plain_port: int = 80
    tls_port: int = 443
    plain_enabled: bool = True
    tls_enabled: bool = True
    public_host: str = "localhost"
    public_port: int = 443
    broker_host: str = "127.0.0.1"
    broker_port: int = 20002
    # Several brokers (docs/brokers.md): "host:port" of each, highest priority first; the
    # gateway registers with all and opens connections to the first that answers within
    # broker_failover_s. Empty: broker_host:broker_port alone.
    brokers: tuple[str, ...] = ()
    broker_failover_s: float = 3.0
    handshake_timeout_s: float = 10.0
    preauth_timeout_s: float = 60.0
    session_idle_timeout_s: float = 600.0
    tunnel_idle_timeout_s: float = 0.0  # 0: off (RDP sessions may sit idle for hours)
    drain_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    broker_timeout_s: float = 30.0
    link_ping_interval_s: float = 5.0
    trusted_proxies: tuple[str, ...] = ()
    # Limits per client address (after a trusted PROXY v2 header: the real client's).
    max_preauth_per_ip: int = 32
    max_preauth_total: int = 10000
    max_new_per_ip_per_s: float = 50.0
    max_new_per_ip_burst: int = 200
    # Forwarding mode.
    next_hops: tuple[NextHop, ...] = ()
    terminate_tls: bool = False
    next_hop_ca_file: Path | None = None
    next_hop_server_name: str = ""  # the name in the next hops' certificates (default: host)
    source_address: str = ""  # the local address connections to next hops come from
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    # RDP load balancing (docs/client.md): native RDP clients on rdp_port, routed by the
    # broker's routing token in their X.224 cookie, or by "Cookie: mstshash=USER" if allowed.
    # A forwarding gateway passes them on to its next hops' rdp_port.
    rdp_lb_enabled: bool = False
    rdp_port: int = 3389
    rdp_lb_mstshash: bool = False
    # Worker processes sharing the ports (SO_REUSEPORT), each with its own trio loop.
    workers: int = 1
    # Operations (docs/operations.md): the opt-in /metrics listener, and the log line format.
    metrics: MetricsConfig | None = None
    log_format: LogFormat = LogFormat.TEXT
    # The web client (docs/webclient.md): where its npm packages are (default: web/node_modules
    # of the checkout, installed by ./dev), and how many browser tunnels a user may have open.
    web_client_dir: Path | None = None
    max_web_tunnels_per_user: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 256:
            raise Invalid("workers", "must be between 1 and 256")
        shared = (
            (self.plain_port, self.plain_enabled),
            (self.tls_port, self.tls_enabled),
            (self.rdp_port, self.rdp_lb_enabled),
        )
        if self.workers > 1 and any(port == 0 and on for port, on in shared):
            raise Invalid("workers", "several workers need fixed ports (not 0) to share")
        check_port("rdp_port", self.rdp_port)
        if not self.name:
            raise Invalid("name", "must not be empty")
        try:  # a str from code that builds the config directly
            object.__setattr__(self, "mode", GatewayMode(self.mode))
        except ValueError:
            raise Invalid("mode", f"{self.mode!r} is not normal or forwarding") from None
        for key in ("listen_host", "public_host", "broker_host"):
            check_host(key, getattr(self, key))
        for key in ("plain_port", "tls_port", "broker_port", "public_port"):
            check_port(key, getattr(self, key))
        broker_addresses(self.brokers, self.broker_host, self.broker_port)  # names a bad one
        for key in (
            "handshake_timeout_s",
            "preauth_timeout_s",
            "session_idle_timeout_s",
            "connect_timeout_s",
            "broker_timeout_s",
            "broker_failover_s",
            "link_ping_interval_s",
            "health_interval_s",
            "health_timeout_s",
            "max_new_per_ip_per_s",
        ):
            check_positive(key, getattr(self, key))
        for key in ("tunnel_idle_timeout_s", "drain_timeout_s"):
            if getattr(self, key) < 0:
                raise Invalid(key, "must not be negative (0: off)")
        for key in (
            "max_preauth_per_ip",
            "max_preauth_total",
            "max_new_per_ip_burst",
            "max_web_tunnels_per_user",
        ):
            if getattr(self, key) < 1:
                raise Invalid(key, "must be at least 1")
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
        if self.source_address:
            try:
                ipaddress.ip_address(self.source_address)
            except ValueError:
                raise Invalid("source_address", "must be an IP address of this machine") from None
        if self.mode is GatewayMode.FORWARDING:
            self._check_forwarding()
        else:
            self._check_normal()

    def _check_normal(self) -> None:
        for key in ("cert_file", "key_file", "ca_file"):
            if getattr(self, key) is None:
                raise Invalid(key, "is needed (mutual TLS with the broker)")
        if self.tls_enabled:
            for key in ("public_cert_file", "public_key_file"):
                if getattr(self, key) is None:
                    raise Invalid(key, "is needed for the TLS port (or set tls_enabled = false)")
        if self.next_hops:
            raise Invalid("next_hops", 'is only for mode = "forwarding"')

    def _check_forwarding(self) -> None:
        if not self.next_hops:
            raise Invalid("next_hops", "a forwarding gateway needs at least one next hop")
        if self.rdp_lb_mstshash:
            raise Invalid(
                "rdp_lb_mstshash",
                "is for normal gateways: a forwarding gateway passes RDP connections on, and "
                "the gateway that serves them decides (set it there)",
            )
        if self.terminate_tls:
            for key in ("public_cert_file", "public_key_file"):
                if getattr(self, key) is None:
                    raise Invalid(key, "is needed with terminate_tls = true")
            if self.next_hop_ca_file is None and self.ca_file is None:
                raise Invalid(
                    "next_hop_ca_file",
                    "terminate_tls = true needs a CA to verify the next hops with "
                    "(next_hop_ca_file, or the farm CA in ca_file)",
                )
        if self.next_hop_server_name:
            check_host("next_hop_server_name", self.next_hop_server_name)

    @property
    def broker_list(self) -> tuple[tuple[str, int], ...]:
        """The brokers, highest priority first."""
        return broker_addresses(self.brokers, self.broker_host, self.broker_port)

    @property
    def forwarding(self) -> bool:
        return self.mode is GatewayMode.FORWARDING
