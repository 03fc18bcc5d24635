"""The control protocol's connection: preface, framing and state machine, sans-I/O.

Theory of operation. One :class:`Connection` object sits on each end of a connection. The
caller feeds it received bytes (``receive_data``, ``b""`` for end of stream) and gets back the
complete events; it asks it for the bytes of each message it wants to send (``send``). The
object never does I/O, never blocks and never imports trio or socket.

Wire format (``docs/protocol.md`` is the normative text):

* The connecting side (the *client* here: a user's client, a gateway or an agent) first sends
  the preface ``RASCP/<v>\\r\\n`` where ``<v>`` is the highest protocol version it speaks.
  The preface lets a shared port recognise the protocol from its first six bytes.
* Then both sides exchange frames: a 4-byte big-endian body length, then that many bytes of
  UTF-8 JSON (see :mod:`ras.protocol.messages`). A length over ``max_frame_size`` is refused
  as soon as the 4 length bytes have arrived, before any of the body is buffered.
* After ``open_tunnel`` has been answered with ``tunnel_open`` the connection stops framing:
  every later byte belongs to the tunnel (``trailing_data`` hands out what was already read).

State rules (one table, ``_TRANSITIONS`` below; both ends walk the same states):

    AWAIT_HELLO   --hello-->         AWAIT_WELCOME   (client sends preface + hello)
    AWAIT_WELCOME --welcome-->       OPEN            (server picks the version)
    AWAIT_WELCOME --error-->         CLOSED          (hello refused: the server closes)
    OPEN          --open_tunnel-->   AWAIT_TUNNEL    (the client's last frame)
    AWAIT_TUNNEL  --tunnel_open-->   TUNNEL          (the server's last frame; raw bytes follow)
    AWAIT_TUNNEL  --error-->         CLOSED          (tunnel refused: the server closes)
    OPEN          --any other message of the right direction--> OPEN
    any state     --error 1xx-->     CLOSED          (fatal: the sender closes)

Anything else is a protocol error: raised as ``LocalProtocolError`` when we try to send it and
``RemoteProtocolError`` when the peer does; after a remote error the connection is in the
terminal ERROR state and only an ``error`` message may still be sent.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from ras.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ras.protocol.messages import (
    Error,
    Hello,
    Message,
    MessageType,
    Welcome,
    decode_body,
    encode_body,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "PREFACE_PREFIX",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Connection",
    "ConnectionClosed",
    "Event",
    "Side",
    "State",
    "preface",
]

PREFACE_PREFIX = b"RASCP/"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_FRAME_SIZE = 64 * 1024
_MAX_PREFACE = len(PREFACE_PREFIX) + 3 + 2
_PREFACE = re.compile(rb"RASCP/([1-9][0-9]{0,2})\r\n")
_LENGTH = struct.Struct("!I")


def preface(version: int = PROTOCOL_VERSION) -> bytes:
    """The bytes a connecting side sends first."""
    return b"RASCP/%d\r\n" % version


class Side(enum.Enum):
    CLIENT = "client"  # the side that connected and sends the preface
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_WELCOME = "await_welcome"
    OPEN = "open"
    AWAIT_TUNNEL = "await_tunnel"
    TUNNEL = "tunnel"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly at a frame boundary."""


Event = Message | ConnectionClosed

T = MessageType
# Which side may send each message type.
_CLIENT_SENDS = frozenset({
    T.HELLO, T.AUTHENTICATE, T.RESUME, T.AUTH_RESPONSE, T.LIST_RESOURCES, T.LAUNCH, T.OPEN_TUNNEL,
    T.AGENT_REGISTER, T.LOAD_REPORT, T.GATEWAY_REGISTER, T.CLIENT_SESSION, T.REDEEM_TICKET,
    T.LIST_GATEWAYS, T.PING, T.PONG, T.ERROR, T.ROUTE, T.RDP_TOKEN, T.SESSION_ACTION_OK, T.LOGOUT,
})  # fmt: skip
_SERVER_SENDS = frozenset({
    T.WELCOME, T.AUTH_CHALLENGE, T.AUTH_OK, T.RESOURCE_LIST, T.LAUNCH_OK, T.TUNNEL_OPEN,
    T.REGISTERED, T.TICKET_OK, T.GATEWAY_LIST, T.PING, T.PONG, T.ERROR, T.ROUTE_OK,
    T.RDP_TOKEN_OK, T.ACME_CHALLENGE, T.ACME_WITHDRAW, T.PUBLIC_CERTIFICATE, T.SESSION_ACTION,
    T.PORTAL_SETTINGS, T.LOGGED_OUT,
})  # fmt: skip
# Messages that open a new phase; all other messages keep an OPEN connection OPEN.
_TRANSITIONS: dict[tuple[State, MessageType], State] = {
    (State.AWAIT_HELLO, T.HELLO): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, T.WELCOME): State.OPEN,
    (State.AWAIT_WELCOME, T.ERROR): State.CLOSED,
    (State.OPEN, T.OPEN_TUNNEL): State.AWAIT_TUNNEL,
    (State.AWAIT_TUNNEL, T.TUNNEL_OPEN): State.TUNNEL,
    (State.AWAIT_TUNNEL, T.ERROR): State.CLOSED,
}
_PHASE_MESSAGES = frozenset({T.HELLO, T.WELCOME, T.OPEN_TUNNEL, T.TUNNEL_OPEN})


def _next_state(state: State, msg: Message) -> State | None:
    if isinstance(msg, Error) and msg.fatal and state not in (State.CLOSED, State.TUNNEL):
        return State.CLOSED
    nxt = _TRANSITIONS.get((state, msg.TYPE))
    if nxt is None and state is State.OPEN and msg.TYPE not in _PHASE_MESSAGES:
        nxt = State.OPEN
    return nxt


class Connection:
    """One end of a control-protocol connection (see the module docstring)."""

    def __init__(self, side: Side, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 64 <= max_frame_size <= 2**31:
            raise ValueError("max_frame_size must be between 64 bytes and 2 GiB")
        self.side = side
        self.max_frame_size = max_frame_size
        self.state = State.AWAIT_HELLO
        self.version: int | None = None  # the client's offer, then the negotiated version
        self._buffer = bytearray()
        self._preface_seen = side is Side.CLIENT
        self._raw = False  # set once every further received byte belongs to the tunnel
        self._sent_open_tunnel = False  # the client's last frame: the server reads raw after it

    # -- sending ---------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """The bytes that carry ``msg``; raises :class:`LocalProtocolError` if not allowed now."""
        allowed = _CLIENT_SENDS if self.side is Side.CLIENT else _SERVER_SENDS
        if self._sent_open_tunnel:
            raise LocalProtocolError("open_tunnel was the last frame: the peer reads raw bytes now")
        if self.state is State.ERROR and not isinstance(msg, Error):
            raise LocalProtocolError("connection is in error: only an error may be sent")
        if msg.TYPE not in allowed:
            raise LocalProtocolError(f"a {self.side.value} may not send {msg.TYPE}")
        nxt = State.CLOSED if self.state is State.ERROR else _next_state(self.state, msg)
        if nxt is None:
            raise LocalProtocolError(f"cannot send {msg.TYPE} in state {self.state.value}")
        prefix = b""
        if isinstance(msg, Hello):
            self.version = PROTOCOL_VERSION
            prefix = preface(PROTOCOL_VERSION)
        elif isinstance(msg, Welcome) and msg.version != self.version:
            raise LocalProtocolError(f"welcome must carry the negotiated version {self.version}")
        body = encode_body(msg)
        if len(body) > self.max_frame_size:
            raise LocalProtocolError(f"{msg.TYPE} is {len(body)} bytes, over the frame limit")
        self.state = nxt
        self._sent_open_tunnel = msg.TYPE is T.OPEN_TUNNEL
        return prefix + _LENGTH.pack(len(body)) + body

    def send_error(self, code: ErrorCode, message: str) -> bytes:
        """Bytes of an ``error`` frame, allowed in any state but TUNNEL and CLOSED, and not
        after sending ``open_tunnel``."""
        if self.state in (State.TUNNEL, State.CLOSED):
            raise LocalProtocolError(f"cannot send an error in state {self.state.value}")
        return self.send(Error(code, message[:1024]))

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes (``b""`` at end of stream); return the complete events."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection is already in error", ErrorCode.UNEXPECTED)
        if self._raw:
            self._buffer += data
            return []
        try:
            return self._receive(data)
        except ProtocolError as exc:
            self.state = State.ERROR
            self._buffer.clear()
            if isinstance(exc, RemoteProtocolError):
                raise
            raise RemoteProtocolError(str(exc), exc.code) from None

    def trailing_data(self) -> bytes:
        """Bytes received after the switch to the raw tunnel (and forget them)."""
        if not self._raw:
            raise LocalProtocolError("the connection has not switched to the tunnel")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def _receive(self, data: bytes) -> list[Event]:
        buf = self._buffer
        if data:
            buf += data
        events: list[Event] = []
        pos = 0
        if not self._preface_seen:
            pos = self._parse_preface()
            if not self._preface_seen:
                if not data:
                    raise RemoteProtocolError(
                        "connection closed before the preface", ErrorCode.BAD_PREFACE
                    )
                return events
        while not self._raw:
            if len(buf) - pos < _LENGTH.size:
                break
            (length,) = _LENGTH.unpack_from(buf, pos)
            if length > self.max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {length} bytes is over the {self.max_frame_size} byte limit",
                    ErrorCode.FRAME_TOO_LARGE,
                )
            if length == 0:
                raise RemoteProtocolError("empty frame", ErrorCode.MALFORMED)
            end = pos + _LENGTH.size + length
            if len(buf) < end:
                break
            msg = decode_body(bytes(buf[pos + _LENGTH.size : end]))
            pos = end
            events.append(self._received(msg))
        del buf[:pos]
        if not data and not self._raw:
            if buf:
                raise RemoteProtocolError(
                    "connection closed in the middle of a frame", ErrorCode.MALFORMED
                )
            if self.state is not State.CLOSED:
                self.state = State.CLOSED
            events.append(ConnectionClosed())
        return events

    def _parse_preface(self) -> int:
        buf = self._buffer
        head = bytes(buf[: len(PREFACE_PREFIX)])
        if not PREFACE_PREFIX.startswith(head):
            raise RemoteProtocolError("not the RASCP protocol", ErrorCode.BAD_PREFACE)
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) >= _MAX_PREFACE:
                raise RemoteProtocolError("preface is too long", ErrorCode.BAD_PREFACE)
            return 0
        match = _PREFACE.fullmatch(bytes(buf[: end + 1]))
        if match is None:
            raise RemoteProtocolError("malformed preface", ErrorCode.BAD_PREFACE)
        offered = int(match.group(1))
        usable = [v for v in SUPPORTED_VERSIONS if v <= offered]
        if not usable:
            raise RemoteProtocolError(
                f"version {offered} is not supported (supported: {sorted(SUPPORTED_VERSIONS)})",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        self.version = max(usable)
        self._preface_seen = True
        return end + 1

    def _received(self, msg: Message) -> Message:
        allowed = _SERVER_SENDS if self.side is Side.CLIENT else _CLIENT_SENDS
        if msg.TYPE not in allowed:
            raise RemoteProtocolError(f"peer may not send {msg.TYPE}", ErrorCode.UNEXPECTED)
        nxt = _next_state(self.state, msg)
        if nxt is None:
            raise RemoteProtocolError(
                f"unexpected {msg.TYPE} in state {self.state.value}", ErrorCode.UNEXPECTED
            )
        if isinstance(msg, Welcome) and (
            msg.version not in SUPPORTED_VERSIONS
            or self.version is None
            or msg.version > self.version
        ):
            raise RemoteProtocolError(
                f"server chose version {msg.version}", ErrorCode.UNSUPPORTED_VERSION
            )
        self.state = nxt
        if nxt is State.AWAIT_TUNNEL or nxt is State.TUNNEL:
            # The client sends nothing framed after open_tunnel and the server nothing framed
            # after tunnel_open: what follows is the tunnel's.
            self._raw = True
        return msg
