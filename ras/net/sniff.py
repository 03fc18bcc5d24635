"""Tell protocols apart by their first bytes, without losing those bytes.

``sniff`` reads just enough of a stream to classify it and returns a ``PrefixedStream`` that
hands those bytes out again first, so the next stage (TLS, the control codec, the relay to an
RDP host) sees the stream from its first byte.
"""

from __future__ import annotations

import enum
import re

import trio

from ras.errors import TransportError
from ras.net.reasons import transport_errors
from ras.protocol import PREFACE_PREFIX
from ras.protocol.proxy import PROXY_V2_SIGNATURE

__all__ = ["Kind", "PrefixedStream", "classify", "sniff"]

_MAX_METHOD = 16  # longest HTTP method told apart (RDG_OUT_DATA is 12)
_HTTP_METHOD = re.compile(rb"[A-Z_]{3,%d} " % _MAX_METHOD)
# Enough bytes to decide every case: the longest magic, or a method and its space.
NEEDED = max(len(PROXY_V2_SIGNATURE), len(PREFACE_PREFIX), _MAX_METHOD + 1)


class Kind(enum.Enum):
    TLS = "tls"
    CONTROL = "control"
    HTTP = "http"
    TPKT = "tpkt"
    PROXY_V2 = "proxy_v2"
    UNKNOWN = "unknown"


def classify(head: bytes) -> Kind | None:
    """The protocol of a stream starting with ``head``, or None if more bytes are needed."""
    candidates: list[tuple[bytes, Kind]] = [
        (b"\x16\x03", Kind.TLS),
        (PREFACE_PREFIX, Kind.CONTROL),
        (b"\x03\x00", Kind.TPKT),
        (PROXY_V2_SIGNATURE, Kind.PROXY_V2),
    ]
    undecided = False
    for magic, kind in candidates:
        n = min(len(head), len(magic))
        if head[:n] == magic[:n]:
            if len(head) >= len(magic):
                return kind
            undecided = True
    if undecided:
        return None
    if _HTTP_METHOD.match(head):
        return Kind.HTTP
    if len(head) <= _MAX_METHOD and re.fullmatch(rb"[A-Z_]*", head):
        return None
    return Kind.UNKNOWN


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``stream`` with ``prefix`` put back in front of it."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            raise trio.ClosedResourceError("this stream cannot be half-closed")
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def sniff(stream: trio.abc.Stream) -> tuple[Kind, PrefixedStream]:
    """Read the first bytes of ``stream`` and classify them. The caller owns the deadline."""
    head = b""
    while (kind := classify(head)) is None:
        with transport_errors("connection lost while sniffing"):
            data = await stream.receive_some(NEEDED - len(head))
        if not data:
            raise TransportError("connection closed before the protocol could be told")
        head += data
    return kind, PrefixedStream(stream, head)
