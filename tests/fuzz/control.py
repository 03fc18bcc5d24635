"""The control protocol's connection (``ras.protocol.control``) on both sides.

Input: one mode byte, then the bytes the connection under test receives.

* Mode bit 0 picks the side: 0 is a server (the input starts with the client's preface and
  hello), 1 a client that has sent its hello (the input starts with the server's welcome).
* First, without replying: the input fed whole then EOF, and fed in pieces then EOF, must give
  the same events, the same raw tunnel bytes, or the same error code.
* Then as a live peer, in pieces: a server answers hello with welcome and open_tunnel with
  tunnel_open (or, mode bit 2, refuses it with an error); a client sends open_tunnel as soon as
  it is open when mode bit 1 is set. Our own replies must always be allowed.

Every accepted message must survive ``encode_body``/``decode_body`` unchanged.
"""

from __future__ import annotations

import dataclasses

from fuzz import chunks
from ras.errors import ErrorCode, RemoteProtocolError
from ras.protocol.control import Connection, ConnectionClosed, Event, Side, State
from ras.protocol.messages import (
    MESSAGE_CLASSES,
    Hello,
    Message,
    MessageType,
    OpenTunnel,
    Role,
    TunnelOpen,
    Welcome,
    decode_body,
    encode_body,
)

TICKET = "v1.eyJ1IjoiYWxpY2UiLCJyIjoiZGVzayJ9.c2lnbmF0dXJl"
DICTIONARY = (
    b"RASCP/1\r\n",
    b'{"type":"',
    b'":"',
    b'":',
    b"null",
    b"true",
    b"false",
    *(f'"{t.value}"'.encode() for t in MessageType),
    *sorted(
        {
            f'"{f.name}"'.encode()
            for cls in MESSAGE_CLASSES.values()
            for f in dataclasses.fields(cls)
        }
    ),
)


def _new(side: Side) -> Connection:
    conn = Connection(side)
    if side is Side.CLIENT:
        conn.send(Hello(Role.CLIENT, "fuzz"))
    return conn


def _check(events: list[Event]) -> None:
    for event in events:
        if isinstance(event, Message):
            repr(event)  # a message's repr hides its secrets, and must not fail doing so
            assert decode_body(encode_body(event)) == event, event
        else:
            assert isinstance(event, ConnectionClosed), event


def _passive(side: Side, pieces: list[bytes]) -> tuple[list[Event], bytes | None, ErrorCode | None]:
    conn = _new(side)
    events: list[Event] = []
    try:
        for piece in [*pieces, b""]:
            events += conn.receive_data(piece)
    except RemoteProtocolError as exc:
        assert conn.state is State.ERROR
        try:
            conn.receive_data(b"more")
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("a connection in error took more data") from None
        _check(events)
        return [], None, exc.code
    _check(events)
    raw = conn.trailing_data() if conn.state in (State.AWAIT_TUNNEL, State.TUNNEL) else None
    return events, raw, None


def _live(side: Side, mode: int, data: bytes) -> None:
    conn = _new(side)
    events: list[Event] = []
    sent_open_tunnel = False
    try:
        for piece in chunks(data):
            events += conn.receive_data(piece)
            if side is Side.SERVER and conn.state is State.AWAIT_WELCOME:
                assert conn.version is not None
                conn.send(Welcome(conn.version, "fuzz"))
            elif side is Side.SERVER and conn.state is State.AWAIT_TUNNEL:
                if mode & 4:
                    conn.send_error(ErrorCode.TICKET_INVALID, "no")
                else:
                    conn.send(TunnelOpen("10.0.0.21", 3389))
            elif side is Side.CLIENT and conn.state is State.OPEN and mode & 2:
                conn.send(OpenTunnel(TICKET))
                sent_open_tunnel = True
        events += conn.receive_data(b"")
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        if not sent_open_tunnel:  # after open_tunnel the peer reads raw bytes: nothing framed
            conn.send_error(ErrorCode.MALFORMED, "fuzz")
    _check(events)


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    mode, data = data[0], data[1:]
    side = Side.CLIENT if mode & 1 else Side.SERVER
    whole = _passive(side, [data] if data else [])
    split = _passive(side, list(chunks(data)))
    assert whole == split, (whole, split)
    _live(side, mode, data)
