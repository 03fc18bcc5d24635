"""The ``/metrics`` listener a daemon runs when its config has ``[metrics] port``.

One request per connection on h11 (``ras.net.http``), as the admin APIs do. A source address
not in ``allow`` is closed before a byte is read (loopback listeners take loopback only); off
loopback the connection is TLS with ``cert_file``. ``GET /metrics`` (or ``HEAD``) answers the
registry in Prometheus's text format; anything else is 404 or 405. A scrape reads the daemons'
state in the event loop's thread (``ras.ops.metrics`` sources), so it sees a consistent state
and never races the handlers that change it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from functools import partial

import h11
import trio

from ras.net.http import read_request, respond
from ras.net.listen import serve_tcp
from ras.net.reasons import transport_errors
from ras.ops.config import MetricsConfig, is_loopback
from ras.ops.metrics import Sample, render, source
from ras.pki import server_context

__all__ = ["CONTENT_TYPE", "serve_metrics", "start_metrics"]

log = logging.getLogger("ras.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DEADLINE_S = 10.0


async def serve_metrics(
    config: MetricsConfig,
    *,
    port_offset: int = 0,
    port: int | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on ``config.listen_host:config.port + port_offset`` (a gateway's
    worker N listens on port + N; ``port`` overrides both, 0 for any free port) until
    cancelled; ``started`` gets the bound address."""
    context = None
    if config.cert_file is not None and config.key_file is not None:
        context = server_context(config.cert_file, config.key_file)
    networks = config.networks()
    loopback_only = not networks and is_loopback(config.listen_host)

    def allowed(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 scraper on a dual-stack listener
        if loopback_only:
            return ip.is_loopback
        return any(ip in net for net in networks)

    async def handle(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        if not allowed(peer[0]):
            log.warning("metrics refused peer=%s:%d reason=not in allow", *peer)
            # Forcefully: a TLS stream's graceful close would first complete the handshake
            # (to send close_notify), reading the peer's hello and showing our certificate.
            await trio.aclose_forcefully(stream)
            return
        with trio.move_on_after(_DEADLINE_S):
            if isinstance(stream, trio.SSLStream):
                with transport_errors("TLS handshake failed", handshake=True):
                    await stream.do_handshake()
            conn = h11.Connection(h11.SERVER)
            got = await read_request(stream, conn)
            if got is None:
                return
            request, _ = got
            target = request.target.split(b"?", 1)[0]
            if target != b"/metrics":
                await respond(stream, conn, 404, b"only /metrics is here\n")
            elif request.method not in (b"GET", b"HEAD"):
                await respond(stream, conn, 405, b"GET /metrics\n", headers=[("allow", "GET")])
            else:
                await respond(stream, conn, 200, render(), content_type=CONTENT_TYPE)

    port = config.port + port_offset if port is None else port
    listen = partial(
        serve_tcp, handle, config.listen_host, port, log=log, what="metrics", ssl_context=context
    )
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(listen)
        task_status.started(addresses[0])


async def _hold(state: Callable[[], Iterable[Sample]]) -> None:
    with source(state):
        await trio.sleep_forever()


async def start_metrics(
    nursery: trio.Nursery,
    config: MetricsConfig | None,
    state: Callable[[], Iterable[Sample]] | None = None,
    *,
    port_offset: int = 0,
) -> tuple[str, int] | None:
    """What a daemon does at start: its ``state`` read at every scrape while ``nursery`` runs,
    and, if ``config`` enables it, the ``/metrics`` listener (its address; None if off)."""
    if state is not None:
        nursery.start_soon(_hold, state)
    if config is None or not config.enabled:
        return None
    address: tuple[str, int] = await nursery.start(
        partial(serve_metrics, config, port_offset=port_offset)
    )
    return address
