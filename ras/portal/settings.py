"""The User Portal's settings, as the administrator keeps them in the broker's store.

One record per gateway (``name`` = the gateway's name) or the farm default (``name`` =
``default``); a gateway uses its own record if there is one, else the farm default, else the
built-in defaults below. The broker pushes the record that applies to each gateway over the
gateway's link (``portal_settings``), as JSON in the form of :meth:`PortalSettings.to_json`,
and the gateway decodes it with :meth:`PortalSettings.from_json`: strict at both ends, an
unknown, missing-type or bad field is an :class:`ras.config.Invalid` naming the field.

The names follow the Parallels RAS User Portal settings: launch methods, "allow users to
select a launch method", "allow opening applications in a new tab", alternate host name and
port for network load balancers, the web cookie name, CORS, "allow embedding in other pages",
and the client IP detection service.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ras.config import Invalid, check_host

__all__ = ["DEFAULT", "LaunchMethod", "PortalSettings"]

DEFAULT = "default"  # the name of the farm default record
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@\\-]{0,254}")
_COOKIE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a cookie name that needs no quoting anywhere
MAX_ORIGINS = 100


class LaunchMethod(enum.StrEnum):
    """How the portal launches a resource (the RAS "launch method" setting)."""

    BROWSER = "browser"  # in the browser only (the web client)
    NATIVE = "native"  # a native RDP client only: the portal hands out an .rdp file
    NATIVE_FALLBACK = "native_fallback"  # native, and the browser offered as the fallback


def _origin(where: str, value: str) -> None:
    """An origin as browsers send it: ``scheme://host[:port]``, nothing after."""
    parts = urllib.parse.urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or parts.username is not None
        or value != value.strip()
    ):
        raise Invalid(where, f"{value!r} is not an origin like https://portal.example.com")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise Invalid(where, f"{value!r} has a bad port") from None


def _https_url(where: str, value: str) -> None:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname or value != value.strip():
        raise Invalid(where, f"{value!r} is not an http(s) URL")
    if any(ord(c) < 0x21 or c in "\"'<>\\" for c in value):
        raise Invalid(where, "must not contain spaces, quotes or control characters")


@dataclass(frozen=True, slots=True)
class PortalSettings:
    """The portal's settings for one gateway (or the farm default, ``name = "default"``)."""

    KIND: ClassVar[str] = "portal"
    name: str = DEFAULT
    launch_method: LaunchMethod = LaunchMethod.NATIVE_FALLBACK
    allow_user_select: bool = True  # the user may pick browser or native per launch
    open_in_new_tab: bool = True  # applications (and desktops) in the browser open a new tab
    # Network load balancers in front of the gateways: the host name and ports that URLs and
    # .rdp files handed out name ("" and 0: the gateway's public_host, public_port, rdp_port).
    alternate_host: str = ""
    alternate_port: int = 0
    alternate_rdp_port: int = 0
    cookie_name: str = "ras_portal"
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the portal from scripts
    cors_max_age_s: int = 600  # how long a browser may cache a preflight answer
    allow_embedding: bool = False  # in frames of other pages (frame-ancestors 'self' if off)
    client_ip_detection_url: str = ""  # a service answering the caller's public address
    hsts: bool = True  # Strict-Transport-Security on the TLS port
    hsts_max_age_s: int = 31_536_000
    session_idle_s: int = 1200  # a web session idle this long ends
    session_max_s: int = 28_800  # and none lives longer than this

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise Invalid("name", f"{self.name!r} is not {DEFAULT!r} or a gateway name")
        try:
            object.__setattr__(self, "launch_method", LaunchMethod(self.launch_method))
        except ValueError:
            allowed = ", ".join(m.value for m in LaunchMethod)
            raise Invalid(
                "launch_method", f"{self.launch_method!r} is not one of: {allowed}"
            ) from None
        if self.alternate_host:
            check_host("alternate_host", self.alternate_host)
        for key in ("alternate_port", "alternate_rdp_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise Invalid(key, "must be a TCP port (0: the gateway's own)")
        if not _COOKIE.fullmatch(self.cookie_name):
            raise Invalid("cookie_name", "1-64 letters, digits, '-' or '_'")
        if len(self.cors_origins) > MAX_ORIGINS:
            raise Invalid("cors_origins", f"more than {MAX_ORIGINS} origins")
        for i, origin in enumerate(self.cors_origins):
            if origin != "null":  # never allowed: a sandboxed frame's origin
                _origin(f"cors_origins[{i}]", origin)
            else:
                raise Invalid(f"cors_origins[{i}]", "'null' cannot be allowed")
        if self.client_ip_detection_url:
            _https_url("client_ip_detection_url", self.client_ip_detection_url)
        bounds = {
            "cors_max_age_s": (0, 86_400),
            "hsts_max_age_s": (0, 63_072_000),
            "session_idle_s": (60, 86_400),
            "session_max_s": (60, 604_800),
        }
        for key, (low, high) in bounds.items():
            if not low <= getattr(self, key) <= high:
                raise Invalid(key, f"must be between {low} and {high}")

    @property
    def key(self) -> str:
        return self.name

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Self:
        """Strict: an unknown or ill-typed field is an ``Invalid`` naming it; missing fields
        take their defaults."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise Invalid(key, f"unknown field (known: {', '.join(sorted(known))})")
            kwargs[key] = _typed(hints[key], value, key)
        return cls(**kwargs)

    def with_changes(self, changes: Mapping[str, object]) -> Self:
        """These settings with the fields of ``changes`` (strict, as ``from_json``)."""
        return type(self).from_json(self.to_json() | dict(changes))


def _typed(tp: Any, value: object, where: str) -> object:
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Invalid(where, "expected a list of strings")
        return tuple(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if not isinstance(value, str):
            raise Invalid(where, f"expected a string, got {type(value).__name__}")
        return value  # checked by the constructor, which names the allowed values
    if type(value) is not tp:  # bool is not an int here
        raise Invalid(where, f"expected {tp.__name__}, got {type(value).__name__}")
    return value
