"""Control-protocol messages: frozen, validated dataclasses and their JSON body encoding.

Every message is a JSON object whose ``type`` names the class (``MessageType``); the other keys
are exactly the dataclass fields. Decoding is strict: a missing, extra or ill-typed field, an
unknown type, a duplicate key, NaN or a non-object body is a :class:`RemoteProtocolError` with
the error code to send back. Field limits (string lengths, port ranges, ...) are checked in the
constructors, so a message that exists is a valid message, whichever side built it.

Secrets (passwords, one-time codes, tickets) are kept out of ``repr`` so that logging a
message never logs a secret.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ras.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "MESSAGE_CLASSES",
    "AcmeChallenge",
    "AcmeWithdraw",
    "AgentRegister",
    "AppStart",
    "AuthChallenge",
    "AuthOk",
    "AuthResponse",
    "Authenticate",
    "ClientSession",
    "Error",
    "GatewayEntry",
    "GatewayList",
    "GatewayRegister",
    "Hello",
    "HostKind",
    "Launch",
    "LaunchOk",
    "ListGateways",
    "ListResources",
    "LoadReport",
    "LoggedOut",
    "Logout",
    "Message",
    "MessageType",
    "Mode",
    "OpenTunnel",
    "Ping",
    "Pong",
    "PortalSettingsUpdate",
    "PublicCertificate",
    "RdpToken",
    "RdpTokenOk",
    "RedeemTicket",
    "Registered",
    "Resource",
    "ResourceKind",
    "ResourceList",
    "Resume",
    "Role",
    "Route",
    "RouteOk",
    "SessionAction",
    "SessionActionKind",
    "SessionActionOk",
    "SessionInfo",
    "SessionState",
    "TicketOk",
    "TunnelOpen",
    "Welcome",
    "decode_body",
    "encode_body",
]

MAX_STRING = 4096
MAX_LIST = 1000
MAX_PORTAL_SETTINGS = 16_384  # a hundred CORS origins and the rest fit with room to spare
MAX_RESUME_TOKEN = 16_384  # a user's groups are signed into it; a frame holds at most 64 KiB
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@\\-]{0,254}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1, surrogates
_HOST = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?"
)


class MessageType(enum.StrEnum):
    """The ``type`` of every message, as it appears on the wire."""

    HELLO = "hello"
    WELCOME = "welcome"
    AUTHENTICATE = "authenticate"
    AUTH_CHALLENGE = "auth_challenge"
    AUTH_RESPONSE = "auth_response"
    AUTH_OK = "auth_ok"
    RESUME = "resume"
    LOGOUT = "logout"
    LOGGED_OUT = "logged_out"
    LIST_RESOURCES = "list_resources"
    RESOURCE_LIST = "resource_list"
    LAUNCH = "launch"
    LAUNCH_OK = "launch_ok"
    OPEN_TUNNEL = "open_tunnel"
    TUNNEL_OPEN = "tunnel_open"
    AGENT_REGISTER = "agent_register"
    LOAD_REPORT = "load_report"
    GATEWAY_REGISTER = "gateway_register"
    CLIENT_SESSION = "client_session"
    REGISTERED = "registered"
    LIST_GATEWAYS = "list_gateways"
    GATEWAY_LIST = "gateway_list"
    REDEEM_TICKET = "redeem_ticket"
    TICKET_OK = "ticket_ok"
    ROUTE = "route"
    ROUTE_OK = "route_ok"
    RDP_TOKEN = "rdp_token"
    RDP_TOKEN_OK = "rdp_token_ok"
    PING = "ping"
    PONG = "pong"
    ERROR = "error"
    SESSION_ACTION = "session_action"
    SESSION_ACTION_OK = "session_action_ok"
    ACME_CHALLENGE = "acme_challenge"
    ACME_WITHDRAW = "acme_withdraw"
    PUBLIC_CERTIFICATE = "public_certificate"
    PORTAL_SETTINGS = "portal_settings"


class Role(enum.StrEnum):
    """Who opened the connection (sent in ``hello``)."""

    CLIENT = "client"
    GATEWAY = "gateway"
    AGENT = "agent"
    HALB = "halb"


class Mode(enum.StrEnum):
    """How a client reaches the host once a resource is launched."""

    DIRECT = "direct"
    DIRECT_SSL = "direct_ssl"
    GATEWAY = "gateway"
    GATEWAY_SSL = "gateway_ssl"
    WEB = "web"  # the browser's RDP client: a web launch token for the gateway's WebSocket

    @property
    def tunnelled(self) -> bool:
        return self in (Mode.GATEWAY, Mode.GATEWAY_SSL)


class ResourceKind(enum.StrEnum):
    DESKTOP = "desktop"
    APPLICATION = "application"
    DOCUMENT = "document"
    FOLDER = "folder"


class HostKind(enum.StrEnum):
    RDSH = "rdsh"
    VDI = "vdi"
    REMOTE_PC = "remote_pc"


class SessionState(enum.StrEnum):
    """A user session on a host, as its agent sees it."""

    ACTIVE = "active"
    DISCONNECTED = "disconnected"


class AppStart(enum.StrEnum):
    """How a host starts a published application in an RDP session: ``shell``, the alternate
    shell of the RDP Info PDU (xrdp; xfreerdp ``/shell:``), or ``remoteapp``, RemoteApp
    (Windows RD Session Hosts; xfreerdp ``/app:``, the .rdp file's ``remoteapplication*``)."""

    SHELL = "shell"
    REMOTEAPP = "remoteapp"


class SessionActionKind(enum.StrEnum):
    LOGOFF = "logoff"
    DISCONNECT = "disconnect"


# -- field checks -------------------------------------------------------------------------------


def _fail(cls: type, name: str, why: str) -> ProtocolError:
    return LocalProtocolError(f"{cls.__name__}.{name}: {why}", ErrorCode.BAD_FIELD)


def _check_str(obj: object, name: str, *, empty: bool = False, limit: int = MAX_STRING) -> None:
    _check_text(type(obj), name, getattr(obj, name), empty=empty, limit=limit)


def _check_text(cls: type, name: str, value: str, *, empty: bool, limit: int) -> None:
    if not empty and not value:
        raise _fail(cls, name, "must not be empty")
    if len(value) > limit:
        raise _fail(cls, name, f"longer than {limit} characters")
    if _CONTROL.search(value):
        # Surrogates cannot be encoded as UTF-8: such a message could not be sent on.
        raise _fail(cls, name, "contains control characters or surrogates")


def _check_name(obj: object, name: str) -> None:
    if not _NAME.fullmatch(getattr(obj, name)):
        raise _fail(type(obj), name, "is not a valid name (letters, digits, . _ @ \\ -)")


_SESSION = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _check_session(obj: LaunchOk | TicketOk | RouteOk | SessionAction) -> None:
    """A session id: empty (not given), or 1 to 64 of letters, digits and ``_ . : -`` (it goes
    into log lines as it is)."""
    value = obj.session
    if value and not _SESSION.fullmatch(value):
        raise _fail(type(obj), "session", "is not a session id (1 to 64 of A-Z a-z 0-9 _ . : -)")


def _check_sha256(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if value and not (len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise _fail(type(obj), name, "must be a SHA-256 in lower-case hex, or empty")


def _check_host(obj: object, name: str) -> None:
    value = getattr(obj, name)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST.fullmatch(value):
            raise _fail(type(obj), name, "is not an IP address or host name") from None


def _check_range(obj: object, name: str, low: float, high: float) -> None:
    value = getattr(obj, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(type(obj), name, "must be a finite number")
    if not low <= value <= high:
        raise _fail(type(obj), name, f"must be between {low} and {high}")


def _check_program(obj: LaunchOk | RdpTokenOk) -> None:
    for name in ("command", "arguments", "working_dir", "target"):
        _check_str(obj, name, empty=True, limit=1024)
    if obj.start and obj.start not in tuple(AppStart):
        raise _fail(type(obj), "start", f"{obj.start!r} is not shell or remoteapp")


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """Base class of all control-protocol messages."""

    TYPE: ClassVar[MessageType]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame from the connecting side, right after the preface."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    role: Role
    software: str

    def __post_init__(self) -> None:
        _check_str(self, "software", limit=128)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The server's answer to ``hello``: the protocol version both will speak."""

    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    version: int
    software: str

    def __post_init__(self) -> None:
        _check_range(self, "version", 1, 999)
        _check_str(self, "software", limit=128)


@dataclass(frozen=True, slots=True)
class Authenticate(Message):
    TYPE: ClassVar[MessageType] = MessageType.AUTHENTICATE
    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_str(self, "username", limit=256)
        _check_str(self, "password", empty=True, limit=1024)


@dataclass(frozen=True, slots=True)
class AuthChallenge(Message):
    """A second-factor round: show ``prompt`` to the user, answer with ``auth_response``."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH_CHALLENGE
    prompt: str
    echo: bool

    def __post_init__(self) -> None:
        _check_str(self, "prompt", limit=512)


@dataclass(frozen=True, slots=True)
class AuthResponse(Message):
    TYPE: ClassVar[MessageType] = MessageType.AUTH_RESPONSE
    answer: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_str(self, "answer", empty=True, limit=256)


@dataclass(frozen=True, slots=True)
class AuthOk(Message):
    """A login succeeded. ``resume_token`` (optional, empty: none) lets the client log in
    again on a new connection with ``resume`` after its connection is lost."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH_OK
    user: str
    groups: tuple[str, ...]
    resume_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _check_str(self, "user", limit=256)
        _check_str(self, "resume_token", empty=True, limit=MAX_RESUME_TOKEN)
        if len(self.groups) > MAX_LIST:
            raise _fail(type(self), "groups", f"more than {MAX_LIST} entries")
        for group in self.groups:
            _check_text(type(self), "groups", group, empty=False, limit=256)


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Log in again with the ``resume_token`` of an earlier ``auth_ok`` (a new connection,
    perhaps to another gateway, after the first was lost): answered like ``authenticate``."""

    TYPE: ClassVar[MessageType] = MessageType.RESUME
    token: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_str(self, "token", limit=MAX_RESUME_TOKEN)


@dataclass(frozen=True, slots=True)
class Logout(Message):
    """End this connection's login. The ``resume_token`` its ``auth_ok`` gave, if named, is
    revoked on every broker of the farm: a copy of it resumes nothing after this (the User
    Portal's logout, which another gateway could otherwise take over). Answered with
    ``logged_out``."""

    TYPE: ClassVar[MessageType] = MessageType.LOGOUT
    resume_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _check_str(self, "resume_token", empty=True, limit=MAX_RESUME_TOKEN)


@dataclass(frozen=True, slots=True)
class LoggedOut(Message):
    TYPE: ClassVar[MessageType] = MessageType.LOGGED_OUT


@dataclass(frozen=True, slots=True)
class ListResources(Message):
    TYPE: ClassVar[MessageType] = MessageType.LIST_RESOURCES


@dataclass(frozen=True, slots=True)
class Resource:
    """One published resource as a user sees it (not a message: an item of ``resource_list``)."""

    id: str
    name: str
    kind: ResourceKind

    def __post_init__(self) -> None:
        _check_name(self, "id")
        _check_str(self, "name", limit=256)


@dataclass(frozen=True, slots=True)
class ResourceList(Message):
    TYPE: ClassVar[MessageType] = MessageType.RESOURCE_LIST
    resources: tuple[Resource, ...]

    def __post_init__(self) -> None:
        if len(self.resources) > MAX_LIST:
            raise _fail(type(self), "resources", f"more than {MAX_LIST} entries")


@dataclass(frozen=True, slots=True)
class Launch(Message):
    TYPE: ClassVar[MessageType] = MessageType.LAUNCH
    resource: str
    mode: Mode

    def __post_init__(self) -> None:
        _check_name(self, "resource")


@dataclass(frozen=True, slots=True)
class LaunchOk(Message):
    """Where to connect. In the gateway modes, ``ticket`` opens the tunnel (``open_tunnel``)."""

    TYPE: ClassVar[MessageType] = MessageType.LAUNCH_OK
    mode: Mode
    host: str
    port: int
    ticket: str = field(repr=False)
    expires_in_s: int
    # Optional (omitted when empty): what to start in the session, for applications,
    # documents and folders; a desktop leaves them empty.
    command: str = ""
    arguments: str = ""
    working_dir: str = ""
    target: str = ""
    # Optional: how the chosen host starts what is above ("" for a desktop), and whether the
    # client should log in to the host with the farm credentials it logged in with (NLA).
    start: str = ""
    single_sign_on: bool = False
    # Optional: the farm's id of the session this launch starts, in every daemon's log lines.
    session: str = ""

    def __post_init__(self) -> None:
        _check_host(self, "host")
        _check_range(self, "port", 1, 65535)
        _check_str(self, "ticket", empty=True, limit=2048)
        _check_range(self, "expires_in_s", 0, 86400)
        _check_program(self)
        _check_session(self)


@dataclass(frozen=True, slots=True)
class OpenTunnel(Message):
    """Ask the gateway to connect to the ticket's host; the last frame the client sends."""

    TYPE: ClassVar[MessageType] = MessageType.OPEN_TUNNEL
    ticket: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_str(self, "ticket", limit=2048)


@dataclass(frozen=True, slots=True)
class TunnelOpen(Message):
    """The last frame the gateway sends: from the next byte on, the connection is raw."""

    TYPE: ClassVar[MessageType] = MessageType.TUNNEL_OPEN
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_host(self, "host")
        _check_range(self, "port", 1, 65535)


@dataclass(frozen=True, slots=True)
class AgentRegister(Message):
    TYPE: ClassVar[MessageType] = MessageType.AGENT_REGISTER
    name: str
    kind: HostKind
    rdp_host: str
    rdp_port: int
    max_sessions: int
    apps: AppStart = AppStart.SHELL  # optional: how the host starts applications
    # the SHA-256 (hex) of the TLS certificate the agent's RDP server presents ("" unknown)
    rdp_cert_sha256: str = ""

    def __post_init__(self) -> None:
        _check_name(self, "name")
        _check_host(self, "rdp_host")
        _check_range(self, "rdp_port", 1, 65535)
        _check_range(self, "max_sessions", 1, 100_000)
        _check_sha256(self, "rdp_cert_sha256")


@dataclass(frozen=True, slots=True)
class LoadReport(Message):
    """An agent's load: CPU and memory in percent, session counts."""

    TYPE: ClassVar[MessageType] = MessageType.LOAD_REPORT
    cpu_percent: float
    memory_percent: float
    sessions: int
    disconnected: int
    sessions_detail: tuple[SessionInfo, ...] = ()  # optional: who the sessions are
    ready: bool = True  # optional: False while the host cannot take a session (a VDI guest)

    def __post_init__(self) -> None:
        _check_range(self, "cpu_percent", 0.0, 100.0)
        _check_range(self, "memory_percent", 0.0, 100.0)
        _check_range(self, "sessions", 0, 100_000)
        _check_range(self, "disconnected", 0, 100_000)
        if len(self.sessions_detail) > MAX_LIST:
            raise _fail(type(self), "sessions_detail", f"more than {MAX_LIST} entries")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One user session on a host (an item of ``load_report.sessions_detail``)."""

    id: str
    user: str
    state: SessionState

    def __post_init__(self) -> None:
        _check_str(self, "id", limit=256)
        _check_str(self, "user", limit=256)


@dataclass(frozen=True, slots=True)
class SessionAction(Message):
    """The broker asks an agent to log off or disconnect one of its host's sessions."""

    TYPE: ClassVar[MessageType] = MessageType.SESSION_ACTION
    session_id: str
    action: SessionActionKind
    session: str = ""  # optional: the farm's id of the session (for the agent's log lines)

    def __post_init__(self) -> None:
        _check_str(self, "session_id", limit=256)
        _check_session(self)


@dataclass(frozen=True, slots=True)
class SessionActionOk(Message):
    """The agent did it."""

    TYPE: ClassVar[MessageType] = MessageType.SESSION_ACTION_OK
    session_id: str

    def __post_init__(self) -> None:
        _check_str(self, "session_id", limit=256)


@dataclass(frozen=True, slots=True)
class GatewayRegister(Message):
    """A gateway announces itself on its long-lived link to the broker."""

    TYPE: ClassVar[MessageType] = MessageType.GATEWAY_REGISTER
    name: str
    public_host: str
    public_port: int

    def __post_init__(self) -> None:
        _check_name(self, "name")
        _check_host(self, "public_host")
        _check_range(self, "public_port", 1, 65535)


@dataclass(frozen=True, slots=True)
class ClientSession(Message):
    """First frame of a gateway's connection made on behalf of one client: who the client is."""

    TYPE: ClassVar[MessageType] = MessageType.CLIENT_SESSION
    address: str
    port: int

    def __post_init__(self) -> None:
        _check_host(self, "address")
        _check_range(self, "port", 0, 65535)


@dataclass(frozen=True, slots=True)
class Registered(Message):
    TYPE: ClassVar[MessageType] = MessageType.REGISTERED
    name: str
    report_interval_s: float

    def __post_init__(self) -> None:
        _check_name(self, "name")
        _check_range(self, "report_interval_s", 0.1, 3600.0)


@dataclass(frozen=True, slots=True)
class ListGateways(Message):
    """A HALB asks the broker for the gateways that are online now."""

    TYPE: ClassVar[MessageType] = MessageType.LIST_GATEWAYS


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    """One online gateway (an item of ``gateway_list``): where a HALB reaches it."""

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_name(self, "name")
        _check_host(self, "host")
        _check_range(self, "port", 1, 65535)


@dataclass(frozen=True, slots=True)
class GatewayList(Message):
    TYPE: ClassVar[MessageType] = MessageType.GATEWAY_LIST
    gateways: tuple[GatewayEntry, ...]

    def __post_init__(self) -> None:
        if len(self.gateways) > MAX_LIST:
            raise _fail(type(self), "gateways", f"more than {MAX_LIST} entries")


@dataclass(frozen=True, slots=True)
class RedeemTicket(Message):
    """May the client have a tunnel with this ticket? ``client`` (optional, added in 0.2) is
    the client's address: required on a gateway's redemption connection, where one connection
    serves the tickets of many clients; absent on a per-client connection (its
    ``client_session`` says who the client is)."""

    TYPE: ClassVar[MessageType] = MessageType.REDEEM_TICKET
    ticket: str = field(repr=False)
    client: str = ""
    web: bool = False  # a web launch token, redeemed by the web client's endpoint (0.3)

    def __post_init__(self) -> None:
        _check_str(self, "ticket", limit=2048)
        if self.client:
            _check_host(self, "client")


@dataclass(frozen=True, slots=True)
class TicketOk(Message):
    """The broker's word that a ticket was good: the only place a tunnel may go."""

    TYPE: ClassVar[MessageType] = MessageType.TICKET_OK
    host: str
    port: int
    user: str
    resource: str
    session: str = ""  # optional: the session id of the launch (for the gateway's log lines)
    # the SHA-256 (hex) of the host's TLS certificate as its agent saw it ("" unknown): the web
    # client's endpoint, the TLS client to the host, pins it
    cert_sha256: str = ""

    def __post_init__(self) -> None:
        _check_host(self, "host")
        _check_range(self, "port", 1, 65535)
        _check_str(self, "user", limit=256)
        _check_name(self, "resource")
        _check_session(self)
        _check_sha256(self, "cert_sha256")


@dataclass(frozen=True, slots=True)
class Route(Message):
    """RDP load balancing (gateway to broker): where may this native RDP connection go? By the
    routing token of its ``Cookie: msts=`` or by the user name of its ``Cookie: mstshash=``:
    exactly one of the two is given, the other is empty."""

    TYPE: ClassVar[MessageType] = MessageType.ROUTE
    token: str = field(repr=False)
    user: str

    def __post_init__(self) -> None:
        _check_str(self, "token", empty=True, limit=2048)
        _check_str(self, "user", empty=True, limit=256)
        if bool(self.token) == bool(self.user):
            raise _fail(type(self), "token", "exactly one of token and user must be given")


@dataclass(frozen=True, slots=True)
class RouteOk(Message):
    """The broker's choice for a routed RDP connection: the only place it may go."""

    TYPE: ClassVar[MessageType] = MessageType.ROUTE_OK
    host: str
    port: int
    user: str
    resource: str
    session: str = ""  # optional: the session id this route starts (for the gateway's lines)

    def __post_init__(self) -> None:
        _check_host(self, "host")
        _check_range(self, "port", 1, 65535)
        _check_str(self, "user", limit=256)
        _check_name(self, "resource")
        _check_session(self)


@dataclass(frozen=True, slots=True)
class RdpToken(Message):
    """A logged-in client asks for a routing token for ``resource`` (for an .rdp file)."""

    TYPE: ClassVar[MessageType] = MessageType.RDP_TOKEN
    resource: str

    def __post_init__(self) -> None:
        _check_name(self, "resource")


@dataclass(frozen=True, slots=True)
class RdpTokenOk(Message):
    """A routing token for ``Cookie: msts=``, reusable until it expires."""

    TYPE: ClassVar[MessageType] = MessageType.RDP_TOKEN_OK
    token: str = field(repr=False)
    expires_in_s: int
    # Optional, as in launch_ok: what the .rdp file starts, how the resource's hosts start it,
    # and whether the RDP client may sign on with the farm credentials.
    command: str = ""
    arguments: str = ""
    working_dir: str = ""
    target: str = ""
    start: str = ""
    single_sign_on: bool = False

    def __post_init__(self) -> None:
        _check_str(self, "token", limit=2048)
        _check_range(self, "expires_in_s", 0, 604800)
        _check_program(self)


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[MessageType] = MessageType.PING
    nonce: int

    def __post_init__(self) -> None:
        _check_range(self, "nonce", 0, 2**53)


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[MessageType] = MessageType.PONG
    nonce: int

    def __post_init__(self) -> None:
        _check_range(self, "nonce", 0, 2**53)


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A refusal or a protocol error. Codes 1xx are followed by close (see ``ErrorCode``)."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        _check_str(self, "message", empty=True, limit=1024)

    @property
    def fatal(self) -> bool:
        return 100 <= self.code < 200


_ACME_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_ACME_KEY_AUTHORIZATION = re.compile(r"[A-Za-z0-9_-]{1,256}\.[A-Za-z0-9_-]{1,256}")
_PEM_CONTROL = re.compile("[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_PEM = 24_000  # a leaf, two intermediates and a key fit; a frame holds at most 64 KiB


@dataclass(frozen=True, slots=True)
class AcmeChallenge(Message):
    """The broker hands its gateways and HALBs an ACME HTTP-01 token to answer on their plain
    port; with ``name`` (optional, added in 0.2), only to requests whose Host is that name."""

    TYPE: ClassVar[MessageType] = MessageType.ACME_CHALLENGE
    token: str
    key_authorization: str = field(repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        if not _ACME_TOKEN.fullmatch(self.token):
            raise _fail(type(self), "token", "is not an ACME token (base64url, 1 to 256)")
        if self.name:
            _check_host(self, "name")
        if not _ACME_KEY_AUTHORIZATION.fullmatch(self.key_authorization):
            raise _fail(type(self), "key_authorization", "is not token.thumbprint (base64url)")
        if self.key_authorization.split(".")[0] != self.token:
            raise _fail(type(self), "key_authorization", "does not start with the token")


@dataclass(frozen=True, slots=True)
class AcmeWithdraw(Message):
    """The challenge of ``token`` is over: stop answering it."""

    TYPE: ClassVar[MessageType] = MessageType.ACME_WITHDRAW
    token: str

    def __post_init__(self) -> None:
        if not _ACME_TOKEN.fullmatch(self.token):
            raise _fail(type(self), "token", "is not an ACME token (base64url, 1 to 256)")


@dataclass(frozen=True, slots=True)
class PublicCertificate(Message):
    """The broker distributes the gateways' public TLS certificate (chain, leaf first) and its
    key (PEM); a gateway presents it to new connections from then on."""

    TYPE: ClassVar[MessageType] = MessageType.PUBLIC_CERTIFICATE
    cert_pem: str
    key_pem: str = field(repr=False)

    def __post_init__(self) -> None:
        for name, marker in (("cert_pem", "CERTIFICATE-----"), ("key_pem", "PRIVATE KEY-----")):
            value = getattr(self, name)
            if not 0 < len(value) <= MAX_PEM:
                raise _fail(type(self), name, f"must be 1 to {MAX_PEM} characters")
            if _PEM_CONTROL.search(value) or not value.lstrip().startswith("-----BEGIN "):
                raise _fail(type(self), name, "is not PEM text")
            if marker not in value:
                raise _fail(type(self), name, f"has no {marker.rstrip('-')} block")


@dataclass(frozen=True, slots=True)
class PortalSettingsUpdate(Message):
    """The broker gives a gateway the User Portal settings that apply to it (its own record or
    the farm default), right after it registers and whenever an administrator changes them.
    ``settings`` is the JSON object of the record as the admin API shows it
    (``ras.portal.settings``, checked strictly by the gateway): one schema, kept in one place."""

    TYPE: ClassVar[MessageType] = MessageType.PORTAL_SETTINGS
    settings: str

    def __post_init__(self) -> None:
        _check_str(self, "settings", limit=MAX_PORTAL_SETTINGS)
        try:
            value = json.loads(self.settings)
        except ValueError:
            raise _fail(type(self), "settings", "is not JSON") from None
        if not isinstance(value, dict):
            raise _fail(type(self), "settings", "is not a JSON object")


MESSAGE_CLASSES: Mapping[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, Authenticate, AuthChallenge, AuthResponse, AuthOk, Resume, ListResources,
        ResourceList, Launch, LaunchOk, OpenTunnel, TunnelOpen, AgentRegister, LoadReport,
        GatewayRegister, ClientSession, Registered, ListGateways, GatewayList, RedeemTicket,
        TicketOk, Ping, Pong, Error, SessionAction, SessionActionOk, Route, RouteOk, RdpToken,
        RdpTokenOk,
        AcmeChallenge, AcmeWithdraw, PublicCertificate, PortalSettingsUpdate, Logout, LoggedOut,
    )
}  # fmt: skip


# -- JSON body codec ----------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_ITEMS = (Resource, GatewayEntry, SessionInfo)  # objects that appear in lists inside messages
_FIELDS: dict[type, dict[str, Any]] = {
    cls: _field_types(cls) for cls in (*MESSAGE_CLASSES.values(), *_ITEMS)
}
# Optional fields (added to a message after its first release, docs/protocol.md 6.2): their
# default, which a receiver takes when the field is absent and a sender leaves out.
_OPTIONAL: dict[type, dict[str, object]] = {
    cls: {f.name: f.default for f in dataclasses.fields(cls) if f.default != dataclasses.MISSING}
    for cls in _FIELDS
}


def _to_json(value: object) -> object:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, _ITEMS):
        return _members(value)
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, enum.StrEnum):
        return str(value)
    return value


def _members(value: object) -> dict[str, object]:
    """The fields of a message or item, without the optional ones left at their default."""
    optional = _OPTIONAL[type(value)]
    return {
        name: _to_json(getattr(value, name)) for name in _FIELDS[type(value)]
        if name not in optional or getattr(value, name) != optional[name]
    }  # fmt: skip


def encode_body(msg: Message) -> bytes:
    """The JSON body of ``msg`` (compact, UTF-8, ``type`` first)."""
    obj: dict[str, object] = {"type": str(msg.TYPE), **_members(msg)}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _bad(why: str, code: ErrorCode = ErrorCode.BAD_FIELD) -> RemoteProtocolError:
    return RemoteProtocolError(why, code)


def _convert(tp: Any, value: object, where: str) -> object:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item,) = (a for a in typing.get_args(tp) if a is not Ellipsis)
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise _bad(f"{where}: expected a list of at most {MAX_LIST} items")
        return tuple(_convert(item, v, f"{where}[]") for v in value)
    if tp in _ITEMS:
        if not isinstance(value, dict):
            raise _bad(f"{where}: expected an object")
        return _build(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        base = int if issubclass(tp, enum.IntEnum) else str
        if type(value) is not base:
            raise _bad(f"{where}: expected {base.__name__}")
        try:
            return tp(value)
        except ValueError:
            raise _bad(f"{where}: {value!r} is not one of the allowed values") from None
    if tp is float:
        if type(value) not in (int, float):
            raise _bad(f"{where}: expected a number")
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError:  # an integer literal beyond the largest float
            raise _bad(f"{where}: number out of range") from None
    if type(value) is not tp:  # bool is not an int here, on purpose
        raise _bad(f"{where}: expected {getattr(tp, '__name__', tp)}")
    return value


def _build(cls: type[Any], obj: dict[str, object], where: str) -> Any:
    fields = _FIELDS[cls]
    extra = obj.keys() - fields.keys()
    if extra:
        raise _bad(f"{where}: unknown field {sorted(extra)[0]!r}")
    missing = fields.keys() - obj.keys() - _OPTIONAL[cls].keys()
    if missing:
        raise _bad(f"{where}: missing field {sorted(missing)[0]!r}")
    kwargs = {
        name: _convert(tp, obj[name], f"{where}.{name}")
        for name, tp in fields.items() if name in obj
    }  # fmt: skip
    try:
        return cls(**kwargs)
    except ProtocolError as exc:
        raise _bad(str(exc), exc.code) from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _bad("duplicate key in object", ErrorCode.MALFORMED)
    return obj


def _no_constants(name: str) -> object:
    raise _bad(f"{name} is not allowed", ErrorCode.MALFORMED)


def decode_body(body: bytes) -> Message:
    """Parse one frame body into a message, or raise :class:`RemoteProtocolError`."""
    try:
        obj = json.loads(
            body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("frame body is not UTF-8 JSON", ErrorCode.MALFORMED) from None
    if not isinstance(obj, dict):
        raise _bad("frame body is not a JSON object", ErrorCode.MALFORMED)
    kind = obj.pop("type", None)
    if not isinstance(kind, str):
        raise _bad("frame body has no string 'type'", ErrorCode.MALFORMED)
    try:
        cls = MESSAGE_CLASSES[MessageType(kind)]
    except ValueError:
        raise _bad(f"unknown message type {kind[:64]!r}", ErrorCode.UNKNOWN_TYPE) from None
    msg: Message = _build(cls, obj, kind)
    return msg
