"""The first message of every RDP connection: TPKT + X.224 Connection Request, sans-I/O.

Theory of operation. A native RDP client (mstsc, xfreerdp) opens its connection with one
TPKT packet (RFC 1006) carrying an X.224 Connection Request TPDU (ISO 8073 class 0) whose
variable part carries, as MS-RDPBCGR 2.2.1.1 defines, an optional routing token *or* cookie
line ended by CR LF, then an optional RDP Negotiation Request (``rdpNegReq``), then an optional
RDP Correlation Info. The gateway's RDP load balancer reads this one message to learn where
the connection should go, then sends the very same bytes on to the host it picked.

:func:`parse_connection_request` is a transaction, like ``parse_v2``: it returns None until the
whole request is there, then a :class:`ConnectionRequest` whose ``length`` says how many bytes
it took (what follows belongs to the RDP session). It raises
:class:`~ras.errors.RemoteProtocolError` as soon as the bytes so far cannot start a valid
request, so a hostile peer never gets more than :data:`MAX_CONNECTION_REQUEST` bytes buffered.

Wire format (TPKT and X.224 numbers big-endian, RDP structures little-endian)::

    TPKT   1 byte   version, 3
           1 byte   reserved, 0
           2 bytes  length of the whole packet, this header included
    X.224  1 byte   length indicator (LI): the bytes after it, so TPKT length - 5
           1 byte   0xE0: Connection Request, credit 0
           2 bytes  DST-REF, 0
           2 bytes  SRC-REF, any
           1 byte   class and options, 0 (class 0)
           n bytes  "Cookie: mstshash=USER" CR LF, or a routing token CR LF (optional):
                    printable ASCII here
           8 bytes  rdpNegReq (optional): type 0x01, flags, length 8 (u16), protocols (u32)
          36 bytes  rdpCorrelationInfo (optional, after rdpNegReq): type 0x06, flags 0,
                    length 36 (u16), correlation id (16), reserved (16)

Rules this codec keeps (stricter than most servers, on purpose: the gateway decides a route
from these bytes):

* The LI is one byte and 0xFF is reserved, so a request is at most 4 + 1 + 254 = 259 bytes;
  a TPKT length over that, or one that disagrees with the LI, is refused on the header.
* The line before CR LF is the routing information. ``Cookie: mstshash=X`` is the user name a
  client offers (the domain already stripped by the client); ``Cookie: msts=X`` is a routing
  token (Windows brokers put an encoded IP address and port there; a ras broker puts a signed
  token there: this codec does not judge, it only splits); any other line (``tsv://...``) is
  kept as ``load_balance_info`` and routes nowhere at a ras gateway. Control characters,
  bytes over 0x7E, a line with no CR LF and trailing bytes are errors.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ras.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_CONNECTION_REQUEST",
    "ConnectionConfirm",
    "ConnectionRequest",
    "CookieKind",
    "NegotiationRequest",
    "RdpProtocol",
    "encode_connection_request",
    "parse_connection_confirm",
    "parse_connection_request",
]

TPKT_HEADER = 4
X224_FIXED = 7  # LI, code, DST-REF, SRC-REF, class
MIN_CONNECTION_REQUEST = TPKT_HEADER + X224_FIXED  # 11
MAX_CONNECTION_REQUEST = TPKT_HEADER + 1 + 254  # 259: the LI is one byte, 0xFF reserved
_CR_CODE = 0xE0
_NEG_REQ = struct.Struct("<BBHI")  # type, flags, length, requested protocols
_NEG_REQ_TYPE = 0x01
_CORRELATION_TYPE = 0x06
_CORRELATION_SIZE = 36
_CORRELATION_PRESENT = 0x08  # rdpNegReq flag: an rdpCorrelationInfo follows
MSTSHASH = b"Cookie: mstshash="
MSTS = b"Cookie: msts="


class RdpProtocol(enum.IntFlag):
    """``requestedProtocols`` of rdpNegReq (0 is standard RDP security)."""

    TLS = 0x1
    HYBRID = 0x2  # CredSSP (NLA)
    RDSTLS = 0x4
    HYBRID_EX = 0x8
    RDSAAD = 0x10


class CookieKind(enum.Enum):
    """What the line before CR LF is."""

    MSTSHASH = "mstshash"  # Cookie: mstshash=USER
    ROUTING_TOKEN = "msts"  # Cookie: msts=TOKEN
    OTHER = "other"  # any other load-balance info (tsv://..., free text)


@dataclass(frozen=True, slots=True)
class NegotiationRequest:
    flags: int
    protocols: RdpProtocol
    correlation_id: bytes | None = None  # 16 bytes when rdpCorrelationInfo is present


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """One parsed request. ``raw`` is its exact bytes (to forward unchanged), ``length`` is
    ``len(raw)``; ``cookie`` is the routing line without CR LF (ASCII), or None."""

    raw: bytes
    src_ref: int
    cookie_kind: CookieKind | None
    cookie: str | None
    negotiation: NegotiationRequest | None

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def mstshash(self) -> str | None:
        """The user name of a ``Cookie: mstshash=`` line."""
        if self.cookie_kind is CookieKind.MSTSHASH and self.cookie is not None:
            return self.cookie[len(MSTSHASH) :]
        return None

    @property
    def routing_token(self) -> str | None:
        """The value of a ``Cookie: msts=`` line (opaque here)."""
        if self.cookie_kind is CookieKind.ROUTING_TOKEN and self.cookie is not None:
            return self.cookie[len(MSTS) :]
        return None

    def __repr__(self) -> str:
        # The routing token is a bearer credential: never in a repr (nor in a log line).
        shown = "<token>" if self.cookie_kind is CookieKind.ROUTING_TOKEN else repr(self.cookie)
        kind = None if self.cookie_kind is None else self.cookie_kind.value
        return (
            f"ConnectionRequest(length={self.length}, cookie_kind={kind}, cookie={shown}, "
            f"negotiation={self.negotiation!r})"
        )


def _bad(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"X.224 Connection Request: {why}", ErrorCode.MALFORMED)


def _check_header(data: bytes) -> int | None:
    """The TPKT length once the header bytes so far are valid, None if more are needed."""
    if len(data) >= 1 and data[0] != 3:
        raise _bad(f"TPKT version {data[0]} is not 3")
    if len(data) >= 2 and data[1] != 0:
        raise _bad("TPKT reserved byte is not 0")
    if len(data) < TPKT_HEADER:
        return None
    length: int = struct.unpack_from(">H", data, 2)[0]
    if length > MAX_CONNECTION_REQUEST:
        raise RemoteProtocolError(
            f"X.224 Connection Request: {length} bytes is over {MAX_CONNECTION_REQUEST}",
            ErrorCode.FRAME_TOO_LARGE,
        )
    if length < MIN_CONNECTION_REQUEST:
        raise _bad(f"TPKT length {length} is too short for a Connection Request")
    if len(data) >= 5 and data[4] != length - 5:
        raise _bad(f"X.224 length indicator {data[4]} does not match the TPKT length {length}")
    if len(data) >= 6 and data[5] != _CR_CODE:
        raise _bad(f"TPDU code 0x{data[5]:02x} is not a Connection Request (0xe0)")
    return length


def parse_connection_request(data: bytes) -> ConnectionRequest | None:
    """Parse the Connection Request at the start of ``data``; None if incomplete."""
    length = _check_header(data)
    if length is None or len(data) < length:
        return None
    raw = bytes(data[:length])
    dst_ref, src_ref, klass = struct.unpack_from(">HHB", raw, 6)
    if dst_ref != 0:
        raise _bad("DST-REF is not 0")
    if klass != 0:
        raise _bad(f"class and options 0x{klass:02x} is not class 0")
    rest = raw[MIN_CONNECTION_REQUEST:]
    kind, cookie, rest = _split_cookie(rest)
    return ConnectionRequest(raw, src_ref, kind, cookie, _parse_negotiation(rest))


def _split_cookie(rest: bytes) -> tuple[CookieKind | None, str | None, bytes]:
    if not rest or (rest[0] == _NEG_REQ_TYPE and len(rest) in (8, 8 + _CORRELATION_SIZE)):
        return None, None, rest
    end = rest.find(b"\r\n")
    if end < 0:
        raise _bad("the routing token or cookie is not ended by CR LF")
    line = rest[:end]
    if not line:
        raise _bad("empty routing token or cookie line")
    if any(b < 0x20 or b > 0x7E for b in line):
        raise _bad("the routing token or cookie has bytes other than printable ASCII")
    if line.startswith(MSTSHASH):
        kind = CookieKind.MSTSHASH
    elif line.startswith(MSTS):
        kind = CookieKind.ROUTING_TOKEN
    else:
        kind = CookieKind.OTHER
    prefix = {CookieKind.MSTSHASH: MSTSHASH, CookieKind.ROUTING_TOKEN: MSTS}.get(kind, b"")
    if prefix and len(line) == len(prefix):
        raise _bad("the cookie has no value")
    return kind, line.decode("ascii"), rest[end + 2 :]


def _parse_negotiation(rest: bytes) -> NegotiationRequest | None:
    if not rest:
        return None
    if len(rest) < _NEG_REQ.size:
        raise _bad(f"{len(rest)} stray bytes after the cookie")
    kind, flags, size, protocols = _NEG_REQ.unpack_from(rest)
    if kind != _NEG_REQ_TYPE or size != _NEG_REQ.size:
        raise _bad("bytes after the cookie are not an RDP Negotiation Request")
    tail = rest[_NEG_REQ.size :]
    correlation = None
    if tail:
        kind, cflags, size = struct.unpack_from("<BBH", tail) if len(tail) >= 4 else (0, 0, 0)
        if len(tail) != _CORRELATION_SIZE or kind != _CORRELATION_TYPE or size != len(tail):
            raise _bad("bytes after the Negotiation Request are not RDP Correlation Info")
        if cflags != 0:
            raise _bad("RDP Correlation Info flags are not 0")
        correlation = bytes(tail[4:20])
    elif flags & _CORRELATION_PRESENT:
        raise _bad("the Negotiation Request announces Correlation Info that is not there")
    return NegotiationRequest(flags, RdpProtocol(protocols), correlation)


def encode_connection_request(
    cookie: str | None = None,
    *,
    protocols: RdpProtocol | int | None = RdpProtocol.TLS | RdpProtocol.HYBRID,
    flags: int = 0,
    correlation_id: bytes | None = None,
    src_ref: int = 0,
) -> bytes:
    """A Connection Request as a client writes it: ``cookie`` is the whole routing line
    without CR LF (``"Cookie: mstshash=alice"``, ``"Cookie: msts=TOKEN"``); ``protocols`` None
    leaves out the Negotiation Request. Raises ``LocalProtocolError`` for what would not fit."""
    body = struct.pack(">BHHB", _CR_CODE, 0, src_ref, 0)
    if cookie is not None:
        line = cookie.encode("ascii", "replace")
        if not line or any(b < 0x20 or b > 0x7E for b in line):
            raise LocalProtocolError("a cookie is printable ASCII", ErrorCode.BAD_FIELD)
        body += line + b"\r\n"
    if protocols is not None:
        if correlation_id is not None:
            flags |= _CORRELATION_PRESENT
        body += _NEG_REQ.pack(_NEG_REQ_TYPE, flags, _NEG_REQ.size, int(protocols))
        if correlation_id is not None:
            if len(correlation_id) != 16:
                raise LocalProtocolError("a correlation id is 16 bytes", ErrorCode.BAD_FIELD)
            body += struct.pack("<BBH", _CORRELATION_TYPE, 0, _CORRELATION_SIZE)
            body += correlation_id + bytes(16)
    if len(body) > 254:
        raise LocalProtocolError(
            f"a Connection Request of {TPKT_HEADER + 1 + len(body)} bytes is over "
            f"{MAX_CONNECTION_REQUEST}",
            ErrorCode.FRAME_TOO_LARGE,
        )
    return struct.pack(">BBHB", 3, 0, TPKT_HEADER + 1 + len(body), len(body)) + body


# -- the server's answer: X.224 Connection Confirm (MS-RDPBCGR 2.2.1.2) ---------------------

_CC_CODE = 0xD0
_NEG_RSP_TYPE = 0x02
_NEG_FAILURE_TYPE = 0x03


@dataclass(frozen=True, slots=True)
class ConnectionConfirm:
    """An RDP server's Connection Confirm: the protocol it selected (``rdpNegRsp``; None when
    it sent none: standard RDP security), or the failure code of its ``rdpNegFailure``."""

    data: bytes  # the whole TPKT packet, as received
    selected: RdpProtocol | None
    failure: int | None

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def tls(self) -> bool:
        """The server goes on with a TLS handshake (TLS, CredSSP, CredSSP with early auth)."""
        return self.failure is None and bool(self.selected)


def parse_connection_confirm(data: bytes) -> ConnectionConfirm | None:
    """The Connection Confirm at the start of ``data`` (None until it is all there);
    ``RemoteProtocolError`` if it cannot be one."""
    if len(data) < TPKT_HEADER:
        return None
    version, _, length = struct.unpack_from(">BBH", data)
    if version != 3 or not TPKT_HEADER + X224_FIXED <= length <= MAX_CONNECTION_REQUEST:
        raise _bad(f"not a Connection Confirm (TPKT version {version}, length {length})")
    if len(data) < length:
        return None
    packet = data[:length]
    li, code = packet[4], packet[5]
    if li != length - 5 or code & 0xF0 != _CC_CODE:
        raise _bad(f"not a Connection Confirm (LI {li}, code 0x{code:02x})")
    rest = packet[TPKT_HEADER + X224_FIXED :]
    if not rest:
        return ConnectionConfirm(packet, None, None)
    if len(rest) != _NEG_REQ.size:
        raise _bad(f"{len(rest)} bytes after the Connection Confirm, expected 8")
    kind, _, size, value = _NEG_REQ.unpack(rest)
    if size != _NEG_REQ.size or kind not in (_NEG_RSP_TYPE, _NEG_FAILURE_TYPE):
        raise _bad(f"unknown negotiation answer type {kind} length {size}")
    if kind == _NEG_FAILURE_TYPE:
        return ConnectionConfirm(packet, None, value)
    return ConnectionConfirm(packet, RdpProtocol(value), None)
