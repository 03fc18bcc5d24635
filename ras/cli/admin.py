"""``ras admin``: administer a broker over its HTTPS admin API (docs/admin-api.md).

Each command logs on (or presents an admin certificate), makes its requests and logs off.
Tables for people by default, ``--json`` for scripts. The admin's password comes from
``--password-file``, ``$RAS_PASSWORD`` or a prompt; a new user's password from
``--user-password-file`` or a prompt, never from the command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ras.cli.admin_portal import COLUMNS as PORTAL_COLUMNS
from ras.cli.admin_portal import add_portal_parser
from ras.cli.admin_report import add_report_parser
from ras.cli.admincert import add_cert_parser
from ras.cli.adminclient import AdminApiError, AdminClient
from ras.cli.common import EXIT, report_error
from ras.cli.daemons import read_secret
from ras.errors import RasError

__all__ = ["AdminApiError", "AdminClient", "add_parser"]

DEFAULT_URL = "https://127.0.0.1:20443"
_FMT = argparse.RawDescriptionHelpFormatter


# -- output ---------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        parts = [f"{k}={_cell(v)}" for k, v in value.items() if v not in ([], "", None)]
        return " ".join(parts) or "-"
    if value is None or value == "":
        return "-"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned columns with a header line."""
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def details(obj: dict[str, Any]) -> str:
    width = max((len(k) for k in obj), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in obj.items())


COLUMNS = {
    "users": ["name", "groups", "enabled", "totp"],
    "groups": ["name", "members", "description"],
    "hosts": [
        "name",
        "kind",
        "online",
        "drained",
        "enabled",
        "sessions",
        "disconnected",
        "cpu_percent",
        "memory_percent",
        "pools",
        "assigned_to",
    ],
    "pools": ["name", "balancing", "description"],
    "resources": ["id", "name", "kind", "hosts", "pools", "filter", "enabled", "source"],
    "rules": ["name", "factor", "order", "filter"],
    "sessions": ["id", "user", "host", "resource", "kind", "state", "gateway", "client", "since"],
    "gateways": ["name", "public_host", "public_port", "online", "since"],
    "portal": PORTAL_COLUMNS,
    "brokers": ["name", "role", "priority", "admin_url"],
}
_TIMES = ("since", "updated")  # seconds since the epoch in the API's answers


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m ago"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h ago"


def readable_times(obj: dict[str, Any], now: float) -> dict[str, Any]:
    """``obj`` with its epoch times as UTC and how long ago (for people; --json keeps them)."""
    out = dict(obj)
    for key in _TIMES:
        value = out.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            stamp = dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            out[key] = f"{stamp} ({_ago(now - value)})"
    return out


# -- commands -------------------------------------------------------------------------------------


def _lists(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def _filter(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        key: _lists(getattr(args, key))
        for key in ("users", "groups", "clients", "gateways")
        if getattr(args, key)
    }


def _new_password(args: argparse.Namespace) -> str:
    password = read_secret(
        args.user_password_file,
        f"new password for {args.name}: ",
        os.environ.get("RAS_NEW_PASSWORD"),
    )
    if not password:
        raise AdminApiError(400, "usage", "refusing an empty password")
    return password


Command = Callable[[AdminClient, argparse.Namespace], Any]


def _user_add(api: AdminClient, a: argparse.Namespace) -> Any:
    body = {"name": a.name, "password": _new_password(a), "groups": _lists(a.group)}
    body["enabled"] = not a.disabled
    user = api.request("POST", "users", body)
    if a.totp:
        user["otpauth_uri"] = api.request("POST", f"users/{a.name}/totp")["otpauth_uri"]
    return user


def _user_set(api: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if a.group is not None:
        body["groups"] = _lists(a.group)
    return api.request("PUT", f"users/{a.name}", body)


def _user_totp(api: AdminClient, a: argparse.Namespace) -> Any:
    if a.remove:
        return api.request("DELETE", f"users/{a.name}/totp")
    return api.request("POST", f"users/{a.name}/totp")


def _group_add(api: AdminClient, a: argparse.Namespace) -> Any:
    body = {"name": a.name, "members": _lists(a.member), "description": a.description}
    return api.request("POST", "groups", body)


def _group_members(api: AdminClient, a: argparse.Namespace) -> Any:
    group = api.request("GET", f"groups/{a.name}")
    if a.add or a.remove:
        members = [
            m
            for m in group["members"]
            if m.casefold() not in {r.casefold() for r in _lists(a.remove)}
        ]
        members += [m for m in _lists(a.add) if m.casefold() not in {x.casefold() for x in members}]
        group = api.request("PUT", f"groups/{a.name}", {"members": members})
    return group


def _host_set(api: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if a.pool is not None:
        body["pools"] = _lists(a.pool)
    if a.max_sessions is not None:
        body["max_sessions"] = a.max_sessions if a.max_sessions > 0 else None
    if a.enabled is not None:
        body["enabled"] = a.enabled
    if a.description is not None:
        body["description"] = a.description
    if a.kind is not None:
        body["kind"] = a.kind
    if a.assigned_user is not None:
        body["assigned_user"] = a.assigned_user
    if a.keep_assignment is not None:
        body["keep_assignment_s"] = a.keep_assignment if a.keep_assignment >= 0 else None
    return api.request("PUT", f"hosts/{a.name}", body)


def _pool_add(api: AdminClient, a: argparse.Namespace) -> Any:
    body = {
        "name": a.name, "balancing": a.balancing, "description": a.description,
        "members": _lists(a.member or []), "persistent": a.persistent,
        "keep_assignment_s": a.keep_assignment,
    }  # fmt: skip
    return api.request("POST", "pools", body)


def _resource_add(api: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"id": a.id, "name": a.name or a.id, "kind": a.kind}
    for key, value in (
        ("command", a.command),
        ("arguments", a.args),
        ("working_dir", a.workdir),
        ("target", a.target),
        ("application", a.application),
        ("description", a.description),
    ):
        if value:
            body[key] = value
    for key in ("hosts", "pools"):
        if getattr(a, key):
            body[key] = _lists(getattr(a, key))
    if a.disabled:
        body["enabled"] = False
    if a.no_sso:
        body["single_sign_on"] = False
    if _filter(a):
        body["filter"] = _filter(a)
    return api.request("POST", "resources", body)


def _rule_add(api: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"name": a.name, "factor": a.factor, "order": a.order}
    if _filter(a):
        body["filter"] = _filter(a)
    return api.request("POST", "rules", body)


def _get(path: str) -> Command:
    return lambda api, a: api.request("GET", path.format(**vars(a)))


def _call(
    method: str, path: str, body: Callable[[argparse.Namespace], Any] | None = None
) -> Command:
    return lambda api, a: api.request(method, path.format(**vars(a)), body(a) if body else None)


def _explain(api: AdminClient, a: argparse.Namespace) -> Any:
    query = {"user": a.user_name, "resource": a.resource, "client": a.client, "gateway": a.gateway}
    return api.request("GET", "explain", query=query)


def _brokers(api: AdminClient, a: argparse.Namespace) -> Any:
    return api.request("GET", "brokers")["brokers"]


def _sessions(api: AdminClient, a: argparse.Namespace) -> Any:
    return api.request("GET", "sessions", query={"user": a.for_user or "", "host": a.host or ""})


def _show(result: Any, a: argparse.Namespace) -> None:
    if a.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    now = time.time()
    if isinstance(result, list):
        result = [readable_times(r, now) if isinstance(r, dict) else r for r in result]
        columns = COLUMNS.get(a.kind_path, sorted({k for r in result for k in r}))
        print(table(result, columns) if result else f"(no {a.kind_path})")
    elif isinstance(result, dict):
        result = readable_times(result, now)
        if "deleted" in result:
            print(f"removed {result['deleted']}")
        elif "unlocked" in result:
            done = "unlocked" if result["unlocked"] else "was not locked; nothing to do"
            print(f"{result['user']}: {done}")
        else:
            print(details(result))
        if "otpauth_uri" in result:
            print("\nsecond factor: add this URI to an authenticator app (TOTP, 30 s, 6 digits);")
            print("it is shown this once:")
            print(result["otpauth_uri"])


# -- running --------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AdminClient:
    if args.ca_file is None:
        raise AdminApiError(
            400, "usage", "--ca-file (or $RAS_ADMIN_CA_FILE) is required: the farm CA"
        )
    api = AdminClient(
        args.url,
        args.ca_file,
        cert_file=args.cert,
        key_file=args.key,
        timeout_s=args.timeout,
    )
    if args.cert is None:
        if not args.user:
            raise AdminApiError(
                400, "usage", "give --user (and a password) or --cert/--key (an admin certificate)"
            )
        api.logon(
            args.user,
            read_secret(
                args.password_file, f"password for {args.user}: ", os.environ.get("RAS_PASSWORD")
            ),
        )
    return api


def _run(args: argparse.Namespace) -> int:
    try:
        api = _client(args)
        try:
            result = args.command_fn(api, args)
        finally:
            api.logoff()
    except AdminApiError as exc:
        report_error(exc)
        return exc.exit_code
    except RasError as exc:  # a certificate or password file: a bad argument
        report_error(exc)
        return EXIT.USAGE
    _show(result, args)
    return EXIT.OK


# -- the parser -----------------------------------------------------------------------------------


def _list_option(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(
        flag, action="append", metavar="A,B", help=f"{what} (comma-separated, repeatable)"
    )


def _filter_options(p: argparse.ArgumentParser) -> None:
    _list_option(p, "--users", "only these users")
    _list_option(p, "--groups", "only members of these groups")
    _list_option(p, "--clients", "only from these client addresses or networks (CIDR)")
    _list_option(p, "--gateways", "only through these gateways")


def _leaf(
    sub: Any, name: str, fn: Command, kind: str, text: str, *args: str
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    for arg in args:
        p.add_argument(arg)
    p.set_defaults(command_fn=fn, kind_path=kind)
    return p


def _users(sub: Any) -> None:
    users = sub.add_parser("user", help="built-in users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _leaf(users, "add", _user_add, "users", "add a user (asks for the password)", "name")
    _list_option(p, "--group", "the user's groups")
    p.add_argument("--user-password-file", type=Path, help="read the new password from this file")
    p.add_argument("--disabled", action="store_true", help="add the user disabled")
    p.add_argument("--totp", action="store_true", help="enrol a TOTP second factor too")
    _leaf(users, "list", _get("users"), "users", "list the users")
    _leaf(users, "show", _get("users/{name}"), "users", "show one user", "name")
    _leaf(users, "remove", _call("DELETE", "users/{name}"), "users", "remove a user", "name")
    p = _leaf(
        users,
        "passwd",
        _call("PUT", "users/{name}", lambda a: {"password": _new_password(a)}),
        "users",
        "set a user's password (asks for it)",
        "name",
    )
    p.add_argument("--user-password-file", type=Path, help="read the new password from this file")
    _leaf(
        users,
        "enable",
        _call("PUT", "users/{name}", lambda a: {"enabled": True}),
        "users",
        "allow a user to log in",
        "name",
    )
    _leaf(
        users,
        "disable",
        _call("PUT", "users/{name}", lambda a: {"enabled": False}),
        "users",
        "refuse a user's logins (the user is kept)",
        "name",
    )
    _leaf(
        users,
        "unlock",
        _call("POST", "users/{name}/unlock"),
        "users",
        "lift the lock that too many failed logins put on a user name",
        "name",
    )
    p = _leaf(users, "set", _user_set, "users", "change a user's groups", "name")
    _list_option(p, "--group", "the user's groups, replacing the current ones")
    p = _leaf(
        users,
        "totp",
        _user_totp,
        "users",
        "enrol a new TOTP second factor; prints the otpauth:// URI once",
        "name",
    )
    p.add_argument("--remove", action="store_true", help="remove the second factor instead")


def _groups(sub: Any) -> None:
    groups = sub.add_parser("group", help="groups of the built-in directory").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _leaf(groups, "add", _group_add, "groups", "add a group", "name")
    _list_option(p, "--member", "user names")
    p.add_argument("--description", default="")
    _leaf(groups, "list", _get("groups"), "groups", "list the groups")
    _leaf(groups, "remove", _call("DELETE", "groups/{name}"), "groups", "remove a group", "name")
    p = _leaf(
        groups, "members", _group_members, "groups", "show or change a group's members", "name"
    )
    _list_option(p, "--add", "add these users")
    _list_option(p, "--remove", "remove these users")


def _hosts(sub: Any) -> None:
    hosts = sub.add_parser("host", help="RDP hosts: load, drain, settings").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    _leaf(hosts, "list", _get("hosts"), "hosts", "list the hosts and their load")
    _leaf(hosts, "show", _get("hosts/{name}"), "hosts", "show one host", "name")
    _leaf(
        hosts,
        "drain",
        _call("POST", "hosts/{name}/drain"),
        "hosts",
        "no new sessions on a host (its users still reconnect)",
        "name",
    )
    _leaf(
        hosts,
        "undrain",
        _call("POST", "hosts/{name}/undrain"),
        "hosts",
        "let a drained host take new sessions again",
        "name",
    )
    p = _leaf(hosts, "set", _host_set, "hosts", "change a host's settings", "name")
    _list_option(p, "--pool", "the host's pools, replacing the current ones")
    p.add_argument("--max-sessions", type=int, help="cap the sessions (0: the agent's figure)")
    p.add_argument("--enable", dest="enabled", action="store_true", default=None)
    p.add_argument("--disable", dest="enabled", action="store_false")
    p.add_argument("--kind", choices=["rdsh", "vdi", "remote_pc"])
    p.add_argument("--description")
    p.add_argument(
        "--assigned-user", metavar="USER", help="a Remote PC or VDI guest only USER gets ('': none)"
    )
    p.add_argument(
        "--keep-assignment", type=float, metavar="SECONDS",
        help="keep it for its user this long after their session ends (-1: the pools' setting)",
    )  # fmt: skip


def _pools(sub: Any) -> None:
    pools = sub.add_parser("pool", help="host pools").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _leaf(pools, "add", _pool_add, "pools", "add a pool", "name")
    p.add_argument("--balancing", choices=["resource", "round_robin"], default="resource")
    p.add_argument("--description", default="")
    _list_option(p, "--member", "hosts in the pool (besides those that name it)")
    p.add_argument(
        "--persistent", action="store_true",
        help="Remote PCs / VDI guests stay the user's who first got them",
    )  # fmt: skip
    p.add_argument(
        "--keep-assignment", type=float, default=0.0, metavar="SECONDS",
        help="keep a member for its user this long after their session ends (default 0)",
    )  # fmt: skip
    _leaf(pools, "list", _get("pools"), "pools", "list the pools")
    _leaf(pools, "remove", _call("DELETE", "pools/{name}"), "pools", "remove a pool", "name")


def _resources(sub: Any) -> None:
    res = sub.add_parser(
        "resource", help="published applications, desktops, documents, folders"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(res, "add", _resource_add, "resources", "publish a resource", "id")
    p.add_argument("--name", help="the name users see (default: the id)")
    p.add_argument(
        "--kind", choices=["desktop", "application", "document", "folder"], default="desktop"
    )
    p.add_argument("--command", help="an application's program")
    p.add_argument("--args", help="an application's arguments")
    p.add_argument("--workdir", help="an application's working folder")
    p.add_argument("--target", help="a document's file or a folder's path")
    p.add_argument("--application", help="the application (id) that opens a document")
    _list_option(p, "--hosts", "run on these hosts")
    _list_option(p, "--pools", "run on the hosts of these pools")
    _filter_options(p)
    p.add_argument("--disabled", action="store_true", help="publish it disabled")
    p.add_argument(
        "--no-sso", action="store_true",
        help="no single sign-on: its hosts have accounts of their own",
    )  # fmt: skip
    p.add_argument("--description", default="")
    _leaf(res, "list", _get("resources"), "resources", "list the published resources")
    _leaf(res, "show", _get("resources/{id}"), "resources", "show one resource", "id")
    _leaf(res, "remove", _call("DELETE", "resources/{id}"), "resources", "unpublish", "id")


def _rules(sub: Any) -> None:
    rules = sub.add_parser("rule", help="who needs which second factor").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _leaf(rules, "add", _rule_add, "rules", "add a factor rule", "name")
    p.add_argument("--factor", choices=["none", "totp", "radius"], required=True)
    p.add_argument("--order", type=int, default=0, help="lower orders are tried first")
    _filter_options(p)
    _leaf(rules, "list", _get("rules"), "rules", "list the factor rules")
    _leaf(rules, "remove", _call("DELETE", "rules/{name}"), "rules", "remove a rule", "name")


def _sessions_parser(sub: Any) -> None:
    ses = sub.add_parser("session", help="users' sessions").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for p in (
        _leaf(ses, "list", _sessions, "sessions", "who is on which host, since when"),
        _leaf(sub, "sessions", _sessions, "sessions", "the same as `session list`"),
    ):
        p.add_argument("--for-user", metavar="USER", help="only this user's sessions")
        p.add_argument("--host", help="only the sessions on this host")
    _leaf(
        ses,
        "logoff",
        _call("POST", "sessions/{id}/logoff"),
        "sessions",
        "log a session off (its agent ends it)",
        "id",
    )
    _leaf(
        ses,
        "disconnect",
        _call("POST", "sessions/{id}/disconnect"),
        "sessions",
        "disconnect a session (the user can reconnect)",
        "id",
    )


def add_parser(subparsers: Any) -> None:
    admin = subparsers.add_parser(
        "admin",
        formatter_class=_FMT,
        help="administer a broker over its HTTPS admin API",
        description="Administer a running broker through its admin API (HTTPS, port 20443). Log "
        "on with --user (member of an admin group; the password from --password-file, "
        "$RAS_PASSWORD or a prompt), or present an admin certificate with --cert/--key.",
        epilog="examples:\n"
        "  ras admin --ca-file state/pki/ca.pem --user admin status\n"
        "  ras admin --ca-file state/pki/ca.pem --cert state/pki/admin.pem "
        "--key state/pki/admin.key host list\n"
        "  ras admin ... user add bob --group users\n"
        "  ras admin ... resource add notepad --kind application --command notepad.exe "
        "--groups users\n"
        "  ras admin ... explain bob desktop --client 10.0.0.5\n\n" + EXIT.HELP,
    )
    env = os.environ.get
    admin.add_argument(
        "--url",
        default=env("RAS_ADMIN_URL", DEFAULT_URL),
        help=f"the admin API ($RAS_ADMIN_URL; default: {DEFAULT_URL})",
    )
    admin.add_argument(
        "--ca-file",
        type=Path,
        default=env("RAS_ADMIN_CA_FILE"),
        help="the farm CA that signed the broker's certificate ($RAS_ADMIN_CA_FILE)",
    )
    admin.add_argument("--cert", type=Path, help="an admin client certificate (mutual TLS)")
    admin.add_argument("--key", type=Path, help="its key (default: in the --cert file)")
    admin.add_argument(
        "--user", default=env("RAS_ADMIN_USER"), help="log on as this admin ($RAS_ADMIN_USER)"
    )
    admin.add_argument(
        "--password-file",
        type=Path,
        help="the admin's password, first line (else $RAS_PASSWORD or a prompt)",
    )
    admin.add_argument("--json", action="store_true", help="print the API's JSON (for scripts)")
    admin.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    sub = admin.add_subparsers(dest="object", metavar="OBJECT", required=True)
    _users(sub)
    _groups(sub)
    _hosts(sub)
    _pools(sub)
    _resources(sub)
    _rules(sub)
    _sessions_parser(sub)
    add_portal_parser(sub, _leaf)
    add_cert_parser(sub)
    add_report_parser(sub)
    gw = sub.add_parser("gateway", help="gateways").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    _leaf(gw, "list", _get("gateways"), "gateways", "the gateways and whether they are online")
    br = sub.add_parser("broker", help="the farm's brokers: roles, promotion").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    _leaf(br, "list", _brokers, "brokers", "the brokers present, their priority and role")
    _leaf(
        br,
        "promote",
        _call("POST", "brokers/{name}/promote"),
        "brokers",
        "make NAME the primary broker (any broker takes this; the old primary is deposed)",
        "name",
    )
    p = _leaf(
        sub,
        "explain",
        _explain,
        "explain",
        "why a launch of RESOURCE by USER would go where it goes",
    )
    p.add_argument("user_name", metavar="USER")
    p.add_argument("resource", metavar="RESOURCE")
    p.add_argument("--client", default="", help="the client address to assume")
    p.add_argument("--gateway", default="", help="the gateway to assume")
    _leaf(sub, "status", _get("status"), "status", "the broker's status")
    admin.set_defaults(func=_run)
