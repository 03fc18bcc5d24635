"""The start of an RDP connection as its TLS client: X.224 request and confirm, then TLS.

Used where ras itself is the TLS client to an RDP host: the web client's endpoint on the
gateway (a browser cannot do TLS to the host) and an agent reading its own RDP server's
certificate to report it (``certificate_sha256``), so that the gateway can pin it.
"""

from __future__ import annotations

import hashlib
import ssl

import trio

from ras.errors import RemoteProtocolError, TransportError
from ras.net.reasons import transport_errors
from ras.net.tls import connect_tcp
from ras.protocol.x224 import (
    ConnectionConfirm,
    RdpProtocol,
    encode_connection_request,
    parse_connection_confirm,
)

__all__ = ["certificate_sha256", "probe_certificate", "rdp_tls", "unverified_context"]


def unverified_context() -> ssl.SSLContext:
    """A TLS client context that takes any certificate: the caller checks it afterwards
    (``certificate_sha256`` against a pin)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def certificate_sha256(tls: trio.SSLStream[trio.abc.Stream]) -> str:
    """The SHA-256 (lower-case hex) of the certificate the peer presented."""
    der = tls.getpeercert(binary_form=True)
    if der is None:  # pragma: no cover - a TLS server always sends one here
        raise TransportError("the RDP host presented no certificate")
    return hashlib.sha256(der).hexdigest()


async def rdp_tls(
    stream: trio.abc.Stream,
    request: bytes,
    context: ssl.SSLContext,
    server_hostname: str | None = None,
) -> tuple[ConnectionConfirm, trio.SSLStream[trio.abc.Stream] | None]:
    """Send the X.224 Connection ``request`` on ``stream``, read the host's Connection Confirm
    and, if the host selected a TLS-based protocol, do the TLS handshake as its client.
    Returns the confirm and the TLS stream (None: no TLS, the confirm says why). The caller
    owns the deadline and the stream."""
    with transport_errors("connection lost in the X.224 exchange with the RDP host"):
        await stream.send_all(request)
        data = b""
        while (confirm := parse_connection_confirm(data)) is None:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise TransportError("the RDP host closed before its Connection Confirm")
            data += chunk
    if len(data) != confirm.length:  # a TLS server waits for the ClientHello
        raise RemoteProtocolError("the RDP host sent more than its Connection Confirm")
    if not confirm.tls:
        return confirm, None
    tls = trio.SSLStream(stream, context, server_hostname=server_hostname)
    with transport_errors("TLS handshake with the RDP host failed", handshake=True):
        await tls.do_handshake()
    return confirm, tls


async def probe_certificate(host: str, port: int) -> str:
    """The SHA-256 of the TLS certificate of the RDP server at ``host``:``port`` (a TLS and
    NLA request, as mstsc sends; nothing is logged in). The caller owns the deadline."""
    stream = await connect_tcp(host, port)
    try:
        request = encode_connection_request(protocols=RdpProtocol.TLS | RdpProtocol.HYBRID)
        confirm, tls = await rdp_tls(stream, request, unverified_context())
        if tls is None:
            raise TransportError(f"the RDP host offers no TLS (confirm {confirm.data.hex()})")
        return certificate_sha256(tls)
    finally:
        await stream.aclose()
