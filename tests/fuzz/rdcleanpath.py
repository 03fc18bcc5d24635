"""A browser's first WebSocket bytes: the RDCleanPath request
(``ras.protocol.rdcleanpath.parse_pdu``), read by the gateway's web client endpoint.

A transaction over a growing buffer, like ``fuzz.x224``. A PDU that parses must be written
back by ``encode_pdu`` into the very bytes it was read from (DER has one encoding).
"""

from __future__ import annotations

from fuzz import cuts
from ras.errors import RemoteProtocolError
from ras.protocol.rdcleanpath import CleanPathPdu, encode_pdu, parse_pdu

DICTIONARY = (
    b"\x30\x82",  # a SEQUENCE with a two-byte length
    b"\xa0\x04\x02\x02\x0d\x3e",  # [0] version 3390
    b"\xa1",  # [1] error
    b"\xa2",  # [2] destination
    b"\xa3",  # [3] proxy auth
    b"\xa6",  # [6] X.224
    b"\xa7",  # [7] certificate chain
    b"\x0c",  # UTF8String
    b"\x04",  # OCTET STRING
)

Outcome = tuple[CleanPathPdu, int] | str | None


def _parse(data: bytes) -> Outcome:
    try:
        return parse_pdu(data)
    except RemoteProtocolError:
        return "refused"


def fuzz_one(data: bytes) -> None:
    whole = _parse(data)
    if isinstance(whole, tuple):
        pdu, length = whole
        assert encode_pdu(pdu) == data[:length], (pdu, data[:length])
        repr(pdu)
    length = whole[1] if isinstance(whole, tuple) else 0
    for cut in cuts(data, length - 1, length):
        part = _parse(data[:cut])
        if isinstance(whole, tuple):
            assert part == (whole if cut >= whole[1] else None), (cut, part, whole)
        elif whole is None:
            assert part is None, (cut, part)
        else:
            assert part is None or part == whole, (cut, part, whole)
