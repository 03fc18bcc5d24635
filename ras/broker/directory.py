"""Where users and their groups come from: the built-in store or an LDAP/AD directory.

A :class:`Directory` answers two questions: is this the user's password (``authenticate``),
and who is this user (``lookup``, without a password). ``None`` means "no" (unknown user or
wrong password: the caller answers both the same way). A directory that cannot answer (down,
slow, or answering strangely) raises :class:`DirectoryUnavailable`: the caller denies and logs
it, never allows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import ssl
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

with warnings.catch_warnings():
    # ldap3 2.9.1 imports names that newer pyasn1 releases deprecate (tagMap, typeMap).
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3  # type: ignore[import-untyped]
    from ldap3.core.exceptions import LDAPException  # type: ignore[import-untyped]
    from ldap3.utils.conv import escape_filter_chars  # type: ignore[import-untyped]
    from ldap3.utils.dn import parse_dn  # type: ignore[import-untyped]

from ras.broker.ldapconfig import LdapConfig, LdapServer
from ras.broker.passwords import verify_password
from ras.broker.store import Store, UserRecord
from ras.errors import AuthError, ConfigError, ErrorCode, PKIError, RasError
from ras.pki import client_context

if TYPE_CHECKING:
    from ras.broker.config import BrokerConfig

__all__ = [
    "BuiltinDirectory",
    "Directory",
    "DirectoryUnavailable",
    "Identity",
    "LdapConfig",
    "LdapDirectory",
    "open_directory",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """A user the directory vouches for: the name as the directory spells it, its groups."""

    name: str
    groups: tuple[str, ...] = ()
    source: str = "builtin"


class DirectoryUnavailable(AuthError):
    """The directory could not answer; the login is denied. The message names the server and
    the reason (never the password)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.UNAVAILABLE)


class Directory(Protocol):
    async def authenticate(self, username: str, password: str) -> Identity | None: ...
    async def lookup(self, username: str) -> Identity | None: ...


class BuiltinDirectory:
    """Users in the broker's own store, with scrypt hashes. An unknown or disabled user costs
    the same time as a wrong password."""

    source = "builtin"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _get(self, username: str) -> UserRecord | None:
        try:
            return await trio.to_thread.run_sync(self.store.get_user, username)
        except RasError as exc:  # a shared store (etcd) out of reach: deny, as a down LDAP
            raise DirectoryUnavailable(f"the user store: {exc}") from None

    async def authenticate(self, username: str, password: str) -> Identity | None:
        record = await self._get(username)
        stored = record.password_hash if record is not None and record.enabled else None
        ok = await trio.to_thread.run_sync(verify_password, password, stored)
        if not ok or record is None:
            return None
        return Identity(record.name, record.groups, self.source)

    async def lookup(self, username: str) -> Identity | None:
        record = await self._get(username)
        if record is None or not record.enabled:
            return None
        return Identity(record.name, record.groups, self.source)


# ---------------------------------------------------------------------------------------------
# LDAP / Active Directory
#
# Theory of operation. ldap3 is blocking, so each operation (authenticate or lookup) runs in a
# worker thread (trio.to_thread.run_sync) under a per-directory thread limiter, and the trio
# side gives up after ``operation_timeout_s`` (abandoning the thread, whose sockets time out on
# their own after ``receive_timeout_s``). In the thread, the servers are tried in order on one
# fresh connection each: open (connect timeout), StartTLS or LDAPS with the certificate and
# host name checked by the ssl module, bind as the search identity (service account, or none:
# anonymous), find the user (exactly one entry, or deny), read the groups, then bind as the
# user's DN with the password. A server that cannot be reached, times out, fails TLS or gives
# an error answer is logged and the next one is tried; "no such user" and "wrong password" are
# answers, and stop there. Nothing here ever turns a failure into an allow.

log = logging.getLogger("ras.broker.ldap")

#: LDAP_MATCHING_RULE_IN_CHAIN: Active Directory walks nested membership on the server.
AD_IN_CHAIN = "1.2.840.113556.1.4.1941"
_OR_CHUNK = 50  # DNs per (|(member=a)(member=b)...) search when walking nested groups
_MAX_USERNAME = 256
_MAX_WORKERS = 16
# Bind results that refuse this user (an answer); any other failure is the server's.
_USER_REFUSED = {48: "inappropriate authentication", 49: "invalid credentials",
                 50: "insufficient access", 53: "unwilling to perform"}  # fmt: skip
# Active Directory says why a bind failed in the message: "... AcceptSecurityContext error,
# data 52e, v4563".
_AD_BIND_REASONS = {
    "525": "no such user",
    "52e": "wrong password",
    "530": "logon not permitted at this time",
    "531": "logon not permitted from this workstation",
    "532": "password expired",
    "533": "account disabled",
    "701": "account expired",
    "773": "password must be changed",
    "775": "account locked",
}
_AD_DATA = re.compile(r"\bdata ([0-9a-f]{3,8})\b", re.IGNORECASE)

Entry = tuple[str, dict[str, list[bytes]]]  # DN, attributes (lower-case names) -> raw values
T = TypeVar("T")


class _ServerFailed(Exception):
    """This server could not answer; the next one is tried."""


class _Tls(ldap3.Tls):  # type: ignore[misc]
    """TLS through our own ``SSLContext``: the ssl module checks the chain and the host name in
    the handshake. (ldap3's own host name check calls ``ssl.match_hostname``, which is
    deprecated.) Remembers why a handshake failed, for the log line."""

    def __init__(self, context: ssl.SSLContext, server_name: str) -> None:
        super().__init__()
        self._context = context
        self._server_name = server_name
        self.failure: str | None = None

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        try:
            connection.socket = self._context.wrap_socket(
                connection.socket,
                server_hostname=self._server_name,
                do_handshake_on_connect=do_handshake,
            )
        except ssl.SSLCertVerificationError as exc:
            self.failure = f"TLS certificate check failed: {exc.verify_message}"
            raise
        except (ssl.SSLError, OSError) as exc:
            self.failure = f"TLS handshake failed: {_oneline(str(exc))}"
            raise


def _oneline(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    """A short reason from an ldap3 or socket exception (ldap3 nests one per address tried)."""
    args = exc.args
    if len(args) == 2 and isinstance(args[1], list):  # ('unable to open socket', [(exc, addr)])
        parts = [f"{addr[0]}: {_describe(inner)}" for inner, addr in args[1]]
        return "; ".join(parts)
    text = _oneline(str(exc)) or type(exc).__name__
    return text.removeprefix("socket connection error while opening: ")


def _unescape_dn_value(value: str) -> str:
    """An RDN value as a string (RFC 4514 escapes: ``\\,`` and ``\\2C``)."""
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            pair = value[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            char = value[i + 1]
            i += 1
        out += char.encode()
        i += 1
    return out.decode("utf-8", errors="replace")


def _first_rdn(dn: str) -> tuple[str, str] | None:
    """(attribute, value) of a DN's first RDN, or None for a multi-valued or unparsable one."""
    try:
        rdns = parse_dn(dn)
    except LDAPException:
        return None
    if not rdns or rdns[0][2] == "+":
        return None
    return rdns[0][0], _unescape_dn_value(rdns[0][1])


def _text(values: list[bytes]) -> str | None:
    return values[0].decode("utf-8", errors="replace") if values else None


class LdapDirectory:
    """Users and groups in an LDAP directory or Active Directory (see :class:`LdapConfig`)."""

    source = "ldap"

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self._servers = config.parsed_servers
        self._password = self._read_password(config.bind_password_file)
        self._ssl = self._ssl_context(config.ca_file)
        self._limiter = trio.CapacityLimiter(_MAX_WORKERS)
        self._receive_timeout = max(1, math.ceil(config.receive_timeout_s))  # ldap3: whole s
        log.info(
            "ldap directory servers=%s start_tls=%s search_as=%s",
            ",".join(config.servers),
            config.start_tls,
            config.bind_dn or "anonymous",
        )

    @staticmethod
    def _read_password(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot read the LDAP bind password: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: the LDAP bind password is not UTF-8 text") from None
        if not password:
            raise ConfigError(f"{path}: the LDAP bind password file is empty")
        return password

    @staticmethod
    def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
        if ca_file is not None:
            try:
                return client_context(ca_file)
            except PKIError as exc:
                raise ConfigError(f"ldap.ca_file: {exc}") from None
        ctx = ssl.create_default_context()  # the system's trusted CAs; the host name checked
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    # -- the trio side ---------------------------------------------------------------------

    async def authenticate(self, username: str, password: str) -> Identity | None:
        if not password:
            # An empty password would be an unauthenticated bind, which servers accept: never
            # ask (RFC 4513 5.1.2).
            log.info("ldap auth refused user=%r reason=empty password (not sent)", username)
            return None
        candidates = self._candidates(username)
        if candidates is None:
            log.info("ldap auth refused user=%r reason=unusable user name (not sent)", username)
            return None
        return await self._run(partial(self._authenticate_on, username, candidates, password))

    async def lookup(self, username: str) -> Identity | None:
        candidates = self._candidates(username)
        if candidates is None:
            return None
        return await self._run(partial(self._lookup_on, username, candidates))

    async def _run(self, op: Callable[[ldap3.Connection, LdapServer], T]) -> T:
        timeout = self.config.operation_timeout_s
        deadline = time.monotonic() + timeout
        with trio.move_on_after(timeout) as scope:
            return await trio.to_thread.run_sync(
                self._failover, op, deadline, abandon_on_cancel=True, limiter=self._limiter
            )
        assert scope.cancelled_caught
        servers = ", ".join(self.config.servers)
        log.warning("ldap no answer within operation_timeout_s=%g servers=%s", timeout, servers)
        raise DirectoryUnavailable(
            f"the LDAP directory did not answer within {timeout:g} s (servers: {servers})"
        )

    def _candidates(self, username: str) -> tuple[str, ...] | None:
        """The values to look the user up by: the name as typed, and for ``user@domain`` or
        ``DOMAIN\\user`` with a configured domain the bare user name. None: not a name."""
        if (
            not username
            or len(username) > _MAX_USERNAME
            or any(ord(c) < 32 or ord(c) == 127 for c in username)
        ):
            return None
        domains = {d.lower() for d in self.config.domains}
        if "\\" in username:
            domain, _, local = username.partition("\\")
            return (local,) if local and domain.lower() in domains else (username,)
        local, at, domain = username.rpartition("@")
        if at and local and domain.lower() in domains:
            return (username, local)
        return (username,)

    # -- the worker thread -----------------------------------------------------------------

    def _failover(self, op: Callable[[ldap3.Connection, LdapServer], T], deadline: float) -> T:
        reasons: list[str] = []
        for server in self._servers:
            if time.monotonic() >= deadline:
                reasons.append(f"{server.url}: not tried, out of time")
                break
            try:
                return self._attempt(server, op)
            except _ServerFailed as exc:
                log.warning("ldap server=%s failed: %s", server.url, exc)
                reasons.append(f"{server.url}: {exc}")
        raise DirectoryUnavailable("no LDAP server could answer (" + "; ".join(reasons) + ")")

    def _attempt(self, server: LdapServer, op: Callable[[ldap3.Connection, LdapServer], T]) -> T:
        tls = _Tls(self._ssl, server.host) if server.ldaps or self.config.start_tls else None
        conn = self._connection(server, tls)
        try:
            self._open(conn, server, tls)
            return op(conn, server)
        except (LDAPException, OSError) as exc:
            why = tls.failure if tls is not None and tls.failure else _describe(exc)
            raise _ServerFailed(why) from None
        except (DirectoryUnavailable, _ServerFailed):
            raise
        except Exception as exc:  # a garbled answer can make ldap3 or pyasn1 raise anything
            log.debug("ldap server=%s unexpected error", server.url, exc_info=True)
            why = f"unreadable answer ({type(exc).__name__}: {_describe(exc)})"
            raise _ServerFailed(why) from exc
        finally:
            self._close(conn)

    def _connection(self, server: LdapServer, tls: _Tls | None) -> ldap3.Connection:
        cfg = self.config
        return ldap3.Connection(
            ldap3.Server(
                server.host,
                port=server.port,
                use_ssl=server.ldaps,
                tls=tls,
                get_info=ldap3.NONE,
                connect_timeout=cfg.connect_timeout_s,
            ),
            user=cfg.bind_dn or None,
            password=self._password,
            auto_bind=ldap3.AUTO_BIND_NONE,
            client_strategy=ldap3.SYNC,
            receive_timeout=self._receive_timeout,
            raise_exceptions=False,
            read_only=True,
            auto_referrals=False,
            auto_escape=False,
        )

    def _open(self, conn: ldap3.Connection, server: LdapServer, tls: _Tls | None) -> None:
        """Connect, TLS, and bind as the search identity (none: anonymous)."""
        conn.open(read_server_info=False)
        if tls is not None and not server.ldaps and not conn.start_tls(read_server_info=False):
            raise _ServerFailed("StartTLS was refused")
        if self.config.bind_dn and not conn.bind(read_server_info=False):
            raise _ServerFailed(
                f"the search bind as {self.config.bind_dn!r} failed: {self._result(conn)}"
            )

    @staticmethod
    def _close(conn: ldap3.Connection) -> None:
        # ldap3 leaves the socket of a failed connect or TLS handshake open: close it here.
        with contextlib.suppress(Exception):
            if not conn.closed:
                conn.unbind()
        sock = getattr(conn, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _result(conn: ldap3.Connection) -> str:
        result = conn.result or {}
        text = f"{result.get('description', 'no result')} ({result.get('result', '?')})"
        if result.get("message"):
            text += f": {_oneline(str(result['message']))}"
        return text

    def _search(
        self,
        conn: ldap3.Connection,
        base: str,
        search_filter: str,
        attributes: list[str],
        *,
        scope: str = ldap3.SUBTREE,
        size_limit: int = 0,
    ) -> list[Entry]:
        conn.search(base, search_filter, scope, attributes=attributes, size_limit=size_limit)
        code = (conn.result or {}).get("result")
        if code == 4 and not size_limit:
            log.warning("ldap search truncated by the server's size limit base=%r filter=%r "
                        "(some groups may be missing)", base, search_filter)  # fmt: skip
        elif code not in (0, 4):
            raise _ServerFailed(f"search under {base!r} failed: {self._result(conn)}")
        entries: list[Entry] = []
        for item in conn.response or ():
            if item.get("type") == "searchResEntry":
                raw = item.get("raw_attributes") or {}
                entries.append((item["dn"], {k.lower(): list(v) for k, v in raw.items()}))
        return entries

    def _find_user(
        self, conn: ldap3.Connection, server: LdapServer, username: str, candidates: tuple[str, ...]
    ) -> Entry | None:
        cfg = self.config
        clauses = "".join(
            f"({attribute}={escape_filter_chars(value)})"
            for attribute in cfg.user_attributes
            for value in candidates
        )
        search_filter = f"(&{cfg.user_filter}(|{clauses}))"
        attributes = list(
            dict.fromkeys(
                a for a in (*cfg.user_attributes, cfg.user_name_attribute, cfg.memberof_attribute)
                if a
            )
        )  # fmt: skip
        entries = self._search(conn, cfg.user_search_base, search_filter, attributes, size_limit=2)
        if not entries:
            log.info(
                "ldap auth refused user=%r server=%s reason=no such user", username, server.url
            )
            return None
        if len(entries) > 1:
            log.error(
                "ldap user=%r server=%s matches %s entries (%s); denying: make the user "
                "attributes or user_filter unique",
                username, server.url, "several" if len(entries) > 2 else "2",
                "; ".join(dn for dn, _ in entries),
            )  # fmt: skip
            raise DirectoryUnavailable(
                f"the directory holds more than one entry for {username!r}; ask an administrator"
            )
        dn, attrs = entries[0]
        if not dn:
            raise DirectoryUnavailable(f"the directory answered {username!r} with an empty DN")
        return dn, attrs

    def _identity(self, username: str, entry: Entry, groups: tuple[str, ...]) -> Identity:
        name = _text(entry[1].get(self.config.user_name_attribute.lower(), [])) or username
        return Identity(name, groups, self.source)

    def _authenticate_on(
        self,
        username: str,
        candidates: tuple[str, ...],
        password: str,
        conn: ldap3.Connection,
        server: LdapServer,
    ) -> Identity | None:
        entry = self._find_user(conn, server, username, candidates)
        if entry is None:
            return None
        # Groups are read with the search identity, before the user's own bind: one connection
        # does it all, and the user needs no right to read groups.
        groups = self._groups(conn, entry)
        if not conn.rebind(user=entry[0], password=password, read_server_info=False):
            code = (conn.result or {}).get("result")
            if code not in _USER_REFUSED:
                raise _ServerFailed(f"the bind as {entry[0]!r} failed: {self._result(conn)}")
            why = _USER_REFUSED[code]
            ad = _AD_DATA.search(str((conn.result or {}).get("message", "")))
            if ad is not None:
                why = _AD_BIND_REASONS.get(ad.group(1).lower(), f"{why}, AD data {ad.group(1)}")
            elif code == 49:
                why = "wrong password"
            log.info(
                "ldap auth refused user=%r dn=%r server=%s reason=%s",
                username, entry[0], server.url, why,
            )  # fmt: skip
            return None
        identity = self._identity(username, entry, groups)
        log.info(
            "ldap auth ok user=%r dn=%r server=%s groups=%s",
            identity.name, entry[0], server.url, ",".join(groups) or "-",
        )  # fmt: skip
        return identity

    def _lookup_on(
        self, username: str, candidates: tuple[str, ...], conn: ldap3.Connection, server: LdapServer
    ) -> Identity | None:
        entry = self._find_user(conn, server, username, candidates)
        if entry is None:
            return None
        return self._identity(username, entry, self._groups(conn, entry))

    # -- groups ----------------------------------------------------------------------------

    def _groups(self, conn: ldap3.Connection, entry: Entry) -> tuple[str, ...]:
        """The names of the user's groups, nested ones included."""
        cfg = self.config
        dn, attrs = entry
        names: dict[str, str] = {}  # lower-case DN -> name
        memberof = attrs.get(cfg.memberof_attribute.lower(), []) if cfg.memberof_attribute else []
        if cfg.active_directory:
            # One search: the server walks the nesting. The direct groups of memberOf are kept
            # too, so a server that ignores the rule still yields those (and is reported).
            member = f"{cfg.member_attribute}:{AD_IN_CHAIN}:={escape_filter_chars(dn)}"
            found = self._search(
                conn,
                cfg.group_search_base,
                f"(&{cfg.group_filter}({member}))",
                [cfg.group_name_attribute],
            )
            if memberof and not found:
                log.warning(
                    "ldap %r has memberOf values but the LDAP_MATCHING_RULE_IN_CHAIN search "
                    "found no group: is this Active Directory? (set active_directory = false "
                    "for other servers); only direct groups are used",
                    dn,
                )
            names = {g[0].lower(): self._group_name(conn, g) for g in found}
            for value in memberof:
                group_dn = value.decode("utf-8", errors="replace")
                names.setdefault(group_dn.lower(), self._group_name_of_dn(conn, group_dn))
            return tuple(sorted(set(names.values())))
        if memberof:
            frontier = [v.decode("utf-8", errors="replace") for v in memberof]
            for group_dn in frontier:
                names[group_dn.lower()] = self._group_name_of_dn(conn, group_dn)
        else:
            frontier = self._parents(conn, [dn], names)
        for _ in range(cfg.nested_depth):
            if not frontier:
                break
            frontier = self._parents(conn, frontier, names)
        if frontier:
            log.warning(
                "ldap groups of %r nest deeper than nested_depth=%d; deeper groups are not read",
                dn, cfg.nested_depth,
            )  # fmt: skip
        return tuple(sorted(set(names.values())))

    def _parents(self, conn: ldap3.Connection, dns: list[str], names: dict[str, str]) -> list[str]:
        """The groups that have one of ``dns`` as a member and are not in ``names`` yet (added
        to it): one level of the walk up the nesting, cycles cut by ``names``."""
        cfg = self.config
        new: list[str] = []
        for start in range(0, len(dns), _OR_CHUNK):
            members = "".join(
                f"({cfg.member_attribute}={escape_filter_chars(d)})"
                for d in dns[start : start + _OR_CHUNK]
            )
            for group in self._search(
                conn,
                cfg.group_search_base,
                f"(&{cfg.group_filter}(|{members}))",
                [cfg.group_name_attribute],
            ):
                if group[0].lower() not in names:
                    names[group[0].lower()] = self._group_name(conn, group)
                    new.append(group[0])
        return new

    def _group_name(self, conn: ldap3.Connection, group: Entry) -> str:
        name = _text(group[1].get(self.config.group_name_attribute.lower(), []))
        return name if name is not None else self._group_name_of_dn(conn, group[0])

    def _group_name_of_dn(self, conn: ldap3.Connection, dn: str) -> str:
        """A group's name from its DN (``memberOf`` holds DNs): the first RDN's value when it
        is the name attribute (``CN=Sales,OU=...``), else read from the entry."""
        rdn = _first_rdn(dn)
        if rdn is not None and rdn[0].lower() == self.config.group_name_attribute.lower():
            return rdn[1]
        found = self._search(
            conn, dn, "(objectClass=*)", [self.config.group_name_attribute], scope=ldap3.BASE
        )
        name = (
            _text(found[0][1].get(self.config.group_name_attribute.lower(), [])) if found else None
        )
        return name if name is not None else (rdn[1] if rdn is not None else dn)


def open_directory(config: BrokerConfig, store: Store) -> Directory:
    """The broker's directory: LDAP when ``broker.toml`` has an ``[ldap]`` table, else the
    built-in store. ConfigError if the LDAP settings cannot be used (bind password file, CA)."""
    if config.ldap is not None:
        return LdapDirectory(config.ldap)
    return BuiltinDirectory(store)
