"""The HALB's configuration (``halb.toml``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.net.brokers import broker_addresses
from ras.ops.config import LogFormat, MetricsConfig
from ras.protocol.vrrp import OWNER_PRIORITY

__all__ = ["GatewayRef", "HalbConfig", "ServiceConfig"]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One balanced port: connections to VIP:listen_port go to gateway:backend_port."""

    listen_port: int
    backend_port: int
    proxy_protocol: bool = True  # send a PROXY v2 header so the gateway sees the client
    # TLS offload: with a certificate, the HALB terminates TLS and forwards plaintext (to the
    # gateway's plain port); without, TLS passes through to the gateway untouched.
    # With a broker (``broker_host``), the farm certificate the broker distributes is written
    # over these files and presented from then on (docs/certificates.md).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Answer ACME HTTP-01 requests (GET /.well-known/acme-challenge/...) here with the tokens
    # the broker pushes, instead of passing them to a gateway; everything else passes on.
    acme: bool = False

    def __post_init__(self) -> None:
        check_port("listen_port", self.listen_port, zero_ok=False)
        check_port("backend_port", self.backend_port, zero_ok=False)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise Invalid("tls_key_file", "TLS offload needs both tls_cert_file and tls_key_file")
        if self.acme and self.tls_cert_file is not None:
            raise Invalid("acme", "ACME HTTP-01 is answered on a plain port, not a TLS offload one")

    @property
    def offload(self) -> bool:
        return self.tls_cert_file is not None


@dataclass(frozen=True, slots=True)
class GatewayRef:
    name: str
    host: str

    def __post_init__(self) -> None:
        if not self.name:
            raise Invalid("name", "must not be empty")
        check_host("host", self.host)


@dataclass(frozen=True, slots=True)
class HalbConfig:
    """VRRP (who holds the VIPs) and the TCP balancing over the gateways.

    Gateway tracking: while no gateway is healthy (and from start-up until the first health
    checks find one) the node advertises ``no_gateway_priority`` instead of ``priority``, so a
    peer that has a healthy gateway takes the VIPs (with ``preempt``). Unset, it is 1 (below
    every node that has a gateway); equal to ``priority``, gateway health does not matter. The
    address owner (priority 255) never changes its priority (RFC 5798), so it cannot have one.
    """

    name: str
    vips: tuple[str, ...]
    interface: str = "eth0"
    vrid: int = 51
    priority: int = 100
    no_gateway_priority: int | None = None  # None: 1, or no tracking for the address owner
    advert_interval_s: float = 1.0
    preempt: bool = True
    preempt_delay_s: float = 0.0
    services: tuple[ServiceConfig, ...] = field(
        default_factory=lambda: (
            ServiceConfig(80, 80),
            ServiceConfig(443, 443),
            ServiceConfig(3389, 3389),
        )
    )
    gateways: tuple[GatewayRef, ...] = ()
    health_port: int = 80
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3
    connect_timeout_s: float = 5.0
    tls_handshake_timeout_s: float = 10.0
    admin_host: str = "127.0.0.1"
    admin_port: int = 31006
    # Gateways from the broker too (those whose link to it is up), over mutual TLS:
    broker_host: str = ""  # empty: the [[gateways]] of this file only
    broker_port: int = 20002
    # Several brokers (docs/brokers.md): "host:port" of each, highest priority first; the
    # HALB asks the first that answers and fails over to the next.
    brokers: tuple[str, ...] = ()
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    broker_poll_interval_s: float = 5.0
    # Operations (docs/operations.md): the opt-in /metrics listener, and the log line format.
    metrics: MetricsConfig | None = None
    log_format: LogFormat = LogFormat.TEXT

    def __post_init__(self) -> None:
        if not self.name:
            raise Invalid("name", "must not be empty")
        if not self.vips:
            raise Invalid("vips", "at least one virtual IP is needed")
        for vip in self.vips:
            try:
                iface = ipaddress.ip_interface(vip)
            except ValueError:
                raise Invalid(
                    "vips", f"{vip!r} is not an IPv4 address (with an optional /prefix)"
                ) from None
            if iface.version != 4:
                raise Invalid("vips", f"{vip!r}: only IPv4 VIPs (VRRPv3 over IPv4)")
        if not 1 <= self.vrid <= 255:
            raise Invalid("vrid", "must be between 1 and 255")
        if not 1 <= self.priority <= 255:
            raise Invalid("priority", "must be between 1 and 255 (255: the address owner)")
        if self.no_gateway_priority is not None:
            if self.priority == OWNER_PRIORITY:
                raise Invalid(
                    "no_gateway_priority",
                    "the address owner (priority 255) keeps priority 255 whatever its gateways "
                    "do (RFC 5798); give the node priority 254 to make it follow its gateways",
                )
            if not 1 <= self.no_gateway_priority <= self.priority:
                raise Invalid(
                    "no_gateway_priority",
                    f"must be between 1 and priority ({self.priority}); equal to priority, "
                    "gateway health does not change the priority",
                )
        if not 0.01 <= self.advert_interval_s <= 40.95:
            raise Invalid(
                "advert_interval_s", "must be between 0.01 and 40.95 (VRRPv3 centiseconds)"
            )
        for key in (
            "health_interval_s",
            "health_timeout_s",
            "connect_timeout_s",
            "tls_handshake_timeout_s",
        ):
            check_positive(key, getattr(self, key))
        if self.preempt_delay_s < 0:
            raise Invalid("preempt_delay_s", "must not be negative")
        if self.rise < 1 or self.fall < 1:
            raise Invalid("rise", "rise and fall must be at least 1")
        check_port("health_port", self.health_port, zero_ok=False)
        check_port("admin_port", self.admin_port)
        check_host("admin_host", self.admin_host)
        if not self.interface or len(self.interface) > 15:
            raise Invalid("interface", f"{self.interface!r} is not an interface name")
        if self.brokers:
            broker_addresses(self.brokers, "", 0)  # names a bad one
        if self.broker_host or self.brokers:
            if self.broker_host:
                check_host("broker_host", self.broker_host)
                check_port("broker_port", self.broker_port, zero_ok=False)
            check_positive("broker_poll_interval_s", self.broker_poll_interval_s)
            for key in ("cert_file", "key_file", "ca_file"):
                if getattr(self, key) is None:
                    raise Invalid(key, "is needed with a broker (mutual TLS with the broker)")
        names = [g.name for g in self.gateways]
        if len(set(names)) != len(names):
            raise Invalid("gateways", "gateway names must be unique")
        ports = [s.listen_port for s in self.services]
        if len(set(ports)) != len(ports):
            raise Invalid("services", "each listen_port may appear once")

    @property
    def broker_list(self) -> tuple[tuple[str, int], ...]:
        """The brokers to ask for gateways (none: the [[gateways]] of this file only)."""
        if not self.brokers and not self.broker_host:
            return ()
        return broker_addresses(self.brokers, self.broker_host, self.broker_port)

    @property
    def tracked_priority(self) -> int | None:
        """The priority advertised while no gateway is healthy; None: no gateway tracking
        (the address owner, or ``no_gateway_priority`` equal to ``priority``)."""
        if self.priority == OWNER_PRIORITY:
            return None
        low = 1 if self.no_gateway_priority is None else self.no_gateway_priority
        return None if low == self.priority else low

    @property
    def vip_interfaces(self) -> tuple[ipaddress.IPv4Interface, ...]:
        """The VIPs with their prefix (a bare address is a /32)."""
        return tuple(ipaddress.IPv4Interface(v) for v in self.vips)
