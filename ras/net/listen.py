"""Listeners for the daemons: TCP or TLS, handlers in their own nursery, failures contained.

A handler gets a ``trio.abc.Stream`` and the peer's address. Whatever it raises is logged and
ends that connection only, never the listener or the daemon.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ras.errors import RasError
from ras.net.channel import aclose_quietly

__all__ = ["Handler", "open_listeners", "peer_address", "serve_tcp", "set_reuse_port_default"]

Handler = Callable[[trio.abc.Stream, tuple[str, int]], Awaitable[None]]

# Set in each worker process (``ras.net.workers``): every listener of the process is shared
# with the other workers through SO_REUSEPORT.
_reuse_port_default = False


def set_reuse_port_default(on: bool) -> None:
    """Make ``serve_tcp`` share its ports (SO_REUSEPORT) unless told otherwise."""
    global _reuse_port_default
    _reuse_port_default = on


async def open_listeners(
    host: str, port: int, *, backlog: int = 1024, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners``, and with ``reuse_port`` sockets that set SO_REUSEPORT,
    so several processes can bind the same port and the kernel spreads connections over
    them."""
    if not reuse_port:
        return list(await trio.open_tcp_listeners(port, host=host, backlog=backlog))
    listeners = []
    infos = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    try:
        for family, type_, proto, _, sockaddr in infos:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for lst in listeners:
            lst.socket.close()
        raise
    return listeners


def peer_address(stream: trio.abc.Stream) -> tuple[str, int]:
    inner: object = stream
    for _ in range(8):
        sock = getattr(inner, "socket", None)
        if sock is not None:
            try:
                host, port = sock.getpeername()[:2]
            except OSError:
                break
            return str(host), int(port)
        inner = getattr(inner, "transport_stream", None)
        if inner is None:
            break
    return ("unknown", 0)


async def serve_tcp(
    handler: Handler,
    host: str,
    port: int,
    *,
    log: logging.Logger,
    what: str,
    ssl_context: ssl.SSLContext | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``host:port`` (0: any free port) until cancelled; ``started`` gets the bound
    addresses. With ``ssl_context`` the streams are TLS (the handshake is the handler's job,
    under its own deadline). Handlers run in ``handler_nursery`` if given (then cancelling
    this listener only stops accepting: a graceful drain), else in a nursery of its own."""
    try:
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
            await trio.open_tcp_listeners(port, host=host, backlog=1024)
        )
    except OSError as exc:
        raise RasError(f"{what}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context) for lst in listeners]
    bound = [_local_address(lst) for lst in listeners]
    for h, p in bound:
        log.info("listening what=%s on=%s:%d tls=%s", what, h, p, ssl_context is not None)

    async def guarded(stream: trio.abc.Stream) -> None:
        peer = peer_address(stream)
        try:
            await handler(stream, peer)
        except RasError as exc:
            log.info("connection ended what=%s peer=%s:%d reason=%s", what, *peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.info("connection lost what=%s peer=%s:%d reason=%r", what, *peer, exc)
        except trio.TooSlowError:
            log.info("connection timed out what=%s peer=%s:%d", what, *peer)
        except Exception:
            log.exception("bug while serving what=%s peer=%s:%d", what, *peer)
        finally:
            await aclose_quietly(stream)

    if handler_nursery is not None:
        task_status.started(bound)
        await trio.serve_listeners(guarded, listeners, handler_nursery=handler_nursery)
    else:
        async with trio.open_nursery() as handlers:
            task_status.started(bound)
            await trio.serve_listeners(guarded, listeners, handler_nursery=handlers)


def _local_address(listener: trio.abc.Listener[trio.abc.Stream]) -> tuple[str, int]:
    inner: Any = getattr(listener, "transport_listener", listener)
    host, port = inner.socket.getsockname()[:2]
    return str(host), int(port)
