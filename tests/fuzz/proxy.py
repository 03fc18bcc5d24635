"""A PROXY protocol v2 header (``ras.protocol.proxy.parse_v2``) at the start of a connection.

``parse_v2`` is a transaction over a growing buffer: on every prefix of the input (a few dozen
of them, see ``fuzz.cuts``) it must say "need more" (None), or give the very header it gives
on the whole input once the prefix holds all of it, or refuse with ``RemoteProtocolError``,
and refuse only what the whole input is also refused for, with the same code. A header never
claims more bytes than it was given.
"""

from __future__ import annotations

from fuzz import cuts
from ras.errors import ErrorCode, RemoteProtocolError
from ras.protocol.proxy import PROXY_V2_SIGNATURE, ProxyHeader, parse_v2

DICTIONARY = (
    PROXY_V2_SIGNATURE,
    b"\x21\x11\x00\x0c",  # PROXY over TCP4, 12 bytes
    b"\x21\x21\x00\x24",  # PROXY over TCP6, 36 bytes
    b"\x20\x00\x00\x00",  # LOCAL, UNSPEC
    b"\x21\x31\x00\xd8",  # PROXY over AF_UNIX stream, 216 bytes
    b"\x03\x00\x04",  # CRC32C TLV head
    b"\x04\x00\x00",  # NOOP TLV
    b"\x20\x00",  # SSL TLV
)

Outcome = ProxyHeader | ErrorCode | None


def _parse(data: bytes) -> Outcome:
    try:
        return parse_v2(data)
    except RemoteProtocolError as exc:
        return exc.code


def fuzz_one(data: bytes) -> None:
    whole = _parse(data)
    if isinstance(whole, ProxyHeader):
        assert whole.length <= len(data)
        assert _parse(data[: whole.length]) == whole  # what follows is not the header's
        assert _parse(bytearray(data)) == whole
        assert _parse(memoryview(data)) == whole
    length = whole.length if isinstance(whole, ProxyHeader) else 0
    for cut in cuts(data, length - 1, length):
        part = _parse(data[:cut])
        if isinstance(whole, ProxyHeader):
            assert part == (whole if cut >= whole.length else None), (cut, part, whole)
        elif whole is None:
            assert part is None, (cut, part)
        else:
            assert part is None or part == whole, (cut, part, whole)
