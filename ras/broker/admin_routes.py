"""What the admin API serves: users, groups, hosts, pools, resources, factor rules, sessions,
gateways, explain and status (the HTTP shell is :mod:`ras.broker.admin`).

Every configured kind follows one pattern: ``GET /api/<kind>`` lists, ``GET /api/<kind>/<key>``
shows one, ``POST /api/<kind>`` creates (409 if it exists), ``PUT /api/<kind>/<key>`` changes
the fields given and keeps the others, ``DELETE /api/<kind>/<key>`` removes. Bodies are the
JSON of the :mod:`ras.broker.model` records; a bad field is a 400 naming it. Store calls run in
a worker thread, as everywhere in the broker.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from ras import __version__
from ras.broker.admin_api import ApiError, ApiRequest, Handler, Route, bad_field
from ras.broker.admin_brokers import broker_routes
from ras.broker.admin_certs import cert_routes
from ras.broker.admin_reports import report_routes
from ras.broker.assignments import SINGLE_USER
from ras.broker.hosts import Host
from ras.broker.model import (
    FactorRule,
    GroupRecord,
    HostRecord,
    PoolRecord,
    ResourceRecord,
    check_name,
)
from ras.broker.parts import BrokerParts
from ras.broker.passwords import hash_password
from ras.broker.portal import portal_routes
from ras.broker.store import UserRecord
from ras.broker.throttle import call
from ras.broker.totp import new_secret, otpauth_uri
from ras.config import Invalid
from ras.errors import RasError

__all__ = ["routes"]

log = logging.getLogger("ras.broker.admin")

_STARTED = time.time()
MAX_PASSWORD = 1024


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    return trio.to_thread.run_sync(fn, *args)


def _record(cls: type[Any], data: dict[str, Any]) -> Any:
    try:
        return cls.from_json(data)
    except Invalid as exc:
        raise bad_field(exc.field, exc.why) from None


def _not_found(what: str, key: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {key!r}")


# -- users --------------------------------------------------------------------------------------


def _user_json(user: UserRecord, groups: tuple[str, ...] = ()) -> dict[str, Any]:
    """A user as the API shows it: never the hash, never the TOTP secret."""
    return {
        "name": user.name,
        "groups": list(dict.fromkeys((*user.groups, *groups))),
        "enabled": user.enabled,
        "totp": user.totp_secret is not None,
    }


def _user_fields(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    allowed = {"name", "password", "groups", "enabled"}
    for key in body:
        if key not in allowed:
            raise bad_field(key, f"unknown field (known: {', '.join(sorted(allowed))})")
    out: dict[str, Any] = {}
    if creating or "name" in body:
        name = body.get("name")
        if not isinstance(name, str):
            raise bad_field("name", "a user name (string) is required")
        try:
            check_name("name", name)
        except Invalid as exc:
            raise bad_field("name", exc.why) from None
        out["name"] = name
    if creating or "password" in body:
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise bad_field("password", "a non-empty string is required")
        if len(password) > MAX_PASSWORD:
            raise bad_field("password", f"longer than {MAX_PASSWORD} characters")
        out["password"] = password
    if "groups" in body:
        groups = body["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise bad_field("groups", "expected a list of group names")
        try:
            GroupRecord("x", members=tuple(groups))  # the same rule as a group's members
        except Invalid as exc:
            raise bad_field(exc.field.replace("members", "groups"), exc.why) from None
        out["groups"] = tuple(groups)
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise bad_field("enabled", "expected true or false")
        out["enabled"] = body["enabled"]
    return out


class _Api:
    """The handlers, bound to one broker."""

    def __init__(self, broker: BrokerParts, unlock_admin: Callable[[str], bool]) -> None:
        self.broker = broker
        self._unlock_admin = unlock_admin

    @property
    def store(self) -> Any:
        return self.broker.store

    async def _member_of(self, user: str) -> tuple[str, ...]:
        groups: list[GroupRecord] = await _run(self.store.list_objects, GroupRecord)
        folded = user.casefold()
        return tuple(g.name for g in groups if folded in {m.casefold() for m in g.members})

    async def _user(self, name: str) -> UserRecord:
        user: UserRecord | None = await _run(self.store.get_user, name)
        if user is None:
            raise _not_found("user", name)
        return user

    async def users_list(self, request: ApiRequest) -> tuple[int, Any]:
        users: list[UserRecord] = await _run(self.store.list_users)
        groups: list[GroupRecord] = await _run(self.store.list_objects, GroupRecord)
        out = []
        for user in users:
            folded = user.name.casefold()
            extra = tuple(g.name for g in groups if folded in {m.casefold() for m in g.members})
            out.append(_user_json(user, extra))
        return 200, out

    async def users_get(self, request: ApiRequest) -> tuple[int, Any]:
        user = await self._user(request.parts[1])
        return 200, _user_json(user, await self._member_of(user.name))

    async def users_create(self, request: ApiRequest) -> tuple[int, Any]:
        fields = _user_fields(request.json(), creating=True)
        if await _run(self.store.get_user, fields["name"]) is not None:
            raise ApiError(409, "conflict", f"user {fields['name']!r} exists")
        hashed = await _run(hash_password, fields["password"])
        user = UserRecord(
            fields["name"], hashed, fields.get("groups", ()), fields.get("enabled", True)
        )
        await _run(self.store.put_user, user)
        return 201, _user_json(user, await self._member_of(user.name))

    async def users_update(self, request: ApiRequest) -> tuple[int, Any]:
        user = await self._user(request.parts[1])
        fields = _user_fields(request.json(), creating=False)
        if "name" in fields and fields["name"].casefold() != user.name.casefold():
            raise bad_field("name", "a user cannot be renamed; add a new one")
        changes: dict[str, Any] = {k: v for k, v in fields.items() if k in ("groups", "enabled")}
        if "password" in fields:
            changes["password_hash"] = await _run(hash_password, fields["password"])
        user = dataclasses.replace(user, **changes)
        await _run(self.store.put_user, user)
        return 200, _user_json(user, await self._member_of(user.name))

    async def users_delete(self, request: ApiRequest) -> tuple[int, Any]:
        name = request.parts[1]
        if not await _run(self.store.delete_user, name):
            raise _not_found("user", name)
        return 200, {"deleted": name}

    async def users_totp_enrol(self, request: ApiRequest) -> tuple[int, Any]:
        user = await self._user(request.parts[1])
        secret = new_secret()
        await _run(self.store.put_user, dataclasses.replace(user, totp_secret=secret))
        # The secret leaves the broker this once, to the administrator who asked for it.
        return 200, {"user": user.name, "otpauth_uri": otpauth_uri(secret, user.name)}

    async def users_totp_remove(self, request: ApiRequest) -> tuple[int, Any]:
        user = await self._user(request.parts[1])
        await _run(self.store.put_user, dataclasses.replace(user, totp_secret=None))
        return 200, _user_json(user, await self._member_of(user.name)) | {"totp": False}

    async def users_unlock(self, request: ApiRequest) -> tuple[int, Any]:
        """Lift a lock from failed logins (the farm's and the admin API's): any user name, in
        the store or only in the directory."""
        name = request.parts[1]
        throttle = self.broker.throttle
        try:  # on etcd: every broker's lock at once
            farm = await call(throttle, throttle.unlock, name)
        except RasError as exc:
            log.error("admin unlock user=%s unavailable reason=%s", name, exc)
            raise ApiError(
                503, "unavailable", "the farm's failed-login counters (etcd) cannot be reached"
            ) from None
        admin = self._unlock_admin(name)
        log.info("admin unlock user=%s by=%s was_locked=%s", name, request.admin, farm or admin)
        return 200, {"user": name, "unlocked": farm or admin}

    # -- groups -------------------------------------------------------------------------------

    async def _group_json(self, group: GroupRecord) -> dict[str, Any]:
        users: list[UserRecord] = await _run(self.store.list_users)
        folded = group.name.casefold()
        implied = [u.name for u in users if folded in {g.casefold() for g in u.groups}]
        out = group.to_json()
        out["all_members"] = sorted(set(group.members) | set(implied), key=str.casefold)
        return out

    async def groups_get(self, request: ApiRequest) -> tuple[int, Any]:
        group = await self._get(GroupRecord, request.parts[1], "group")
        return 200, await self._group_json(group)

    # -- generic records ------------------------------------------------------------------------

    async def _get(self, cls: type[Any], key: str, what: str) -> Any:
        obj = await _run(self.store.get_object, cls, key)
        if obj is None:
            raise _not_found(what, key)
        return obj

    def crud(self, path: str, cls: type[Any], what: str) -> list[Route]:
        async def list_(request: ApiRequest) -> tuple[int, Any]:
            return 200, [o.to_json() for o in await _run(self.store.list_objects, cls)]

        async def get(request: ApiRequest) -> tuple[int, Any]:
            return 200, (await self._get(cls, request.parts[1], what)).to_json()

        async def create(request: ApiRequest) -> tuple[int, Any]:
            obj = _record(cls, request.json())
            await self._check_new(cls, obj.key, what)
            await _run(self.store.put_object, obj)
            return 201, obj.to_json()

        async def update(request: ApiRequest) -> tuple[int, Any]:
            old = await self._get(cls, request.parts[1], what)
            obj = self._merge(cls, old, request.json())
            await _run(self.store.put_object, obj)
            return 200, obj.to_json()

        async def delete(request: ApiRequest) -> tuple[int, Any]:
            key = request.parts[1]
            self._check_writable(cls, key)
            if not await _run(self.store.delete_object, cls, key):
                raise _not_found(what, key)
            return 200, {"deleted": key}

        return [
            Route("GET", (path,), list_),
            Route("GET", (path, "{}"), get),
            Route("POST", (path,), create),
            Route("PUT", (path, "{}"), update),
            Route("DELETE", (path, "{}"), delete),
        ]

    def _check_writable(self, cls: type[Any], key: str) -> None:
        if cls is ResourceRecord and key.casefold() in self._config_resource_ids():
            raise ApiError(
                409, "read_only", f"resource {key!r} is defined in the broker's config file"
            )

    async def _check_new(self, cls: type[Any], key: str, what: str) -> None:
        self._check_writable(cls, key)
        if await _run(self.store.get_object, cls, key) is not None:
            raise ApiError(409, "conflict", f"{what} {key!r} exists")

    @staticmethod
    def _merge(cls: type[Any], old: Any, body: dict[str, Any]) -> Any:
        """``old`` with the fields of ``body`` (a PUT changes what it names)."""
        obj = _record(cls, old.to_json() | body)
        if obj.key.casefold() != old.key.casefold():
            key_field = "id" if cls is ResourceRecord else "name"
            raise bad_field(key_field, "cannot be changed; add a new one and remove this one")
        return obj

    # -- resources ----------------------------------------------------------------------------

    def _config_resource_ids(self) -> set[str]:
        return {r.id.casefold() for r in self.broker.config.resources}

    def _resource_json(self, resource: ResourceRecord, origins: dict[str, str]) -> dict[str, Any]:
        # "config": from broker.toml, read-only here; "store": made through this API.
        return resource.to_json() | {"source": origins.get(resource.id.casefold(), "store")}

    async def resources_list(self, request: ApiRequest) -> tuple[int, Any]:
        origins = self.broker.catalog.resource_origins()
        return 200, [self._resource_json(r, origins) for r in self.broker.catalog.resources()]

    async def resources_get(self, request: ApiRequest) -> tuple[int, Any]:
        key = request.parts[1].casefold()
        for resource in self.broker.catalog.resources():
            if resource.id.casefold() == key:
                return 200, self._resource_json(resource, self.broker.catalog.resource_origins())
        raise _not_found("resource", request.parts[1])

    # -- hosts --------------------------------------------------------------------------------

    async def _hosts(self) -> dict[str, dict[str, Any]]:
        records: list[HostRecord] = await _run(self.store.list_objects, HostRecord)
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for record in records:
            out[record.name.casefold()] = record.to_json() | {"configured": True, "online": False}
        for name, host in self.broker.hosts.hosts.items():
            entry = out.setdefault(
                name.casefold(),
                HostRecord(name, kind=host.kind).to_json() | {"configured": False},
            )
            entry.update(_live_host(host, now, self.broker.hosts.timeout_s))
        # Remote PCs and VDI guests: whose each is now (brokers on etcd: the farm's claims)
        single = [n for n, h in self.broker.hosts.hosts.items() if h.kind in SINGLE_USER]
        if single:
            for key, owner in (await self.broker.catalog.owners(single)).items():
                out[key]["assigned_to"] = owner
        return out

    async def hosts_list(self, request: ApiRequest) -> tuple[int, Any]:
        hosts = await self._hosts()
        return 200, [hosts[k] for k in sorted(hosts)]

    async def hosts_get(self, request: ApiRequest) -> tuple[int, Any]:
        entry = (await self._hosts()).get(request.parts[1].casefold())
        if entry is None:
            raise _not_found("host", request.parts[1])
        return 200, entry

    async def _host_record(self, name: str) -> HostRecord:
        """The host's record, or a fresh one for a host that is only known live."""
        record: HostRecord | None = await _run(self.store.get_object, HostRecord, name)
        if record is not None:
            return record
        live = self.broker.hosts.hosts.get(name) or next(
            (h for n, h in self.broker.hosts.hosts.items() if n.casefold() == name.casefold()),
            None,
        )
        if live is None:
            raise _not_found("host", name)
        return HostRecord(live.name, kind=live.kind)

    async def hosts_update(self, request: ApiRequest) -> tuple[int, Any]:
        old = await self._host_record(request.parts[1])
        record = self._merge(HostRecord, old, request.json())
        await _run(self.store.put_object, record)
        return 200, (await self._hosts())[record.name.casefold()]

    def _drain(self, drained: bool) -> Handler:
        async def handler(request: ApiRequest) -> tuple[int, Any]:
            await self._host_record(request.parts[1])  # 404 for a host nobody knows
            record = await self.broker.catalog.drain_host(request.parts[1], drained)
            return 200, (await self._hosts())[record.name.casefold()]

        return handler

    # -- sessions, gateways, explain, status ------------------------------------------------------

    def _sessions(self) -> list[Any]:
        """The sessions now. Launches nobody connected to expire here too: the table drops
        them only when a launch or an agent's detailed report comes, and a farm may have
        neither for a long time."""
        self.broker.sessions.expire(time.time())
        return self.broker.sessions.list()

    async def sessions_list(self, request: ApiRequest) -> tuple[int, Any]:
        sessions = self._sessions()
        user = request.query.get("user", "").casefold()
        host = request.query.get("host", "").casefold()
        return 200, [
            s.to_json() for s in sessions
            if (not user or s.user.casefold() == user) and (not host or s.host.casefold() == host)
        ]  # fmt: skip

    async def sessions_get(self, request: ApiRequest) -> tuple[int, Any]:
        for session in self._sessions():
            if session.id == request.parts[1]:
                return 200, session.to_json()
        raise _not_found("session", request.parts[1])

    def _session_action(self, action: str) -> Handler:
        async def handler(request: ApiRequest) -> tuple[int, Any]:
            session_id = request.parts[1]
            if not any(s.id == session_id for s in self._sessions()):
                raise _not_found("session", session_id)
            try:
                result = await self.broker.agents.session_action(session_id, action)
            except LookupError:
                raise _not_found("session", session_id) from None
            except Exception as exc:
                from ras.errors import RasError

                if not isinstance(exc, RasError):
                    raise
                raise ApiError(502, "agent_failed", f"{action} failed: {exc}") from None
            answer: dict[str, Any] = {"session": session_id, "action": action}
            if isinstance(result, dict):
                answer |= result
            return 200, answer

        return handler

    async def gateways_list(self, request: ApiRequest) -> tuple[int, Any]:
        return 200, [
            {
                "name": g.name,
                "public_host": g.public_host,
                "public_port": g.public_port,
                "online": g.online,
                "since": g.since,
            }
            for g in sorted(self.broker.gateways.values(), key=lambda g: g.name.casefold())
        ]

    async def explain(self, request: ApiRequest) -> tuple[int, Any]:
        query = request.query
        for key in ("user", "resource"):
            if not query.get(key):
                raise bad_field(key, "required (?user=...&resource=...)")
        result = await self.broker.launches.explain(
            query["user"],
            query["resource"],
            query.get("client") or "127.0.0.1",
            query.get("gateway", ""),
        )
        return 200, result

    async def status(self, request: ApiRequest) -> tuple[int, Any]:
        now = time.monotonic()
        hosts = list(self.broker.hosts.hosts.values())
        online = [
            h for h in hosts if h.online and now - h.last_report <= self.broker.hosts.timeout_s
        ]
        sessions = self._sessions()
        return 200, {
            "broker": self.broker.config.name,
            "version": __version__,
            "uptime_s": round(time.time() - _STARTED, 1),
            "admin": request.admin,
            "hosts": {"registered": len(hosts), "reporting": len(online)},
            "sessions": {
                "total": len(sessions),
                "disconnected": sum(1 for s in sessions if s.state == "disconnected"),
            },
            "gateways": {
                "known": len(self.broker.gateways),
                "online": sum(1 for g in self.broker.gateways.values() if g.online),
            },
            "resources": len(self.broker.catalog.resources()),
            "certificate": self._certificate_status(),
            "warnings": self.broker.certificates.warnings(),
        }

    def _certificate_status(self) -> dict[str, Any]:
        shown = self.broker.certificates.show()
        keys = ("source", "subject", "not_after", "expires_in_s", "warning", "renewal")
        return {k: shown[k] for k in keys if k in shown}


def _live_host(host: Host, now: float, timeout_s: float) -> dict[str, Any]:
    return {
        "online": bool(host.online),
        "state": host.unreachable(now, timeout_s) or ("drained" if host.drained else "usable"),
        "capacity": host.capacity,
        "rdp_host": host.rdp_host,
        "rdp_port": host.rdp_port,
        "announced_max_sessions": host.max_sessions,
        "cpu_percent": host.cpu_percent,
        "memory_percent": host.memory_percent,
        "sessions": host.sessions,
        "disconnected": host.disconnected,
        "last_report_s": round(max(0.0, now - host.last_report), 1),
        "score": round(host.score, 4),
    }


def routes(broker: BrokerParts, unlock_admin: Callable[[str], bool]) -> list[Route]:
    """The API's routes on ``broker``; ``unlock_admin`` lifts a lock from failed admin logons."""
    api = _Api(broker, unlock_admin)
    generic = api.crud("groups", GroupRecord, "group")
    generic = [r for r in generic if r.pattern != ("groups", "{}") or r.method != "GET"]
    resources = [
        r for r in api.crud("resources", ResourceRecord, "resource") if r.method not in ("GET",)
    ]
    hosts = [r for r in api.crud("hosts", HostRecord, "host") if r.method in ("POST", "DELETE")]
    return [
        Route("GET", ("status",), api.status),
        Route("GET", ("users",), api.users_list),
        Route("GET", ("users", "{}"), api.users_get),
        Route("POST", ("users",), api.users_create),
        Route("PUT", ("users", "{}"), api.users_update),
        Route("DELETE", ("users", "{}"), api.users_delete),
        Route("POST", ("users", "{}", "totp"), api.users_totp_enrol),
        Route("DELETE", ("users", "{}", "totp"), api.users_totp_remove),
        Route("POST", ("users", "{}", "unlock"), api.users_unlock),
        *generic,
        Route("GET", ("groups", "{}"), api.groups_get),
        Route("GET", ("hosts",), api.hosts_list),
        Route("GET", ("hosts", "{}"), api.hosts_get),
        Route("PUT", ("hosts", "{}"), api.hosts_update),
        *hosts,
        Route("POST", ("hosts", "{}", "drain"), api._drain(True)),
        Route("POST", ("hosts", "{}", "undrain"), api._drain(False)),
        *api.crud("pools", PoolRecord, "pool"),
        Route("GET", ("resources",), api.resources_list),
        Route("GET", ("resources", "{}"), api.resources_get),
        *resources,
        *api.crud("rules", FactorRule, "factor rule"),
        Route("GET", ("sessions",), api.sessions_list),
        Route("GET", ("sessions", "{}"), api.sessions_get),
        Route("POST", ("sessions", "{}", "logoff"), api._session_action("logoff")),
        Route("POST", ("sessions", "{}", "disconnect"), api._session_action("disconnect")),
        Route("GET", ("gateways",), api.gateways_list),
        Route("GET", ("explain",), api.explain),
        *portal_routes(api.broker),
        *cert_routes(broker),
        *report_routes(broker.reports),
        *broker_routes(broker),
    ]
