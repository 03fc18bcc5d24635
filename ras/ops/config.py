"""The ``[metrics]`` table every daemon's config may have: where its ``/metrics`` listens.

Opt-in: without the table (or with ``port = 0`` and no ``--metrics`` flag) nothing listens.
On a loopback address the listener is plain HTTP for the local Prometheus (or a node
exporter's textfile scraper); on any other address it must be TLS (``cert_file`` and
``key_file``) and list the addresses that may scrape it (``allow``), so that a metrics port
open to a network is never open to everyone on it.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port

__all__ = ["LogFormat", "MetricsConfig", "is_loopback", "parse_listen"]


class LogFormat(enum.StrEnum):
    """How log lines are written: ``text`` (``time logger LEVEL message``) or ``json``."""

    TEXT = "text"
    JSON = "json"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: ``port`` (0: off), ``listen_host`` (default loopback), and off loopback
    ``cert_file``/``key_file`` (TLS) and ``allow`` (addresses or CIDR networks) required."""

    port: int = 0
    listen_host: str = "127.0.0.1"
    cert_file: Path | None = None
    key_file: Path | None = None
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_port("port", self.port)
        check_host("listen_host", self.listen_host)
        if (self.cert_file is None) != (self.key_file is None):
            raise Invalid("cert_file", "cert_file and key_file go together")
        for i, entry in enumerate(self.allow):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise Invalid(f"allow[{i}]", f"{entry!r} is not an address or network") from None
        if self.port and not is_loopback(self.listen_host):
            if self.cert_file is None:
                raise Invalid(
                    "cert_file",
                    f"a metrics listener on {self.listen_host} (not loopback) needs TLS: "
                    "set cert_file and key_file",
                )
            if not self.allow:
                raise Invalid(
                    "allow",
                    f"a metrics listener on {self.listen_host} (not loopback) needs the "
                    "addresses that may scrape it",
                )

    @property
    def enabled(self) -> bool:
        return self.port != 0

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(a, strict=False) for a in self.allow)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (loopback) of the ``--metrics`` flag; ValueError if neither."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    number = int(port)
    if not 0 < number <= 65535:
        raise ValueError(f"{number} is not a TCP port")
    return host, number
