"""The gateway's open tunnels (and forwarded connections): audit, idle timeout, drain.

Each relayed connection is registered while it runs. When it ends, one audit line says who,
what, from where, to where, through which gateways, how many bytes each way and for how long.

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
import logging
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from ras.net.relay import socket_of

__all__ = ["Tunnel", "Tunnels", "format_path"]

log = logging.getLogger("ras.gateway")
_TCP_INFO_LAST_DATA_RECV = 52  # offset of tcpi_last_data_recv (u32, ms) in struct tcp_info
_TCP_INFO_SIZE = 104


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


@dataclass(slots=True, eq=False)
class Tunnel:
    """One relayed connection while it runs."""

    client: tuple[str, int]
    path: tuple[str, ...]
    sides: tuple[trio.abc.Stream, trio.abc.Stream]
    started: float = field(default_factory=time.monotonic)
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
        return time.monotonic() - self.started


class Tunnels:
    """The open tunnels of one gateway."""

    def __init__(self) -> None:
        self._open: set[Tunnel] = set()
        self._empty = trio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(
        self,
        client: tuple[str, int],
        path: tuple[str, ...],
        a: trio.abc.Stream,
        b: trio.abc.Stream,
    ) -> Iterator[Tunnel]:
        tunnel = Tunnel(client, path, (a, b))
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
                        "tunnel idle client=%s:%d path=%s idle_s=%.0f: closing",
                        *tunnel.client,
                        format_path(tunnel.path),
                        idle / 1000,
                    )
                    tunnel.shut("idle timeout")
