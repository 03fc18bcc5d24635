"""A private OpenLDAP slapd for the directory tests: provisioned in a temporary directory,
started as a subprocess on free 127.0.0.1 ports, and always stopped.

The server has an mdb database for ``dc=example,dc=test``, the memberof overlay (so users
carry ``memberOf``), a tiny schema with Active Directory's ``sAMAccountName`` and
``userPrincipalName``, ``ldap://`` with StartTLS and ``ldaps://`` with a certificate for
``localhost`` from the project's own PKI, and the entries of :data:`USERS` and
:data:`GROUPS` (nested groups, a cycle, a name shared by two users, a group name with a
comma). Start to ready takes about a third of a second.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from rdp_peers import PeerError, free_port, wait_port

from ras.broker.directory import ldap3  # imported there without pyasn1's deprecation noise
from ras.pki import FarmPKI

__all__ = [
    "BASE",
    "GROUPS",
    "SERVICE_DN",
    "SERVICE_PASSWORD",
    "USERS",
    "Slapd",
    "User",
    "require_slapd",
]

BASE = "dc=example,dc=test"
ADMIN_DN = f"cn=admin,{BASE}"
ADMIN_PASSWORD = "admin secret"
SERVICE_DN = f"cn=ras-broker,ou=services,{BASE}"
SERVICE_PASSWORD = "service secret 9"
PEOPLE = f"ou=people,{BASE}"
GROUPS_OU = f"ou=groups,{BASE}"
SLAPD = "/usr/sbin/slapd"
_MODULES = "/usr/lib/ldap"
_SCHEMA = "/etc/ldap/schema"


@dataclass(frozen=True)
class User:
    rdn: str
    uid: str
    password: str
    sam: str | None = None  # sAMAccountName
    upn: str | None = None  # userPrincipalName

    @property
    def dn(self) -> str:
        return f"{self.rdn},{PEOPLE}"


USERS = {
    "alice": User("uid=alice", "alice", "alice pass 1", "alice", "alice@example.test"),
    "bob": User("uid=bob", "bob", "bob pass 2", "bob", "bob@example.test"),
    "carol": User("uid=carol", "carol", "carol pass 3"),
    "dave": User("uid=dave", "dave", "dave pass 4"),  # in no group
    "twin1": User("cn=Twin One", "twin", "twin pass 5"),  # two entries share uid=twin
    "twin2": User("cn=Twin Two", "twin", "twin pass 6"),
}

# group cn -> members (user keys of USERS, or "group:<cn>")
GROUPS: dict[str, tuple[str, ...]] = {
    "engineers": ("alice",),
    "Ops, West": ("alice",),  # a comma in the name: escaped in DNs (cn=Ops\, West)
    "staff": ("group:engineers", "bob"),
    "everyone": ("group:staff",),
    "loop-a": ("carol", "group:loop-b"),
    "loop-b": ("group:loop-a",),
}

# Active Directory's attribute types with their real OIDs; the auxiliary class's OID is a
# test-only one (private arc), good for this throwaway server only.
_AD_SCHEMA = """\
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.99999.1.1 NAME 'rasTestAccount' SUP top AUXILIARY
    MAY ( sAMAccountName $ userPrincipalName ) )
"""


def require_slapd() -> None:
    """Skip where slapd is not installed (outside CI); under CI it is a failure."""
    if os.path.exists(SLAPD) and shutil.which("slapd", path="/usr/sbin") is not None:
        return
    reason = "slapd missing (run scripts/install-peers as root)"
    if os.environ.get("CI"):
        raise PeerError(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


def group_dn(cn: str) -> str:
    return f"cn={ldap3.utils.dn.escape_rdn(cn)},{GROUPS_OU}"


def _ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


class Slapd:
    """One slapd in ``directory``: :meth:`start` provisions (once) and starts it, :meth:`stop`
    stops it; the ports stay the same across restarts. Use as a context manager."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.host = "127.0.0.1"
        self.ldap_port = free_port()
        self.ldaps_port = free_port()
        self.pki = FarmPKI(self.directory / "pki")
        self.proc: subprocess.Popen[bytes] | None = None
        self._provisioned = False

    # -- addresses -------------------------------------------------------------------------

    def ldap_url(self, host: str | None = None) -> str:
        return f"ldap://{host or self.host}:{self.ldap_port}"

    def ldaps_url(self, host: str | None = None) -> str:
        return f"ldaps://{host or self.host}:{self.ldaps_port}"

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_path

    @property
    def log_file(self) -> Path:
        return self.directory / "slapd.log"

    # -- life ------------------------------------------------------------------------------

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_config(self) -> Path:
        d = self.directory
        (d / "db").mkdir(parents=True, exist_ok=True)
        cert, key = self.pki.ensure("slapd", ("localhost",))  # not 127.0.0.1: a name mismatch
        (d / "ad.schema").write_text(_AD_SCHEMA)
        conf = d / "slapd.conf"
        conf.write_text(
            f"""\
include {_SCHEMA}/core.schema
include {_SCHEMA}/cosine.schema
include {_SCHEMA}/inetorgperson.schema
include {d}/ad.schema
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath {_MODULES}
moduleload back_mdb
moduleload memberof
TLSCACertificateFile {self.pki.ca_path}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}

database mdb
maxsize 16777216
suffix "{BASE}"
rootdn "{ADMIN_DN}"
rootpw "{ADMIN_PASSWORD}"
directory {d}/db
index objectClass,uid,member eq

overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE

access to attrs=userPassword by anonymous auth by * none
access to * by * read
"""
        )
        return conf

    def start(self) -> None:
        if self.proc is not None:
            return
        conf = self._write_config() if not self._provisioned else self.directory / "slapd.conf"
        urls = f"{self.ldap_url()}/ {self.ldaps_url()}/"
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-f", str(conf), "-h", urls, "-d", "0"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            wait_port(
                self.host, self.ldap_port, 10, proc=self.proc, log=self.log_file, what="slapd"
            )
            wait_port(
                self.host, self.ldaps_port, 10, proc=self.proc, log=self.log_file, what="slapd"
            )
            if not self._provisioned:
                self._populate()
                self._provisioned = True
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- data ------------------------------------------------------------------------------

    def _admin(self) -> ldap3.Connection:
        server = ldap3.Server(self.host, port=self.ldap_port, get_info=ldap3.NONE)
        return ldap3.Connection(server, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True)

    def _populate(self) -> None:
        conn = self._admin()
        try:

            def add(dn: str, classes: list[str], attrs: dict[str, object]) -> None:
                if not conn.add(dn, classes, attrs):
                    raise PeerError(f"slapd: cannot add {dn}: {conn.result}")

            add(BASE, ["dcObject", "organization"], {"dc": "example", "o": "Example"})
            for ou in ("people", "groups", "services"):
                add(f"ou={ou},{BASE}", ["organizationalUnit"], {"ou": ou})
            add(
                SERVICE_DN,
                ["applicationProcess", "simpleSecurityObject"],
                {"cn": "ras-broker", "userPassword": _ssha(SERVICE_PASSWORD)},
            )
            for user in USERS.values():
                attrs: dict[str, object] = {
                    "cn": user.rdn.partition("=")[2],
                    "sn": user.uid,
                    "uid": user.uid,
                    "userPassword": _ssha(user.password),
                }
                classes = ["inetOrgPerson"]
                if user.sam or user.upn:
                    classes.append("rasTestAccount")
                    attrs |= {"sAMAccountName": user.sam, "userPrincipalName": user.upn}
                add(user.dn, classes, {k: v for k, v in attrs.items() if v})
            # Groups in an order where every member group exists, except the cycle's closing
            # edge, added afterwards.
            for cn in ("engineers", "Ops, West", "staff", "everyone", "loop-a"):
                members = [
                    group_dn(m[6:]) if m.startswith("group:") else USERS[m].dn
                    for m in GROUPS[cn]
                    if m != "group:loop-b"
                ]
                add(group_dn(cn), ["groupOfNames"], {"cn": cn, "member": members})
            add(
                group_dn("loop-b"),
                ["groupOfNames"],
                {"cn": "loop-b", "member": [group_dn("loop-a")]},
            )
            conn.modify(group_dn("loop-a"), {"member": [(ldap3.MODIFY_ADD, [group_dn("loop-b")])]})
        finally:
            conn.unbind()
