"""What an administrator configures in the broker, as typed records with a strict JSON form.

Every record is a frozen dataclass with a ``KIND`` (its table in the store and its name in the
admin API), a ``key`` (its name or id, compared without regard to case), ``to_json`` and a
strict ``from_json``: an unknown, missing or ill-typed field is an :class:`ras.config.Invalid`
naming the field (dotted for nested ones, ``filter.clients[1]``). Constructors validate too,
so a record that exists is a valid record, whoever built it.

Live state (sessions) is a record too (:class:`SessionRecord`), kept in memory, not stored.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ras.config import Invalid
from ras.portal.settings import PortalSettings
from ras.protocol import HostKind, ResourceKind

__all__ = [
    "MODELS",
    "Balancing",
    "CertSource",
    "CertificateRecord",
    "Factor",
    "FactorRule",
    "Filter",
    "GroupRecord",
    "HostKind",
    "HostRecord",
    "PoolRecord",
    "ResourceKind",
    "ResourceRecord",
    "SessionRecord",
    "SessionState",
    "TicketScope",
]

# Host, pool, resource and rule names: the protocol's names (an agent's host name is one).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@\\-]{0,254}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_ITEMS = 1000


class Balancing(enum.StrEnum):
    """How a pool spreads new sessions: by load (the RAS default) or in turn."""

    RESOURCE = "resource"
    ROUND_ROBIN = "round_robin"


class TicketScope(enum.StrEnum):
    """Which gateways may redeem a launch ticket or a routing token: any gateway of the farm
    (so a client's next connection may land on any gateway behind a HALB VIP or in its
    profile's server list), or only the gateway it was issued through."""

    FARM = "farm"
    GATEWAY = "gateway"


class Factor(enum.StrEnum):
    """The second factor a login needs after the password."""

    NONE = "none"
    TOTP = "totp"
    RADIUS = "radius"


class SessionState(enum.StrEnum):
    LAUNCHING = "launching"  # the broker sent the user there; the agent has not reported it yet
    ACTIVE = "active"
    DISCONNECTED = "disconnected"


# -- field checks --------------------------------------------------------------------------------


def check_name(name: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise Invalid(name, f"{value!r} is not a valid name (letters, digits, . _ @ \\ -)")


def check_text(name: str, value: str, *, empty: bool = True, limit: int = 4096) -> None:
    if not empty and not value:
        raise Invalid(name, "must not be empty")
    if len(value) > limit:
        raise Invalid(name, f"longer than {limit} characters")
    if _CONTROL.search(value):
        raise Invalid(name, "contains control characters")


def _check_items(
    name: str, values: tuple[str, ...], check: typing.Callable[[str, str], None]
) -> None:
    if len(values) > MAX_ITEMS:
        raise Invalid(name, f"more than {MAX_ITEMS} entries")
    for i, value in enumerate(values):
        check(f"{name}[{i}]", value)


def _check_keep(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0 <= value <= 365 * 86400):
        raise Invalid(name, "must be between 0 and 31536000 seconds")


def _check_group_name(name: str, value: str) -> None:
    check_text(name, value, empty=False, limit=256)  # directory groups have spaces ("Domain Users")


# -- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """Who may see a resource or falls under a rule. Each criterion left empty allows anyone;
    all criteria given must hold. ``users``/``groups``: the user is listed, or is in one of the
    groups; ``clients``: the client's address is in one of the networks (CIDR); ``gateways``:
    the login came through one of these gateways. Names compare without regard to case."""

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _check_items("users", self.users, _check_group_name)
        _check_items("groups", self.groups, _check_group_name)
        _check_items("gateways", self.gateways, check_name)
        networks = []
        for i, cidr in enumerate(self.clients):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise Invalid(f"clients[{i}]", f"{cidr!r} is not an address or network") from None
        object.__setattr__(self, "_networks", tuple(networks))

    @property
    def empty(self) -> bool:
        return not (self.users or self.groups or self.clients or self.gateways)

    def allows(self, user: str, groups: Iterable[str], client: str, gateway: str) -> bool:
        if self.users or self.groups:
            named = user.casefold() in {u.casefold() for u in self.users}
            wanted = {g.casefold() for g in self.groups}
            if not named and not any(g.casefold() in wanted for g in groups):
                return False
        if self._networks:
            try:
                address = ipaddress.ip_address(client.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if not any(address in net for net in self._networks):
                return False
        return self.allows_gateway(gateway)

    def allows_gateway(self, gateway: str) -> bool:
        """The gateway criterion alone (a ticket redeemed through another gateway)."""
        return not self.gateways or gateway.casefold() in {g.casefold() for g in self.gateways}

    def why_not(self, user: str, groups: Iterable[str], client: str, gateway: str) -> str:
        """Which criterion refuses (for ``explain``); empty if the filter allows."""
        groups = tuple(groups)
        if (self.users or self.groups) and not Filter(self.users, self.groups).allows(
            user, groups, client, gateway
        ):
            return "user and groups not in the filter"
        if self.clients and not Filter(clients=self.clients).allows(user, groups, client, gateway):
            return f"client address {client} not in the filter"
        if self.gateways and not Filter(gateways=self.gateways).allows(
            user, groups, client, gateway
        ):
            return f"gateway {gateway!r} not in the filter"
        return ""

    def to_json(self) -> dict[str, object]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Self:
        result: Self = _from_json(cls, data, "")
        return result


class _Record:
    """JSON form shared by the stored records (a mixin: the dataclasses carry the fields)."""

    __slots__ = ()
    KIND: ClassVar[str]

    @property
    def key(self) -> str:
        return str(getattr(self, "name"))  # noqa: B009

    def to_json(self) -> dict[str, object]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Self:
        result: Self = _from_json(cls, data, "")
        return result


@dataclass(frozen=True, slots=True)
class GroupRecord(_Record):
    """A group of the built-in directory; ``members`` are user names."""

    KIND: ClassVar[str] = "group"
    name: str
    members: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        _check_group_name("name", self.name)
        _check_items("members", self.members, _check_group_name)
        check_text("description", self.description, limit=1024)


@dataclass(frozen=True, slots=True)
class HostRecord(_Record):
    """An administrator's settings for a host (its live load comes from its agent).
    ``max_sessions`` caps what the agent announces; a drained host keeps its sessions (and
    users reconnect to them) but takes no new ones; a disabled host takes nothing.
    A Remote PC or VDI guest is one user's at a time (ras/broker/assignments.py):
    ``assigned_user`` assigns it statically; else it is assigned on first use and kept for its
    owner ``keep_assignment_s`` after their session ends (None: its pools' setting, else 0)."""

    KIND: ClassVar[str] = "host"
    name: str
    kind: HostKind = HostKind.RDSH
    pools: tuple[str, ...] = ()
    drained: bool = False
    enabled: bool = True
    max_sessions: int | None = None
    description: str = ""
    assigned_user: str = ""
    keep_assignment_s: float | None = None

    def __post_init__(self) -> None:
        check_name("name", self.name)
        _check_items("pools", self.pools, check_name)
        if self.max_sessions is not None and not 1 <= self.max_sessions <= 100_000:
            raise Invalid("max_sessions", "must be between 1 and 100000")
        check_text("description", self.description, limit=1024)
        if self.assigned_user:
            _check_group_name("assigned_user", self.assigned_user)
        _check_keep("keep_assignment_s", self.keep_assignment_s)


@dataclass(frozen=True, slots=True)
class PoolRecord(_Record):
    """A set of hosts (those whose ``pools`` name it, and those listed in ``members``) and how
    it balances new sessions. For Remote PCs and VDI guests: ``persistent`` keeps a member for
    the user who first got it, for good; else ``keep_assignment_s`` after their session ends."""

    KIND: ClassVar[str] = "pool"
    name: str
    balancing: Balancing = Balancing.RESOURCE
    description: str = ""
    members: tuple[str, ...] = ()
    persistent: bool = False
    keep_assignment_s: float = 0.0

    def __post_init__(self) -> None:
        check_name("name", self.name)
        check_text("description", self.description, limit=1024)
        _check_items("members", self.members, check_name)
        _check_keep("keep_assignment_s", self.keep_assignment_s)


@dataclass(frozen=True, slots=True)
class ResourceRecord(_Record):
    """A published resource. An application runs ``command`` with ``arguments`` in
    ``working_dir`` (without a command, the host decides what its id names); a document is the
    file ``target`` opened with the application whose id is ``application`` (or the host's
    default for its type); a folder is the folder ``target`` (opened with ``command``, or the
    host's file manager).
    It runs on ``hosts`` and the members of ``pools`` (both empty: every host), for the users
    ``filter`` allows. ``single_sign_on``: the client logs in to the host with the user's farm
    credentials (turn it off where the host uses other accounts)."""

    KIND: ClassVar[str] = "resource"
    id: str
    name: str
    kind: ResourceKind = ResourceKind.DESKTOP
    command: str = ""
    arguments: str = ""
    working_dir: str = ""
    target: str = ""
    application: str = ""
    hosts: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    filter: Filter = Filter()
    enabled: bool = True
    description: str = ""
    single_sign_on: bool = True

    def __post_init__(self) -> None:
        check_name("id", self.id)
        check_text("name", self.name, empty=False, limit=256)
        for key in ("command", "arguments", "working_dir", "target"):
            check_text(key, getattr(self, key), limit=1024)
        if self.application:
            check_name("application", self.application)
        _check_items("hosts", self.hosts, check_name)
        _check_items("pools", self.pools, check_name)
        check_text("description", self.description, limit=1024)
        if self.kind in (ResourceKind.DOCUMENT, ResourceKind.FOLDER) and not self.target:
            raise Invalid("target", f"a {self.kind} needs the path of the {self.kind}")
        if self.application and self.kind is not ResourceKind.DOCUMENT:
            raise Invalid("application", "only a document is opened with an application")

    @property
    def key(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class FactorRule(_Record):
    """Who needs which second factor: the first rule (lowest ``order``, then name) whose
    filter allows the login decides."""

    KIND: ClassVar[str] = "factor_rule"
    name: str
    factor: Factor = Factor.NONE
    filter: Filter = Filter()
    order: int = 0

    def __post_init__(self) -> None:
        check_name("name", self.name)
        if not -1_000_000 <= self.order <= 1_000_000:
            raise Invalid("order", "must be between -1000000 and 1000000")


@dataclass(frozen=True, slots=True)
class SessionRecord(_Record):
    """A user's session as the broker knows it (in memory; the agents report the truth)."""

    KIND: ClassVar[str] = "session"
    id: str
    user: str
    host: str
    resource: str
    gateway: str
    client: str
    state: SessionState
    since: float
    updated: float
    kind: str = "native"  # how it was launched: "native" (an RDP client) or "web" (a browser)

    def __post_init__(self) -> None:
        check_text("id", self.id, empty=False, limit=256)
        if self.kind not in ("native", "web"):
            raise Invalid("kind", f"{self.kind!r} is not native or web")
        check_text("user", self.user, empty=False, limit=256)
        check_name("host", self.host)
        for key in ("resource", "gateway", "client"):
            check_text(key, getattr(self, key), limit=256)
        for key in ("since", "updated"):
            if not math.isfinite(getattr(self, key)):
                raise Invalid(key, "must be a finite number")

    @property
    def key(self) -> str:
        return self.id


class CertSource(enum.StrEnum):
    """Where the farm's public certificate came from."""

    NONE = "none"  # none yet: each gateway presents its own public_cert_file
    SELF_SIGNED = "self_signed"
    IMPORTED = "imported"  # a PEM bundle or a PFX
    CSR = "csr"  # signed elsewhere from a request whose key the broker made and kept
    LETSENCRYPT = "letsencrypt"  # ACME (Let's Encrypt or another ACME CA)


_PEM_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class CertificateRecord(_Record):
    """The farm's public certificate (gateways' TLS ports, HALB offload), one record: chain
    (leaf first) and key, where it came from, where it is pushed, the ACME settings and
    account, and a pending CSR's key. The keys are PEM in the broker's store (SQLite, mode
    0600): protect the state directory and its backups as the private keys they hold."""

    KIND: ClassVar[str] = "certificate"
    name: str = "farm"
    source: CertSource = CertSource.NONE
    cert_pem: str = ""
    key_pem: str = field(default="", repr=False)
    # gateway and HALB names it is pushed to; empty: every one of them
    assigned: tuple[str, ...] = ()
    acme_names: tuple[str, ...] = ()
    acme_email: str = ""
    acme_directory: str = ""
    acme_account_key_pem: str = field(default="", repr=False)
    acme_account_url: str = ""
    csr_pem: str = ""
    csr_key_pem: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        check_name("name", self.name)
        for key in (
            "cert_pem", "key_pem", "acme_account_key_pem", "csr_pem", "csr_key_pem",
        ):  # fmt: skip
            value = getattr(self, key)
            if len(value) > _PEM_LIMIT or _CONTROL.search(value.replace("\n", "")):
                raise Invalid(key, f"is not PEM text of at most {_PEM_LIMIT} characters")
        _check_items("assigned", self.assigned, check_name)
        _check_items("acme_names", self.acme_names, _check_group_name)
        for key in ("acme_email", "acme_directory", "acme_account_url"):
            check_text(key, getattr(self, key), limit=1024)


MODELS: dict[str, type[Any]] = {
    cls.KIND: cls
    for cls in (
        GroupRecord, HostRecord, PoolRecord, ResourceRecord, FactorRule,
        PortalSettings,  # the User Portal's settings, per gateway or farm default (ras.portal)
        CertificateRecord,
    )
}  # fmt: skip


# -- JSON ----------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """Public fields: name -> (type, required)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (hints[f.name], f.default is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
        if f.init and not f.name.startswith("_")
    }


def _to_json(obj: object) -> dict[str, object]:
    return {name: _value_to_json(getattr(obj, name)) for name in _fields(type(obj))}


def _value_to_json(value: object) -> object:
    if isinstance(value, tuple):
        return [_value_to_json(v) for v in value]
    if isinstance(value, Filter):
        return value.to_json()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _from_json(cls: type[Any], data: Mapping[str, object], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise Invalid(prefix.rstrip(".") or cls.__name__, "expected an object")
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            raise Invalid(f"{prefix}{key}", f"unknown field (known: {', '.join(fields)})")
    kwargs: dict[str, object] = {}
    for name, (tp, required) in fields.items():
        if name not in data:
            if required:
                raise Invalid(f"{prefix}{name}", "missing")
            continue
        kwargs[name] = _convert(tp, data[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except Invalid as exc:
        raise Invalid(f"{prefix}{exc.field}", exc.why) from None


def _convert(tp: Any, value: object, where: str) -> object:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (tp,) = (a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list):
            raise Invalid(where, f"expected a list, got {type(value).__name__}")
        if len(value) > MAX_ITEMS:
            raise Invalid(where, f"more than {MAX_ITEMS} entries")
        (item,) = (a for a in typing.get_args(tp) if a is not Ellipsis)
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Filter:
        if not isinstance(value, Mapping):
            raise Invalid(where, f"expected an object, got {type(value).__name__}")
        return _from_json(Filter, value, f"{where}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise Invalid(where, f"{value!r} is not one of: {allowed}") from None
    if tp is float:
        if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
            raise Invalid(where, "expected a finite number")
        return float(value)  # type: ignore[arg-type]
    if type(value) is not tp:  # bool is not an int here
        raise Invalid(where, f"expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")
    return value
