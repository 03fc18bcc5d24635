"""A client connection profile (``client.toml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.protocol import Mode

__all__ = ["ClientConfig"]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where the gateway is, how to reach it, and who the user is."""

    server_host: str
    server_port: int = 443
    mode: Mode = Mode.GATEWAY_SSL
    ca_file: Path | None = None
    server_name: str = ""
    username: str = ""
    resource: str = ""
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    keepalive_s: float = 30.0

    def __post_init__(self) -> None:
        check_host("server_host", self.server_host)
        check_port("server_port", self.server_port, zero_ok=False)
        check_host("listen_host", self.listen_host)
        check_port("listen_port", self.listen_port)
        for key in ("connect_timeout_s", "request_timeout_s", "keepalive_s"):
            check_positive(key, getattr(self, key))
        if self.mode in (Mode.GATEWAY_SSL, Mode.DIRECT_SSL) and self.ca_file is None:
            raise Invalid(
                "ca_file", f"mode {self.mode} needs ca_file (the gateway's certificate or its CA)"
            )

    @property
    def tls(self) -> bool:
        return self.mode in (Mode.GATEWAY_SSL, Mode.DIRECT_SSL)
