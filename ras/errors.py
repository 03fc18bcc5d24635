"""The public exceptions of the ``ras`` package.

Everything the package raises on purpose derives from :class:`RasError`. Exceptions of the
libraries underneath (trio's ``BrokenResourceError`` and ``TooSlowError``, ``ssl.SSLError``,
raw ``OSError``) are translated into these at the I/O boundary with ``raise ... from exc``, so
that callers handle one small family and never an exception group.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ras.protocol.messages import Error

__all__ = [
    "AuthError",
    "ConfigError",
    "ErrorCode",
    "LocalProtocolError",
    "PKIError",
    "PeerError",
    "ProtocolError",
    "RasError",
    "RemoteProtocolError",
    "TicketError",
    "TransportError",
]


class ErrorCode(enum.IntEnum):
    """Error codes carried by the control protocol's ``error`` message.

    The numbers are part of the wire protocol (see ``docs/protocol.md``): never renumber.
    1xx: the peer broke the protocol. 2xx: the request was understood and refused.
    5xx: the server could not do what was asked.
    """

    BAD_PREFACE = 100
    UNSUPPORTED_VERSION = 101
    FRAME_TOO_LARGE = 102
    MALFORMED = 103
    UNKNOWN_TYPE = 104
    BAD_FIELD = 105
    UNEXPECTED = 106
    AUTH_FAILED = 200
    AUTH_REQUIRED = 201
    FORBIDDEN = 202
    NOT_FOUND = 203
    TICKET_INVALID = 204
    THROTTLED = 205
    NO_HOST = 500
    HOST_UNREACHABLE = 501
    UNAVAILABLE = 502
    TIMEOUT = 503
    INTERNAL = 504


class RasError(Exception):
    """Base class of every error the ``ras`` package raises on purpose."""


class ConfigError(RasError):
    """A configuration file is missing, unreadable or wrong; the message names file and key."""


class PKIError(RasError):
    """A certificate, key, CSR or PKCS#12 bundle could not be made, read or used."""


class TransportError(RasError):
    """A connection failed, broke or timed out underneath the protocol."""


class PeerError(TransportError):
    """The peer answered with an ``error`` message: its ``code`` and text (``error``)."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code.name}: {error.message}")
        self.code = error.code
        self.error = error


class ProtocolError(RasError):
    """A control-protocol violation. ``code`` is the wire error code to send before closing."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class AuthError(RasError):
    """Authentication failed or was refused. The message is safe to show the user."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.AUTH_FAILED) -> None:
        super().__init__(message)
        self.code = code


class TicketError(RasError):
    """A launch ticket is forged, expired, replayed, or bound to another gateway or client."""
