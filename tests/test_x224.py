"""The TPKT/X.224 Connection Request codec (``ras.protocol.x224``): what real RDP clients
send, fed whole and byte by byte; strict refusals; property tests (round trip, any split, any
mutation or garbage gives only ``RemoteProtocolError``)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ras.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ras.protocol.x224 import (
    MAX_CONNECTION_REQUEST,
    CookieKind,
    RdpProtocol,
    encode_connection_request,
    parse_connection_request,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What xfreerdp 2.11 sent to a plain listener (docs: ../shared/notes/rdp-peers.md).
XFREERDP_MSTSHASH = (
    bytes.fromhex("0300002d28e00000000000")
    + b"Cookie: mstshash=rdpuser\r\n"
    + bytes.fromhex("0100080003000000")
)
# xfreerdp reading an .rdp file with loadbalanceinfo:s:Cookie: msts=r1.ABCdef-_x
XFREERDP_TOKEN = (
    bytes.fromhex("0300002e29e00000000000")
    + b"Cookie: msts=r1.ABCdef-_x\r\n"
    + bytes.fromhex("0100080003000000")
)


def test_xfreerdp_mstshash_cookie() -> None:
    request = parse_connection_request(XFREERDP_MSTSHASH)
    assert request is not None
    assert request.raw == XFREERDP_MSTSHASH
    assert request.length == 45
    assert request.cookie_kind is CookieKind.MSTSHASH
    assert request.mstshash == "rdpuser"
    assert request.routing_token is None
    assert request.negotiation is not None
    assert request.negotiation.protocols == RdpProtocol.TLS | RdpProtocol.HYBRID


def test_xfreerdp_routing_token_from_an_rdp_file() -> None:
    request = parse_connection_request(XFREERDP_TOKEN + b"more")
    assert request is not None
    assert request.length == len(XFREERDP_TOKEN)  # what follows is not the request's
    assert request.routing_token == "r1.ABCdef-_x"
    assert request.mstshash is None
    assert "r1.ABC" not in repr(request)  # a bearer token never reaches a log line


@pytest.mark.parametrize("wire", [XFREERDP_MSTSHASH, XFREERDP_TOKEN])
def test_every_prefix_needs_more_and_bytewise_gives_the_same(wire: bytes) -> None:
    for n in range(len(wire)):
        assert parse_connection_request(wire[:n]) is None
    assert parse_connection_request(wire) == parse_connection_request(bytes(wire))


def test_no_cookie_other_line_and_correlation_info() -> None:
    bare = parse_connection_request(encode_connection_request(protocols=RdpProtocol.TLS))
    assert bare is not None
    assert bare.cookie is None
    assert bare.cookie_kind is None
    tsv = parse_connection_request(
        encode_connection_request("tsv://MS Terminal Services Plugin.1.x")
    )
    assert tsv is not None
    assert tsv.cookie_kind is CookieKind.OTHER
    assert tsv.mstshash is None
    assert tsv.routing_token is None
    correlated = encode_connection_request("Cookie: mstshash=a", correlation_id=bytes(range(16)))
    request = parse_connection_request(correlated)
    assert request is not None
    assert request.negotiation is not None
    assert request.negotiation.correlation_id == bytes(range(16))
    legacy = parse_connection_request(encode_connection_request(protocols=None))
    assert legacy is not None
    assert legacy.negotiation is None


def cr(after_li: bytes) -> bytes:
    """A TPKT + X.224 packet with correct lengths around ``after_li``."""
    return bytes([3, 0, 0, len(after_li) + 5, len(after_li)]) + after_li


FIXED = bytes.fromhex("e00000000000")  # CR code, DST-REF, SRC-REF, class 0
NEG = bytes.fromhex("0100080003000000")
BAD = {
    "tpkt version": b"\x04\x00\x00\x0b",
    "tpkt reserved": b"\x03\x01",
    "too long, refused on the header": b"\x03\x00\x01\x04",
    "too short": b"\x03\x00\x00\x0a",
    "length indicator disagrees": bytes.fromhex("0300000b05") + FIXED,
    "not a connection request": cr(bytes.fromhex("f00000000000")),
    "dst-ref": cr(bytes.fromhex("e00001000000")),
    "class 4": cr(bytes.fromhex("e00000000040")),
    "no CR LF": cr(FIXED + b"Cookie: ms"),
    "control character": cr(FIXED + b"Cookie:\x00ms\r\n"),
    "high byte": cr(FIXED + b"Cookie:\xffms\r\n"),
    "empty mstshash": cr(FIXED + b"Cookie: mstshash=\r\n" + NEG),
    "empty line": cr(FIXED + b"\r\n" + NEG),
    "stray bytes": cr(FIXED + b"\x01\x00\x08"),
    "bad negreq length": cr(FIXED + bytes.fromhex("0100090003000000")),
    "trailing after negreq": cr(FIXED + NEG + b"\x00"),
    "correlation announced, absent": cr(FIXED + bytes.fromhex("0108080003000000")),
    "bad correlation": cr(FIXED + bytes.fromhex("0108080003000000") + bytes(36)),
}


def _refuses(data: bytes) -> bool:
    try:
        parse_connection_request(data)
    except RemoteProtocolError:
        return True
    return False


@pytest.mark.parametrize("name", list(BAD))
def test_strict_refusals_whole_and_bytewise(name: str) -> None:
    wire = BAD[name]
    # fed byte by byte, every prefix before the refusal still needs more, never a request
    refused_at = next(n for n in range(1, len(wire) + 1) if _refuses(wire[:n]))
    assert all(parse_connection_request(wire[:n]) is None for n in range(refused_at))
    with pytest.raises(RemoteProtocolError) as caught:
        parse_connection_request(wire)
    if name == "too long, refused on the header":
        assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_encoder_refuses_what_does_not_fit() -> None:
    with pytest.raises(LocalProtocolError):
        encode_connection_request("Cookie: msts=" + "x" * 250)
    with pytest.raises(LocalProtocolError):
        encode_connection_request("Cookie: msts=\x01")
    assert len(encode_connection_request("Cookie: msts=" + "x" * 220)) <= MAX_CONNECTION_REQUEST


_lines = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=150)
_cookies = (
    st.none()
    | _lines.map(lambda s: "Cookie: mstshash=" + s)
    | _lines.map(lambda s: "Cookie: msts=" + s)
    | _lines.filter(lambda s: not s.startswith("Cookie: ms"))
)


@PROPERTY
@given(
    _cookies,
    st.none() | st.integers(0, 0x1F),
    st.none() | st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFF),
)
def test_round_trip_and_any_split(
    cookie: str | None, protocols: int | None, correlation: bytes | None, src_ref: int
) -> None:
    if protocols is None:
        correlation = None
    wire = encode_connection_request(
        cookie, protocols=protocols, correlation_id=correlation, src_ref=src_ref
    )
    request = parse_connection_request(wire)
    assert request is not None
    assert request.raw == wire
    assert request.src_ref == src_ref
    assert request.cookie == cookie
    if protocols is None:
        assert request.negotiation is None
    else:
        assert request.negotiation is not None
        assert int(request.negotiation.protocols) == protocols
        assert request.negotiation.correlation_id == correlation
    for n in range(len(wire)):
        assert parse_connection_request(wire[:n]) is None


@PROPERTY
@given(st.data())
def test_any_mutation_is_a_request_or_a_remote_protocol_error(data: st.DataObject) -> None:
    wire = bytearray(data.draw(st.sampled_from([XFREERDP_MSTSHASH, XFREERDP_TOKEN])))
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] = data.draw(st.integers(0, 255).filter(lambda b: b != wire[at]))
    try:
        request = parse_connection_request(bytes(wire))
    except RemoteProtocolError:
        return
    # what still parses is a well-formed request (a changed letter of the cookie, a flag)
    assert request is None or request.raw == bytes(wire[: request.length])


@PROPERTY
@given(st.binary(max_size=300))
def test_garbage_never_crashes(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_connection_request(data)
