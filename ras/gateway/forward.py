"""Forwarding mode: pass every connection on to the next gateway, with the client's address.

Theory of operation. A forwarding gateway (a DMZ front) serves nobody itself. Each connection
(after a PROXY v2 header of its own trusted proxies, if any, which names the real client) goes
to the first healthy gateway of ``next_hops``: plain port to plain port, TLS port to TLS port.
It writes a PROXY v2 header naming the client (so the next gateway, which must trust this one
in its ``trusted_proxies``, sees the original client, binds tickets and applies filters to
it), then relays bytes unchanged. TLS passes through untouched, so the client's TLS session
ends at the gateway that serves it; with ``terminate_tls`` the forwarder ends the client's TLS
itself and opens its own TLS to the next hop, verifying the next hop's certificate.

The header carries the gateway path too: a TLV of type ``PATH_TLV`` (0xE0, the first of the
types the PROXY protocol leaves for custom use) listing the names of the forwarders passed so
far, so the serving gateway's audit line says ``path=dmz1>dmz2>gw1``. A proxy that sends no
such TLV (a HALB node, haproxy) appears in the path as its address. A forwarder that finds its
own name in the incoming path refuses the connection: the chain loops.

Next hops are health-checked with the control protocol (``ras.net.health.probe``, as the HALB
does): a hop that fails a check, or a connection, is skipped until it passes a check again.
Before the first check every hop is tried in order. Chains of any length work the same way:
each forwarder's health check goes through the rest of the chain to a serving gateway.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
from dataclasses import dataclass

import trio

from ras import __version__
from ras.errors import LocalProtocolError, RasError, TransportError
from ras.gateway.config import GatewayConfig, NextHop
from ras.net.channel import aclose_quietly
from ras.net.health import probe
from ras.net.tls import connect_tcp
from ras.protocol import encode_v2, encode_v2_local

__all__ = ["MAX_PATH", "PATH_TLV", "Forwarder", "decode_path", "encode_path"]

log = logging.getLogger("ras.gateway")
SOFTWARE = f"ras-gateway/{__version__}"
PATH_TLV = 0xE0  # PP2_TYPE_MIN_CUSTOM
MAX_PATH = 32
_HOP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@\[\]-]{0,127}")


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


@dataclass(slots=True)
class _Hop:
    hop: NextHop
    healthy: bool | None = None  # None: not checked yet
    last_error: str = ""


class Forwarder:
    """The next hops of a forwarding gateway: health, choice, and the connection to one."""

    def __init__(self, config: GatewayConfig, upstream_tls: ssl.SSLContext | None) -> None:
        self.config = config
        self.hops = [_Hop(h) for h in config.next_hops]
        self._upstream_tls = upstream_tls

    # -- health --------------------------------------------------------------------------------

    async def check(self, hop: _Hop) -> None:
        cfg = self.config
        try:
            with trio.fail_after(cfg.health_timeout_s):
                await probe(
                    hop.hop.host,
                    hop.hop.plain_port,
                    software=SOFTWARE,
                    source=cfg.source_address or None,
                )
        except (RasError, trio.TooSlowError) as exc:
            self._mark(hop, ok=False, why=str(exc) or "timed out")
        else:
            self._mark(hop, ok=True, why="")

    def _mark(self, hop: _Hop, *, ok: bool, why: str) -> None:
        if ok and hop.healthy is not True:
            log.warning("next hop up hop=%s", hop.hop)
        elif not ok and hop.healthy is not False:
            log.warning("next hop down hop=%s reason=%s", hop.hop, why)
        hop.healthy = ok
        hop.last_error = why

    async def health_loop(self) -> None:
        while True:
            async with trio.open_nursery() as nursery:
                for hop in self.hops:
                    nursery.start_soon(self.check, hop)
            await trio.sleep(self.config.health_interval_s)

    def candidates(self) -> list[_Hop]:
        """Healthy hops first (in configured order), then the unchecked, then the down ones (a
        last resort when every check failed: a connection may still get through)."""
        order = {True: 0, None: 1, False: 2}
        return sorted(self.hops, key=lambda h: order[h.healthy])

    # -- forwarding ----------------------------------------------------------------------------

    async def connect(
        self,
        client: tuple[str, int],
        local: tuple[str, int],
        path: tuple[str, ...],
        *,
        tls_port: bool,
    ) -> tuple[trio.abc.Stream, NextHop]:
        """A connection to the first next hop that takes it, PROXY v2 header sent (and with
        ``terminate_tls`` on the TLS port, TLS to it established and verified)."""
        cfg = self.config
        header = _header(client, local, path)
        errors = []
        for hop in self.candidates():
            port = hop.hop.tls_port if tls_port else hop.hop.plain_port
            try:
                with trio.fail_after(cfg.connect_timeout_s):
                    tcp = await connect_tcp(hop.hop.host, port, source=cfg.source_address or None)
                    try:
                        await tcp.send_all(header)
                        if tls_port and self._upstream_tls is not None:
                            return await self._tls(tcp, hop.hop), hop.hop
                    except BaseException:
                        await aclose_quietly(tcp)
                        raise
                    return tcp, hop.hop
            except (RasError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                why = str(exc) or "connect timeout"
                errors.append(f"{hop.hop}: {why}")
                if hop.healthy is not False:
                    self._mark(hop, ok=False, why=f"forward: {why}")
        raise TransportError("no next hop took the connection (" + "; ".join(errors) + ")")

    async def _tls(self, tcp: trio.SocketStream, hop: NextHop) -> trio.abc.Stream:
        assert self._upstream_tls is not None
        name = self.config.next_hop_server_name or hop.host
        stream = trio.SSLStream(tcp, self._upstream_tls, server_hostname=name)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            raise TransportError(f"TLS with {hop}: {exc.__cause__ or exc}") from exc
        return stream


def _header(client: tuple[str, int], local: tuple[str, int], path: tuple[str, ...]) -> bytes:
    tlvs = [(PATH_TLV, encode_path(path))]
    try:
        ipaddress.ip_address(client[0])
        ipaddress.ip_address(local[0])
        return encode_v2(client, local, tlvs=tlvs)
    except (ValueError, LocalProtocolError):  # no client address to give (not TCP)
        return encode_v2_local(tlvs=tlvs)
