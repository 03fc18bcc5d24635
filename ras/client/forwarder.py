"""The client's local forwarder: an RDP client connects to 127.0.0.1:port, and each of its
connections is carried to the launched resource (a tunnel through the gateway in the gateway
modes, a direct connection to the host in the direct modes), with a fresh launch each time."""

from __future__ import annotations

import logging

import trio

from ras.client.session import ClientSession
from ras.errors import RasError
from ras.net.listen import serve_tcp
from ras.net.relay import relay
from ras.net.tls import connect_tcp
from ras.protocol import LaunchOk

__all__ = ["serve_forwarder"]

log = logging.getLogger("ras.client")


async def serve_forwarder(
    session: ClientSession,
    resource: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    first: LaunchOk | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` until cancelled; ``started`` gets the bound address. ``first``:
    a launch already made (the caller's, to learn what it starts), used by the first
    connection while its ticket is fresh; every other connection launches anew."""
    unused = [first] if first is not None else []

    async def forward(local: trio.abc.Stream, peer: tuple[str, int]) -> None:
        try:
            launched = unused.pop() if unused else await session.launch(resource)
            if launched.mode.tunnelled:
                remote = await session.open_tunnel(launched.ticket)
            else:
                with trio.fail_after(session.config.connect_timeout_s):
                    remote = await connect_tcp(launched.host, launched.port)
        except RasError as exc:
            log.warning("cannot forward local=%s:%d resource=%s reason=%s", *peer, resource, exc)
            return
        session_id = launched.session or "-"  # the farm's id, in the farm's logs too
        log.info(
            "forwarding local=%s:%d resource=%s to=%s:%d mode=%s session=%s",
            *peer,
            resource,
            launched.host,
            launched.port,
            launched.mode,
            session_id,
        )
        stats = await relay(local, remote)
        log.info(
            "forward closed local=%s:%d bytes_up=%d bytes_down=%d session=%s",
            *peer,
            stats.a_to_b,
            stats.b_to_a,
            session_id,
        )

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: serve_tcp(
                forward, host, port, log=log, what="forwarder", task_status=task_status
            )
        )
        task_status.started(bound[0])
