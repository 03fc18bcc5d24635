"""A client connection profile (``client.toml``, or one table of ``profiles.toml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_port, check_positive
from ras.protocol import Mode

__all__ = ["ClientConfig", "split_hostport"]


def split_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` to (host, port); ``ValueError`` if bad."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] not in ("", ":"):
            raise ValueError(f"{text!r} is not HOST[:PORT]")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = _port(rest, text)
    check_host("server", host)
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: {text!r} is not a TCP port (1-65535)")
    return int(text)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where the gateway is, how to reach it, and who the user is.

    ``server_host``:``server_port`` is the primary gateway; ``secondary_servers`` (each
    ``HOST`` or ``HOST:PORT``, the port defaulting to ``server_port``) are tried in order when
    the ones before cannot be reached. Every server must present a certificate that
    ``ca_file`` trusts, under ``server_name`` (default: that server's host).
    """

    server_host: str
    server_port: int = 443
    secondary_servers: tuple[str, ...] = ()
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
        if isinstance(self.secondary_servers, str):
            raise Invalid("secondary_servers", "must be a list of HOST:PORT, not one string")
        for i, server in enumerate(self.secondary_servers):
            try:
                split_hostport(server, self.server_port)
            except (ValueError, Invalid) as exc:
                raise Invalid(f"secondary_servers[{i}]", str(exc)) from None
        check_port("listen_port", self.listen_port)
        for key in ("connect_timeout_s", "request_timeout_s", "keepalive_s"):
            check_positive(key, getattr(self, key))
        if self.mode is Mode.WEB:
            raise Invalid("mode", "web is the browser's (the User Portal), not a client's mode")
        if self.mode in (Mode.GATEWAY_SSL, Mode.DIRECT_SSL) and self.ca_file is None:
            raise Invalid(
                "ca_file", f"mode {self.mode} needs ca_file (the gateway's certificate or its CA)"
            )

    @property
    def tls(self) -> bool:
        return self.mode in (Mode.GATEWAY_SSL, Mode.DIRECT_SSL)

    @property
    def servers(self) -> list[tuple[str, int]]:
        """The gateways to try, in order: the primary, then the secondaries."""
        return [(self.server_host, self.server_port)] + [
            split_hostport(s, self.server_port) for s in self.secondary_servers
        ]
