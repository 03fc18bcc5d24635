"""Sans-I/O protocol codecs: bytes in, events out; events in, bytes out. No trio, no sockets."""

from ras.protocol.control import (
    MAX_FRAME_SIZE,
    PREFACE_PREFIX,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Event,
    Side,
    State,
    preface,
)
from ras.protocol.messages import *  # noqa: F403
from ras.protocol.messages import __all__ as _messages_all

__all__ = [
    "MAX_FRAME_SIZE",
    "PREFACE_PREFIX",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionClosed",
    "Event",
    "Side",
    "State",
    "preface",
    *_messages_all,
]
