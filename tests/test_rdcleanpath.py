"""The RDCleanPath codec (``ras.protocol.rdcleanpath``): IronRDP's own test vectors byte for
byte (crates/ironrdp-testsuite-core/tests/rdcleanpath.rs), fed whole and byte by byte; strict
DER refusals; property tests (round trip, any split, any mutation or garbage gives only
``RemoteProtocolError``)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ras.errors import LocalProtocolError, RemoteProtocolError
from ras.protocol.rdcleanpath import (
    NEGOTIATION_ERROR,
    CleanPathError,
    CleanPathPdu,
    encode_pdu,
    parse_pdu,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEAD = bytes([0xDE, 0xAD, 0xBE, 0xFF])

# IronRDP's vectors, copied from its test suite as they are written there.
REQUEST_DER = bytes(
    [
        0x30, 0x32, 0xA0, 0x4, 0x2, 0x2, 0xD, 0x3E, 0xA2, 0xD, 0xC, 0xB, 0x64, 0x65, 0x73, 0x74,
        0x69, 0x6E, 0x61, 0x74, 0x69, 0x6F, 0x6E, 0xA3, 0xC, 0xC, 0xA, 0x70, 0x72, 0x6F, 0x78,
        0x79, 0x20, 0x61, 0x75, 0x74, 0x68, 0xA5, 0x5, 0xC, 0x3, 0x50, 0x43, 0x42, 0xA6, 0x6, 0x4,
        0x4, 0xDE, 0xAD, 0xBE, 0xFF,
    ]
)  # fmt: skip
VMCONNECT_REQUEST_DER = bytes(
    [
        0x30, 0x2A, 0xA0, 0x4, 0x2, 0x2, 0xD, 0x3E, 0xA2, 0xD, 0xC, 0xB, 0x64, 0x65, 0x73, 0x74,
        0x69, 0x6E, 0x61, 0x74, 0x69, 0x6F, 0x6E, 0xA3, 0xC, 0xC, 0xA, 0x70, 0x72, 0x6F, 0x78,
        0x79, 0x20, 0x61, 0x75, 0x74, 0x68, 0xA5, 0x5, 0xC, 0x3, 0x50, 0x43, 0x42,
    ]
)  # fmt: skip
RESPONSE_SUCCESS_DER = bytes(
    [
        0x30, 0x34, 0xA0, 0x4, 0x2, 0x2, 0xD, 0x3E, 0xA6, 0x6, 0x4, 0x4, 0xDE, 0xAD, 0xBE, 0xFF,
        0xA7, 0x14, 0x30, 0x12, 0x4, 0x4, 0xDE, 0xAD, 0xBE, 0xFF, 0x4, 0x4, 0xDE, 0xAD, 0xBE,
        0xFF, 0x4, 0x4, 0xDE, 0xAD, 0xBE, 0xFF, 0xA9, 0xE, 0xC, 0xC, 0x31, 0x39, 0x32, 0x2E, 0x31,
        0x36, 0x38, 0x2E, 0x37, 0x2E, 0x39, 0x35,
    ]
)  # fmt: skip
VMCONNECT_RESPONSE_DER = bytes(
    [
        0x30, 0x2C, 0xA0, 0x4, 0x2, 0x2, 0xD, 0x3E, 0xA7, 0x14, 0x30, 0x12, 0x4, 0x4, 0xDE, 0xAD,
        0xBE, 0xFF, 0x4, 0x4, 0xDE, 0xAD, 0xBE, 0xFF, 0x4, 0x4, 0xDE, 0xAD, 0xBE, 0xFF, 0xA9, 0xE,
        0xC, 0xC, 0x31, 0x39, 0x32, 0x2E, 0x31, 0x36, 0x38, 0x2E, 0x37, 0x2E, 0x39, 0x35,
    ]
)  # fmt: skip
RESPONSE_HTTP_ERROR_DER = bytes(
    [
        0x30, 0x15, 0xA0, 0x4, 0x2, 0x2, 0xD, 0x3E, 0xA1, 0xD, 0x30, 0xB, 0xA0, 0x3, 0x2, 0x1, 0x1,
        0xA1, 0x4, 0x2, 0x2, 0x1, 0xF4,
    ]
)  # fmt: skip
RESPONSE_TLS_ERROR_DER = bytes(
    [
        0x30, 0x14, 0xA0, 0x04, 0x02, 0x02, 0x0D, 0x3E, 0xA1, 0x0C, 0x30, 0x0A, 0xA0, 0x03, 0x02,
        0x01, 0x01, 0xA3, 0x03, 0x02, 0x01, 0x30,
    ]
)  # fmt: skip

VECTORS = [
    pytest.param(
        CleanPathPdu.request(DEAD, "destination", "proxy auth", "PCB"), REQUEST_DER, id="request"
    ),
    pytest.param(
        CleanPathPdu(destination="destination", proxy_auth="proxy auth", preconnection_blob="PCB"),
        VMCONNECT_REQUEST_DER,
        id="vmconnect_request",
    ),
    pytest.param(
        CleanPathPdu.response("192.168.7.95", DEAD, (DEAD, DEAD, DEAD)),
        RESPONSE_SUCCESS_DER,
        id="response_success",
    ),
    pytest.param(
        CleanPathPdu(cert_chain=(DEAD, DEAD, DEAD), server_addr="192.168.7.95"),
        VMCONNECT_RESPONSE_DER,
        id="vmconnect_response",
    ),
    pytest.param(CleanPathPdu.http_error(500), RESPONSE_HTTP_ERROR_DER, id="http_error"),
    pytest.param(CleanPathPdu.tls_error(48), RESPONSE_TLS_ERROR_DER, id="tls_error"),
]  # fmt: skip


@pytest.mark.parametrize(("pdu", "der"), VECTORS)
def test_ironrdp_vectors_encode_byte_for_byte(pdu: CleanPathPdu, der: bytes) -> None:
    assert encode_pdu(pdu).hex() == der.hex()


@pytest.mark.parametrize(("pdu", "der"), VECTORS)
def test_ironrdp_vectors_decode_whole_and_byte_by_byte(pdu: CleanPathPdu, der: bytes) -> None:
    assert parse_pdu(der, max_size=4096) == (pdu, len(der))
    for cut in range(len(der)):
        assert parse_pdu(der[:cut], max_size=4096) is None  # IronRDP's detect: not enough bytes
    assert parse_pdu(der + b"\x17\x03\x03", max_size=4096) == (pdu, len(der))  # TLS follows


def test_request_shape() -> None:
    assert CleanPathPdu.request(DEAD, "h", "t").is_request
    assert not CleanPathPdu(destination="destination", proxy_auth="x").is_request  # no X.224
    assert not CleanPathPdu.http_error(403).is_request


def test_long_lengths_and_errors_round_trip() -> None:
    chain = (bytes(1500), bytes(70000))  # lengths in two and three bytes
    pdu = CleanPathPdu.response("2001:db8::1", bytes(19), chain)
    der = encode_pdu(pdu)
    assert der[:2] == b"\x30\x83"
    assert parse_pdu(der, max_size=1 << 20) == (pdu, len(der))
    both = CleanPathPdu(error=CleanPathError(1, 502, 10060, 45))
    assert parse_pdu(encode_pdu(both)) == (both, len(encode_pdu(both)))
    nego = CleanPathPdu.negotiation_error(b"\x03\x00\x00\x13")
    got = parse_pdu(encode_pdu(nego))
    assert got is not None
    assert got[0].error == CleanPathError(NEGOTIATION_ERROR)


@pytest.mark.parametrize(
    ("der", "why"),
    [
        (b"\x31\x00", "not a DER sequence"),
        (b"\x04", "not a DER sequence"),
        (b"\x30\x00", "no version"),
        (b"\x30\x06\xa0\x04\x02\x02\x0d\x3d", "version 3389"),
        (b"\x30\x07\xa0\x05\x02\x03\x00\x0d\x3e", "shortest form"),  # padded integer
        (b"\x30\x81\x06\xa0\x04\x02\x02\x0d\x3e", "shortest form"),  # long length for 6
        (b"\x30\x80", "indefinite"),
        (b"\x30\x0a\xa0\x04\x02\x02\x0d\x3e\xa8\x02\x0c\x00", "unknown field"),  # [8]
        (b"\x30\x0a\xa2\x02\x0c\x00\xa0\x04\x02\x02\x0d\x3e", "out of order"),
        (b"\x30\x0e\xa0\x04\x02\x02\x0d\x3e\xa2\x02\x0c\x00\xa2\x02\x0c\x00", "repeated"),
        (b"\x30\x0b\xa0\x04\x02\x02\x0d\x3e\xa2\x03\x0c\x01\xff", "UTF-8"),
        (b"\x30\x0a\xa0\x04\x02\x02\x0d\x3e\xa2\x02\x04\x00", "tag 0x0c"),  # octets, not text
        (b"\x30\x07\xa0\x04\x02\x02\x0d\x3e\x00", "runs past"),  # a stray byte inside
        (b"\x30\x06\xa0\x04\x02\x02\xff\x3e", "negative"),
    ],
)
def test_refusals(der: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        parse_pdu(der)


def test_size_is_refused_on_the_header() -> None:
    # 64 KiB announced, 4 bytes given: refused before waiting for (or buffering) the rest
    with pytest.raises(RemoteProtocolError, match="more than 16384"):
        parse_pdu(b"\x30\x83\x01\x00\x00\xa0")


def test_fields_are_checked_when_built() -> None:
    with pytest.raises(LocalProtocolError):
        CleanPathError(1, http_status=70000)
    with pytest.raises(LocalProtocolError):
        CleanPathPdu(version=-1)


_texts = st.none() | st.text(max_size=40)
_pdus = st.builds(
    CleanPathPdu,
    error=st.none()
    | st.builds(
        CleanPathError,
        code=st.integers(0, 0xFFFF),
        http_status=st.none() | st.integers(0, 0xFFFF),
        wsa_error=st.none() | st.integers(0, 0xFFFF),
        tls_alert=st.none() | st.integers(0, 0xFF),
    ),
    destination=_texts,
    proxy_auth=_texts,
    server_auth=_texts,
    preconnection_blob=_texts,
    x224=st.none() | st.binary(max_size=300),
    cert_chain=st.none() | st.lists(st.binary(max_size=200), max_size=3).map(tuple),
    server_addr=_texts,
)


@PROPERTY
@given(_pdus, st.data())
def test_round_trip_at_any_split(pdu: CleanPathPdu, data: st.DataObject) -> None:
    der = encode_pdu(pdu)
    cut = data.draw(st.integers(0, len(der)))
    assert parse_pdu(der[:cut]) is None or cut == len(der)
    assert parse_pdu(der) == (pdu, len(der))


@PROPERTY
@given(_pdus, st.data())
def test_mutations_give_only_protocol_errors(pdu: CleanPathPdu, data: st.DataObject) -> None:
    der = bytearray(encode_pdu(pdu))
    at = data.draw(st.integers(0, len(der) - 1))
    der[at] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RemoteProtocolError):
        parse_pdu(bytes(der))


@PROPERTY
@given(st.binary(max_size=200))
def test_garbage_gives_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_pdu(data)
