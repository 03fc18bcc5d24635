"""The lean I/O path of the relay: raw non-blocking sockets, ``ssl.SSLObject``, splice.

Theory of operation. trio's high-level streams pay for their generality on every call: two
checkpoints per socket operation, and ``trio.SSLStream`` hands out one 16 KiB TLS record per
``receive_some``. A relay moves millions of small and large chunks, so this module drives the
file descriptors itself:

- a syscall is always tried first; only when it would block does the task suspend, in
  ``trio.lowlevel.wait_readable``/``wait_writable``. A task that never had to wait yields with
  a checkpoint every few operations, so a busy tunnel cannot starve the others;
- buffers come from one shared pool and go back to it whenever a direction waits, so an idle
  tunnel holds no buffer at all, and each direction holds at most one (bounded buffering);
- ``TLSStream`` terminates TLS with an ``ssl.SSLObject`` over memory BIOs. It is a
  normal ``trio.abc.HalfCloseableStream`` (the gateway sniffs and speaks the control protocol
  over it before the tunnel), and the relay drives the same object directly: one socket read
  feeds every TLS record it holds to OpenSSL and all complete records are decrypted in one go.
  ``send_eof`` sends a close_notify while reading goes on, so TLS tunnels pass a half-close
  through (``trio.SSLStream`` cannot);
- between two plain sockets, bytes move with ``os.splice`` through a 1 MiB pipe and never
  enter Python. Pipes are pooled too: a direction holds one only while bytes are in flight.

The ``Leg`` classes are the relay's view of one side: ``try_receive_into`` (never blocks),
``wait_receivable``, ``send``, ``send_eof``. ``leg_for`` picks the leanest leg for a stream;
a stream it does not know (an ``SSLStream`` to the next hop, a memory stream in a test) gets
the generic leg over ``receive_some``/``send_all``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
from typing import Final, cast

import trio

from ras.net.sniff import PrefixedStream

__all__ = [
    "BUFFER_SIZE",
    "POOL",
    "Leg",
    "TLSStream",
    "leg_for",
    "server_tls",
    "unwrap",
]

BUFFER_SIZE: Final = 128 * 1024
PIPE_SIZE: Final = 1024 * 1024
_F_SETPIPE_SZ: Final = 1031
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
#: Operations that did not have to wait before a direction yields to the other tasks anyway.
_YIELD_EVERY: Final = 16
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class BufferPool:
    """Fixed-size bytearrays shared by every tunnel; ``held`` counts those handed out."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self.held = 0
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        self.held += 1
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        self.held -= 1
        if len(self._free) < self.keep:
            self._free.append(buf)


class PipePool:
    """Empty pipes of ``PIPE_SIZE`` for splice; a pipe is given back only when empty.

    The relays using the pool register (``users``); when the last one ends the spare pipes
    are closed, so a quiet daemon holds no pipe file descriptors."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.users = 0
        self._free: list[tuple[int, int]] = []

    def enter(self) -> None:
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            while self._free:
                self.discard(self._free.pop())

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works, only slower
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """A pipe that may still hold bytes (the direction failed): never reuse it."""
        os.close(pipe[0])
        os.close(pipe[1])


POOL: Final = BufferPool(BUFFER_SIZE, keep=256)
PIPES: Final = PipePool(keep=64)


class Yielder:
    """Counts operations that did not wait; every ``_YIELD_EVERY`` it checkpoints."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    async def tick(self) -> None:
        self.n += 1
        if self.n >= _YIELD_EVERY:
            self.n = 0
            await trio.lowlevel.checkpoint()


def unwrap(stream: trio.abc.Stream) -> tuple[trio.abc.Stream, bytes]:
    """The stream under any ``PrefixedStream`` layers and the bytes they still hold, in the
    order a reader would get them."""
    prefix = b""
    while isinstance(stream, PrefixedStream):
        prefix += stream.prefix
        stream = stream.stream
    return stream, prefix


async def write_fd(fd: int, data: memoryview | bytes, yielder: Yielder) -> None:
    """Write all of ``data`` to the non-blocking ``fd``; wait only when the kernel is full."""
    view = memoryview(data)
    while view:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[sent:]
        await yielder.tick()


def set_nodelay(sock: trio.socket.SocketType) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- TLS ----------------------------------------------------------------------------------


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS on a trio socket, driven through ``ssl.SSLObject`` (server side unless a
    ``server_hostname`` is given).

    ``prefix`` holds bytes of the connection already read (the sniffed ClientHello). A TLS
    error or a transport failure is ``trio.BrokenResourceError``; an end of stream without a
    close_notify counts as an end of stream (RDP frames itself, and clients do close so)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        context: ssl.SSLContext,
        prefix: bytes = b"",
        *,
        server_hostname: str | None = None,
    ) -> None:
        self.socket = sock
        self.fd = sock.fileno()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server_hostname is None,
            server_hostname=server_hostname,
        )
        if prefix:
            self.incoming.write(prefix)
        self.eof_sent = False
        self.closed = False
        self._flushing = False
        self._flushed: trio.Event | None = None
        set_nodelay(sock)

    # -- socket side: ciphertext

    def read_ciphertext(self) -> int:
        """Move what the socket holds into OpenSSL without waiting: bytes read, 0 at end of
        stream; ``BlockingIOError`` when nothing is there."""
        try:
            data = os.read(self.fd, BUFFER_SIZE)
        except _RESET_ERRORS as exc:
            raise trio.BrokenResourceError(f"connection reset: {exc}") from exc
        except OSError as exc:
            if isinstance(exc, BlockingIOError):
                raise
            raise trio.BrokenResourceError(str(exc)) from exc
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return len(data)

    async def flush(self, yielder: Yielder | None = None) -> None:
        """Send whatever OpenSSL has produced. One task at a time writes the socket; others
        wait for it, then send what is left."""
        while self._flushing:
            if self._flushed is None:
                self._flushed = trio.Event()
            await self._flushed.wait()
        if not self.outgoing.pending:
            return
        self._flushing = True
        try:
            while self.outgoing.pending:
                await write_fd(self.fd, self.outgoing.read(), yielder or Yielder())
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        finally:
            self._flushing = False
            if self._flushed is not None:
                self._flushed.set()
                self._flushed = None

    async def flush_reading(self) -> None:
        """Flush what reading produced (a TLS 1.3 key update answer, a handshake record). A
        reader never waits for a writer's flush: that one sends these bytes too, as it loops
        until nothing is pending, and waiting for it could wait on our own peer."""
        if self.outgoing.pending and not self._flushing:
            await self.flush()

    # -- TLS records: plaintext

    def decrypt_into(self, view: memoryview) -> int:
        """Decrypt every complete record OpenSSL holds into ``view``: bytes written, -1 at the
        end of the TLS stream; ``ssl.SSLWantReadError`` when not even one record is whole."""
        filled = 0
        room = len(view)
        try:
            while filled < room:
                n = cast(int, self.obj.read(room - filled, view[filled:]))
                if n == 0:  # a close_notify (ssl gives 0, not SSLZeroReturnError, at times)
                    return filled or -1
                filled += n
        except ssl.SSLWantReadError:
            if filled == 0:
                raise
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            if filled == 0:
                return -1
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        return filled

    def encrypt(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.obj.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    def close_notify(self) -> None:
        """Queue a close_notify (the flush sends it); reading may go on after it."""
        if self.eof_sent:
            return
        self.eof_sent = True
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent ours; the peer's comes later, or never
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    # -- trio.abc.HalfCloseableStream

    async def do_handshake(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self._receive_ciphertext()
            except ssl.SSLError as exc:
                with contextlib.suppress(trio.BrokenResourceError):
                    await self.flush()  # the alert
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        await self.flush()

    async def _receive_ciphertext(self) -> None:
        while True:
            try:
                self.read_ciphertext()
                return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError
        await trio.lowlevel.checkpoint()
        size = max_bytes or 65536
        buf = bytearray(size)
        while True:
            try:
                n = self.decrypt_into(memoryview(buf))
            except ssl.SSLWantReadError:
                await self.flush_reading()
                await self._receive_ciphertext()
                continue
            await self.flush_reading()
            return b"" if n < 0 else bytes(buf[:n])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        if self.eof_sent:
            raise trio.ClosedResourceError("send_eof was called")
        await trio.lowlevel.checkpoint()
        self.encrypt(data)
        await self.flush()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.fd)

    async def send_eof(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError
        await trio.lowlevel.checkpoint()
        self.close_notify()
        await self.flush()

    async def aclose(self) -> None:
        """Send a close_notify if none was sent, as far as the socket takes it without
        waiting, then close."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        if self.socket.fileno() != -1:  # not already closed by an abort (the fd may be reused)
            try:
                if not self.eof_sent:
                    self.close_notify()
                if self.outgoing.pending:
                    os.write(self.fd, self.outgoing.read())
            except (OSError, trio.BrokenResourceError, ssl.SSLError):
                pass
        self.socket.close()
        await trio.lowlevel.checkpoint()


def server_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> TLSStream | trio.SSLStream[trio.abc.Stream]:
    """TLS (server side) over ``stream``: the lean ``TLSStream`` where ``stream`` is a
    socket (under any sniffed prefix), ``trio.SSLStream`` otherwise. Call ``do_handshake``."""
    base, prefix = unwrap(stream)
    if isinstance(base, trio.SocketStream):
        return TLSStream(base.socket, context, prefix)
    return trio.SSLStream(stream, context, server_side=True)


# -- legs: the relay's view of one side ------------------------------------------------------


class Leg:
    """One side of a relay. ``try_receive_into`` returns the bytes put into ``view``, 0 at end
    of stream, or -1 if it would have to wait (then ``wait_receivable``). ``fd`` is set for a
    plain socket, which the relay may splice."""

    __slots__ = ("stream",)

    fd: int | None = None

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    def try_receive_into(self, view: memoryview) -> int:
        raise NotImplementedError

    async def wait_receivable(self) -> None:
        raise NotImplementedError

    async def send(self, data: memoryview, yielder: Yielder) -> None:
        raise NotImplementedError

    async def send_eof(self) -> bool:
        """Pass an end of stream on; False if this side cannot be half-closed."""
        raise NotImplementedError


class SocketLeg(Leg):
    __slots__ = ("fd", "socket")

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.socket = stream.socket
        self.fd = self.socket.fileno()  # trio.SocketStream has set TCP_NODELAY already

    def try_receive_into(self, view: memoryview) -> int:
        assert self.fd is not None
        try:
            return os.readv(self.fd, (view,))
        except BlockingIOError:
            return -1

    async def wait_receivable(self) -> None:
        assert self.fd is not None
        await trio.lowlevel.wait_readable(self.fd)

    async def send(self, data: memoryview, yielder: Yielder) -> None:
        assert self.fd is not None
        await write_fd(self.fd, data, yielder)

    async def send_eof(self) -> bool:
        self.socket.shutdown(socket.SHUT_WR)
        await trio.lowlevel.checkpoint()
        return True


class TLSLeg(Leg):
    __slots__ = ("tls",)

    def __init__(self, stream: TLSStream) -> None:
        super().__init__(stream)
        self.tls = stream

    def try_receive_into(self, view: memoryview) -> int:
        tls = self.tls
        while True:
            try:
                n = tls.decrypt_into(view)
                return 0 if n < 0 else n
            except ssl.SSLWantReadError:
                pass
            try:
                tls.read_ciphertext()
            except BlockingIOError:
                return -1

    async def wait_receivable(self) -> None:
        await self.tls.flush_reading()
        await trio.lowlevel.wait_readable(self.tls.fd)

    async def send(self, data: memoryview, yielder: Yielder) -> None:
        self.tls.encrypt(data)
        await self.tls.flush(yielder)

    async def send_eof(self) -> bool:
        self.tls.close_notify()
        await self.tls.flush()
        return True


class StreamLeg(Leg):
    """Any trio stream, through ``receive_some``/``send_all`` (one received chunk kept)."""

    __slots__ = ("pending",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.pending: bytes | None = None

    def try_receive_into(self, view: memoryview) -> int:
        data = self.pending
        if data is None:
            return -1
        n = min(len(view), len(data))
        view[:n] = data[:n]
        self.pending = data[n:] or None
        return n if data else 0

    async def wait_receivable(self) -> None:
        if self.pending is None:
            self.pending = bytes(await self.stream.receive_some(BUFFER_SIZE))

    async def send(self, data: memoryview, yielder: Yielder) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> bool:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
            return True
        return False


def leg_for(stream: trio.abc.Stream) -> tuple[Leg, bytes]:
    """The leanest leg for ``stream`` and the bytes of it already read (to send first)."""
    base, prefix = unwrap(stream)
    if type(base) is trio.SocketStream:
        return SocketLeg(base), prefix
    if isinstance(base, TLSStream) and not base.closed:
        return TLSLeg(base), prefix
    return StreamLeg(stream), b""
