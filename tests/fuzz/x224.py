"""The first packet of an RDP connection: TPKT + X.224 Connection Request
(``ras.protocol.x224.parse_connection_request``), read by the gateway's RDP load balancer.

A transaction over a growing buffer, like ``parse_v2`` (see ``fuzz.proxy``). A request that
parses must be written back by ``encode_connection_request`` from its fields into a request
that parses to the same routing line, references and negotiation.
"""

from __future__ import annotations

from fuzz import cuts
from ras.errors import ErrorCode, RemoteProtocolError
from ras.protocol.x224 import (
    ConnectionRequest,
    encode_connection_request,
    parse_connection_request,
)

DICTIONARY = (
    b"\x03\x00\x00",  # TPKT version 3, reserved, length high byte
    b"\xe0\x00\x00\x00\x00\x00",  # Connection Request, DST-REF, SRC-REF, class 0
    b"Cookie: mstshash=",
    b"Cookie: msts=",
    b"\r\n",
    b"\x01\x00\x08\x00\x03\x00\x00\x00",  # rdpNegReq: TLS | HYBRID
    b"\x06\x00\x24\x00",  # rdpCorrelationInfo head
)

Outcome = ConnectionRequest | ErrorCode | None


def _parse(data: bytes) -> Outcome:
    try:
        return parse_connection_request(data)
    except RemoteProtocolError as exc:
        return exc.code


def _fields(request: ConnectionRequest) -> tuple[object, ...]:
    neg = request.negotiation
    negotiation = None if neg is None else (neg.protocols, neg.correlation_id)
    return request.src_ref, request.cookie_kind, request.cookie, negotiation


def fuzz_one(data: bytes) -> None:
    whole = _parse(data)
    if isinstance(whole, ConnectionRequest):
        assert whole.raw == data[: whole.length]
        repr(whole)
        assert whole.mstshash is None or whole.routing_token is None
        neg = whole.negotiation
        again = encode_connection_request(
            whole.cookie,
            protocols=None if neg is None else neg.protocols,
            flags=0 if neg is None else neg.flags,
            correlation_id=None if neg is None else neg.correlation_id,
            src_ref=whole.src_ref,
        )
        parsed = parse_connection_request(again)
        assert parsed is not None
        assert _fields(parsed) == _fields(whole), (parsed, whole)
    length = whole.length if isinstance(whole, ConnectionRequest) else 0
    for cut in cuts(data, length - 1, length):
        part = _parse(data[:cut])
        if isinstance(whole, ConnectionRequest):
            assert part == (whole if cut >= whole.length else None), (cut, part, whole)
        elif whole is None:
            assert part is None, (cut, part)
        else:
            assert part is None or part == whole, (cut, part, whole)
