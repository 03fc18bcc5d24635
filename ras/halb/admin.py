"""The HALB's admin port: JSON status, drain/undrain a gateway, reload the config.

    GET  /status                      state, VIPs, master, gateways and their health
    POST /gateways/<name>/drain       no new connections to <name>; open ones run on
    POST /gateways/<name>/undrain
    POST /reload                      re-read the gateway list from the config file

It listens on ``admin_host`` (loopback by default): whoever can reach it administers the HALB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from ras.errors import RasError
from ras.net.http import MAX_REQUEST_HEAD, read_request, respond

__all__ = ["AdminApi", "serve_admin"]

log = logging.getLogger("ras.halb")


class AdminApi:
    """What the admin port can ask of the daemon (implemented by ``Halb``)."""

    status: Callable[[], dict[str, Any]]
    drain: Callable[[str, bool], bool]
    reload: Callable[[], Awaitable[str]]


async def _handle(api: AdminApi, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    got = await read_request(stream, conn)
    if got is None:
        return
    request, _ = got
    method = request.method.decode()
    path = request.target.decode("ascii", "replace").split("?")[0].rstrip("/")
    parts = path.split("/")
    answer: dict[str, Any] = {"error": f"no such resource: {method} {path}"}
    status = 404
    try:
        if method == "GET" and path == "/status":
            status, answer = 200, api.status()
        elif (
            method == "POST"
            and len(parts) == 4
            and parts[1] == "gateways"
            and parts[3] in ("drain", "undrain")
        ):
            if api.drain(parts[2], parts[3] == "drain"):
                status, answer = 200, {"gateway": parts[2], "draining": parts[3] == "drain"}
            else:
                status, answer = 404, {"error": f"no gateway {parts[2]!r}"}
        elif method == "POST" and path == "/reload":
            status, answer = 200, {"reloaded": await api.reload()}
    except RasError as exc:
        status, answer = 400, {"error": str(exc)}
    log.info("admin %s %s -> %d", method, path, status)
    body = json.dumps(answer, indent=2, sort_keys=True).encode() + b"\n"
    await respond(stream, conn, status, body, content_type="application/json")


async def serve_admin(
    api: AdminApi,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    from ras.net.listen import serve_tcp

    async def handler(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        with trio.fail_after(10):
            await _handle(api, stream)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: serve_tcp(
                handler, host, port, log=log, what="admin", task_status=task_status
            )
        )
        task_status.started(bound[0])
