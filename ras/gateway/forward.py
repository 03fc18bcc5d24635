"""Forwarding mode: pass every connection on to the next gateway, with the client's address.

Theory of operation. A forwarding gateway (a DMZ front) serves nobody itself. Each connection
comes through the same front door as a normal gateway's (limits, the handshake deadline, a
PROXY v2 header of its own trusted proxies naming the real client), then goes to the first
healthy gateway of ``next_hops``: plain port to plain port, TLS port to TLS port, RDP port to
RDP port (the hop's ``rdp_port``: native RDP clients with routing tokens). It writes a PROXY v2
header naming the client (so the next gateway, which must trust this one in its
``trusted_proxies``, sees the original client, binds tickets and applies filters to it), then
relays bytes unchanged. TLS passes through untouched, so the client's TLS session
ends at the gateway that serves it; with ``terminate_tls`` the forwarder ends the client's TLS
itself and opens its own TLS to the next hop, verifying the next hop's certificate.

The header carries the gateway path too: a TLV of type ``PATH_TLV`` (0xE0, the first of the
types the PROXY protocol leaves for custom use) listing the names of the forwarders passed so
far, so the serving gateway's audit line says ``path=dmz1>dmz2>gw1``. A proxy that sends no
such TLV (a HALB node, haproxy) appears in the path as its address. A forwarder that finds its
own name in the incoming path refuses the connection: the chain loops. A trusted proxy's own
control-protocol connection (its health check) is passed on with a ``CHECK_TLV`` (0xE1), so
that every gateway down the chain knows it for one and audits it at DEBUG, not INFO.

Each forwarded connection is a tunnel of the gateway (``ras.gateway.tunnels``): the idle
timeout and the drain apply, and it gets the gateway's one audit line (``via=forward``).

Next hops are health-checked with the control protocol (``ras.net.health.probe``, as the HALB
does): a hop that fails a check, or a connection, is skipped until it passes a check again.
Before the first check every hop is tried in order. Chains of any length work the same way:
each forwarder's health check goes through the rest of the chain to a serving gateway.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass

import trio

from ras.errors import LocalProtocolError, RasError, TransportError
from ras.gateway.config import GatewayConfig, NextHop
from ras.gateway.front import CHECK_TLV, PATH_TLV, Conn, Port, encode_path
from ras.gateway.link import SOFTWARE
from ras.gateway.tunnels import TunnelInfo, Tunnels, Via, format_path
from ras.net.channel import aclose_quietly
from ras.net.health import probe
from ras.net.reasons import transport_errors
from ras.net.relay import socket_of
from ras.net.tls import connect_tcp
from ras.protocol import encode_v2, encode_v2_local

__all__ = ["Forwarder"]

log = logging.getLogger("ras.gateway")
Peer = tuple[str, int]


@dataclass(slots=True)
class _Hop:
    hop: NextHop
    healthy: bool | None = None  # None: not checked yet
    last_error: str = ""


class Forwarder:
    """The next hops of a forwarding gateway: health, choice, and the connection to one."""

    def __init__(
        self, config: GatewayConfig, upstream_tls: ssl.SSLContext | None, tunnels: Tunnels
    ) -> None:
        self.config = config
        self.hops = [_Hop(h) for h in config.next_hops]
        self._upstream_tls = upstream_tls
        self._tunnels = tunnels

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

    async def serve(self, stream: trio.abc.Stream, conn: Conn) -> None:
        """Pass ``conn`` on to a next hop and relay until either side ends."""
        cfg = self.config
        if cfg.name in conn.path:
            log.warning(
                "refused client=%s:%d reason=forwarding loop path=%s",
                *conn.client,
                format_path(conn.path),
            )
            return
        path = (*conn.path, cfg.name)
        try:
            upstream, target = await self.connect(
                conn.client, _local_address(stream), path, conn.port, check=conn.proxy_check
            )
        except TransportError as exc:
            log.warning("forward failed client=%s:%d reason=%s", *conn.client, exc)
            return
        conn.tunnelled()  # the next gateway holds the client to its own deadline from here
        info = TunnelInfo(
            via=Via.FORWARD,
            client=conn.client,
            target=target,
            gateway=cfg.name,
            path=path,
            tls=conn.port is Port.TLS,
            health_check=conn.proxy_check,
        )
        await self._tunnels.run(info, stream, upstream)

    async def connect(
        self,
        client: Peer,
        local: Peer,
        path: tuple[str, ...],
        port: Port,
        *,
        check: bool = False,
    ) -> tuple[trio.abc.Stream, Peer]:
        """A connection to the same port of the first next hop that takes it, PROXY v2 header
        sent (and with ``terminate_tls`` on the TLS port, TLS to it established and verified);
        with it, the hop's address and port. ``check``: a proxy's health check passed on."""
        cfg = self.config
        header = _header(client, local, path, check)
        errors = []
        for hop in self.candidates():
            hop_port = _port_of(hop.hop, port)
            try:
                with trio.fail_after(cfg.connect_timeout_s):
                    tcp = await connect_tcp(
                        hop.hop.host, hop_port, source=cfg.source_address or None
                    )
                    try:
                        with transport_errors("cannot send the PROXY v2 header"):
                            await tcp.send_all(header)
                        if port is Port.TLS and self._upstream_tls is not None:
                            return await self._tls(tcp, hop.hop), (hop.hop.host, hop_port)
                    except BaseException:
                        await aclose_quietly(tcp)
                        raise
                    return tcp, (hop.hop.host, hop_port)
            except (RasError, trio.TooSlowError) as exc:
                why = str(exc) or "connect timeout"
                errors.append(f"{hop.hop.host}:{hop_port}: {why}")
                if hop.healthy is not False:
                    self._mark(hop, ok=False, why=f"forward: {why}")
        raise TransportError("no next hop took the connection (" + "; ".join(errors) + ")")

    async def _tls(self, tcp: trio.SocketStream, hop: NextHop) -> trio.abc.Stream:
        assert self._upstream_tls is not None
        name = self.config.next_hop_server_name or hop.host
        stream = trio.SSLStream(tcp, self._upstream_tls, server_hostname=name)
        with transport_errors(f"TLS with {hop}", handshake=True):
            await stream.do_handshake()
        return stream


def _port_of(hop: NextHop, port: Port) -> int:
    match port:
        case Port.PLAIN:
            return hop.plain_port
        case Port.TLS:
            return hop.tls_port
        case Port.RDP:
            return hop.rdp_port


def _local_address(stream: trio.abc.Stream) -> Peer:
    sock = socket_of(stream)
    if sock is not None:
        try:
            host, port = sock.getsockname()[:2]
            return str(host), int(port)
        except OSError:
            pass
    return ("0.0.0.0", 0)


def _header(client: Peer, local: Peer, path: tuple[str, ...], check: bool) -> bytes:
    tlvs = [(PATH_TLV, encode_path(path))]
    if check:
        tlvs.append((CHECK_TLV, b""))
    try:
        ipaddress.ip_address(client[0])
        ipaddress.ip_address(local[0])
        return encode_v2(client, local, tlvs=tlvs)
    except (ValueError, LocalProtocolError):  # no client address to give (not TCP)
        return encode_v2_local(tlvs=tlvs)
