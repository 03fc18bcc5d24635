"""The I/O boundary: transport exceptions become ``TransportError``, saying why.

trio wraps what went wrong underneath (``ssl.SSLError``, ``OSError``) in a
``BrokenResourceError`` whose own text is empty, so ``f"failed: {exc}"`` said nothing.
:func:`reason` looks down the exception's cause chain and says what the peer did or what to
check. :func:`transport_errors` is the one mapping the package uses where it does I/O on a
stream: whatever trio, ``ssl`` or the OS raise there (``BROKEN``, or ``TooSlowError``) leaves
as a ``TransportError`` (``raise ... from exc``) that names what was being done and why.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import trio

from ras.errors import TransportError

__all__ = ["BROKEN", "reason", "transport_errors"]

#: What a stream raises when its connection breaks underneath it (``ssl.SSLError`` is an
#: ``OSError``; named for the reader).
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


@contextlib.contextmanager
def transport_errors(what: str, *, handshake: bool = False) -> Iterator[None]:
    """Inside, a broken or timed-out transport raises ``TransportError("<what>: <why>")``
    instead (``handshake``: the TLS handshake is what broke). Protocol errors, other
    ``RasError`` and cancellation pass through unchanged."""
    try:
        yield
    except BROKEN as exc:
        raise TransportError(f"{what}: {reason(exc, handshake=handshake)}") from exc
    except trio.TooSlowError as exc:
        raise TransportError(f"{what}: timed out") from exc


# OpenSSL reasons the peer's alert or its silence leaves us with.
_THEY_REFUSED_US = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
}
_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
    "RECORD_LAYER_FAILURE",
}


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out and len(out) < 8:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _tls(exc: ssl.SSLError, handshake: bool) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or exc.reason or "verification failed"
        if "hostname mismatch" in message.lower():
            return f"its certificate is for another name ({message}); check the server name"
        return f"its certificate is not trusted ({message}); check the CA file (ca_file, --ca-file)"
    why = exc.reason or ""
    if why in _THEY_REFUSED_US:
        return f"the peer refused our certificate or TLS settings ({why})"
    if why in _NOT_TLS:
        return f"the peer does not speak TLS there ({why}): is it the right port?"
    if isinstance(exc, ssl.SSLEOFError) or why == "UNEXPECTED_EOF_WHILE_READING":
        if handshake:
            return "the peer closed the connection in the TLS handshake (does it trust us?)"
        return "the peer closed the connection without ending TLS"
    return str(exc) or why or type(exc).__name__


def reason(exc: BaseException, *, handshake: bool = False) -> str:
    """A short reason for ``exc``, never empty; ``handshake``: it broke a TLS handshake."""
    chain = _chain(exc)
    for item in chain:
        if isinstance(item, ssl.SSLError):
            return _tls(item, handshake)
    for item in chain:
        if isinstance(item, ConnectionResetError):
            return "the peer reset the connection"
        if isinstance(item, OSError) and not isinstance(item, ssl.SSLError):
            return item.strerror or str(item) or type(item).__name__
    for item in chain:
        text = str(item)
        if text:
            return text
    if isinstance(exc, trio.ClosedResourceError):
        return "the connection was already closed here"
    if isinstance(exc, trio.BrokenResourceError):
        return "the peer closed the connection"
    return type(exc).__name__
