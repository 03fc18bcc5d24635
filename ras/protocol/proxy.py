"""The PROXY protocol, version 2 (haproxy's ``proxy-protocol.txt``, section 2.2), sans-I/O.

Theory of operation. A proxy that relays a TCP connection (a HALB node, a forwarding gateway,
haproxy with ``send-proxy-v2``) writes one binary header before the relayed bytes; it tells
the receiver who the real client is. :func:`encode_v2` and :func:`encode_v2_local` make that
header; :func:`parse_v2` reads it from the first bytes of a connection. Neither does I/O, and
neither imports trio or socket. Trusting the header is the caller's decision: anyone can send
one, so a receiver reads it only from the proxies it was told to trust.

Wire format (all numbers big-endian)::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   version (high nibble, always 2) and command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   address family (high nibble) and transport (low nibble): see ProxyFamily
     2 bytes  length of what follows: the address block, then TLVs
     n bytes  address block: source address, destination address, source port,
              destination port (IPv4 12 bytes, IPv6 36; AF_UNIX 216: two 108-byte paths)
     rest     TLVs: type (1 byte), value length (2 bytes), value

Rules this codec keeps:

* ``parse_v2`` is a transaction: it returns None until the whole header is there, then the
  header and how many bytes it took (``length``); what follows belongs to the next protocol.
  It raises :class:`~ras.errors.RemoteProtocolError` as soon as the bytes so far cannot start
  a valid header: a wrong signature byte, a version other than 2, an unassigned command or
  family, a declared length over :data:`PROXY_V2_MAX_PAYLOAD` (refused before that many bytes
  are waited for), an address block longer than the declared length, a TLV that runs past the
  end, a CRC32C TLV that does not match.
* LOCAL (a proxy's own health check) carries no client: ``source`` and ``destination`` are
  None and the receiver keeps the real TCP endpoints, whatever address block was sent. So do
  AF_UNSPEC and AF_UNIX, which a TCP service falls back to UNSPEC for, as the spec allows.
* TLVs are kept in wire order as ``(type, value)`` pairs, except NOOP padding, which the spec
  says to ignore. A CRC32C TLV is verified (RFC 4960 appendix B checksum of the whole header
  with its value zeroed) and kept.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ras.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROXY_V2_HEADER_SIZE",
    "PROXY_V2_MAX_PAYLOAD",
    "PROXY_V2_SIGNATURE",
    "PP2Type",
    "ProxyCommand",
    "ProxyFamily",
    "ProxyHeader",
    "crc32c",
    "encode_v2",
    "encode_v2_local",
    "parse_v2",
]

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_HEADER_SIZE = 16  # signature, version/command, family, length
# Addresses + TLVs. haproxy's own headers are a few hundred bytes at most (AF_UNIX addresses
# are 216); this bounds what a receiver ever buffers for a header.
PROXY_V2_MAX_PAYLOAD = 4096
_VERSION = 2
_LENGTH = struct.Struct("!H")
_PORTS = struct.Struct("!HH")
_TLV_HEAD = 3  # type, 2-byte length

Address = tuple[str, int]
TLV = tuple[int, bytes]


class ProxyCommand(enum.IntEnum):
    """The low nibble of the 13th byte."""

    LOCAL = 0x0  # the proxy's own connection (health check): use the real endpoints
    PROXY = 0x1  # relayed for a client: the address block names it


class ProxyFamily(enum.IntEnum):
    """The 14th byte: address family (high nibble) and transport (low nibble)."""

    UNSPEC = 0x00
    TCP4 = 0x11
    UDP4 = 0x12
    TCP6 = 0x21
    UDP6 = 0x22
    UNIX_STREAM = 0x31
    UNIX_DGRAM = 0x32


class PP2Type(enum.IntEnum):
    """Registered TLV types (``PP2_TYPE_*``); other values are allowed and kept as numbers."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


_COMMANDS = frozenset(ProxyCommand)
_FAMILIES = frozenset(ProxyFamily)
_ADDRESS_BLOCK = {
    ProxyFamily.UNSPEC: 0,
    ProxyFamily.TCP4: 12,
    ProxyFamily.UDP4: 12,
    ProxyFamily.TCP6: 36,
    ProxyFamily.UDP6: 36,
    ProxyFamily.UNIX_STREAM: 216,
    ProxyFamily.UNIX_DGRAM: 216,
}
_IP_VERSION = {
    ProxyFamily.TCP4: 4,
    ProxyFamily.UDP4: 4,
    ProxyFamily.TCP6: 6,
    ProxyFamily.UDP6: 6,
}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY v2 header.

    ``source`` is the client (address, port) and ``destination`` the address it connected to;
    both None for LOCAL, AF_UNSPEC and AF_UNIX. ``length`` is the header's size in bytes on the
    wire: the caller's stream continues after that many bytes.
    """

    command: ProxyCommand
    family: ProxyFamily
    source: Address | None
    destination: Address | None
    tlvs: tuple[TLV, ...]
    length: int

    def __post_init__(self) -> None:
        if not isinstance(self.command, ProxyCommand) or not isinstance(self.family, ProxyFamily):
            raise ValueError("command and family must be ProxyCommand and ProxyFamily members")
        if (self.source is None) != (self.destination is None):
            raise ValueError("source and destination come together")
        version = _IP_VERSION.get(self.family)
        if self.source is None:
            if self.command is ProxyCommand.PROXY and version is not None:
                raise ValueError(f"a PROXY header over {self.family.name} names its addresses")
        else:
            if self.command is ProxyCommand.LOCAL or version is None:
                what = f"{self.command.name} {self.family.name}"
                raise ValueError(f"a {what} header has no addresses")
            for host, port in (e for e in (self.source, self.destination) if e is not None):
                if ipaddress.ip_address(host).version != version or not 0 <= port <= 65535:
                    raise ValueError(f"{host}:{port} is not a {self.family.name} endpoint")
        for kind, value in self.tlvs:
            if not 0 <= kind <= 255 or len(value) > 0xFFFF:
                raise ValueError(f"TLV type {kind} with {len(value)} bytes does not fit")
        if not PROXY_V2_HEADER_SIZE <= self.length <= PROXY_V2_HEADER_SIZE + PROXY_V2_MAX_PAYLOAD:
            raise ValueError(f"a header of {self.length} bytes is impossible")


# -- encoding -------------------------------------------------------------------------------


def encode_v2(source: Address, destination: Address, *, tlvs: Sequence[TLV] = ()) -> bytes:
    """The header a proxy sends for a TCP connection from ``source`` to ``destination``
    (IP literals and ports). Over IPv4 when both are IPv4, else over IPv6 (an IPv4 endpoint is
    then written IPv4-mapped, as haproxy does). Raises ``LocalProtocolError`` on a bad
    endpoint."""
    src, src_port = _endpoint(source, "source")
    dst, dst_port = _endpoint(destination, "destination")
    if src.version != dst.version:
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    family = ProxyFamily.TCP4 if src.version == 4 else ProxyFamily.TCP6
    addresses = src.packed + dst.packed + _PORTS.pack(src_port, dst_port)
    return _encode(ProxyCommand.PROXY, family, addresses, tlvs)


def encode_v2_local(*, tlvs: Sequence[TLV] = ()) -> bytes:
    """The header of a proxy's own connection (a health check): LOCAL, no addresses."""
    return _encode(ProxyCommand.LOCAL, ProxyFamily.UNSPEC, b"", tlvs)


def _encode(
    command: ProxyCommand, family: ProxyFamily, addresses: bytes, tlvs: Sequence[TLV]
) -> bytes:
    parts = [addresses]
    for kind, value in tlvs:
        if not 0 <= kind <= 255 or kind == PP2Type.CRC32C:
            raise LocalProtocolError(f"cannot send a TLV of type {kind}")
        if len(value) > 0xFFFF:
            raise LocalProtocolError(f"TLV {kind} of {len(value)} bytes does not fit")
        parts += (bytes((kind,)), _LENGTH.pack(len(value)), bytes(value))
    payload = b"".join(parts)
    if len(payload) > PROXY_V2_MAX_PAYLOAD:
        raise LocalProtocolError(f"PROXY v2 header of {len(payload)} bytes is over the limit")
    head = bytes((_VERSION << 4 | command, family))
    return PROXY_V2_SIGNATURE + head + _LENGTH.pack(len(payload)) + payload


def _endpoint(
    endpoint: Address, what: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = endpoint
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(f"{what} {host!r} is not an IP address") from None
    if not 0 <= port <= 65535:
        raise LocalProtocolError(f"{what} port {port} is not a TCP port")
    return address, port


def _as_ipv6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


# -- parsing --------------------------------------------------------------------------------


def parse_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The PROXY v2 header at the start of ``data``, or None if more bytes are needed.

    Raises ``RemoteProtocolError`` as soon as ``data`` cannot be the start of a valid header
    (see the module docstring). Bytes after the header are left alone: ``length`` says where
    they start.
    """
    buf = bytes(data[: PROXY_V2_HEADER_SIZE + PROXY_V2_MAX_PAYLOAD])
    if not PROXY_V2_SIGNATURE.startswith(buf[: len(PROXY_V2_SIGNATURE)]):
        raise RemoteProtocolError("not a PROXY v2 header (bad signature)", ErrorCode.BAD_PREFACE)
    if len(buf) > 12:
        if buf[12] >> 4 != _VERSION:
            raise RemoteProtocolError(
                f"PROXY protocol version {buf[12] >> 4} is not 2", ErrorCode.UNSUPPORTED_VERSION
            )
        if buf[12] & 0x0F not in _COMMANDS:
            raise RemoteProtocolError(f"unassigned PROXY v2 command {buf[12] & 0x0F:#x}")
    if len(buf) > 13 and buf[13] not in _FAMILIES:
        raise RemoteProtocolError(f"unassigned PROXY v2 address family {buf[13]:#04x}")
    if len(buf) < PROXY_V2_HEADER_SIZE:
        return None
    command, family = ProxyCommand(buf[12] & 0x0F), ProxyFamily(buf[13])
    (size,) = _LENGTH.unpack_from(buf, 14)
    if size > PROXY_V2_MAX_PAYLOAD:
        raise RemoteProtocolError(
            f"PROXY v2 header of {size} bytes is over the {PROXY_V2_MAX_PAYLOAD} byte limit",
            ErrorCode.FRAME_TOO_LARGE,
        )
    block = _ADDRESS_BLOCK[family]
    if size < block:
        raise RemoteProtocolError(
            f"PROXY v2 length {size} is shorter than the {family.name} address block ({block})"
        )
    end = PROXY_V2_HEADER_SIZE + size
    if len(buf) < end:
        return None
    header = buf[:end]
    source = destination = None
    if command is ProxyCommand.PROXY and family in _IP_VERSION:
        source, destination = _addresses(header[PROXY_V2_HEADER_SIZE:], family)
    return ProxyHeader(
        command=command,
        family=family,
        source=source,
        destination=destination,
        tlvs=_tlvs(header, PROXY_V2_HEADER_SIZE + block),
        length=end,
    )


def _addresses(block: bytes, family: ProxyFamily) -> tuple[Address, Address]:
    size = 4 if _IP_VERSION[family] == 4 else 16
    src = ipaddress.ip_address(block[:size])
    dst = ipaddress.ip_address(block[size : 2 * size])
    src_port, dst_port = _PORTS.unpack_from(block, 2 * size)
    return (str(src), src_port), (str(dst), dst_port)


def _tlvs(header: bytes, pos: int) -> tuple[TLV, ...]:
    tlvs: list[TLV] = []
    checksum_at: int | None = None
    while pos < len(header):
        if len(header) - pos < _TLV_HEAD:
            raise RemoteProtocolError("PROXY v2 header ends inside a TLV header")
        kind = header[pos]
        (size,) = _LENGTH.unpack_from(header, pos + 1)
        start, pos = pos + _TLV_HEAD, pos + _TLV_HEAD + size
        if pos > len(header):
            raise RemoteProtocolError(f"PROXY v2 TLV {kind:#04x} runs past the end of the header")
        if kind == PP2Type.CRC32C:
            if size != 4 or checksum_at is not None:
                raise RemoteProtocolError("PROXY v2 CRC32C TLV is malformed or repeated")
            checksum_at = start
        if kind != PP2Type.NOOP:
            tlvs.append((kind, header[start:pos]))
    if checksum_at is not None:
        zeroed = header[:checksum_at] + bytes(4) + header[checksum_at + 4 :]
        if crc32c(zeroed) != int.from_bytes(header[checksum_at : checksum_at + 4], "big"):
            raise RemoteProtocolError("PROXY v2 header fails its CRC32C check")
    return tuple(tlvs)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B), the checksum of the CRC32C TLV."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
