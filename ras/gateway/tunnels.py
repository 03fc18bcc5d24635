"""The gateway's open tunnels, of every kind: audit, idle timeout, drain.

A tunnel is any connection the gateway relays: a ticketed tunnel of a client session
(``via=ticket``), an RDP-port connection routed by a routing token or an mstshash cookie
(``via=token``, ``via=mstshash``), a connection a forwarding gateway passes on to its next
hop (``via=forward``) and a browser's RDP through the web client's WebSocket (``via=web``).
Each is registered while it runs (:meth:`Tunnels.run`); when it ends, one
audit line (:func:`audit`, the same for every kind) says who, what, from where, to where,
through which gateways, how many bytes each way and for how long.

Ending a tunnel from outside (idle timeout, the end of a drain) never closes its sockets under
the relay's feet (a closed descriptor number can be reused by the next accept before the relay
notices): it shuts both sockets down (``shutdown(SHUT_RDWR)``), the relay sees the ends of
stream, finishes as usual, closes what it owns and returns its byte counts for the audit.

The idle timeout reads the kernel's own clock of each socket (``TCP_INFO``
``tcpi_last_data_recv``: milliseconds since data last arrived), so the relay's fast paths
(splice, pooled buffers) need no bookkeeping: one sweep over the open tunnels every quarter of
the timeout.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from ras.net.relay import RelayStats, relay, socket_of
from ras.ops import metrics

__all__ = ["Tunnel", "TunnelInfo", "Tunnels", "Via", "audit", "format_path"]

log = logging.getLogger("ras.gateway")
_TCP_INFO_LAST_DATA_RECV = 52  # offset of tcpi_last_data_recv (u32, ms) in struct tcp_info
_TCP_INFO_SIZE = 104
Peer = tuple[str, int]


def format_path(path: tuple[str, ...]) -> str:
    return ">".join(path) or "-"


def _idle_ms(sock: trio.socket.SocketType) -> int | None:
    """Milliseconds since data last arrived on ``sock`` (None: not a TCP socket we can ask)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    if len(info) < _TCP_INFO_LAST_DATA_RECV + 4:
        return None
    (ms,) = struct.unpack_from("I", info, _TCP_INFO_LAST_DATA_RECV)
    return int(ms)


class Via(enum.StrEnum):
    """How a tunnel came to be (the audit line's ``via``)."""

    TICKET = "ticket"  # a client session's tunnel, opened with a launch ticket
    TOKEN = "token"  # an RDP-port connection routed by its routing token
    MSTSHASH = "mstshash"  # an RDP-port connection routed by its mstshash user name
    FORWARD = "forward"  # a connection a forwarding gateway passed on
    WEB = "web"  # a browser's RDP, through the web client's WebSocket (ras.gateway.webclient)


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """What the audit line says of a tunnel besides its bytes and duration.

    ``via``: how it came to be. ``target``: the RDP host, or
    for a forward the next hop (host and the port connected to). ``path``: the gateways the
    connection went through, this one included. ``user`` and ``resource``: where the broker
    said (a forwarder does not know them), and ``session``, the farm's id of the session
    (``session=`` in the broker's and agent's lines too). ``health_check``: a proxy's own
    check passed on by a forwarder, audited at DEBUG (several a second with default
    intervals).
    """

    via: Via
    client: Peer
    target: Peer
    gateway: str
    path: tuple[str, ...]
    tls: bool = False
    user: str = ""
    resource: str = ""
    health_check: bool = False
    session: str = ""  # the farm's id of the session (from the broker), where there is one

    def describe(self) -> str:
        who = f"user={self.user} resource={self.resource} " if self.user else ""
        to = "next_hop" if self.via is Via.FORWARD else "rdp"
        return (
            f"{who}client={self.client[0]}:{self.client[1]} "
            f"{to}={self.target[0]}:{self.target[1]} "
            f"gateway={self.gateway} path={format_path(self.path)} via={self.via} tls={self.tls}"
            + (f" session={self.session}" if self.session else "")
        )


@dataclass(slots=True, eq=False)
class Tunnel:
    """One relayed connection while it runs."""

    info: TunnelInfo
    sides: tuple[trio.abc.Stream, trio.abc.Stream]
    started: float = field(default_factory=trio.current_time)
    ended_by: str = ""  # why the gateway ended it (idle, drain); empty: the peers did

    def shut(self, why: str) -> None:
        """End it from outside: both sockets shut down, the relay finishes by itself."""
        if not self.ended_by:
            self.ended_by = why
        for side in self.sides:
            sock = socket_of(side)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def idle_ms(self) -> int | None:
        """Milliseconds since data last arrived from either side (None: unknown)."""
        times = [
            ms
            for ms in (_idle_ms(s) for s in map(socket_of, self.sides) if s is not None)
            if ms is not None
        ]
        return min(times) if len(times) == len(self.sides) else None

    @property
    def seconds(self) -> float:
        return trio.current_time() - self.started


class Tunnels:
    """The open tunnels of one gateway."""

    def __init__(self) -> None:
        self._open: set[Tunnel] = set()
        self._empty = trio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Tunnel]:
        """The tunnels open now (a copy: they may end while the caller looks)."""
        return iter(list(self._open))

    async def run(self, info: TunnelInfo, a: trio.abc.Stream, b: trio.abc.Stream) -> RelayStats:
        """Relay ``a`` (the client's side) and ``b`` until both ends are done, registered the
        while (idle timeout, drain); log the tunnel's opening and its audit line. Closes both
        streams."""
        quiet = info.health_check or info.via is Via.FORWARD  # one line per forward is enough
        log.log(logging.DEBUG if quiet else logging.INFO, "tunnel open %s", info.describe())
        counted = not info.health_check  # a proxy's check passed on is not a user's tunnel
        if counted:
            metrics.tunnel_opened(info.via)
        stats = RelayStats()
        started = trio.current_time()
        try:
            with self.track(info, a, b) as tunnel:
                stats = await relay(a, b)
        finally:  # counted once, at the end, from the relay's totals: nothing per read
            if counted:
                seconds = trio.current_time() - started
                metrics.tunnel_closed(info.via, stats.a_to_b, stats.b_to_a, seconds)
        audit(tunnel, stats)
        return stats

    @contextlib.contextmanager
    def track(self, info: TunnelInfo, a: trio.abc.Stream, b: trio.abc.Stream) -> Iterator[Tunnel]:
        tunnel = Tunnel(info, (a, b))
        if not self._open:
            self._empty = trio.Event()
        self._open.add(tunnel)
        try:
            yield tunnel
        finally:
            self._open.discard(tunnel)
            if not self._open:
                self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def shut_all(self, why: str) -> int:
        tunnels = list(self._open)
        for tunnel in tunnels:
            tunnel.shut(why)
        return len(tunnels)

    async def sweep_idle(self, timeout_s: float) -> None:
        """End tunnels that carried no byte either way for ``timeout_s``; runs until cancelled."""
        limit_ms = timeout_s * 1000
        while True:
            await trio.sleep(max(timeout_s / 4, 0.25))
            for tunnel in list(self._open):
                idle = tunnel.idle_ms()
                if idle is not None and idle >= limit_ms:
                    log.info(
                        "tunnel idle client=%s:%d path=%s via=%s idle_s=%.0f: closing",
                        *tunnel.info.client,
                        format_path(tunnel.info.path),
                        tunnel.info.via,
                        idle / 1000,
                    )
                    tunnel.shut("idle timeout")


def audit(tunnel: Tunnel, stats: RelayStats) -> None:
    """The audit line of a tunnel of any kind, written once, when it has ended."""
    log.log(
        logging.DEBUG if tunnel.info.health_check else logging.INFO,
        "tunnel closed %s bytes_up=%d bytes_down=%d seconds=%.1f reset=%s%s",
        tunnel.info.describe(),
        stats.a_to_b,
        stats.b_to_a,
        tunnel.seconds,
        stats.reset,
        f" ended_by={tunnel.ended_by}" if tunnel.ended_by else "",
    )
