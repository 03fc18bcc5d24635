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
from ras.protocol.proxy import (
    PROXY_V2_HEADER_SIZE,
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

__all__ = [
    "MAX_FRAME_SIZE",
    "PREFACE_PREFIX",
    "PROTOCOL_VERSION",
    "PROXY_V2_HEADER_SIZE",
    "PROXY_V2_MAX_PAYLOAD",
    "PROXY_V2_SIGNATURE",
    "Connection",
    "ConnectionClosed",
    "Event",
    "PP2Type",
    "ProxyCommand",
    "ProxyFamily",
    "ProxyHeader",
    "Side",
    "State",
    "encode_v2",
    "encode_v2_local",
    "parse_v2",
    "preface",
    *_messages_all,
]
