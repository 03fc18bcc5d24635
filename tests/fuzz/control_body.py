"""One control-protocol frame body (``ras.protocol.messages.decode_body``): strict JSON into a
validated message, or ``RemoteProtocolError``. What decodes must encode back to a body that
decodes to the same message, and its ``repr`` must work."""

from __future__ import annotations

from fuzz.control import DICTIONARY as _CONTROL_DICTIONARY
from ras.errors import RemoteProtocolError
from ras.protocol.messages import decode_body, encode_body

DICTIONARY = tuple(t for t in _CONTROL_DICTIONARY if not t.startswith(b"RASCP"))


def fuzz_one(data: bytes) -> None:
    try:
        msg = decode_body(data)
    except RemoteProtocolError as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert 100 <= refused.code < 200, refused.code  # the peer's fault
        return
    repr(msg)
    again = encode_body(msg)
    assert decode_body(again) == msg, (data, again)
    assert encode_body(decode_body(again)) == again
