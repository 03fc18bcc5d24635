"""RDCleanPath: how a browser's RDP client asks a gateway for a host, sans-I/O.

Theory of operation. A browser cannot open a TCP connection, let alone TLS to an RDP host, so
IronRDP's web client speaks RDCleanPath over a binary WebSocket (IronRDP's
``crates/ironrdp-rdcleanpath``; this is our own codec of it). The client sends one request
PDU: the protocol version, the destination it would like, a token for the proxy and the X.224
Connection Request it built. The proxy connects to the host, forwards that X.224 request
unchanged, reads the X.224 Connection Confirm, does the TLS handshake with the host itself, and
answers with one response PDU: the confirm, the host's certificate chain (the client binds
CredSSP to the first certificate) and the address it reached. An error is the same PDU with
its ``error`` field set (an HTTP status, a socket error or a TLS alert). After that, the
WebSocket carries the RDP bytes inside the TLS, in both directions.

Wire format: DER (X.690), every field EXPLICIT-tagged::

    RDCleanPathPdu ::= SEQUENCE {
        version             [0] INTEGER,                 -- 3390 (3389 + 1)
        error               [1] RDCleanPathErr OPTIONAL, -- proxy to client
        destination         [2] UTF8String OPTIONAL,     -- client to proxy
        proxy_auth          [3] UTF8String OPTIONAL,     -- client to proxy
        server_auth         [4] UTF8String OPTIONAL,     -- unused
        preconnection_blob  [5] UTF8String OPTIONAL,     -- client to proxy
        x224_connection_pdu [6] OCTET STRING OPTIONAL,   -- both ways
        server_cert_chain   [7] SEQUENCE OF OCTET STRING OPTIONAL,  -- proxy to client
        server_addr         [9] UTF8String OPTIONAL }    -- proxy to client
    RDCleanPathErr ::= SEQUENCE {
        error_code          [0] INTEGER,                 -- 1 general, 2 negotiation
        http_status_code    [1] INTEGER OPTIONAL,
        wsa_last_error      [2] INTEGER OPTIONAL,
        tls_alert_code      [3] INTEGER OPTIONAL }

Rules this codec keeps: :func:`parse_pdu` is a transaction (None until the whole PDU is there,
then the PDU and how many bytes it took); the outer length is checked against ``max_size``
before anything is buffered; DER strictly (minimal lengths and integers, fields in tag order,
each at most once, no unknown field, nothing left over inside a sequence, valid UTF-8). Any
violation is a :class:`~ras.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ras.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "GENERAL_ERROR",
    "MAX_REQUEST_SIZE",
    "NEGOTIATION_ERROR",
    "VERSION",
    "CleanPathError",
    "CleanPathPdu",
    "encode_pdu",
    "parse_pdu",
]

VERSION = 3390  # 3389 + 1, the only version there is
GENERAL_ERROR = 1
NEGOTIATION_ERROR = 2
MAX_REQUEST_SIZE = 16 * 1024  # a request: an X.224 request, a host name and a token
_SEQUENCE = 0x30
_INTEGER = 0x02
_OCTETS = 0x04
_UTF8 = 0x0C
_MAX_INT = 2**64 - 1


@dataclass(frozen=True, slots=True)
class CleanPathError:
    """Why the proxy could not connect; at least ``code``. The browser shows it."""

    code: int = GENERAL_ERROR
    http_status: int | None = None
    wsa_error: int | None = None
    tls_alert: int | None = None

    def __post_init__(self) -> None:
        _check_int("error_code", self.code, 0xFFFF)
        for name, value, top in (
            ("http_status_code", self.http_status, 0xFFFF),
            ("wsa_last_error", self.wsa_error, 0xFFFF),
            ("tls_alert_code", self.tls_alert, 0xFF),
        ):
            if value is not None:
                _check_int(name, value, top)


@dataclass(frozen=True, slots=True)
class CleanPathPdu:
    """One RDCleanPath PDU; the class methods build the shapes the protocol uses."""

    version: int = VERSION
    error: CleanPathError | None = None
    destination: str | None = None
    proxy_auth: str | None = None
    server_auth: str | None = None
    preconnection_blob: str | None = None
    x224: bytes | None = None
    cert_chain: tuple[bytes, ...] | None = None
    server_addr: str | None = None

    def __post_init__(self) -> None:
        _check_int("version", self.version, _MAX_INT)

    @classmethod
    def request(
        cls, x224: bytes, destination: str, proxy_auth: str, pcb: str | None = None
    ) -> CleanPathPdu:
        return cls(
            destination=destination, proxy_auth=proxy_auth, preconnection_blob=pcb, x224=x224
        )

    @classmethod
    def response(cls, server_addr: str, x224: bytes, chain: tuple[bytes, ...]) -> CleanPathPdu:
        return cls(x224=x224, cert_chain=chain, server_addr=server_addr)

    @classmethod
    def http_error(cls, status: int) -> CleanPathPdu:
        return cls(error=CleanPathError(GENERAL_ERROR, http_status=status))

    @classmethod
    def tls_error(cls, alert: int) -> CleanPathPdu:
        return cls(error=CleanPathError(GENERAL_ERROR, tls_alert=alert))

    @classmethod
    def wsa_error(cls, code: int) -> CleanPathPdu:
        return cls(error=CleanPathError(GENERAL_ERROR, wsa_error=code))

    @classmethod
    def negotiation_error(cls, x224: bytes) -> CleanPathPdu:
        """The host refused the X.224 negotiation: its confirm goes back for the client to read."""
        return cls(error=CleanPathError(NEGOTIATION_ERROR), x224=x224)

    @property
    def is_request(self) -> bool:
        """Has what a proxy needs: a proxy token and an X.224 Connection Request."""
        return self.error is None and self.proxy_auth is not None and self.x224 is not None


def _check_int(name: str, value: int, top: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise LocalProtocolError(f"RDCleanPath {name} {value!r} is out of range")


# -- encoding ------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


def _integer(value: int) -> bytes:
    # minimal two's complement of a non-negative number: a leading 0 if the top bit is set
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _explicit(number: int, inner: bytes) -> bytes:
    return _tlv(0xA0 | number, inner)


def _encode_error(error: CleanPathError) -> bytes:
    fields = [_explicit(0, _integer(error.code))]
    for number, value in ((1, error.http_status), (2, error.wsa_error), (3, error.tls_alert)):
        if value is not None:
            fields.append(_explicit(number, _integer(value)))
    return _tlv(_SEQUENCE, b"".join(fields))


def encode_pdu(pdu: CleanPathPdu) -> bytes:
    """The DER bytes of ``pdu``."""
    fields = [_explicit(0, _integer(pdu.version))]
    if pdu.error is not None:
        fields.append(_explicit(1, _encode_error(pdu.error)))
    for number, text in (
        (2, pdu.destination),
        (3, pdu.proxy_auth),
        (4, pdu.server_auth),
        (5, pdu.preconnection_blob),
    ):
        if text is not None:
            fields.append(_explicit(number, _tlv(_UTF8, text.encode("utf-8"))))
    if pdu.x224 is not None:
        fields.append(_explicit(6, _tlv(_OCTETS, pdu.x224)))
    if pdu.cert_chain is not None:
        chain = b"".join(_tlv(_OCTETS, cert) for cert in pdu.cert_chain)
        fields.append(_explicit(7, _tlv(_SEQUENCE, chain)))
    if pdu.server_addr is not None:
        fields.append(_explicit(9, _tlv(_UTF8, pdu.server_addr.encode("utf-8"))))
    return _tlv(_SEQUENCE, b"".join(fields))


# -- decoding ------------------------------------------------------------------------------


def _bad(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad RDCleanPath PDU: {why}")


def _header(data: bytes, at: int) -> tuple[int, int, int] | None:
    """(tag, length, offset of the value) of the TLV at ``at``; None: not all there yet."""
    if len(data) < at + 2:
        return None
    tag, first = data[at], data[at + 1]
    if first < 0x80:
        return tag, first, at + 2
    size = first & 0x7F
    if size == 0 or size > 4:
        raise _bad("indefinite or oversized length")
    if len(data) < at + 2 + size:
        return None
    raw = data[at + 2 : at + 2 + size]
    length = int.from_bytes(raw, "big")
    if raw[0] == 0 or length < 0x80:
        raise _bad("length not in its shortest form")
    return tag, length, at + 2 + size


def _elements(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs that make up ``data`` exactly (the content of a constructed value)."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        header = _header(data, at)
        if header is None:
            raise _bad("a field runs past its sequence")
        tag, length, start = header
        if start + length > len(data):
            raise _bad("a field runs past its sequence")
        out.append((tag, data[start : start + length]))
        at = start + length
    return out


def _single(tag: int, value: bytes) -> bytes:
    """The content of the one ``tag`` element inside an explicit tag's ``value``."""
    inner = _elements(value)
    if len(inner) != 1 or inner[0][0] != tag:
        raise _bad(f"expected one element of tag 0x{tag:02x}")
    return inner[0][1]


def _int(value: bytes, top: int) -> int:
    content = _single(_INTEGER, value)
    if not content:
        raise _bad("an empty integer")
    if len(content) > 1 and (
        (content[0] == 0 and content[1] < 0x80) or (content[0] == 0xFF and content[1] >= 0x80)
    ):
        raise _bad("an integer not in its shortest form")
    if content[0] & 0x80:
        raise _bad("a negative integer")
    number = int.from_bytes(content, "big")
    if number > top:
        raise _bad(f"integer {number} out of range")
    return number


def _text(value: bytes) -> str:
    try:
        return _single(_UTF8, value).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("a string that is not UTF-8") from None


def _fields(content: bytes, known: tuple[int, ...]) -> dict[int, bytes]:
    """The explicit fields of a sequence, by number: known ones only, in order, once each."""
    out: dict[int, bytes] = {}
    last = -1
    for tag, value in _elements(content):
        number = tag - 0xA0
        if tag & 0xE0 != 0xA0 or number not in known:
            raise _bad(f"unknown field tag 0x{tag:02x}")
        if number <= last:
            raise _bad(f"field [{number}] out of order or repeated")
        last = number
        out[number] = value
    return out


def _decode_error(value: bytes) -> CleanPathError:
    f = _fields(_single(_SEQUENCE, value), (0, 1, 2, 3))
    if 0 not in f:
        raise _bad("an error without its code")
    return CleanPathError(
        _int(f[0], 0xFFFF),
        http_status=_int(f[1], 0xFFFF) if 1 in f else None,
        wsa_error=_int(f[2], 0xFFFF) if 2 in f else None,
        tls_alert=_int(f[3], 0xFF) if 3 in f else None,
    )


def parse_pdu(data: bytes, *, max_size: int = MAX_REQUEST_SIZE) -> tuple[CleanPathPdu, int] | None:
    """The PDU at the start of ``data`` and how many bytes it took, or None if it is not all
    there yet; ``RemoteProtocolError`` when it cannot be one (or is longer than ``max_size``)."""
    header = _header(data, 0)
    if header is None:
        if data and data[0] != _SEQUENCE:
            raise _bad("not a DER sequence")
        return None
    tag, length, start = header
    if tag != _SEQUENCE:
        raise _bad("not a DER sequence")
    if start + length > max_size:
        raise _bad(f"{start + length} bytes, more than {max_size}")
    if len(data) < start + length:
        return None
    f = _fields(data[start : start + length], (0, 1, 2, 3, 4, 5, 6, 7, 9))
    if 0 not in f:
        raise _bad("no version")
    version = _int(f[0], _MAX_INT)
    if version != VERSION:
        raise _bad(f"version {version}, expected {VERSION}")
    chain = None
    if 7 in f:
        certs = _elements(_single(_SEQUENCE, f[7]))
        if any(t != _OCTETS for t, _ in certs):
            raise _bad("a certificate that is not an octet string")
        chain = tuple(v for _, v in certs)
    pdu = CleanPathPdu(
        version=version,
        error=_decode_error(f[1]) if 1 in f else None,
        destination=_text(f[2]) if 2 in f else None,
        proxy_auth=_text(f[3]) if 3 in f else None,
        server_auth=_text(f[4]) if 4 in f else None,
        preconnection_blob=_text(f[5]) if 5 in f else None,
        x224=_single(_OCTETS, f[6]) if 6 in f else None,
        cert_chain=chain,
        server_addr=_text(f[9]) if 9 in f else None,
    )
    return pdu, start + length
