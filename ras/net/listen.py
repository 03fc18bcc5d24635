"""Listeners for the daemons: TCP or TLS, handlers in their own nursery, failures contained.

A handler gets a ``trio.abc.Stream`` and the peer's address. Whatever it raises is logged and
ends that connection only, never the listener or the daemon.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ras.errors import RasError
from ras.net.channel import aclose_quietly
from ras.net.reasons import BROKEN, reason

__all__ = [
    "Handler",
    "accept_loop",
    "open_listeners",
    "peer_address",
    "serve_tcp",
    "set_reuse_port_default",
]

Handler = Callable[[trio.abc.Stream, tuple[str, int]], Awaitable[None]]

#: Accepts in a row (the backlog is full) before the accept loop lets other tasks run.
_ACCEPT_BURST = 16
#: Out of file descriptors or memory: accept waits this long, then tries again.
_ACCEPT_PAUSE_S = 0.1
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_log = logging.getLogger("ras.net.listen")

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


async def accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    nursery: trio.Nursery,
) -> None:
    """Accept on ``listener`` until cancelled and start ``handler(stream)`` in ``nursery``
    for each connection; the handler owns (and closes) the stream. Closes ``listener`` when
    it ends.

    Leaner than ``trio.serve_listeners`` on a busy port: ``accept`` is tried before waiting
    and the backlog is drained in bursts (one wakeup, several connections), and no wrapper
    task closes the stream a second time. A full file table pauses accepting briefly, as
    ``trio.serve_listeners`` does."""
    lsock = socket.fromfd(listener.socket.fileno(), listener.socket.family, socket.SOCK_STREAM)
    lsock.setblocking(False)  # a dup of the listening socket: ours to close
    burst = 0
    try:
        while True:
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                burst = 0
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_PAUSE_ERRNOS:
                    raise
                _log.warning("accept paused: %s", exc.strerror)
                await trio.sleep(_ACCEPT_PAUSE_S)
                continue
            nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
            burst += 1
            if burst >= _ACCEPT_BURST:
                burst = 0
                await trio.lowlevel.checkpoint()
    finally:
        lsock.close()
        listener.socket.close()  # as trio.serve_listeners does: the port is closed after


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
    tls: bool | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``host:port`` (0: any free port) until cancelled; ``started`` gets the bound
    addresses. With ``ssl_context`` the streams are TLS (the handshake is the handler's job,
    under its own deadline); ``tls`` is what the log line says for a handler that does its
    own TLS (default: whether ``ssl_context`` is given). Handlers run in ``handler_nursery``
    if given (then cancelling this listener only stops accepting: a graceful drain), else in
    a nursery of its own."""
    try:
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
            await open_listeners(host, port, backlog=1024, reuse_port=_reuse_port_default)
        )
    except OSError as exc:
        raise RasError(f"{what}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context) for lst in listeners]
    bound = [_local_address(lst) for lst in listeners]
    for h, p in bound:
        log.info(
            "listening what=%s on=%s:%d tls=%s",
            what, h, p, ssl_context is not None if tls is None else tls,
        )  # fmt: skip

    async def guarded(stream: trio.abc.Stream) -> None:
        peer = peer_address(stream)
        try:
            await handler(stream, peer)
        except RasError as exc:
            log.info("connection ended what=%s peer=%s:%d reason=%s", what, *peer, exc)
        except BROKEN as exc:  # a handler that left its I/O unmapped (ras.net.reasons)
            log.info("connection lost what=%s peer=%s:%d reason=%s", what, *peer, reason(exc))
        except trio.TooSlowError:
            log.info("connection timed out what=%s peer=%s:%d", what, *peer)
        except Exception:
            log.exception("bug while serving what=%s peer=%s:%d", what, *peer)
        finally:
            await aclose_quietly(stream)

    async def serve(handlers: trio.Nursery) -> None:
        if ssl_context is not None:
            await trio.serve_listeners(guarded, listeners, handler_nursery=handlers)
            return
        async with trio.open_nursery() as accepting:
            for lst in listeners:
                assert isinstance(lst, trio.SocketListener)
                accepting.start_soon(accept_loop, lst, guarded, handlers)

    if handler_nursery is not None:
        task_status.started(bound)
        await serve(handler_nursery)
    else:
        async with trio.open_nursery() as handlers:
            task_status.started(bound)
            await serve(handlers)


def _local_address(listener: trio.abc.Listener[trio.abc.Stream]) -> tuple[str, int]:
    inner: Any = getattr(listener, "transport_listener", listener)
    host, port = inner.socket.getsockname()[:2]
    return str(host), int(port)
