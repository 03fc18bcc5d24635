"""Codec tests of the control protocol (``ras.protocol``) on plain bytes: no trio, no sockets.

Layout:

* samples and helpers (one valid instance of every message, whole sessions as "flights");
* round trips (every message, generated messages, golden bytes of ``docs/protocol.md``);
* session transcripts fed whole, one byte at a time and split anywhere;
* robustness: truncation then EOF, byte mutations, random bytes, structured JSON mutations;
* framing limits, preface, state machine, field validation, secrets.

A *flight* is what one side writes before it waits for the other: a peer only sends what
follows after it has read our answer, so a read never spans two flights. Within a flight the
bytes may arrive split anywhere.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ras.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ras.protocol import (
    MAX_FRAME_SIZE,
    MESSAGE_CLASSES,
    AcmeChallenge,
    AcmeWithdraw,
    AgentRegister,
    AuthChallenge,
    Authenticate,
    AuthOk,
    AuthResponse,
    ClientSession,
    Connection,
    ConnectionClosed,
    Error,
    Event,
    GatewayEntry,
    GatewayList,
    GatewayRegister,
    Hello,
    HostKind,
    Launch,
    LaunchOk,
    ListGateways,
    ListResources,
    LoadReport,
    LoggedOut,
    Logout,
    Message,
    MessageType,
    Mode,
    OpenTunnel,
    Ping,
    Pong,
    PortalSettingsUpdate,
    PublicCertificate,
    RdpToken,
    RdpTokenOk,
    RedeemTicket,
    Registered,
    Resource,
    ResourceKind,
    ResourceList,
    Resume,
    Role,
    Route,
    RouteOk,
    SessionAction,
    SessionActionKind,
    SessionActionOk,
    SessionInfo,
    SessionState,
    Side,
    State,
    TicketOk,
    TunnelOpen,
    Welcome,
    decode_body,
    encode_body,
    preface,
)

CLIENT, SERVER = Side.CLIENT, Side.SERVER
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PASSWORD = "correct horse battery staple"
OTP = "914207"
TICKET = "v1.eyJ1IjoiYWxpY2UiLCJyIjoiZGVzayJ9.c2lnbmF0dXJl"

# -- samples and helpers ------------------------------------------------------------------------

DESK = Resource("desk", "Full desktop", ResourceKind.DESKTOP)
GW1 = GatewayEntry("gw1", "10.0.0.11", 443)
CALC = Resource("calc", "Calculator", ResourceKind.APPLICATION)

ACME_TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
THUMBPRINT = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ==\n-----END CERTIFICATE-----\n"
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49==\n-----END PRIVATE KEY-----\n"

SESSION_BOB = SessionInfo("rdp-7", "bob", SessionState.ACTIVE)
SESSION_CAROL = SessionInfo("rdp-9", "carol", SessionState.DISCONNECTED)

# One valid instance of every message class, and the side that sends it.
SAMPLES: dict[MessageType, tuple[Side, Message]] = {
    MessageType.HELLO: (CLIENT, Hello(Role.CLIENT, "ras-client/0.1")),
    MessageType.WELCOME: (SERVER, Welcome(1, "ras-gateway/0.1")),
    MessageType.AUTHENTICATE: (CLIENT, Authenticate("alice", PASSWORD)),
    MessageType.AUTH_CHALLENGE: (SERVER, AuthChallenge("Verification code:", echo=False)),
    MessageType.AUTH_RESPONSE: (CLIENT, AuthResponse(OTP)),
    MessageType.AUTH_OK: (SERVER, AuthOk("alice", ("staff", "rdp-users"), "s1.e30.bWFj")),
    MessageType.RESUME: (CLIENT, Resume("s1.e30.bWFj")),
    MessageType.LOGOUT: (CLIENT, Logout("s1.e30.bWFj")),
    MessageType.LOGGED_OUT: (SERVER, LoggedOut()),
    MessageType.LIST_RESOURCES: (CLIENT, ListResources()),
    MessageType.RESOURCE_LIST: (SERVER, ResourceList((CALC, DESK))),
    MessageType.LAUNCH: (CLIENT, Launch("desk", Mode.GATEWAY_SSL)),
    MessageType.LAUNCH_OK: (
        SERVER,
        LaunchOk(Mode.GATEWAY_SSL, "rdsh1.farm.example", 3389, TICKET, 60),
    ),
    MessageType.OPEN_TUNNEL: (CLIENT, OpenTunnel(TICKET)),
    MessageType.TUNNEL_OPEN: (SERVER, TunnelOpen("rdsh1.farm.example", 3389)),
    MessageType.AGENT_REGISTER: (
        CLIENT,
        AgentRegister("rdsh1", HostKind.RDSH, "10.0.0.21", 3389, 50),
    ),
    MessageType.LOAD_REPORT: (CLIENT, LoadReport(37.5, 61.0, 12, 3)),
    MessageType.GATEWAY_REGISTER: (CLIENT, GatewayRegister("gw1", "gw1.farm.example", 443)),
    MessageType.CLIENT_SESSION: (CLIENT, ClientSession("2001:db8::7", 50122)),
    MessageType.REGISTERED: (SERVER, Registered("rdsh1", 5.0)),
    MessageType.LIST_GATEWAYS: (CLIENT, ListGateways()),
    MessageType.GATEWAY_LIST: (SERVER, GatewayList((GW1,))),
    MessageType.REDEEM_TICKET: (CLIENT, RedeemTicket(TICKET)),
    MessageType.TICKET_OK: (SERVER, TicketOk("10.0.0.21", 3389, "alice", "desk")),
    MessageType.PING: (SERVER, Ping(7)),
    MessageType.PONG: (CLIENT, Pong(7)),
    MessageType.ERROR: (SERVER, Error(ErrorCode.NOT_FOUND, "no such resource")),
    MessageType.SESSION_ACTION: (SERVER, SessionAction("rdp-7", SessionActionKind.LOGOFF)),
    MessageType.SESSION_ACTION_OK: (CLIENT, SessionActionOk("rdp-7")),
    MessageType.ROUTE: (CLIENT, Route(TICKET, "")),
    MessageType.ROUTE_OK: (SERVER, RouteOk("10.0.0.21", 3389, "alice", "desk")),
    MessageType.RDP_TOKEN: (CLIENT, RdpToken("desk")),
    MessageType.RDP_TOKEN_OK: (SERVER, RdpTokenOk(TICKET, 28800)),
    MessageType.ACME_CHALLENGE: (SERVER, AcmeChallenge(ACME_TOKEN, f"{ACME_TOKEN}.{THUMBPRINT}")),
    MessageType.ACME_WITHDRAW: (SERVER, AcmeWithdraw(ACME_TOKEN)),
    MessageType.PUBLIC_CERTIFICATE: (SERVER, PublicCertificate(CERT_PEM, KEY_PEM)),
    MessageType.PORTAL_SETTINGS: (SERVER, PortalSettingsUpdate('{"launch_method":"browser"}')),
}


def frame(body: bytes | str | dict[str, object]) -> bytes:
    """A frame carrying ``body`` (a dict is dumped as JSON, a str encoded as UTF-8)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return len(body).to_bytes(4, "big") + body


def opened(role: Role = Role.CLIENT) -> tuple[Connection, Connection]:
    """A client and a server connection after hello/welcome."""
    client, server = Connection(CLIENT), Connection(SERVER)
    assert server.receive_data(client.send(Hello(role, "test"))) == [Hello(role, "test")]
    assert client.receive_data(server.send(Welcome(1, "test"))) == [Welcome(1, "test")]
    assert client.state is server.state is State.OPEN
    return client, server


def tunnelled() -> tuple[Connection, Connection]:
    """A client and a server after open_tunnel/tunnel_open: both raw."""
    client, server = opened()
    server.receive_data(client.send(OpenTunnel(TICKET)))
    client.receive_data(server.send(TunnelOpen("10.0.0.21", 3389)))
    assert client.state is server.state is State.TUNNEL
    return client, server


def refuse(conn: Connection, data: bytes, code: ErrorCode) -> None:
    """Feeding ``data`` raises RemoteProtocolError(code) and leaves ``conn`` in ERROR."""
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(data)
    assert info.value.code is code, info.value
    assert conn.state is State.ERROR


def other(side: Side) -> Side:
    return SERVER if side is CLIENT else CLIENT


# -- sessions as flights ------------------------------------------------------------------------


@dataclass(frozen=True)
class Flight:
    side: Side  # who writes it
    items: tuple[Message | bytes, ...]  # messages, or raw tunnel bytes


def c(*items: Message | bytes) -> Flight:
    return Flight(CLIENT, items)


def s(*items: Message | bytes) -> Flight:
    return Flight(SERVER, items)


X224_CONNECTION_REQUEST = bytes.fromhex("030000130ee000000000000100080003000000")
X224_CONNECTION_CONFIRM = bytes.fromhex("030000130ed000001234000200080001000000")

SESSIONS: dict[str, tuple[Flight, ...]] = {
    # A user's client logs in through a gateway, with a second factor, and launches.
    "client-login": (
        c(Hello(Role.CLIENT, "ras-client/0.1")),
        s(Welcome(1, "ras-gateway/0.1"), Ping(7)),
        c(Pong(7), Authenticate("alice", PASSWORD)),
        s(AuthChallenge("Verification code:", echo=False)),
        c(AuthResponse(OTP)),
        s(AuthOk("alice", ("staff", "rdp-users"))),
        c(ListResources()),
        s(ResourceList((CALC, DESK))),
        c(Launch("payroll", Mode.GATEWAY)),
        s(Error(ErrorCode.NOT_FOUND, "no such resource")),
        c(Launch("desk", Mode.GATEWAY_SSL)),
        s(LaunchOk(Mode.GATEWAY_SSL, "rdsh1.farm.example", 3389, TICKET, 60)),
    ),
    # The same client after its connection was lost: a new one, perhaps to another gateway,
    # logged in again with the resume token of the first login.
    "client-resume": (
        c(Hello(Role.CLIENT, "ras-client/0.1")),
        s(Welcome(1, "ras-gateway/0.1")),
        c(Resume("s1.e30.bWFj")),
        c(Logout("s1.e30.bWFj")),
        s(LoggedOut()),
        s(AuthOk("alice", ("staff", "rdp-users"), "s1.e30.bmV3")),
        c(Ping(8)),
        s(Pong(8)),
    ),
    # The same client's second connection: the tunnel, then RDP bytes both ways.
    "client-tunnel": (
        c(Hello(Role.CLIENT, "ras-client/0.1")),
        s(Welcome(1, "ras-gateway/0.1")),
        c(OpenTunnel(TICKET), X224_CONNECTION_REQUEST),
        s(TunnelOpen("rdsh1.farm.example", 3389), X224_CONNECTION_CONFIRM),
        c(b"\x03\x00\x01\x00" + bytes(range(252))),
        s(b"\x03\x00\x00\x08\x02\xf0\x80\x7f"),
    ),
    # An agent registers with the broker and reports its load.
    "agent": (
        c(Hello(Role.AGENT, "ras-agent/0.1")),
        s(Welcome(1, "ras-broker/0.1")),
        c(AgentRegister("rdsh1", HostKind.RDSH, "10.0.0.21", 3389, 50)),
        s(Registered("rdsh1", 5.0)),
        c(LoadReport(37.5, 61.0, 12, 3), LoadReport(40.25, 61.5, 13, 2)),
        s(Ping(1)),
        c(Pong(1), LoadReport(5.0, 20.0, 2, 1, (SESSION_BOB, SESSION_CAROL))),
        # the broker asks for a log off and a disconnect; the agent answers each
        s(SessionAction("rdp-9", SessionActionKind.LOGOFF)),
        c(SessionActionOk("rdp-9")),
        s(SessionAction("rdp-7", SessionActionKind.DISCONNECT)),
        c(Error(ErrorCode.NOT_FOUND, "no session rdp-7 on this host")),
    ),
    # A gateway's long-lived link to the broker.
    "gateway-link": (
        c(Hello(Role.GATEWAY, "ras-gateway/0.1")),
        s(Welcome(1, "ras-broker/0.1")),
        c(GatewayRegister("gw1", "gw1.farm.example", 443)),
        s(Registered("gw1", 30.0)),
        # pushed by the broker at any time: ACME HTTP-01 tokens, a new public certificate,
        # the User Portal's settings
        s(AcmeChallenge(ACME_TOKEN, f"{ACME_TOKEN}.{THUMBPRINT}")),
        s(PortalSettingsUpdate('{"name":"gw1","launch_method":"native"}')),
        c(Ping(2)),
        s(Pong(2), PublicCertificate(CERT_PEM, KEY_PEM), AcmeWithdraw(ACME_TOKEN)),
    ),
    # A HALB asking the broker which gateways to balance over.
    "halb": (
        c(Hello(Role.HALB, "ras-halb/0.1")),
        s(Welcome(1, "ras-broker/0.1")),
        c(ListGateways()),
        s(GatewayList((GW1, GatewayEntry("gw2", "gw2.farm.example", 443)))),
        c(ListGateways()),
        s(GatewayList(())),
    ),
    # A gateway's connection to the broker on behalf of one client.
    "gateway-client": (
        c(Hello(Role.GATEWAY, "ras-gateway/0.1")),
        s(Welcome(1, "ras-broker/0.1")),
        c(ClientSession("198.51.100.7", 50122), Authenticate("alice", PASSWORD)),
        s(AuthOk("alice", ("staff",))),
        c(RedeemTicket(TICKET)),
        s(TicketOk("10.0.0.21", 3389, "alice", "desk")),
        c(Error(ErrorCode.INTERNAL, "relay failed")),
    ),
    # A user asks for a routing token for an .rdp file (relayed by the gateway like launch).
    "client-rdp-token": (
        c(Hello(Role.CLIENT, "ras-client/0.1")),
        s(Welcome(1, "ras-gateway/0.1")),
        c(RdpToken("desk")),
        s(Error(ErrorCode.AUTH_REQUIRED, "authenticate first")),
        c(Authenticate("alice", PASSWORD)),
        s(AuthOk("alice", ())),
        c(RdpToken("desk")),
        s(RdpTokenOk(TICKET, 28800)),
    ),
    # RDP load balancing: a gateway asks where a native RDP connection may go, then holds the
    # connection (session affinity) until the RDP connection ends.
    "gateway-route": (
        c(Hello(Role.GATEWAY, "ras-gateway/0.1")),
        s(Welcome(1, "ras-broker/0.1")),
        c(ClientSession("198.51.100.7", 50200), Route("", "mallory")),
        s(Error(ErrorCode.FORBIDDEN, "no route for this user")),
        c(Route(TICKET, "")),
        s(RouteOk("10.0.0.21", 3389, "alice", "desk")),
    ),
}


@dataclass(frozen=True)
class Wire:
    """The bytes of every item of every flight, as the real connections produced them."""

    flights: tuple[Flight, ...]
    items: tuple[tuple[bytes, ...], ...]  # per flight, the bytes of each item

    @property
    def data(self) -> tuple[bytes, ...]:
        return tuple(b"".join(items) for items in self.items)

    def stream(self, receiver: Side) -> bytes:
        """All the bytes ``receiver`` gets, in order."""
        return b"".join(
            d for f, d in zip(self.flights, self.data, strict=True) if f.side is not receiver
        )

    def expected(self, receiver: Side) -> tuple[list[Event], bytes]:
        """The events ``receiver`` must see, and the raw tunnel bytes it must be handed."""
        incoming = [f for f in self.flights if f.side is not receiver]
        events = [m for f in incoming for m in f.items if isinstance(m, Message)]
        raw = b"".join(m for f in incoming for m in f.items if isinstance(m, bytes))
        return events, raw

    def layout(self, receiver: Side) -> tuple[list[tuple[int, Message]], set[int], int | None]:
        """In ``stream(receiver)``: the end of each frame with its message, the offsets where
        EOF is a clean close, and where the raw tunnel bytes start (if they do)."""
        ends: list[tuple[int, Message]] = []
        clean = {0} if receiver is CLIENT else set()  # a server needs at least the preface
        raw_start = None
        pos = 0
        for f, items in zip(self.flights, self.items, strict=True):
            if f.side is receiver:
                continue
            for item, wire in zip(f.items, items, strict=True):
                if isinstance(item, Hello):
                    clean.add(pos + len(preface()))
                pos += len(wire)
                if isinstance(item, Message) and raw_start is None:
                    ends.append((pos, item))
                    clean.add(pos)
                    if isinstance(item, OpenTunnel | TunnelOpen):
                        raw_start = pos
        return ends, clean, raw_start


def record(flights: Sequence[Flight]) -> Wire:
    """Walk a real client and server through ``flights``; each receives exactly what was sent."""
    conns = {CLIENT: Connection(CLIENT), SERVER: Connection(SERVER)}
    out = []
    for f in flights:
        items = tuple(i if isinstance(i, bytes) else conns[f.side].send(i) for i in f.items)
        events = conns[other(f.side)].receive_data(b"".join(items))
        assert events == [i for i in f.items if isinstance(i, Message)]
        out.append(items)
    return Wire(tuple(flights), tuple(out))


WIRES = {name: record(flights) for name, flights in SESSIONS.items()}

Splitter = Callable[[int, bytes], Iterable[bytes]]


def whole(_index: int, data: bytes) -> Iterable[bytes]:
    return [data] if data else []


def bytewise(_index: int, data: bytes) -> Iterable[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@dataclass
class Outcome:
    events: list[Event]
    raw: bytes | None  # trailing_data() if the connection went raw
    error: RemoteProtocolError | None
    refused: LocalProtocolError | None = None  # our own scripted message was not allowed


def play(
    wire: Wire,
    me: Side,
    *,
    split: Splitter = whole,
    incoming: Sequence[bytes] | None = None,
    cut: int | None = None,
    eof: bool = False,
) -> Outcome:
    """Be ``me`` in ``wire``'s session: send our flights, receive the peer's. ``incoming``
    replaces the peer's flights; ``cut`` ends the session after that many of the peer's bytes."""
    conn = Connection(me)
    data = incoming if incoming is not None else wire.data
    events: list[Event] = []
    error = refused = None
    try:
        for index, f in enumerate(wire.flights):
            if f.side is me:
                for item in f.items:
                    if isinstance(item, Message):
                        conn.send(item)
                continue
            received = data[index]
            if cut is not None:
                received = received[:cut]
                cut -= len(received)
            for chunk in split(index, received):
                events += conn.receive_data(chunk)
            if cut == 0:
                break
        if eof:
            events += conn.receive_data(b"")
    except RemoteProtocolError as exc:
        error = exc
    except LocalProtocolError as exc:
        # Altered traffic can leave us where our scripted next message is not allowed (a real
        # endpoint would have answered differently): the tests that alter traffic allow this.
        refused = exc
    try:
        raw = conn.trailing_data()
    except LocalProtocolError:
        raw = None
    return Outcome(events, raw, error, refused)


# -- round trips ---------------------------------------------------------------------------------


def test_samples_cover_every_message_class() -> None:
    assert set(SAMPLES) == set(MESSAGE_CLASSES) == set(MessageType)
    for kind, (_, msg) in SAMPLES.items():
        assert type(msg) is MESSAGE_CLASSES[kind]
    sent = {type(i) for flights in SESSIONS.values() for f in flights for i in f.items}
    assert set(MESSAGE_CLASSES.values()) <= sent, "every message appears in a transcript"


def _ready(sender_side: Side, msg: Message) -> tuple[Connection, Connection]:
    """(sender, receiver) in the state where ``sender_side`` may send ``msg``."""
    if isinstance(msg, Hello):
        client, server = Connection(CLIENT), Connection(SERVER)
    elif isinstance(msg, Welcome):
        client, server = Connection(CLIENT), Connection(SERVER)
        server.receive_data(client.send(Hello(Role.CLIENT, "test")))
    elif isinstance(msg, TunnelOpen):
        client, server = opened()
        server.receive_data(client.send(OpenTunnel(TICKET)))
    else:
        client, server = opened()
    return (client, server) if sender_side is CLIENT else (server, client)


@pytest.mark.parametrize("kind", list(MessageType))
def test_every_message_round_trips_through_connections(kind: MessageType) -> None:
    side, msg = SAMPLES[kind]
    sender, receiver = _ready(side, msg)
    wire = sender.send(msg)
    assert receiver.receive_data(wire) == [msg]
    assert decode_body(encode_body(msg)) == msg


@pytest.mark.parametrize("msg", [Ping(0), Pong(2**53), Error(ErrorCode.THROTTLED, "")])
def test_both_sides_send_ping_pong_and_error(msg: Message) -> None:
    client, server = opened()
    assert server.receive_data(client.send(msg)) == [msg]
    assert client.receive_data(server.send(msg)) == [msg]
    assert client.state is server.state is State.OPEN


def test_encode_body_is_compact_utf8_json_with_type_first() -> None:
    body = encode_body(AuthOk("zoë", ("ü-group",)))
    assert body == '{"type":"auth_ok","user":"zoë","groups":["ü-group"]}'.encode()
    assert encode_body(ListResources()) == b'{"type":"list_resources"}'
    assert encode_body(Error(ErrorCode.TICKET_INVALID, "expired")) == (
        b'{"type":"error","code":204,"message":"expired"}'
    )
    assert encode_body(ResourceList((DESK,))) == (
        b'{"type":"resource_list","resources":'
        b'[{"id":"desk","name":"Full desktop","kind":"desktop"}]}'
    )


def test_optional_fields_are_left_out_at_their_default_and_taken_when_absent() -> None:
    # load_report without sessions_detail (as version-1 agents send it) is the empty list.
    old = b'{"type":"load_report","cpu_percent":1,"memory_percent":2,"sessions":0,"disconnected":0}'
    assert decode_body(old) == LoadReport(1.0, 2.0, 0, 0)
    assert encode_body(LoadReport(1.0, 2.0, 0, 0)) == old.replace(b":1,", b":1.0,").replace(
        b":2,", b":2.0,"
    )
    detailed = LoadReport(1.0, 2.0, 1, 0, (SESSION_BOB,))
    assert encode_body(detailed).endswith(
        b',"sessions_detail":[{"id":"rdp-7","user":"bob","state":"active"}]}'
    )
    assert decode_body(encode_body(detailed)) == detailed
    app = LaunchOk(Mode.DIRECT, "10.0.0.5", 3389, "", 0, command="calc.exe")
    assert b'"command":"calc.exe"' in encode_body(app)
    assert b"arguments" not in encode_body(app)
    # Required fields stay required.
    with pytest.raises(RemoteProtocolError, match="missing field 'disconnected'"):
        decode_body(b'{"type":"load_report","cpu_percent":1,"memory_percent":2,"sessions":0}')
    with pytest.raises(RemoteProtocolError, match="missing field 'state'"):
        decode_body(old[:-1] + b',"sessions_detail":[{"id":"a","user":"b"}]}')


def test_decode_accepts_any_key_order_and_whitespace() -> None:
    body = b' {\n "port" : 3389 , "host" : "10.0.0.21", "type": "tunnel_open"}\t'
    assert decode_body(body) == TunnelOpen("10.0.0.21", 3389)
    # A float field accepts an integer literal.
    assert decode_body(b'{"type":"registered","name":"a","report_interval_s":5}') == Registered(
        "a", 5.0
    )


# The hello frame shown byte by byte in docs/protocol.md: the wire format must not drift.
HELLO_WIRE = bytes.fromhex(
    "52 41 53 43 50 2f 31 0d 0a"  # RASCP/1\r\n
    "00 00 00 3c"  # body length 60
    "7b 22 74 79 70 65 22 3a 22 68 65 6c 6c 6f 22 2c"  # {"type":"hello",
    "22 72 6f 6c 65 22 3a 22 63 6c 69 65 6e 74 22 2c"  # "role":"client",
    "22 73 6f 66 74 77 61 72 65 22 3a 22 72 61 73 2d"  # "software":"ras-
    "63 6c 69 65 6e 74 2f 30 2e 31 22 7d"  # client/0.1"}
)


def test_golden_bytes_of_the_documented_hello() -> None:
    assert Connection(CLIENT).send(Hello(Role.CLIENT, "ras-client/0.1")) == HELLO_WIRE
    server = Connection(SERVER)
    assert server.receive_data(HELLO_WIRE) == [Hello(Role.CLIENT, "ras-client/0.1")]
    assert server.send(Welcome(1, "ras-gateway/0.1")) == frame(
        b'{"type":"welcome","version":1,"software":"ras-gateway/0.1"}'
    )


SPEC = Path(__file__).parent.parent / "docs" / "protocol.md"


def test_the_specification_matches_the_code() -> None:
    spec = SPEC.read_text()
    # The hex dump of section 14.1 is the hello the code writes.
    example = spec[spec.index("### 14.1") : spec.index("### 14.2")]
    dump = re.findall(r"^[0-9a-f]{4}  ((?:[0-9a-f]{2} )+)", example, re.MULTILINE)
    assert bytes.fromhex("".join(dump)) == HELLO_WIRE
    for kind in MessageType:
        assert f"| `{kind}` |" in spec, kind
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in spec, code


# Generated messages: every field over its whole valid range.
_printable = st.characters(exclude_categories=("Cc", "Cs"))


def _text(limit: int, *, empty: bool = False) -> st.SearchStrategy[str]:
    return st.text(_printable, min_size=0 if empty else 1, max_size=min(limit, 40)) | st.text(
        _printable, min_size=limit, max_size=limit
    )


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@\\-]{0,40}", fullmatch=True)
_acme_tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
_pem_bodies = st.from_regex(r"[A-Za-z0-9+/=\n]{0,200}", fullmatch=True)
_hosts = st.ip_addresses().map(str) | st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9-]{0,20}(\.[A-Za-z0-9][A-Za-z0-9-]{0,20}){0,4}\.?", fullmatch=True
)
_ports = st.integers(1, 65535)
_counts = st.integers(0, 100_000)
_percent = st.floats(0.0, 100.0)
_nonce = st.integers(0, 2**53)
_resources = st.builds(Resource, _names, _text(256), st.sampled_from(ResourceKind))

MESSAGE_STRATEGIES: dict[MessageType, st.SearchStrategy[Message]] = {
    MessageType.HELLO: st.builds(Hello, st.sampled_from(Role), _text(128)),
    MessageType.WELCOME: st.builds(Welcome, st.integers(1, 999), _text(128)),
    MessageType.AUTHENTICATE: st.builds(Authenticate, _text(256), _text(1024, empty=True)),
    MessageType.AUTH_CHALLENGE: st.builds(AuthChallenge, _text(512), st.booleans()),
    MessageType.AUTH_RESPONSE: st.builds(AuthResponse, _text(256, empty=True)),
    MessageType.AUTH_OK: st.builds(
        AuthOk,
        _text(256),
        st.lists(_text(256), max_size=5).map(tuple),
        _text(2048, empty=True),
    ),
    MessageType.RESUME: st.builds(Resume, _text(2048)),
    MessageType.LOGOUT: st.builds(Logout, _text(2048, empty=True)),
    MessageType.LOGGED_OUT: st.just(LoggedOut()),
    MessageType.LIST_RESOURCES: st.just(ListResources()),
    MessageType.RESOURCE_LIST: st.builds(ResourceList, st.lists(_resources, max_size=5).map(tuple)),
    MessageType.LAUNCH: st.builds(Launch, _names, st.sampled_from(Mode)),
    MessageType.LAUNCH_OK: st.builds(
        LaunchOk,
        st.sampled_from(Mode),
        _hosts,
        _ports,
        _text(2048, empty=True),
        st.integers(0, 86400),
        command=_text(1024, empty=True),
        target=_text(1024, empty=True),
    ),
    MessageType.OPEN_TUNNEL: st.builds(OpenTunnel, _text(2048)),
    MessageType.TUNNEL_OPEN: st.builds(TunnelOpen, _hosts, _ports),
    MessageType.AGENT_REGISTER: st.builds(
        AgentRegister, _names, st.sampled_from(HostKind), _hosts, _ports, st.integers(1, 100_000)
    ),
    MessageType.LOAD_REPORT: st.builds(
        LoadReport,
        _percent,
        _percent,
        _counts,
        _counts,
        st.lists(
            st.builds(SessionInfo, _text(256), _text(256), st.sampled_from(SessionState)),
            max_size=3,
        ).map(tuple),
    ),
    MessageType.GATEWAY_REGISTER: st.builds(GatewayRegister, _names, _hosts, _ports),
    MessageType.CLIENT_SESSION: st.builds(ClientSession, _hosts, st.integers(0, 65535)),
    MessageType.REGISTERED: st.builds(Registered, _names, st.floats(0.1, 3600.0)),
    MessageType.LIST_GATEWAYS: st.builds(ListGateways),
    MessageType.GATEWAY_LIST: st.builds(
        GatewayList,
        st.lists(st.builds(GatewayEntry, _names, _hosts, _ports), max_size=3).map(tuple),
    ),
    MessageType.REDEEM_TICKET: st.builds(RedeemTicket, _text(2048), st.just("") | _hosts),
    MessageType.TICKET_OK: st.builds(TicketOk, _hosts, _ports, _text(256), _names),
    MessageType.PING: st.builds(Ping, _nonce),
    MessageType.PONG: st.builds(Pong, _nonce),
    MessageType.ERROR: st.builds(Error, st.sampled_from(ErrorCode), _text(1024, empty=True)),
    MessageType.SESSION_ACTION: st.builds(
        SessionAction, _text(256), st.sampled_from(SessionActionKind)
    ),
    MessageType.SESSION_ACTION_OK: st.builds(SessionActionOk, _text(256)),
    MessageType.ROUTE: st.builds(Route, _text(2048), st.just(""))
    | st.builds(Route, st.just(""), _text(256)),
    MessageType.ROUTE_OK: st.builds(RouteOk, _hosts, _ports, _text(256), _names),
    MessageType.RDP_TOKEN: st.builds(RdpToken, _names),
    MessageType.RDP_TOKEN_OK: st.builds(RdpTokenOk, _text(2048), st.integers(0, 604800)),
    MessageType.ACME_CHALLENGE: _acme_tokens.map(lambda t: AcmeChallenge(t, f"{t}.{THUMBPRINT}")),
    MessageType.ACME_WITHDRAW: st.builds(AcmeWithdraw, _acme_tokens),
    MessageType.PUBLIC_CERTIFICATE: st.builds(
        PublicCertificate,
        _pem_bodies.map(lambda b: f"-----BEGIN CERTIFICATE-----\n{b}\n-----END CERTIFICATE-----\n"),
        _pem_bodies.map(lambda b: f"-----BEGIN PRIVATE KEY-----\n{b}\n-----END PRIVATE KEY-----\n"),
    ),
    MessageType.PORTAL_SETTINGS: st.dictionaries(_text(64), st.booleans() | _text(64)).map(
        lambda d: PortalSettingsUpdate(json.dumps(d))
    ),
}


def test_every_message_class_has_a_strategy() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MessageType)


@PROPERTY
@given(st.one_of(*MESSAGE_STRATEGIES.values()))
def test_generated_messages_round_trip(msg: Message) -> None:
    body = encode_body(msg)
    assert decode_body(body) == msg
    assert len(body) <= MAX_FRAME_SIZE
    side, _ = SAMPLES[msg.TYPE]
    if not isinstance(msg, Welcome):  # welcome must carry the negotiated version
        sender, receiver = _ready(side, msg)
        assert receiver.receive_data(sender.send(msg)) == [msg]


# -- transcripts -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SESSIONS))
@pytest.mark.parametrize("me", [CLIENT, SERVER])
@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_transcript_gives_the_same_events_however_fed(name: str, me: Side, split: Splitter) -> None:
    wire = WIRES[name]
    events, raw = wire.expected(me)
    got = play(wire, me, split=split)
    assert got.error is got.refused is None
    assert got.events == events
    assert got.raw == (raw or None)


def test_tunnel_transcript_hands_the_rdp_bytes_to_the_relay() -> None:
    wire = WIRES["client-tunnel"]
    server = play(wire, SERVER)
    assert (server.raw or b"").startswith(X224_CONNECTION_REQUEST)
    client = play(wire, CLIENT)
    assert (client.raw or b"").startswith(X224_CONNECTION_CONFIRM)


@PROPERTY
@given(st.sampled_from(sorted(SESSIONS)), st.sampled_from([CLIENT, SERVER]), st.data())
def test_transcript_split_anywhere(name: str, me: Side, data: st.DataObject) -> None:
    wire = WIRES[name]

    def split(_index: int, chunk: bytes) -> list[bytes]:
        cuts = data.draw(st.sets(st.integers(1, max(1, len(chunk) - 1)), max_size=8))
        edges = [0, *sorted(cuts), len(chunk)]
        return [chunk[a:b] for a, b in itertools.pairwise(edges) if a < b]

    events, raw = wire.expected(me)
    got = play(wire, me, split=split)
    assert got.error is got.refused is None
    assert got.events == events
    assert (got.raw or b"") == raw


# -- robustness ---------------------------------------------------------------------------------

_DIRECTIONS = [(name, me) for name in sorted(SESSIONS) for me in (CLIENT, SERVER)]


@PROPERTY
@given(st.sampled_from(_DIRECTIONS), st.data())
def test_truncation_then_eof(direction: tuple[str, Side], data: st.DataObject) -> None:
    name, me = direction
    wire = WIRES[name]
    stream = wire.stream(me)
    n = data.draw(st.integers(0, len(stream)), label="cut")
    ends, clean, raw_start = wire.layout(me)
    got = play(wire, me, cut=n, eof=True)
    complete = [m for end, m in ends if end <= n]
    if raw_start is not None and n >= raw_start:
        assert got.error is got.refused is None
        assert got.events == complete  # EOF in the tunnel is the relay's business: no event
        assert got.raw == stream[raw_start:n]
    elif n in clean:
        assert got.error is got.refused is None
        assert got.events == [*complete, ConnectionClosed()]
    else:
        assert got.error is not None, got
        assert got.events == complete
        assert got.error.code in (ErrorCode.MALFORMED, ErrorCode.BAD_PREFACE)


def test_eof_before_anything() -> None:
    assert Connection(CLIENT).receive_data(b"") == [ConnectionClosed()]
    refuse(Connection(SERVER), b"", ErrorCode.BAD_PREFACE)
    server = Connection(SERVER)
    server.receive_data(b"RASCP/")
    refuse(server, b"", ErrorCode.BAD_PREFACE)


def test_eof_at_a_frame_boundary_closes_cleanly() -> None:
    client, server = opened()
    assert server.receive_data(b"") == [ConnectionClosed()]
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(Ping(1))
    assert client.receive_data(b"") == [ConnectionClosed()]
    assert client.state is State.CLOSED


def test_eof_inside_a_frame_is_malformed() -> None:
    client, server = opened()
    wire = client.send(Ping(1))
    assert server.receive_data(wire[:-1]) == []
    refuse(server, b"", ErrorCode.MALFORMED)
    client, server = opened()
    assert server.receive_data(b"\x00\x00") == []
    refuse(server, b"", ErrorCode.MALFORMED)


_mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 2**16), st.integers(1, 255)
)


def _mutate(data: bytes, mutations: Iterable[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, byte in mutations:
        if op == "insert":
            out.insert(where % (len(out) + 1), byte)
        elif out:
            i = where % len(out)
            if op == "flip":
                out[i] ^= byte
            else:
                del out[i]
    return bytes(out)


def _check_events(events: Iterable[Event]) -> None:
    """Whatever was accepted is a well-formed message that can be relayed as is."""
    for event in events:
        if isinstance(event, Message):
            assert decode_body(encode_body(event)) == event


@PROPERTY
@given(st.sampled_from(_DIRECTIONS), st.data())
def test_mutated_traffic_gives_events_or_remote_protocol_error(
    direction: tuple[str, Side], data: st.DataObject
) -> None:
    name, me = direction
    wire = WIRES[name]
    theirs = [i for i, f in enumerate(wire.flights) if f.side is not me]
    target = data.draw(st.sampled_from(theirs), label="flight")
    mutations = data.draw(st.lists(_mutation, min_size=1, max_size=3), label="mutations")
    incoming = list(wire.data)
    incoming[target] = _mutate(incoming[target], mutations)
    bytewise_feed = data.draw(st.booleans(), label="bytewise")
    # Any exception other than RemoteProtocolError propagates out of play() and fails the test.
    got = play(wire, me, incoming=incoming, split=bytewise if bytewise_feed else whole, eof=True)
    _check_events(got.events)
    if got.error is not None:
        assert got.error.code in (
            ErrorCode.BAD_PREFACE, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.FRAME_TOO_LARGE,
            ErrorCode.MALFORMED, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_FIELD, ErrorCode.UNEXPECTED,
        )  # fmt: skip


@PROPERTY
@given(st.binary(max_size=300), st.sampled_from([CLIENT, SERVER]), st.booleans())
def test_random_bytes_after_a_valid_start(junk: bytes, me: Side, bytewise_feed: bool) -> None:
    if me is SERVER:
        conn = Connection(SERVER)
        conn.receive_data(preface())
    else:
        conn = Connection(CLIENT)
        conn.send(Hello(Role.CLIENT, "test"))
    chunks = bytewise(0, junk) if bytewise_feed else [junk]
    try:
        events: list[Event] = []
        for chunk in [*chunks, b""]:
            events += conn.receive_data(chunk)
    except RemoteProtocolError:
        return
    _check_events(events)


@PROPERTY
@given(st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: b"RASCP/" + b))
def test_random_bytes_as_a_preface(junk: bytes) -> None:
    conn = Connection(SERVER)
    try:
        events = conn.receive_data(junk) + conn.receive_data(b"")
    except RemoteProtocolError:
        return
    assert junk.startswith(preface())
    _check_events(events)


# Structured mutations of the JSON bodies: any value of any type in any place, and values of
# the right JSON type at their edges (huge numbers, control characters, surrogates).
_ints = (
    st.integers()
    | st.integers(min_value=2**1023, max_value=2**1100)  # over the largest float
    | st.sampled_from([0, -1, 1, 65535, 65536, 86401, 2**31, 2**53, 2**53 + 1, 2**64])
)
_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [-0.0, 0.05, 100.0, 100.5, 3600.5, 1e308, 5e-324]
)
_strings = (
    st.text(st.characters(exclude_categories=()), max_size=12)
    | st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "\x1b[2J", "\x7f", "\x85", "\u2028"])
    | st.sampled_from([*MessageType, *Role, *Mode, *ResourceKind, *HostKind, "x" * 5000])
)
_json_values = st.recursive(
    st.none() | st.booleans() | _ints | _floats | _strings,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=8,
)
_field_names = sorted(
    {"type", "id", "name", "kind"}
    | {f for (_, m) in SAMPLES.values() for f in json.loads(encode_body(m))}
)


def _like(value: object) -> st.SearchStrategy[object]:
    """Values of the same JSON type as ``value``."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return _ints
    if isinstance(value, float):
        return _floats | _ints
    if isinstance(value, str):
        return _strings
    return _json_values


def _mutate_json(data: st.DataObject, value: object) -> object:
    """``value`` with one place changed: replaced, deleted or added to."""
    # (hypothesis favours the first choices of sampled_from: the likely case comes first)
    if isinstance(value, dict) and value and data.draw(st.sampled_from([True, True, False])):
        key = data.draw(st.sampled_from(sorted(value)))
        op = data.draw(st.sampled_from(["descend", "descend", "replace", "delete", "add"]))
        out = dict(value)
        if op == "descend":
            out[key] = _mutate_json(data, value[key])
        elif op == "replace":
            out[key] = data.draw(_json_values)
        elif op == "delete":
            del out[key]
        else:
            new = data.draw(st.sampled_from(_field_names) | st.text(max_size=8))
            out[new] = data.draw(_json_values)
        return out
    if isinstance(value, list) and value and data.draw(st.sampled_from([True, False])):
        i = data.draw(st.integers(0, len(value) - 1))
        out_list = list(value)
        out_list[i] = _mutate_json(data, value[i])
        return out_list
    same_type = data.draw(st.sampled_from([True, True, False]))
    return data.draw(_like(value) if same_type else _json_values)


@PROPERTY
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_mutated_json_bodies_decode_or_fail_cleanly(kind: MessageType, data: st.DataObject) -> None:
    obj = json.loads(encode_body(SAMPLES[kind][1]))
    mutated = _mutate_json(data, obj)
    ascii_only = data.draw(st.booleans())
    body = json.dumps(mutated, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        msg = decode_body(body)
    except RemoteProtocolError as exc:
        code = exc.code
    else:
        assert decode_body(encode_body(msg)) == msg
        return
    assert code in (ErrorCode.MALFORMED, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_FIELD)


# -- framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0xFFFFFFFF, MAX_FRAME_SIZE + 1, 2**31])
def test_oversize_length_refused_on_the_four_header_bytes(length: int) -> None:
    _, server = opened()
    header = length.to_bytes(4, "big")
    for b in header[:3]:
        assert server.receive_data(bytes([b])) == []
    refuse(server, header[3:], ErrorCode.FRAME_TOO_LARGE)


def test_oversize_length_refused_without_buffering_the_body() -> None:
    client, _ = opened()
    # The body that follows in the same read is not kept: the error comes first.
    refuse(client, (2**20).to_bytes(4, "big") + b"x" * 100_000, ErrorCode.FRAME_TOO_LARGE)
    assert len(client._buffer) == 0
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"more")


def test_frame_size_limit_is_inclusive() -> None:
    limit = 64
    body = b'{"type":"ping","nonce":1}'
    padded = body + b" " * (limit - len(body))
    conn = Connection(SERVER, max_frame_size=limit)
    conn.receive_data(Connection(CLIENT).send(Hello(Role.CLIENT, "x")))
    conn.send(Welcome(1, "x"))
    assert conn.receive_data(frame(padded)) == [Ping(1)]
    refuse(conn, frame(padded + b" "), ErrorCode.FRAME_TOO_LARGE)


def test_sending_over_the_limit_is_a_local_error() -> None:
    many = (Resource(f"r{i}", "x" * 200, ResourceKind.APPLICATION) for i in range(400))
    big = ResourceList(tuple(many))
    client, server = opened()
    with pytest.raises(LocalProtocolError):
        server.send(big)
    assert server.state is State.OPEN  # nothing was sent: the connection is still usable
    assert client.receive_data(server.send(Ping(1))) == [Ping(1)]


def test_max_frame_size_bounds() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        Connection(SERVER, max_frame_size=63)
    with pytest.raises(ValueError, match="max_frame_size"):
        Connection(SERVER, max_frame_size=2**31 + 1)


def test_empty_frame_is_malformed() -> None:
    _, server = opened()
    refuse(server, b"\x00\x00\x00\x00", ErrorCode.MALFORMED)


def test_several_frames_in_one_read_and_a_frame_across_reads() -> None:
    client, server = opened()
    wire = client.send(Ping(1)) + client.send(Pong(2)) + client.send(ListResources())
    assert server.receive_data(wire[:-3]) == [Ping(1), Pong(2)]
    assert server.receive_data(wire[-3:]) == [ListResources()]


# -- preface ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS ClientHello
        b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"\x03\x00\x00\x13\x0e\xe0",  # TPKT (native RDP)
        b"\r\n\r\n\x00\r\nQUIT\n",  # PROXY protocol v2 signature
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"rascp/1\r\n",
        b"\x00\x00\x00\x1a{",  # a frame without the preface
    ],
    ids=["tls", "http", "tpkt", "proxy-v2", "ssh", "lowercase", "no-preface"],
)
def test_foreign_protocols_refused_on_the_first_byte(first: bytes) -> None:
    refuse(Connection(SERVER), first[:1], ErrorCode.BAD_PREFACE)
    refuse(Connection(SERVER), first, ErrorCode.BAD_PREFACE)


@pytest.mark.parametrize(
    "bad",
    [
        b"RASCP/0\r\n",
        b"RASCP/01\r\n",
        b"RASCP/1\n",
        b"RASCP/1 \r\n",
        b"RASCP/v1\r\n",
        b"RASCP/-1\r\n",
        b"RASCP/1000\r\n",
        b"RASCP/\r\n",
        b"RASCP/1\r\r\n",
    ],
)
def test_malformed_preface(bad: bytes) -> None:
    refuse(Connection(SERVER), bad, ErrorCode.BAD_PREFACE)


def test_overlong_preface_refused_without_waiting_for_a_newline() -> None:
    server = Connection(SERVER)
    assert server.receive_data(b"RASCP/123\r") == []
    refuse(server, b"9", ErrorCode.BAD_PREFACE)  # 11 bytes and still no end of line
    refuse(Connection(SERVER), b"RASCP/" + b"9" * 1000, ErrorCode.BAD_PREFACE)


@pytest.mark.parametrize("offered", [1, 2, 17, 999])
def test_version_negotiation_picks_the_highest_common(offered: int) -> None:
    server = Connection(SERVER)
    hello = Connection(CLIENT).send(Hello(Role.CLIENT, "x"))
    wire = preface(offered) + hello[len(preface()) :]
    for i in range(len(wire)):  # one byte at a time, preface included
        events = server.receive_data(wire[i : i + 1])
    assert events == [Hello(Role.CLIENT, "x")]
    assert server.version == 1
    with pytest.raises(LocalProtocolError):
        server.send(Welcome(2, "x"))  # welcome must carry the negotiated version
    assert server.state is State.AWAIT_WELCOME
    welcome = server.send(Welcome(1, "x"))
    client = Connection(CLIENT)
    client.send(Hello(Role.CLIENT, "x"))
    assert client.receive_data(welcome) == [Welcome(1, "x")]


@pytest.mark.parametrize("version", [2, 999])
def test_client_refuses_a_version_it_did_not_offer(version: int) -> None:
    client = Connection(CLIENT)
    client.send(Hello(Role.CLIENT, "x"))
    refuse(
        client,
        frame({"type": "welcome", "version": version, "software": "x"}),
        ErrorCode.UNSUPPORTED_VERSION,
    )


def test_preface_and_hello_split_across_reads() -> None:
    server = Connection(SERVER)
    wire = Connection(CLIENT).send(Hello(Role.AGENT, "a"))
    assert server.receive_data(wire[:4]) == []
    assert server.receive_data(wire[4:12]) == []
    assert server.receive_data(wire[12:]) == [Hello(Role.AGENT, "a")]


# -- state machine ------------------------------------------------------------------------------


def test_wrong_direction_is_unexpected() -> None:
    client, server = opened()
    # A server may not send authenticate; a client may not send welcome.
    with pytest.raises(LocalProtocolError):
        server.send(Authenticate("alice", PASSWORD))
    with pytest.raises(LocalProtocolError):
        client.send(Welcome(1, "x"))
    refuse(client, frame(encode_body(Authenticate("alice", PASSWORD))), ErrorCode.UNEXPECTED)
    refuse(server, frame(encode_body(AuthOk("alice", ()))), ErrorCode.UNEXPECTED)


@pytest.mark.parametrize(
    "msg",
    [m for side, m in SAMPLES.values() if side is CLIENT and not isinstance(m, Hello)]
    + [Ping(1), Error(ErrorCode.INTERNAL, "x")],
)
def test_nothing_but_hello_before_hello(msg: Message) -> None:
    with pytest.raises(LocalProtocolError):
        Connection(CLIENT).send(msg)
    server = Connection(SERVER)
    refuse(server, preface() + frame(encode_body(msg)), ErrorCode.UNEXPECTED)


def test_nothing_before_welcome() -> None:
    client = Connection(CLIENT)
    client.send(Hello(Role.CLIENT, "x"))
    with pytest.raises(LocalProtocolError):
        client.send(Launch("desk", Mode.DIRECT))  # no pipelining before welcome
    refuse(client, frame(encode_body(Ping(1))), ErrorCode.UNEXPECTED)
    server = Connection(SERVER)
    hello = Connection(CLIENT).send(Hello(Role.CLIENT, "x"))
    refuse(server, hello + frame(encode_body(Ping(1))), ErrorCode.UNEXPECTED)


def test_a_second_hello_or_welcome_is_unexpected() -> None:
    client, server = opened()
    with pytest.raises(LocalProtocolError):
        client.send(Hello(Role.CLIENT, "x"))
    with pytest.raises(LocalProtocolError):
        server.send(Welcome(1, "x"))
    refuse(server, frame(encode_body(Hello(Role.CLIENT, "x"))), ErrorCode.UNEXPECTED)
    refuse(client, frame(encode_body(Welcome(1, "x"))), ErrorCode.UNEXPECTED)


def test_tunnel_open_only_after_open_tunnel() -> None:
    client, server = opened()
    with pytest.raises(LocalProtocolError):
        server.send(TunnelOpen("10.0.0.21", 3389))
    refuse(client, frame(encode_body(TunnelOpen("10.0.0.21", 3389))), ErrorCode.UNEXPECTED)


def test_everything_after_open_tunnel_is_raw_for_the_server() -> None:
    client, server = opened()
    ping = client.send(Ping(9))
    assert server.receive_data(client.send(OpenTunnel(TICKET)) + ping) == [OpenTunnel(TICKET)]
    assert server.state is State.AWAIT_TUNNEL
    assert server.receive_data(ping) == []  # a well-formed frame is tunnel bytes now
    assert server.receive_data(b"") == []  # EOF is the relay's business
    assert server.trailing_data() == ping + ping
    assert server.trailing_data() == b""
    # The client sends nothing framed after open_tunnel; the server only tunnel_open or error.
    for msg in (Ping(1), Pong(1), Launch("desk", Mode.GATEWAY), Error(ErrorCode.INTERNAL, "x")):
        with pytest.raises(LocalProtocolError):
            client.send(msg)
    with pytest.raises(LocalProtocolError):
        server.send(Ping(1))


def test_client_awaiting_the_tunnel_accepts_only_tunnel_open_or_error() -> None:
    client, _ = opened()
    client.send(OpenTunnel(TICKET))
    with pytest.raises(LocalProtocolError):
        client.trailing_data()  # not raw until tunnel_open
    refuse(client, frame(encode_body(Ping(3))), ErrorCode.UNEXPECTED)
    # Not even an error frame: the server would take it for tunnel bytes.
    with pytest.raises(LocalProtocolError):
        client.send_error(ErrorCode.UNEXPECTED, "bad answer")


def test_tunnel_open_is_the_servers_last_frame() -> None:
    client, server = tunnelled()
    for msg in (Ping(1), Error(ErrorCode.INTERNAL, "x")):
        with pytest.raises(LocalProtocolError):
            server.send(msg)
        with pytest.raises(LocalProtocolError):
            client.send(msg)
    with pytest.raises(LocalProtocolError):
        server.send_error(ErrorCode.INTERNAL, "x")
    assert client.receive_data(b"\x00\x00\x00\x05hello") == []
    assert client.trailing_data() == b"\x00\x00\x00\x05hello"


def test_tunnel_refused_with_an_error_closes() -> None:
    client, server = opened()
    server.receive_data(client.send(OpenTunnel(TICKET)))
    refusal = server.send_error(ErrorCode.TICKET_INVALID, "ticket expired")
    assert server.state is State.CLOSED
    assert client.receive_data(refusal) == [Error(ErrorCode.TICKET_INVALID, "ticket expired")]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Ping(1))


@pytest.mark.parametrize("code", [c for c in ErrorCode if 100 <= c < 200])
def test_fatal_error_closes_both_ends(code: ErrorCode) -> None:
    client, server = opened()
    wire = server.send_error(code, "bye")
    assert server.state is State.CLOSED
    assert client.receive_data(wire) == [Error(code, "bye")]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Ping(1))
    with pytest.raises(LocalProtocolError):
        server.send(Ping(1))
    # Whatever the peer sends after its fatal error is unexpected.
    refuse(client, frame(encode_body(Ping(1))), ErrorCode.UNEXPECTED)


@pytest.mark.parametrize("code", [c for c in ErrorCode if c >= 200])
def test_refusals_keep_the_connection_open(code: ErrorCode) -> None:
    client, server = opened()
    assert client.receive_data(server.send_error(code, "no")) == [Error(code, "no")]
    assert client.state is server.state is State.OPEN
    assert server.receive_data(client.send(ListResources())) == [ListResources()]


@pytest.mark.parametrize("code", [ErrorCode.FORBIDDEN, ErrorCode.UNAVAILABLE, ErrorCode.BAD_FIELD])
def test_hello_refused_with_an_error_closes(code: ErrorCode) -> None:
    # The broker answers a hello of the wrong role with FORBIDDEN, the gateway a non-client
    # hello too: the refusal must reach the peer, and it ends the connection.
    client, server = Connection(CLIENT), Connection(SERVER)
    server.receive_data(client.send(Hello(Role.AGENT, "x")))
    refusal = server.send_error(code, "this port serves gateway connections")
    assert server.state is State.CLOSED
    assert client.receive_data(refusal) == [Error(code, "this port serves gateway connections")]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Authenticate("alice", PASSWORD))


def test_after_a_remote_error_only_send_error() -> None:
    client, server = opened()
    refuse(server, frame(b"{"), ErrorCode.MALFORMED)
    with pytest.raises(LocalProtocolError):
        server.send(Ping(1))
    with pytest.raises(LocalProtocolError):
        server.send(AuthOk("alice", ()))
    # Even a non-fatal code closes: the connection is beyond repair.
    wire = server.send_error(ErrorCode.INTERNAL, "x")
    assert server.state is State.CLOSED
    assert client.receive_data(wire) == [Error(ErrorCode.INTERNAL, "x")]
    with pytest.raises(LocalProtocolError):
        server.send_error(ErrorCode.MALFORMED, "again")


def test_receive_after_a_remote_error_keeps_failing() -> None:
    _, server = opened()
    refuse(server, b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(frame(encode_body(Ping(1))))
    assert info.value.code is ErrorCode.UNEXPECTED
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"")


def test_send_error_truncates_long_text() -> None:
    _, server = opened()
    wire = server.send_error(ErrorCode.INTERNAL, "x" * 5000)
    assert decode_body(wire[4:]) == Error(ErrorCode.INTERNAL, "x" * 1024)


def test_trailing_data_before_the_tunnel_is_a_local_error() -> None:
    client, server = opened()
    for conn in (client, server):
        with pytest.raises(LocalProtocolError):
            conn.trailing_data()


# -- field validation ---------------------------------------------------------------------------


def _hello(software: bytes) -> bytes:
    return b'{"type":"hello","role":"client","software":' + software + b"}"


def _tunnel_open(host: bytes, port: bytes) -> bytes:
    return b'{"type":"tunnel_open","host":' + host + b',"port":' + port + b"}"


def _load(cpu: bytes, sessions: bytes = b"1") -> bytes:
    return (
        b'{"type":"load_report","cpu_percent":'
        + cpu
        + b',"memory_percent":1,"sessions":'
        + sessions
        + b',"disconnected":0}'
    )


def _auth_ok(groups: bytes) -> bytes:
    return b'{"type":"auth_ok","user":"u","groups":' + groups + b"}"


def _resources(*items: bytes) -> bytes:
    return b'{"type":"resource_list","resources":[' + b",".join(items) + b"]}"


_RES = b'{"id":"a","name":"a","kind":"desktop"}'

M, U, B = ErrorCode.MALFORMED, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_FIELD
# fmt: off
BAD_BODIES: list[tuple[str, bytes, ErrorCode]] = [
    # structure: MALFORMED
    ("not json", b"{", M),
    ("trailing garbage", b'{"type":"ping","nonce":1} x', M),
    ("not utf-8", _hello(b'"\xff"'), M),
    ("utf-8 bom", b'\xef\xbb\xbf{"type":"ping","nonce":1}', M),
    ("surrogate bytes", _hello(b'"\xed\xa0\x80"'), M),
    ("array", b'[{"type":"ping","nonce":1}]', M),
    ("string", b'"ping"', M),
    ("number", b"1", M),
    ("null", b"null", M),
    ("no type", b'{"nonce":1}', M),
    ("type not a string", b'{"type":1,"nonce":1}', M),
    ("type null", b'{"type":null}', M),
    ("duplicate key", b'{"type":"ping","nonce":1,"nonce":2}', M),
    ("duplicate type", b'{"type":"ping","type":"pong","nonce":1}', M),
    ("duplicate nested key", _resources(b'{"id":"a","id":"b","name":"n","kind":"desktop"}'), M),
    ("NaN", _load(b"NaN"), M),
    ("Infinity", _load(b"Infinity"), M),
    ("-Infinity", _load(b"-Infinity"), M),
    ("raw control char", _hello(b'"a\nb"'), M),
    ("deep nesting", b'{"type":"ping","nonce":' + b"[" * 60_000 + b"}", M),
    ("huge integer literal", b'{"type":"ping","nonce":' + b"9" * 5000 + b"}", M),
    # type: UNKNOWN_TYPE
    ("unknown type", b'{"type":"bogus"}', U),
    ("type is case sensitive", b'{"type":"PING","nonce":1}', U),
    ("empty type", b'{"type":""}', U),
    # fields: BAD_FIELD
    ("unknown field", b'{"type":"ping","nonce":1,"extra":true}', B),
    ("missing field", b'{"type":"ping"}', B),
    ("field on list_resources", b'{"type":"list_resources","filter":"x"}', B),
    ("bool for int", b'{"type":"ping","nonce":true}', B),
    ("string for int", _tunnel_open(b'"h"', b'"3389"'), B),
    ("float for int", _tunnel_open(b'"h"', b"3389.0"), B),
    ("exponent for int", _tunnel_open(b'"h"', b"3e3"), B),
    ("null for str", _hello(b"null"), B),
    ("int for bool", b'{"type":"auth_challenge","prompt":"p","echo":1}', B),
    ("bool for float", _load(b"true"), B),
    ("float overflow", _load(b"1e999"), B),
    ("integer over the largest float", _load(b"1" + b"0" * 400), B),
    ("percent over 100", _load(b"100.5"), B),
    ("negative count", _load(b"1", sessions=b"-1"), B),
    ("bad role", b'{"type":"hello","role":"admin","software":"x"}', B),
    ("enum is case sensitive", b'{"type":"launch","resource":"desk","mode":"GATEWAY"}', B),
    ("int for enum", b'{"type":"launch","resource":"desk","mode":1}', B),
    ("unknown error code", b'{"type":"error","code":999,"message":""}', B),
    ("string error code", b'{"type":"error","code":"100","message":""}', B),
    ("port 0", _tunnel_open(b'"h"', b"0"), B),
    ("port 70000", _tunnel_open(b'"h"', b"70000"), B),
    ("port -1", b'{"type":"client_session","address":"10.0.0.1","port":-1}', B),
    ("host with a space", _tunnel_open(b'"a b"', b"1"), B),
    ("host with a path", _tunnel_open(b'"h/x"', b"1"), B),
    ("host with a port", _tunnel_open(b'"h:22"', b"1"), B),
    ("host with a newline", _tunnel_open(b'"h\\n"', b"1"), B),
    ("empty host", _tunnel_open(b'""', b"1"), B),
    ("host too long", _tunnel_open(b'"' + b"a." * 127 + b'a"', b"1"), B),
    ("bad resource id", b'{"type":"launch","resource":"../etc","mode":"direct"}', B),
    ("version 0", b'{"type":"welcome","version":0,"software":"x"}', B),
    ("nul in a string", _hello(b'"a\\u0000b"'), B),
    ("escape sequence", _hello(b'"\\u001b[31m"'), B),
    ("DEL", _hello(b'"\\u007f"'), B),
    ("C1 control (NEL)", _hello(b'"a\\u0085b"'), B),
    ("newline escape", b'{"type":"error","code":203,"message":"a\\nb"}', B),
    ("lone surrogate", b'{"type":"authenticate","username":"\\ud800","password":""}', B),
    ("empty software", _hello(b'""'), B),
    ("software too long", _hello(b'"' + b"x" * 129 + b'"'), B),
    ("empty ticket", b'{"type":"open_tunnel","ticket":""}', B),
    ("groups not a list", _auth_ok(b'"staff"'), B),
    ("group not a string", _auth_ok(b"[1]"), B),
    ("control char in a group", _auth_ok(b'["a\\u0000"]'), B),
    ("empty group", _auth_ok(b'[""]'), B),
    ("too many groups", _auth_ok(b"[" + b",".join([b'"g"'] * 1001) + b"]"), B),
    ("too many resources", _resources(*[_RES] * 1001), B),
    ("resource not an object", _resources(b'"desk"'), B),
    ("resource missing kind", _resources(b'{"id":"a","name":"a"}'), B),
    ("resource extra field", _resources(b'{"id":"a","name":"a","kind":"desktop","host":"h"}'), B),
    ("resource bad kind", _resources(b'{"id":"a","name":"a","kind":"x"}'), B),
]
# fmt: on


@pytest.mark.parametrize(
    ("body", "code"), [(b, c) for _, b, c in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES]
)
def test_bad_bodies_are_refused_with_their_code(body: bytes, code: ErrorCode) -> None:
    assert len(body) <= MAX_FRAME_SIZE
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code is code, info.value
    # The same through a connection.
    _, server = opened()
    refuse(server, frame(body), code)


def test_constructors_validate_locally() -> None:
    with pytest.raises(LocalProtocolError) as info:
        TunnelOpen("10.0.0.21", 0)
    assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(LocalProtocolError):
        Hello(Role.CLIENT, "line\nbreak")
    with pytest.raises(LocalProtocolError):
        LoadReport(float("nan"), 0.0, 0, 0)
    with pytest.raises(LocalProtocolError):
        Registered("gw1", float("inf"))


def test_addresses_accepted_as_hosts() -> None:
    for host in (
        "10.0.0.21",
        "::1",
        "2001:db8::7",
        "fe80::1%eth0",
        "rdsh1",
        "rdsh1.farm.example.",
        "xn--bcher-kva.example",
        "a" * 63 + ".example",
    ):
        assert decode_body(frame(encode_body(TunnelOpen(host, 1)))[4:]) == TunnelOpen(host, 1)
    # client_session names the client's source port, which may be 0 when unknown.
    assert ClientSession("10.0.0.1", 0).port == 0


# -- secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "secret"),
    [
        (Authenticate("alice", PASSWORD), PASSWORD),
        (AuthResponse(OTP), OTP),
        (LaunchOk(Mode.GATEWAY, "rdsh1", 3389, TICKET, 60), TICKET),
        (OpenTunnel(TICKET), TICKET),
        (RedeemTicket(TICKET), TICKET),
    ],
)
def test_secrets_stay_out_of_repr(msg: Message, secret: str) -> None:
    assert secret not in repr(msg)
    assert secret not in str(msg)
    assert secret not in repr([msg])
    assert secret in encode_body(msg).decode()  # but they do travel


@pytest.mark.parametrize(
    "body",
    [
        {"type": "authenticate", "username": "alice", "password": PASSWORD + "\x00"},
        {"type": "authenticate", "username": "alice", "password": PASSWORD * 40},
        {"type": "authenticate", "username": "alice", "password": [PASSWORD]},
        {"type": "open_tunnel", "ticket": TICKET + "\x1b"},
        {"type": "redeem_ticket", "ticket": TICKET * 50},
        {"type": "auth_response", "answer": OTP + "\n"},
    ],
    ids=["control", "long", "list", "ticket-control", "ticket-long", "answer-newline"],
)
def test_refusals_do_not_echo_secrets(body: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(json.dumps(body).encode())
    assert info.value.code is ErrorCode.BAD_FIELD
    for secret in (PASSWORD, TICKET, OTP):
        assert secret not in str(info.value)


def test_error_codes_are_stable_wire_values() -> None:
    assert {c.name: int(c) for c in ErrorCode} == {
        "BAD_PREFACE": 100, "UNSUPPORTED_VERSION": 101, "FRAME_TOO_LARGE": 102, "MALFORMED": 103,
        "UNKNOWN_TYPE": 104, "BAD_FIELD": 105, "UNEXPECTED": 106, "AUTH_FAILED": 200,
        "AUTH_REQUIRED": 201, "FORBIDDEN": 202, "NOT_FOUND": 203, "TICKET_INVALID": 204,
        "THROTTLED": 205, "NO_HOST": 500, "HOST_UNREACHABLE": 501, "UNAVAILABLE": 502,
        "TIMEOUT": 503, "INTERNAL": 504,
    }  # fmt: skip


def test_redeem_ticket_names_its_client_only_on_a_redemption_connection() -> None:
    # a per-client connection's redeem_ticket is unchanged on the wire (client left out) ...
    assert encode_body(RedeemTicket(TICKET)) == b'{"type":"redeem_ticket","ticket":"%s"}' % (
        TICKET.encode()
    )
    # ... a redemption connection's names the client, and it must be an address or host name
    pooled = RedeemTicket(TICKET, "198.51.100.7")
    assert encode_body(pooled).endswith(b',"client":"198.51.100.7"}')
    assert decode_body(encode_body(pooled)) == pooled
    assert TICKET not in repr(pooled)
    with pytest.raises(RemoteProtocolError, match="client"):
        decode_body(b'{"type":"redeem_ticket","ticket":"t1.x.y","client":"a b"}')
