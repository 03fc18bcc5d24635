"""Opening TLS connections to other daemons (mutual TLS with the farm's certificates)."""

from __future__ import annotations

import ipaddress
import ssl

import trio

from ras.errors import TransportError
from ras.net.channel import aclose_quietly
from ras.net.reasons import reason

__all__ = ["connect_tcp", "connect_tls"]


async def connect_tcp(host: str, port: int, *, source: str | None = None) -> trio.SocketStream:
    """A TCP connection with TCP_NODELAY; failures become ``TransportError``.

    A numeric address gets one plain socket connect (the balancer's hot path); a name goes
    through trio's resolver and happy-eyeballs. ``source``: the local address to connect from
    (an IP address of this machine)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    try:
        if address is None:
            return await trio.open_tcp_stream(host, port, local_address=source)
        family = trio.socket.AF_INET6 if address.version == 6 else trio.socket.AF_INET
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        try:
            if source is not None:
                await sock.bind((source, 0))
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)  # sets TCP_NODELAY
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc


async def connect_tls(
    host: str, port: int, context: ssl.SSLContext, *, server_hostname: str | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection whose handshake is done (the caller owns the deadline)."""
    tcp = await connect_tcp(host, port)
    stream = trio.SSLStream(tcp, context, server_hostname=server_hostname or host)
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        await aclose_quietly(tcp)
        raise TransportError(
            f"TLS with {host}:{port} failed: {reason(exc, handshake=True)}"
        ) from exc
    except BaseException:  # cancelled mid-handshake: do not leak the socket
        await aclose_quietly(tcp)
        raise
    return stream
