"""RADIUS second factor (RFC 2865) through pyrad: PAP, Access-Challenge rounds,
Message-Authenticator, timeouts, retries and several servers.

``RadiusClient.authenticate`` answers :class:`Accept`, :class:`Reject` or :class:`Challenge`
(show ``prompt`` to the user, send the answer back with ``state``). When no server answers in
time it raises :class:`RadiusUnavailable`: the caller denies, never allows.

Theory of operation. pyrad only encodes, signs and checks packets (:func:`encode_request` and
:func:`read_response` are pure: bytes out, bytes in); the I/O is a trio UDP socket per server
and request, connected to that server, so the kernel drops datagrams from other addresses and
an ICMP "port unreachable" fails over at once instead of after the timeout. A request is sent
``1 + retries`` times, the same bytes each time (RFC 5080 section 2.2.1: same Identifier and
Request Authenticator, so a late answer to the first copy still counts), waiting ``timeout_s``
after each; then the next server gets a fresh request. A datagram that is not the answer to
our request (other Identifier, bad Response Authenticator or Message-Authenticator, missing
Message-Authenticator when required, malformed) is logged and ignored like a lost packet: a
forged or misdirected Access-Reject must not end a login, nor a forged Access-Accept allow it.
A wrong shared secret therefore shows as "no valid answer" and the login is denied.

The Request always carries a Message-Authenticator (RFC 3579 section 3.2; BlastRADIUS,
CVE-2024-3596). The shared secret is read from ``secret_file`` and never logged; neither are
passwords, codes or State values.
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
import io
import ipaddress
import logging
import math
import socket
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from pyrad import packet as rad  # type: ignore[import-untyped]
from pyrad.dictionary import Dictionary  # type: ignore[import-untyped]

from ras.config import Invalid, check_host, check_port, check_positive
from ras.errors import AuthError, ConfigError, ErrorCode

__all__ = [
    "Accept",
    "Challenge",
    "RadiusClient",
    "RadiusConfig",
    "RadiusResult",
    "RadiusUnavailable",
    "Reject",
    "check_credentials",
    "encode_request",
    "read_response",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 1812
MAX_DATAGRAM = 4096  # RFC 2865 section 3: a packet is at most 4096 octets
MAX_PASSWORD_BYTES = 128  # RFC 2865 section 5.2
MAX_TEXT_BYTES = 253
MAX_MESSAGE_CHARS = 512  # what the control protocol's auth_challenge prompt carries
DEFAULT_PROMPT = "Response to the RADIUS challenge:"
# State values of open challenges remembered, to send the answer to the server that asked.
MAX_OPEN_CHALLENGES = 10_000

_USER_NAME, _USER_PASSWORD, _REPLY_MESSAGE, _STATE, _PROMPT, _MESSAGE_AUTHENTICATOR = (
    1, 2, 18, 24, 76, 80,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Accept:
    message: str = ""


@dataclass(frozen=True, slots=True)
class Reject:
    message: str = ""


@dataclass(frozen=True, slots=True)
class Challenge:
    prompt: str
    state: bytes = field(repr=False)
    echo: bool = True


RadiusResult = Accept | Reject | Challenge


class RadiusUnavailable(AuthError):
    """No RADIUS server answered (or answered with a bad authenticator); deny."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.UNAVAILABLE)


# --- configuration ---------------------------------------------------------------------------


def parse_server(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; the port defaults to 1812."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] not in ("", ":"):
            raise ValueError(f"{text!r} is not host:port")
        host = text[1:end]
        if text[end + 1 :]:
            port = _port(text, text[end + 2 :])
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = _port(text, rest)
    try:
        check_host("server", host)
        check_port("server", port, zero_ok=False)
    except Invalid as exc:
        raise ValueError(f"{text!r}: {exc.why}") from None
    return host, port


def _port(text: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{text!r}: {value!r} is not a port number")
    return int(value)


@dataclass(frozen=True, slots=True)
class RadiusConfig:
    """The ``[radius]`` table of ``broker.toml``.

    Each server in ``servers`` is tried in order; each gets ``1 + retries`` sends of
    ``timeout_s`` each, so a login waits at most ``len(servers) * (1 + retries) * timeout_s``
    before it is denied as unavailable (an unreachable port fails over at once).
    """

    servers: tuple[str, ...]
    secret_file: Path
    nas_identifier: str = "ras-broker"
    nas_ip_address: str | None = None
    timeout_s: float = 3.0
    retries: int = 2
    require_message_authenticator: bool = True

    def __post_init__(self) -> None:
        if not self.servers:
            raise Invalid("servers", "name at least one RADIUS server (host:port)")
        for i, server in enumerate(self.servers):
            try:
                parse_server(server)
            except ValueError as exc:
                raise Invalid(f"servers[{i}]", str(exc)) from None
        check_positive("timeout_s", self.timeout_s)
        if not math.isfinite(self.timeout_s) or self.timeout_s > 60:
            raise Invalid("timeout_s", "must be at most 60")
        if not 0 <= self.retries <= 10:
            raise Invalid("retries", f"must be 0 to 10, not {self.retries}")
        if not self.nas_identifier or len(self.nas_identifier.encode()) > MAX_TEXT_BYTES:
            raise Invalid("nas_identifier", "must be 1 to 253 bytes")
        if self.nas_ip_address is not None:
            try:
                ipaddress.ip_address(self.nas_ip_address)
            except ValueError:
                raise Invalid(
                    "nas_ip_address", f"{self.nas_ip_address!r} is not an IP address"
                ) from None

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_server(s) for s in self.servers)


def read_secret(path: Path) -> bytes:
    """The shared secret: the file's first line. Errors name the file, never its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: RADIUS secret_file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the RADIUS secret_file: {exc}") from None
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ConfigError(f"{path}: the RADIUS secret_file is empty")
    if len(secret) < 16:
        log.warning("the RADIUS shared secret in %s is shorter than 16 characters", path)
    if path.stat().st_mode & 0o077:
        log.warning("the RADIUS secret_file %s can be read by other users (chmod 600 it)", path)
    return secret.encode()


@functools.cache
def dictionary() -> Any:
    """The attributes this client uses, shipped with the package (``radius.dictionary``)."""
    text = importlib.resources.files(__package__).joinpath("radius.dictionary").read_text()
    return Dictionary(io.StringIO(text))


# --- packets (pure) --------------------------------------------------------------------------


class IgnoredResponse(Exception):
    """A datagram that is not a valid answer to our request; ``str()`` says why."""


def check_credentials(username: str, password: str) -> None:
    """Raise ``ValueError`` unless PAP can carry this user name and password."""
    if not username or len(username.encode()) > MAX_TEXT_BYTES:
        raise ValueError("the user name must be 1 to 253 bytes for RADIUS")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError("the password is longer than RADIUS can carry (128 bytes)")


def encode_request(
    secret: bytes,
    username: str,
    password: str,
    *,
    state: bytes | None = None,
    nas_identifier: str,
    nas_ip_address: str | None = None,
    calling_station: str | None = None,
) -> Any:
    """An Access-Request (a ``pyrad.packet.AuthPacket``): PAP, Message-Authenticator first.

    Raises ``ValueError`` for a user name or password that RADIUS cannot carry.
    """
    check_credentials(username, password)
    request = rad.AuthPacket(rad.AccessRequest, secret=secret, dict=dictionary())
    request.add_message_authenticator()
    request["User-Name"] = username
    request[_USER_PASSWORD] = [request.PwCrypt(password)]
    request["NAS-Identifier"] = nas_identifier
    request["Service-Type"] = "Authenticate-Only"
    request["NAS-Port-Type"] = "Virtual"
    if nas_ip_address is not None:
        key = "NAS-IP-Address" if ipaddress.ip_address(nas_ip_address).version == 4 else None
        request[key or "NAS-IPv6-Address"] = nas_ip_address
    if calling_station:
        request["Calling-Station-Id"] = calling_station[:MAX_TEXT_BYTES]
    if state:
        # by code: pyrad's octets encoder would rewrite a value that starts with b"0x"
        request[_STATE] = [state]
    return request


def read_response(
    request: Any, data: bytes, *, require_message_authenticator: bool
) -> RadiusResult:
    """The answer ``data`` gives to ``request``, or :class:`IgnoredResponse` if it is none."""
    if len(data) < 20:
        raise IgnoredResponse(f"a datagram of {len(data)} bytes is too short for RADIUS")
    if data[1] != request.id:
        raise IgnoredResponse(f"identifier {data[1]} is not the one we sent ({request.id})")
    try:
        reply = request.CreateReply(packet=data)
    except (rad.PacketError, ValueError, KeyError) as exc:
        raise IgnoredResponse(f"malformed packet: {exc}") from None
    if reply.code not in (rad.AccessAccept, rad.AccessReject, rad.AccessChallenge):
        raise IgnoredResponse(f"code {reply.code} is not an answer to an Access-Request")
    if require_message_authenticator and not _raw(reply, _MESSAGE_AUTHENTICATOR):
        raise IgnoredResponse(
            "no Message-Authenticator (old server? see require_message_authenticator)"
        )
    if not request.VerifyReply(reply, data):
        raise IgnoredResponse(
            "bad Response Authenticator or Message-Authenticator (is the shared secret right?)"
        )
    message = _text(_raw(reply, _REPLY_MESSAGE))
    if reply.code == rad.AccessAccept:
        return Accept(message)
    if reply.code == rad.AccessReject:
        return Reject(message)
    states = _raw(reply, _STATE)
    prompt = _raw(reply, _PROMPT)
    echo = not (prompt and prompt[0] == b"\x00\x00\x00\x00")
    return Challenge(message or DEFAULT_PROMPT, states[0] if states else b"", echo)


def _raw(reply: Any, code: int) -> list[bytes]:
    values = collections.OrderedDict.get(reply, code, [])
    return [v for v in values if isinstance(v, bytes)]


def _text(values: list[bytes]) -> str:
    """Reply-Message text fit to show a user and to carry in ``auth_challenge``: UTF-8, one
    line (several Reply-Messages joined by spaces), no control characters, at most
    ``MAX_MESSAGE_CHARS``."""
    text = " ".join(v.decode("utf-8", errors="replace") for v in values)
    text = "".join(" " if c in "\t\r\n" else c for c in text)
    text = "".join(c for c in text if not unicodedata.category(c).startswith("C"))
    return " ".join(text.split())[:MAX_MESSAGE_CHARS]


# --- I/O -------------------------------------------------------------------------------------


class _NoAnswer(Exception):
    pass


class RadiusClient:
    """Asks the configured RADIUS servers, in order, until one answers."""

    def __init__(self, config: RadiusConfig, *, secret: bytes | None = None) -> None:
        self.config = config
        self._secret = secret if secret is not None else read_secret(config.secret_file)
        self._servers = config.addresses
        # State of an open challenge -> index of the server that sent it (the answer goes there)
        self._challenges: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        dictionary()  # read the packaged dictionary now: a broken install fails at start

    def __repr__(self) -> str:
        return f"RadiusClient(servers={list(self.config.servers)})"

    async def authenticate(
        self,
        username: str,
        password: str,
        *,
        state: bytes | None = None,
        calling_station: str | None = None,
    ) -> Accept | Reject | Challenge:
        """Ask for ``username``/``password`` (with ``state``, the answer to a challenge).

        ``calling_station`` (the client's address) is sent as Calling-Station-Id for the
        server's policies. Raises :class:`RadiusUnavailable` when no server answers validly.
        """
        try:
            check_credentials(username, password)
        except ValueError as exc:
            log.warning("radius user=%s not asked: %s", username, exc)
            return Reject(str(exc))
        first = self._challenges.pop(state, 0) if state else 0
        order = [*range(first, len(self._servers)), *range(first)]
        failures: list[str] = []
        for index in order:
            host, port = self._servers[index]
            request = encode_request(
                self._secret,
                username,
                password,
                state=state,
                nas_identifier=self.config.nas_identifier,
                nas_ip_address=self.config.nas_ip_address,
                calling_station=calling_station,
            )
            try:
                result = await self._exchange(host, port, request)
            except _NoAnswer as exc:
                where = _where(host, port)
                log.warning("radius server %s: %s", where, exc)
                failures.append(f"{where}: {exc}")
                continue
            log.info(
                "radius user=%s server=%s answer=%s",
                username,
                _where(host, port),
                type(result).__name__.lower(),
            )
            if isinstance(result, Challenge) and result.state:
                self._remember(result.state, index)
            return result
        raise RadiusUnavailable("no RADIUS server answered: " + "; ".join(failures))

    def _remember(self, state: bytes, index: int) -> None:
        self._challenges[state] = index
        while len(self._challenges) > MAX_OPEN_CHALLENGES:
            self._challenges.popitem(last=False)

    async def _exchange(self, host: str, port: int, request: Any) -> RadiusResult:
        """Send ``request`` to one server up to ``1 + retries`` times; its valid answer."""
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise _NoAnswer(f"cannot resolve {host!r}: {exc}") from None
        family, type_, proto, _, address = infos[0]
        datagram = request.RequestPacket()
        ignored = 0
        with trio.socket.socket(family, type_, proto) as sock:
            try:
                await sock.connect(address)
                for _attempt in range(1 + self.config.retries):
                    await sock.send(datagram)
                    with trio.move_on_after(self.config.timeout_s):
                        while True:
                            data, source = await sock.recvfrom(MAX_DATAGRAM)
                            if source[:2] != address[:2]:  # connected: only if the kernel errs
                                continue
                            try:
                                return read_response(
                                    request,
                                    data,
                                    require_message_authenticator=(
                                        self.config.require_message_authenticator
                                    ),
                                )
                            except IgnoredResponse as reason:
                                ignored += 1
                                log.warning(
                                    "radius server %s: ignored a response: %s",
                                    _where(host, port),
                                    reason,
                                )
            except ConnectionRefusedError:
                raise _NoAnswer("nothing listens on that port (ICMP port unreachable)") from None
            except OSError as exc:
                raise _NoAnswer(f"cannot send: {exc.strerror or exc}") from None
        tries = 1 + self.config.retries
        sends = f"{tries} {'try' if tries == 1 else 'tries'}"
        why = f"no answer after {sends} of {self.config.timeout_s:g} s"
        if ignored:
            why += f" ({ignored} invalid {'response' if ignored == 1 else 'responses'} ignored:"
            why += " check the shared secret)"
        raise _NoAnswer(why)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
