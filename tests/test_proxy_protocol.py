"""Codec tests of PROXY protocol v2 (``ras.protocol.proxy``) on plain bytes: no trio, no sockets.

Golden headers are built by hand from the layout in haproxy's proxy-protocol.txt section 2.2,
not with the encoder, so that encoder and parser cannot agree on a mistake.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ras.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ras.protocol import (
    PROXY_V2_MAX_PAYLOAD,
    PROXY_V2_SIGNATURE,
    PP2Type,
    ProxyCommand,
    ProxyFamily,
    ProxyHeader,
    encode_v2,
    encode_v2_local,
    parse_v2,
)
from ras.protocol.proxy import crc32c

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIG = bytes.fromhex("0D0A0D0A000D0A515549540A")


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


def header(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes((ver_cmd, fam)) + struct.pack("!H", len(body)) + body


# 192.0.2.7:51000 -> 10.0.0.1:443, TCP over IPv4, PROXY command
TCP4 = bytes.fromhex(
    "0D0A0D0A000D0A515549540A"  # signature
    "21"  # version 2, PROXY
    "11"  # AF_INET, STREAM
    "000C"  # 12 bytes follow
    "C0000207"  # 192.0.2.7
    "0A000001"  # 10.0.0.1
    "C738"  # 51000
    "01BB"  # 443
)
TCP4_HEADER = ProxyHeader(
    command=ProxyCommand.PROXY,
    family=ProxyFamily.TCP4,
    source=("192.0.2.7", 51000),
    destination=("10.0.0.1", 443),
    tlvs=(),
    length=28,
)
# [2001:db8::7]:40000 -> [2001:db8::1]:3389
TCP6 = bytes.fromhex(
    "0D0A0D0A000D0A515549540A"  # signature
    "21"  # version 2, PROXY
    "21"  # AF_INET6, STREAM
    "0024"  # 36 bytes follow
    "20010DB8000000000000000000000007"  # 2001:db8::7
    "20010DB8000000000000000000000001"  # 2001:db8::1
    "9C40"  # 40000
    "0D3D"  # 3389
)
TCP6_HEADER = ProxyHeader(
    ProxyCommand.PROXY, ProxyFamily.TCP6, ("2001:db8::7", 40000), ("2001:db8::1", 3389), (), 52
)
# what haproxy sends for a health check with check-send-proxy: LOCAL, UNSPEC, no address
LOCAL = bytes.fromhex(
    "0D0A0D0A000D0A515549540A"  # signature
    "20"  # version 2, LOCAL
    "00"  # AF_UNSPEC, UNSPEC
    "0000"  # nothing follows
)
LOCAL_HEADER = ProxyHeader(ProxyCommand.LOCAL, ProxyFamily.UNSPEC, None, None, (), 16)
# PROXY over TCP4 with TLVs: ALPN, NOOP padding, AUTHORITY, a custom type
WITH_TLVS = header(
    0x21,
    0x11,
    TCP4[16:]
    + tlv(0x01, b"h2")
    + tlv(0x04, b"\x00" * 5)
    + tlv(0x02, b"rds.example.org")
    + tlv(0xE0, b""),
)
WITH_TLVS_HEADER = ProxyHeader(
    ProxyCommand.PROXY,
    ProxyFamily.TCP4,
    ("192.0.2.7", 51000),
    ("10.0.0.1", 443),
    ((0x01, b"h2"), (0x02, b"rds.example.org"), (0xE0, b"")),
    len(WITH_TLVS),
)

GOLDEN = [
    ("tcp4", TCP4, TCP4_HEADER),
    ("tcp6", TCP6, TCP6_HEADER),
    ("local", LOCAL, LOCAL_HEADER),
    ("tlvs", WITH_TLVS, WITH_TLVS_HEADER),
]
GOLDEN_IDS = [name for name, _, _ in GOLDEN]


def with_crc(ver_cmd: int, fam: int, body: bytes) -> bytes:
    """A header whose TLVs end with a CRC32C TLV computed as the spec says."""
    blank = header(ver_cmd, fam, body + tlv(0x03, bytes(4)))
    return blank[:-4] + crc32c(blank).to_bytes(4, "big")


# -- golden bytes ---------------------------------------------------------------------------


def test_encoder_writes_the_spec_layout():
    assert encode_v2(("192.0.2.7", 51000), ("10.0.0.1", 443)) == TCP4
    assert encode_v2(("2001:db8::7", 40000), ("2001:db8::1", 3389)) == TCP6
    assert encode_v2_local() == LOCAL


@pytest.mark.parametrize(("name", "data", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_whole(name, data, expected):
    assert parse_v2(data) == expected


@pytest.mark.parametrize(("name", "data", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_one_byte_at_a_time(name, data, expected):
    buffer = bytearray()
    results = []
    for byte in data:
        buffer.append(byte)
        results.append(parse_v2(buffer))
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == expected


@pytest.mark.parametrize(("name", "data", "expected"), GOLDEN, ids=GOLDEN_IDS)
def test_bytes_after_the_header_are_left_for_the_next_protocol(name, data, expected):
    after = b"\x16\x03\x01\x02\x00" + b"RASCP/1\r\n"
    parsed = parse_v2(data + after)
    assert parsed == expected
    assert (data + after)[parsed.length :] == after


def test_local_ignores_any_address_block():
    """Receivers must skip what the length says, even for LOCAL, and use the real endpoints."""
    data = header(0x20, 0x11, TCP4[16:] + tlv(0x05, b"conn-42"))
    assert parse_v2(data) == ProxyHeader(
        ProxyCommand.LOCAL, ProxyFamily.TCP4, None, None, ((0x05, b"conn-42"),), len(data)
    )


@pytest.mark.parametrize("fam", [0x31, 0x32])
def test_unix_falls_back_to_unspec(fam):
    paths = b"/run/client.sock".ljust(108, b"\x00") + b"/run/ras.sock".ljust(108, b"\x00")
    data = header(0x21, fam, paths + tlv(0x02, b"gw1.lab"))
    parsed = parse_v2(data)
    assert parsed == ProxyHeader(
        ProxyCommand.PROXY, ProxyFamily(fam), None, None, ((0x02, b"gw1.lab"),), 16 + 216 + 10
    )


def test_unspec_proxy_has_no_addresses_and_tlvs_start_at_once():
    data = header(0x21, 0x00, tlv(0x05, b"x"))
    assert parse_v2(data) == ProxyHeader(
        ProxyCommand.PROXY, ProxyFamily.UNSPEC, None, None, ((0x05, b"x"),), 20
    )


def test_udp_addresses_are_decoded():
    data = header(0x21, 0x12, TCP4[16:])
    parsed = parse_v2(data)
    assert parsed.family is ProxyFamily.UDP4
    assert parsed.source == ("192.0.2.7", 51000)


def test_mixed_families_are_sent_over_ipv6_with_the_ipv4_address_mapped():
    parsed = parse_v2(encode_v2(("192.0.2.7", 1), ("2001:db8::1", 443)))
    assert parsed.family is ProxyFamily.TCP6
    assert ipaddress.ip_address(parsed.source[0]).ipv4_mapped == ipaddress.ip_address("192.0.2.7")
    assert parsed.destination == ("2001:db8::1", 443)


def test_the_largest_header_is_accepted():
    body = TCP4[16:] + tlv(0x04, bytes(PROXY_V2_MAX_PAYLOAD - 12 - 3))
    data = header(0x21, 0x11, body)
    assert len(data) == 16 + PROXY_V2_MAX_PAYLOAD
    assert parse_v2(data) == ProxyHeader(
        ProxyCommand.PROXY,
        ProxyFamily.TCP4,
        ("192.0.2.7", 51000),
        ("10.0.0.1", 443),
        (),  # NOOP padding is dropped
        len(data),
    )


# -- CRC32C ---------------------------------------------------------------------------------


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720 B.4 too)


def test_a_crc32c_tlv_is_verified():
    data = with_crc(0x21, 0x11, TCP4[16:] + tlv(0x02, b"gw1.lab"))
    parsed = parse_v2(data)
    assert parsed.source == ("192.0.2.7", 51000)
    assert [kind for kind, _ in parsed.tlvs] == [PP2Type.AUTHORITY, PP2Type.CRC32C]
    # the same header with the client address edited fails its checksum
    forged = data[:16] + b"\xc0\x00\x02\x08" + data[20:]
    with pytest.raises(RemoteProtocolError, match="CRC32C"):
        parse_v2(forged)


@pytest.mark.parametrize(
    "tlvs",
    [tlv(0x03, b"\x00\x00\x00"), tlv(0x03, bytes(4)) + tlv(0x03, bytes(4))],
    ids=["short", "repeated"],
)
def test_a_malformed_crc32c_tlv_is_refused(tlvs):
    with pytest.raises(RemoteProtocolError):
        parse_v2(header(0x21, 0x11, TCP4[16:] + tlvs))


# -- refusals -------------------------------------------------------------------------------

REFUSED = [
    ("signature-first-byte", b"\r\n\r\nX", ErrorCode.BAD_PREFACE),
    ("signature-last-byte", SIG[:-1] + b"\r", ErrorCode.BAD_PREFACE),
    ("tls-not-proxy", b"\x16\x03\x01", ErrorCode.BAD_PREFACE),
    ("version-1", SIG + b"\x11", ErrorCode.UNSUPPORTED_VERSION),
    ("version-3", SIG + b"\x31", ErrorCode.UNSUPPORTED_VERSION),
    ("command-2", SIG + b"\x22", ErrorCode.MALFORMED),
    ("command-f", SIG + b"\x2f", ErrorCode.MALFORMED),
    ("family-4", SIG + b"\x21\x41", ErrorCode.MALFORMED),
    ("transport-3", SIG + b"\x21\x13", ErrorCode.MALFORMED),
    ("unspec-stream", SIG + b"\x21\x01", ErrorCode.MALFORMED),
    ("inet-unspec", SIG + b"\x21\x10", ErrorCode.MALFORMED),
    ("over-limit", SIG + b"\x21\x11" + struct.pack("!H", 4097), ErrorCode.FRAME_TOO_LARGE),
    ("max-length", SIG + b"\x21\x11\xff\xff", ErrorCode.FRAME_TOO_LARGE),
    ("tcp4-short", header(0x21, 0x11, TCP4[16:27]), ErrorCode.MALFORMED),
    ("tcp6-as-tcp4", header(0x21, 0x21, TCP4[16:]), ErrorCode.MALFORMED),
    ("unix-short", header(0x21, 0x31, bytes(215)), ErrorCode.MALFORMED),
    ("tlv-head-cut", header(0x21, 0x11, TCP4[16:] + b"\x01\x00"), ErrorCode.MALFORMED),
    ("tlv-one-byte", header(0x21, 0x11, TCP4[16:] + b"\x01"), ErrorCode.MALFORMED),
    ("tlv-past-end", header(0x21, 0x11, TCP4[16:] + b"\x01\x00\x05ab"), ErrorCode.MALFORMED),
    ("local-bad-tlv", header(0x20, 0x00, b"\x04\x00\x09"), ErrorCode.MALFORMED),
]


@pytest.mark.parametrize(("name", "data", "code"), REFUSED, ids=[n for n, _, _ in REFUSED])
def test_refused_as_soon_as_the_bytes_say_so(name, data, code):
    with pytest.raises(RemoteProtocolError) as info:
        parse_v2(data)
    assert info.value.code is code


def test_an_oversize_length_is_refused_before_its_bytes_are_awaited():
    """16 bytes are enough to refuse: a receiver never waits for (or buffers) 64 KiB."""
    head = SIG + b"\x21\x11" + struct.pack("!H", PROXY_V2_MAX_PAYLOAD + 1)
    assert len(head) == 16
    with pytest.raises(RemoteProtocolError, match="limit"):
        parse_v2(head)
    # the limit itself only needs more bytes
    assert parse_v2(SIG + b"\x21\x11" + struct.pack("!H", PROXY_V2_MAX_PAYLOAD)) is None


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("gw1.lab", 1), ("10.0.0.1", 443)),
        (("10.0.0.2", 1), ("", 443)),
        (("10.0.0.2", 65536), ("10.0.0.1", 443)),
        (("10.0.0.2", 1), ("10.0.0.1", -1)),
    ],
)
def test_encoder_refuses_bad_endpoints(source, destination):
    with pytest.raises(LocalProtocolError):
        encode_v2(source, destination)


@pytest.mark.parametrize(
    "tlvs",
    [[(0x03, bytes(4))], [(256, b"")], [(0x05, bytes(0x10000))], [(0xE0, bytes(4096))]],
    ids=["crc32c", "type-256", "value-64k", "over-limit"],
)
def test_encoder_refuses_tlvs_the_parser_would_refuse(tlvs):
    with pytest.raises(LocalProtocolError):
        encode_v2(("10.0.0.2", 1), ("10.0.0.1", 443), tlvs=tlvs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": None, "destination": ("10.0.0.1", 1)}, "together"),
        ({"source": None, "destination": None}, "names its addresses"),
        ({"command": ProxyCommand.LOCAL}, "has no addresses"),
        ({"source": ("2001:db8::1", 1), "destination": ("10.0.0.1", 1)}, "not a TCP4 endpoint"),
        ({"source": ("10.0.0.2", 70000), "destination": ("10.0.0.1", 1)}, "not a TCP4 endpoint"),
        ({"tlvs": ((300, b""),)}, "does not fit"),
        ({"length": 15}, "impossible"),
        ({"command": 1}, "ProxyCommand"),
    ],
)
def test_header_validates_in_its_constructor(kwargs, match):
    fields = {
        "command": ProxyCommand.PROXY,
        "family": ProxyFamily.TCP4,
        "source": ("10.0.0.2", 1),
        "destination": ("10.0.0.1", 1),
        "tlvs": (),
        "length": 28,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        ProxyHeader(**fields)


# -- properties -----------------------------------------------------------------------------

ports = st.integers(0, 65535)
endpoints = st.tuples(st.ip_addresses().map(str), ports)
tlv_lists = st.lists(
    st.tuples(
        st.integers(0, 255).filter(lambda k: k not in (PP2Type.CRC32C, PP2Type.NOOP)),
        st.binary(max_size=64),
    ),
    max_size=6,
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Valid headers of every shape: PROXY over IPv4/IPv6, LOCAL, with TLVs, with a CRC."""
    tlvs = draw(tlv_lists)
    if draw(st.booleans()):
        data = encode_v2_local(tlvs=tlvs)
    else:
        data = encode_v2(draw(endpoints), draw(endpoints), tlvs=tlvs)
    if draw(st.booleans()):
        data = with_crc(data[12], data[13], data[16:])
    return data


@PROPERTY
@given(endpoints, endpoints, tlv_lists)
def test_round_trip(source, destination, tlvs):
    data = encode_v2(source, destination, tlvs=tlvs)
    parsed = parse_v2(data)
    assert parsed is not None
    assert parsed.command is ProxyCommand.PROXY
    assert parsed.length == len(data)
    assert parsed.tlvs == tuple((kind, value) for kind, value in tlvs)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == dst.version:
        assert parsed.source == (str(src), source[1])
        assert parsed.destination == (str(dst), destination[1])
        assert parsed.family is (ProxyFamily.TCP4 if src.version == 4 else ProxyFamily.TCP6)
    else:
        assert parsed.family is ProxyFamily.TCP6
    assert parse_v2(encode_v2(parsed.source, parsed.destination, tlvs=parsed.tlvs)) == parsed


@PROPERTY
@given(headers(), st.binary(max_size=32), st.data())
def test_any_split_gives_the_same_header(data, after, draw):
    """As a receiver does: append each chunk and parse again until a header comes out."""
    stream = data + after
    whole = parse_v2(stream)
    cuts = sorted(draw.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    buffer = b""
    result = None
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buffer += stream[start:end]
        result = parse_v2(buffer)
        if result is not None:
            break
    assert result == whole
    assert len(buffer) >= whole.length


@PROPERTY
@given(headers(), st.data())
def test_truncation_only_ever_needs_more(data, draw):
    cut = draw.draw(st.integers(0, len(data) - 1))
    assert parse_v2(data[:cut]) is None


@PROPERTY
@given(headers(), st.data())
def test_mutations_give_a_header_none_or_a_remote_protocol_error(data, draw):
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        pos = draw.draw(st.integers(0, len(mutated) - 1))
        op = draw.draw(st.sampled_from(["flip", "set", "delete", "insert"]))
        if op == "flip":
            mutated[pos] ^= 1 << draw.draw(st.integers(0, 7))
        elif op == "set":
            mutated[pos] = draw.draw(st.integers(0, 255))
        elif op == "delete" and len(mutated) > 1:
            del mutated[pos]
        else:
            mutated.insert(pos, draw.draw(st.integers(0, 255)))
    try:
        parsed = parse_v2(bytes(mutated))
    except RemoteProtocolError:
        return
    assert parsed is None or parsed.length <= len(mutated)


@PROPERTY
@given(st.binary(max_size=300))
def test_random_bytes_after_the_signature(tail):
    try:
        parsed = parse_v2(PROXY_V2_SIGNATURE + tail)
    except RemoteProtocolError:
        return
    assert parsed is None or parsed.length <= 12 + len(tail)


@PROPERTY
@given(endpoints, endpoints, tlv_lists, st.data())
def test_with_a_crc_an_edited_client_address_is_refused(source, destination, tlvs, draw):
    """With a CRC32C TLV, any one-byte edit of the address block (addresses and ports) is
    refused: a damaged header never yields another client."""
    plain = encode_v2(source, destination, tlvs=tlvs)
    data = with_crc(plain[12], plain[13], plain[16:])
    block = 12 if data[13] == ProxyFamily.TCP4 else 36
    pos = draw.draw(st.integers(16, 16 + block - 1))
    value = draw.draw(st.integers(0, 255).filter(lambda v: v != data[pos]))
    mutated = data[:pos] + bytes((value,)) + data[pos + 1 :]
    with pytest.raises(RemoteProtocolError, match="CRC32C"):
        parse_v2(mutated)
