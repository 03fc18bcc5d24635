"""What every port of the gateway shares on the way in: who a connection is from, what it speaks.

Theory of operation. The gateway has one front door (``Gateway.front_door``) for all its
ports: plain, TLS and RDP (``Port``). Each accepted connection becomes a :class:`Conn`, which
carries its two deadlines, both absolute from the accept: the handshake deadline (sniffing, a
PROXY v2 header, the TLS handshake, an RDP client's X.224 Connection Request) and the
pre-authentication deadline (until the user logged in or a tunnel opened). It holds a
pre-authentication slot of its client's address (``ras.gateway.limits``) until then, and a
cancel scope that a drain cancels until it became a tunnel, which a drain lets run.

:func:`read_front` sniffs the first bytes. A PROXY v2 header (a HALB node or forwarding gateway
relaying a client) is read only from a trusted proxy: the client it names is the connection's
client from then on, for the broker, the limits and the logs, its gateway path (a custom TLV,
``PATH_TLV``) is kept, and the rest of the stream is sniffed again; from anyone else it is
refused. A trusted proxy's own control-protocol connection (no header, a LOCAL one, or a
forwarding gateway's ``CHECK_TLV``) is a health check.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from ras.errors import RemoteProtocolError, TransportError
from ras.gateway.limits import Slot
from ras.gateway.tunnels import format_path
from ras.net.reasons import transport_errors
from ras.net.sniff import Kind, PrefixedStream, sniff
from ras.protocol import ProxyCommand, ProxyHeader, parse_v2

__all__ = [
    "CHECK_TLV",
    "MAX_PATH",
    "PATH_TLV",
    "Conn",
    "Port",
    "TrustedProxies",
    "decode_path",
    "encode_path",
    "read_front",
]

log = logging.getLogger("ras.gateway")
PATH_TLV = 0xE0  # PP2_TYPE_MIN_CUSTOM: the gateway path
CHECK_TLV = 0xE1  # empty: a proxy's health check, passed on by a forwarding gateway
MAX_PATH = 32
_HOP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@\[\]-]{0,127}")
_PROXY_READ = 4096
Peer = tuple[str, int]


class Port(enum.Enum):
    """The gateway's ports; what each serves is the front door's ``match``."""

    PLAIN = "plain"
    TLS = "tls"
    RDP = "rdp"


@dataclass(slots=True, eq=False)
class Conn:
    """One accepted connection on its way in: who it is from, its deadlines, its slot."""

    port: Port
    peer: Peer
    client: Peer  # the peer, or the client a trusted proxy's header names
    deadline: float  # pre-authentication, absolute from accept
    handshake_deadline: float  # sniffing, PROXY header, TLS, X.224 request: from accept
    sessions: set[trio.CancelScope]  # the gateway's connections that a drain ends
    path: tuple[str, ...] = ()
    tls: bool = False
    proxy_check: bool = False  # a trusted proxy's own connection: its health check
    slot: Slot | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def __post_init__(self) -> None:
        self.sessions.add(self.scope)

    def release(self) -> None:
        """Authenticated (or a tunnel opened, or forwarded): the pre-auth slot is free."""
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def tunnelled(self) -> None:
        """Its tunnel is open: the slot is free, and a drain lets it run (up to the drain
        timeout) instead of ending it."""
        self.release()
        self.sessions.discard(self.scope)

    def close(self) -> None:
        """The connection is over, however it ended (idempotent)."""
        self.tunnelled()


class TrustedProxies:
    """The networks whose PROXY v2 headers are believed (``trusted_proxies``)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n) for n in networks)

    def __contains__(self, host: object) -> bool:
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:  # "unknown": no socket address to trust
            return False
        return any(address in network for network in self._networks)


async def read_front(
    stream: trio.abc.Stream, conn: Conn, *, trusted: bool
) -> tuple[Kind, PrefixedStream] | None:
    """Sniff a new connection (``trusted``: from a trusted proxy). A PROXY v2 header is read,
    the client it names becomes ``conn.client`` (after LOCAL, a health check, the proxy itself
    stays the client), its gateway path ``conn.path``, and the stream behind it is sniffed.
    None when refused (logged). The caller owns the deadline."""
    peer = conn.peer
    kind, sniffed = await sniff(stream)
    if kind is not Kind.PROXY_V2:
        conn.proxy_check = trusted and kind is Kind.CONTROL  # the proxy's own ping
        return kind, sniffed
    if not trusted:
        log.info("refused peer=%s:%d reason=PROXY v2 from an untrusted source", *peer)
        return None
    try:
        header, rest = await _read_proxy_header(sniffed)
    except RemoteProtocolError as exc:
        log.info("refused peer=%s:%d reason=bad PROXY v2 header: %s", *peer, exc)
        return None
    path = path_of(header.tlvs, peer[0])
    if path is None:
        log.info("refused peer=%s:%d reason=bad gateway path in the PROXY v2 header", *peer)
        return None
    conn.client = peer if header.source is None else header.source
    conn.path = path
    log.debug(
        "proxy header peer=%s:%d command=%s client=%s:%d path=%s",
        *peer,
        header.command.name.lower(),
        *conn.client,
        format_path(path),
    )
    try:
        kind, sniffed = await sniff(rest)
    except TransportError:
        if header.command is not ProxyCommand.LOCAL:
            raise
        # a proxy's TCP health check: connect, LOCAL header, close; not worth an info line
        log.debug("health check peer=%s:%d", *peer)
        return None
    own = header.source is None or any(t == CHECK_TLV for t, _ in header.tlvs)
    conn.proxy_check = own and kind is Kind.CONTROL
    return kind, sniffed


async def _read_proxy_header(stream: PrefixedStream) -> tuple[ProxyHeader, PrefixedStream]:
    """Read a whole PROXY v2 header; return it and the stream that follows it (bytes read past
    the header are put back). A bad header is a ``RemoteProtocolError``; the caller owns
    the deadline."""
    buffer = b""
    while (header := parse_v2(buffer)) is None:
        with transport_errors("connection lost in the PROXY v2 header"):
            data = await stream.receive_some(_PROXY_READ)
        if not data:
            raise TransportError("connection closed in the middle of the PROXY v2 header")
        buffer += data
    return header, PrefixedStream(stream, buffer[header.length :])


# -- the gateway path TLV ----------------------------------------------------------------------


def encode_path(path: tuple[str, ...]) -> bytes:
    return ",".join(path).encode("ascii")


def decode_path(value: bytes) -> tuple[str, ...] | None:
    """The gateway path of a PATH TLV, or None if it is not one (bad names, too long)."""
    try:
        names = tuple(value.decode("ascii").split(",")) if value else ()
    except UnicodeDecodeError:
        return None
    if len(names) > MAX_PATH or not all(_HOP_NAME.fullmatch(n) for n in names):
        return None
    return names


def path_of(tlvs: tuple[tuple[int, bytes], ...], proxy: str) -> tuple[str, ...] | None:
    """The path a trusted proxy's header says the connection took (the proxy's own address when
    it sends no path); None when the path TLV is malformed."""
    for kind, value in tlvs:
        if kind == PATH_TLV:
            return decode_path(value)
    return (proxy,)
