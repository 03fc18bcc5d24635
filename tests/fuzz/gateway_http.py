"""The gateway's plain HTTP port (``ras.gateway.http.plain_http``), which anyone on the
internet reaches: the request read by ``ras.net.http.read_request`` (h11), then an ACME
HTTP-01 answer, a 404 for an unknown token, or a redirect to HTTPS.

Fed whole and in pieces, the request must get the same answer; the answer must be written (or
nothing, when the bytes were not HTTP). Nothing but h11's own refusal of the answer to a HEAD
request (``fuzz.admin_http.HEAD_FAULT``, reported) may escape.
"""

from __future__ import annotations

import h11

from fuzz import chunks, run_sync
from fuzz.admin_http import HEAD_FAULT, _Stream
from ras.gateway.http import plain_http
from ras.net.acme import CHALLENGE_PREFIX, Challenges
from ras.protocol.messages import AcmeChallenge

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
THUMBPRINT = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
DICTIONARY = (
    b"GET ",
    b"HEAD ",
    b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n",
    b"\r\n\r\n",
    b"host: ",
    b"content-length: ",
    b"transfer-encoding: chunked\r\n",
    CHALLENGE_PREFIX.encode(),
    TOKEN.encode(),
)


def _serve(pieces: list[bytes], *, known_faults: bool = True) -> bytes | str:
    challenges = Challenges()
    challenges.add(AcmeChallenge(TOKEN, f"{TOKEN}.{THUMBPRINT}"))
    head = b"".join(pieces).lstrip(b"\r\n").startswith(b"HEAD ")
    stream = _Stream(list(pieces))
    try:
        run_sync(plain_http(stream, "rds.example.org", 443, challenges))
    except h11.LocalProtocolError:
        if known_faults and head:
            return HEAD_FAULT
        raise
    sent = bytes(stream.sent)
    assert not sent or sent.startswith((b"HTTP/1.1 301 ", b"HTTP/1.1 404 ", b"HTTP/1.1 200 ")), sent
    return sent


def fuzz_one(data: bytes) -> None:
    whole = _serve([data] if data else [])
    split = _serve(list(chunks(data)))
    assert whole == split, (whole, split)
