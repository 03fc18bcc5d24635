"""The health check the HALB and forwarding gateways run against a gateway: a real
control-protocol exchange (preface, hello, ping, pong), so it proves the gateway serves, not
only that its port accepts. The caller owns the deadline."""

from __future__ import annotations

from ras.net.channel import greet
from ras.net.tls import connect_tcp
from ras.protocol import Role

__all__ = ["probe"]


async def probe(host: str, port: int, *, software: str, source: str | None = None) -> None:
    """Ping the gateway at ``host:port``; ``TransportError`` (or a protocol error) if it does
    not answer as a gateway should."""
    stream = await connect_tcp(host, port, source=source)
    async with await greet(stream, Role.CLIENT, software) as chan:
        await chan.ping(1)
