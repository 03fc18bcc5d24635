"""The ``[ldap]`` table of ``broker.toml``: where the LDAP / Active Directory servers are and how
users and their groups are found there (see ``docs/directories.md``).

It lives apart from :mod:`ras.broker.directory` so that the broker's config can name it without
importing ldap3.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ras.config import Invalid, check_host, check_positive

__all__ = ["LdapConfig", "LdapServer"]

# An attribute description: a name (letters, digits, '-') or a numeric OID.
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+")
_DEFAULT_PORTS = {"ldap": 389, "ldaps": 636}
MAX_NESTED_DEPTH = 32


@dataclass(frozen=True, slots=True)
class LdapServer:
    """One entry of ``servers``, parsed: ``ldaps://dc1.example.com`` or ``ldap://10.0.0.5:389``."""

    url: str
    host: str
    port: int
    ldaps: bool

    @classmethod
    def parse(cls, url: str) -> LdapServer:
        """Raises ``ValueError`` saying what is wrong with ``url``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{url!r} must start with ldap:// or ldaps://")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"{url!r}: only a scheme, a host and a port are allowed")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValueError(f"{url!r} has a bad port") from None
        host = parts.hostname or ""
        try:
            check_host("host", host)
        except Invalid:
            raise ValueError(f"{url!r} names no valid host") from None
        return cls(url, host, port, parts.scheme == "ldaps")


def _check_filter(name: str, value: str) -> None:
    """A filter must be one parenthesised expression; the server judges the rest."""
    depth = 0
    for i, char in enumerate(value):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0 or (depth == 0 and i != len(value) - 1):
            break
    else:
        if value.startswith("(") and depth == 0:
            return
    raise Invalid(name, f"{value!r} is not one parenthesised LDAP filter, e.g. '(objectClass=*)'")


def _check_dn(name: str, value: str, *, empty_ok: bool) -> None:
    if not value and empty_ok:
        return
    if "=" not in value or any(c in value for c in "\0\r\n"):
        raise Invalid(name, f"{value!r} is not a distinguished name (like 'dc=example,dc=com')")


def _check_attribute(name: str, value: str) -> None:
    if not _ATTRIBUTE.fullmatch(value):
        raise Invalid(name, f"{value!r} is not an LDAP attribute name")


@dataclass(frozen=True, slots=True)
class LdapConfig:
    """How to find users and groups in an LDAP directory or Active Directory.

    ``servers`` are tried in order: one that cannot be reached, times out or fails its TLS
    check is logged and the next one is tried. Users are searched (with ``bind_dn`` and the
    password in ``bind_password_file``, or anonymously when ``bind_dn`` is empty) by any of
    ``user_attributes``, then the password is checked by binding as the user's DN.
    """

    servers: tuple[str, ...]
    base_dn: str
    start_tls: bool = False
    ca_file: Path | None = None
    allow_plaintext: bool = False
    bind_dn: str = ""
    bind_password_file: Path | None = None
    user_base_dn: str = ""
    user_filter: str = "(objectClass=person)"
    user_attributes: tuple[str, ...] = ("uid",)
    domains: tuple[str, ...] = ()
    name_attribute: str = ""
    group_base_dn: str = ""
    group_filter: str = "(|(objectClass=groupOfNames)(objectClass=group))"
    member_attribute: str = "member"
    memberof_attribute: str = "memberOf"
    group_name_attribute: str = "cn"
    nested_depth: int = 8
    active_directory: bool = False
    connect_timeout_s: float = 5.0
    receive_timeout_s: float = 10.0
    operation_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.servers:
            raise Invalid("servers", "name at least one server, e.g. 'ldaps://dc1.example.com'")
        for i, url in enumerate(self.servers):
            try:
                server = LdapServer.parse(url)
            except ValueError as exc:
                raise Invalid(f"servers[{i}]", str(exc)) from None
            if not server.ldaps and not self.start_tls and not self.allow_plaintext:
                raise Invalid(
                    f"servers[{i}]",
                    f"{url!r} would carry passwords in clear text: use ldaps://, set "
                    "start_tls = true, or set allow_plaintext = true to accept that",
                )
        _check_dn("base_dn", self.base_dn, empty_ok=False)
        _check_dn("user_base_dn", self.user_base_dn, empty_ok=True)
        _check_dn("group_base_dn", self.group_base_dn, empty_ok=True)
        _check_dn("bind_dn", self.bind_dn, empty_ok=True)
        if bool(self.bind_dn) != (self.bind_password_file is not None):
            raise Invalid(
                "bind_password_file" if self.bind_dn else "bind_dn",
                "bind_dn and bind_password_file go together (leave both out to search anonymously)",
            )
        _check_filter("user_filter", self.user_filter)
        _check_filter("group_filter", self.group_filter)
        if not self.user_attributes:
            raise Invalid("user_attributes", "name at least one, e.g. ['sAMAccountName']")
        for i, attribute in enumerate(self.user_attributes):
            _check_attribute(f"user_attributes[{i}]", attribute)
        for key in ("member_attribute", "group_name_attribute"):
            _check_attribute(key, getattr(self, key))
        for key in ("name_attribute", "memberof_attribute"):
            if getattr(self, key):
                _check_attribute(key, getattr(self, key))
        for i, domain in enumerate(self.domains):
            if not domain or any(c in domain for c in "@\\ \t/"):
                raise Invalid(f"domains[{i}]", f"{domain!r} is not a domain name")
        if not 0 <= self.nested_depth <= MAX_NESTED_DEPTH:
            raise Invalid(
                "nested_depth", f"must be 0 to {MAX_NESTED_DEPTH}, not {self.nested_depth}"
            )
        for key in ("connect_timeout_s", "receive_timeout_s", "operation_timeout_s"):
            check_positive(key, getattr(self, key))

    @property
    def parsed_servers(self) -> tuple[LdapServer, ...]:
        return tuple(LdapServer.parse(url) for url in self.servers)

    @property
    def user_search_base(self) -> str:
        return self.user_base_dn or self.base_dn

    @property
    def group_search_base(self) -> str:
        return self.group_base_dn or self.base_dn

    @property
    def user_name_attribute(self) -> str:
        """The attribute whose value becomes the user's name in the farm."""
        return self.name_attribute or self.user_attributes[0]
