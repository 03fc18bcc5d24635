"""The broker's HTTPS admin API, against the in-process farm over real TLS, and `ras admin`.

What an administrator notices: a logon gives a token and nothing works without one, a user
who is not an admin is refused, an admin certificate needs no logon, what is created can be
read back, changed and removed (and it changes what the farm does: a user added here can log
in through the gateway), bad input names the field, drain keeps new sessions off a host.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
from adminkit import (
    ADMIN,
    ADMIN_PASSWORD,
    admin_client,
    call,
    logged_on,
    ras_admin,
    refused,
    with_admin,
)
from farmkit import LOOPBACK, PASSWORD, USER, Farm, farm

from ras.broker.model import MODELS
from ras.broker.passwords import hash_password
from ras.broker.store import SQLiteStore, UserRecord
from ras.errors import AuthError, ErrorCode
from ras.net.channel import Channel, PeerError, greet
from ras.net.tls import connect_tls
from ras.pki import client_context
from ras.protocol import Authenticate, AuthOk, ClientSession, Launch, LaunchOk, Mode, Role


@contextlib.asynccontextmanager
async def as_gateway(f: Farm, client: str = "127.0.0.1") -> AsyncIterator[Channel]:
    """A client session at the broker, opened the way the farm's gateway opens one."""
    cert, key = f.pki.ensure("gateway", LOOPBACK)
    ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
    host, port = f.broker_addrs["gateways"]
    stream = await connect_tls(host, port, ctx, server_hostname="localhost")
    async with await greet(stream, Role.GATEWAY, "test-gateway") as chan:
        await chan.send(ClientSession(client, 50000))
        yield chan


async def login(f: Farm, user: str, password: str) -> str:
    """The name the broker logs ``user`` in as; AuthError if it refuses."""
    async with as_gateway(f) as chan:
        try:
            reply = await chan.request(Authenticate(user, password))
        except PeerError as exc:
            raise AuthError(exc.error.message, exc.code) from None
        assert isinstance(reply, AuthOk)
        return reply.user


async def test_logon_gives_a_token_and_nothing_works_without_one(tmp_path):
    async with farm(tmp_path) as f:
        with_admin(f)
        anonymous = admin_client(f)
        err = await refused(anonymous, "GET", "status")
        assert (err.status, err.code) == (401, "unauthorized")
        assert "logon" in str(err)
        anonymous.token = "forged-token"
        assert (await refused(anonymous, "GET", "users")).status == 401

        api = await logged_on(f)
        assert api.token is not None
        assert len(api.token) >= 32
        status = await call(api, "GET", "status")
        assert status["admin"] == ADMIN
        assert status["gateways"]["online"] == 1

        # Logging off ends the token.
        await call(api, "POST", "session/logoff")
        assert (await refused(api, "GET", "status")).status == 401


async def test_wrong_password_and_non_admin_are_refused(tmp_path, caplog):
    async with farm(tmp_path) as f:
        with_admin(f)
        api = admin_client(f)
        err = await refused(api, "POST", "session/logon", {"username": ADMIN, "password": "nope"})
        assert (err.status, err.code) == (401, "unauthorized")
        err = await refused(api, "POST", "session/logon", {"username": "ghost", "password": "x"})
        assert err.status == 401
        # alice has the right password but is not in an admin group.
        err = await refused(api, "POST", "session/logon", {"username": USER, "password": PASSWORD})
        assert (err.status, err.code) == (403, "forbidden")
        err = await refused(api, "POST", "session/logon", {"username": ADMIN})
        assert (err.status, err.field) == (400, "password")
        # After the farm's limit of failures the name is locked, even with the right password.
        for _ in range(5):
            await refused(api, "POST", "session/logon", {"username": ADMIN, "password": "x"})
        err = await refused(
            api, "POST", "session/logon", {"username": ADMIN, "password": ADMIN_PASSWORD}
        )
        assert err.status == 429
    assert ADMIN_PASSWORD not in caplog.text
    assert "admin logon failed user=root" in caplog.text


async def test_an_admin_certificate_needs_no_logon_and_other_certificates_do(tmp_path):
    async with farm(tmp_path, admin_cert_names=("ops-admin",)) as f:
        cert, key = f.pki.ensure("ops-admin")
        api = admin_client(f, cert_file=cert, key_file=key)
        assert (await call(api, "GET", "status"))["admin"] == "cert:ops-admin"
        # A farm certificate that is not listed (the gateway's) is no admin.
        cert, key = f.pki.ensure("gateway")
        err = await refused(admin_client(f, cert_file=cert, key_file=key), "GET", "status")
        assert err.status == 401


async def test_users_round_trip_and_change_who_can_log_in(tmp_path):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        bob = await call(
            api, "POST", "users", {"name": "bob", "password": "bob's pw", "groups": ["users"]}
        )
        assert bob == {"name": "bob", "groups": ["users"], "enabled": True, "totp": False}
        assert "password" not in json.dumps(await call(api, "GET", "users"))
        assert await call(api, "GET", "users/bob") == bob
        assert (await refused(api, "POST", "users", {"name": "bob", "password": "x"})).status == 409

        assert await login(f, "bob", "bob's pw") == "bob"
        await call(api, "PUT", "users/bob", {"password": "new pw"})
        with pytest.raises(AuthError):
            await login(f, "bob", "bob's pw")
        assert await login(f, "bob", "new pw") == "bob"
        changed = await call(api, "PUT", "users/bob", {"enabled": False, "groups": ["a", "b"]})
        assert (changed["enabled"], changed["groups"]) == (False, ["a", "b"])
        with pytest.raises(AuthError):
            await login(f, "bob", "new pw")

        enrol = await call(api, "POST", "users/bob/totp")
        assert enrol["otpauth_uri"].startswith("otpauth://totp/RAS%3Abob?secret=")
        assert (await call(api, "GET", "users/bob"))["totp"] is True
        assert (await call(api, "DELETE", "users/bob/totp"))["totp"] is False

        assert await call(api, "DELETE", "users/bob") == {"deleted": "bob"}
        assert (await refused(api, "GET", "users/bob")).status == 404
        assert (await refused(api, "DELETE", "users/bob")).status == 404


KINDS = [
    ("groups", {"name": "ops", "members": ["alice"], "description": "operators"},
     {"description": "night shift"}),
    ("pools", {"name": "p1", "balancing": "round_robin", "description": "east"},
     {"balancing": "resource"}),
    ("resources", {"id": "notepad", "name": "Notepad", "kind": "application",
                   "command": "notepad.exe", "arguments": "/A", "working_dir": "C:\\Temp",
                   "pools": ["p1"],
                   "filter": {"groups": ["users"], "clients": ["10.0.0.0/8"],
                              "gateways": ["gateway"]}},
     {"arguments": "/W", "filter": {"users": ["alice"]}}),
    ("rules", {"name": "outside", "factor": "totp", "order": 10,
               "filter": {"clients": ["0.0.0.0/0"]}}, {"factor": "radius"}),
]  # fmt: skip


STORED = {"groups": "group", "pools": "pool", "resources": "resource", "rules": "factor_rule"}


@pytest.mark.parametrize(("path", "body", "change"), KINDS, ids=[k[0] for k in KINDS])
async def test_each_kind_round_trips(tmp_path, path, body, change):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        key = body.get("name", body.get("id"))
        created = await call(api, "POST", path, body)
        for field, value in body.items():
            assert created[field] == value if field != "filter" else created[field] | value
        shown = await call(api, "GET", f"{path}/{key}")
        assert {k: v for k, v in shown.items() if k in created} == created
        listed = await call(api, "GET", path)
        assert key in [o.get("name", o.get("id")) for o in listed]
        err = await refused(api, "POST", path, body)
        assert (err.status, err.code) == (409, "conflict")

        updated = await call(api, "PUT", f"{path}/{key}", change)
        for field, value in change.items():
            if isinstance(value, dict):
                assert {k: v for k, v in updated[field].items() if v} == value
            else:
                assert updated[field] == value
        # What was not named stays as it was.
        untouched = next(k for k in body if k not in change and k not in ("name", "id"))
        assert updated[untouched] == body[untouched]

        # It is in the broker's database: another opening of the file (a restart) sees it.
        again = SQLiteStore(tmp_path / "broker.sqlite3")
        try:
            stored = again.get_object(MODELS[STORED[path]], key)
        finally:
            again.close()
        assert stored is not None
        assert stored.to_json() == {k: v for k, v in updated.items() if k != "source"}

        assert await call(api, "DELETE", f"{path}/{key}") == {"deleted": key}
        assert (await refused(api, "GET", f"{path}/{key}")).status == 404


async def test_bad_input_names_the_field(tmp_path):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        cases = [
            ("resources", {"id": "doc", "name": "Doc", "kind": "document"}, "target"),
            ("resources", {"id": "d", "name": "D", "filter": {"clients": ["nowhere"]}},
             "filter.clients[0]"),
            ("resources", {"id": "d", "name": "D", "colour": "red"}, "colour"),
            ("resources", {"id": "bad id!", "name": "D"}, "id"),
            ("pools", {"name": "p", "balancing": "sideways"}, "balancing"),
            ("rules", {"name": "r", "factor": "telepathy"}, "factor"),
            ("users", {"name": "carol"}, "password"),
            ("users", {"name": "carol", "password": "x", "groups": "users"}, "groups"),
        ]  # fmt: skip
        for path, body, field in cases:
            err = await refused(api, "POST", path, body)
            assert (err.status, err.code, err.field) == (400, "bad_field", field), (body, err)
            assert field.split(".")[0].split("[")[0] in str(err)
        await call(api, "POST", "pools", {"name": "p"})
        err = await refused(api, "PUT", "pools/p", {"name": "q"})
        assert err.field == "name"
        # Not JSON at all.
        status, answer = await raw(f, "POST", "/api/pools", b"{not json", token=api.token)
        assert status == 400
        assert answer["error"] == "bad_json"


async def raw(
    f: Farm, method: str, target: str, body: bytes = b"", *, token: str | None = None,
    extra: str = "",
) -> tuple[int, dict[str, object]]:  # fmt: skip
    """A hand-made request (for what the client library would never send)."""
    host, port = f.broker_addrs["admin"]
    ctx = ssl.create_default_context(cafile=str(f.pki.ca_path))
    stream = trio.SSLStream(
        await trio.open_tcp_stream(host, port), ctx, server_hostname="localhost"
    )
    head = f"{method} {target} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}"
    if token:
        head += f"auth_token: {token}\r\n"
    async with stream:
        await stream.send_all(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(payload)


async def test_http_errors(tmp_path):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        assert (await refused(api, "DELETE", "status")).status == 405
        assert (await refused(api, "GET", "nothing/here")).status == 404
        status, answer = await raw(f, "GET", "/elsewhere")
        assert status == 404
        status, answer = await raw(f, "POST", "/api/users", b"", token=api.token)
        assert (status, answer["field"]) == (400, "name")  # an empty body: no name
        # A body over the limit is refused from its length, before it is read.
        host, port = f.broker_addrs["admin"]
        ctx = ssl.create_default_context(cafile=str(f.pki.ca_path))
        stream = trio.SSLStream(
            await trio.open_tcp_stream(host, port), ctx, server_hostname="localhost"
        )
        async with stream:
            await stream.send_all(
                b"POST /api/users HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n"
            )
            data = await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 413")
        assert b'"too_large"' in data


async def test_hosts_list_and_drain(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    rdp_port = listener.getsockname()[1]
    try:
        async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", rdp_port)]) as f:
            api = await logged_on(with_admin(f))
            hosts = await call(api, "GET", "hosts")
            assert [h["name"] for h in hosts] == ["host1"]
            assert hosts[0]["online"] is True
            assert hosts[0]["drained"] is False
            assert hosts[0]["rdp_port"] == rdp_port

            drained = await call(api, "POST", "hosts/host1/drain")
            assert drained["drained"] is True
            assert (await call(api, "GET", "hosts/host1"))["drained"] is True
            # The broker sends no new session there.
            async with as_gateway(f) as chan:
                await chan.request(Authenticate(USER, PASSWORD))
                with pytest.raises(PeerError) as info:
                    await chan.request(Launch("desktop", Mode.GATEWAY_SSL))
                assert info.value.code is ErrorCode.NO_HOST
                assert (await call(api, "POST", "hosts/host1/undrain"))["drained"] is False
                ok = await chan.request(Launch("desktop", Mode.GATEWAY_SSL))
                assert isinstance(ok, LaunchOk)
                assert ok.port == rdp_port

            changed = await call(api, "PUT", "hosts/host1", {"max_sessions": 3, "pools": ["p"]})
            assert (changed["max_sessions"], changed["pools"]) == (3, ["p"])
            assert (await refused(api, "POST", "hosts/nohost/drain")).status == 404
    finally:
        listener.close()


async def test_sessions_gateways_and_explain(tmp_path):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", 3389)]) as f:
        api = await logged_on(with_admin(f))
        gateways = await call(api, "GET", "gateways")
        assert [(g["name"], g["online"]) for g in gateways] == [("gateway", True)]
        async with as_gateway(f) as chan:
            await chan.request(Authenticate(USER, PASSWORD))
            await chan.request(Launch("desktop", Mode.GATEWAY_SSL))
        sessions = await call(api, "GET", "sessions")
        assert [(s["user"], s["host"], s["resource"]) for s in sessions] == [
            (USER, "host1", "desktop")
        ]
        assert (await call(api, "GET", "sessions", query={"user": "nobody"})) == []
        explained = await call(
            api,
            "GET",
            "explain",
            query={"user": USER, "resource": "desktop", "client": "127.0.0.1"},
        )
        assert "host1" in json.dumps(explained)
        err = await refused(api, "GET", "explain", query={"user": USER})
        assert (err.status, err.field) == (400, "resource")


async def test_config_resources_are_listed_and_read_only(tmp_path):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        listed = await call(api, "GET", "resources")
        assert [(r["id"], r["source"]) for r in listed] == [("desktop", "config")]
        err = await refused(api, "DELETE", "resources/desktop")
        assert err.status == 409
        err = await refused(api, "POST", "resources", {"id": "desktop", "name": "Again"})
        assert err.status == 409


# -- the real `ras admin` command -----------------------------------------------------------------


async def test_ras_admin_command(tmp_path):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", 3389)]) as f:
        with_admin(f)
        code, out, err = await ras_admin(f, tmp_path, "host", "list")
        assert code == 0, err
        assert out.splitlines()[0].split()[:3] == ["NAME", "KIND", "ONLINE"]
        assert out.splitlines()[1].split()[:3] == ["host1", "rdsh", "yes"]

        code, out, err = await ras_admin(f, tmp_path, "user", "add", "dave", "--group", "users")
        assert code == 0, err
        assert "new user pw" not in out + err
        code, out, err = await ras_admin(f, tmp_path, "--json", "user", "list")
        assert code == 0, err
        assert "dave" in [u["name"] for u in json.loads(out)]

        code, out, err = await ras_admin(
            f, tmp_path, "resource", "add", "calc", "--kind", "application",
            "--command", "calc.exe", "--groups", "users,ops", "--clients", "10.0.0.0/8",
        )  # fmt: skip
        assert code == 0, err
        code, out, err = await ras_admin(f, tmp_path, "--json", "resource", "show", "calc")
        shown = json.loads(out)
        assert shown["filter"]["groups"] == ["users", "ops"]
        assert shown["command"] == "calc.exe"

        # A bad value: exit code 2 and the field named; an unknown object: 1; no access: 3.
        code, out, err = await ras_admin(f, tmp_path, "resource", "add", "x", "--kind", "document")
        assert code == 2
        assert "target" in err
        code, out, err = await ras_admin(f, tmp_path, "user", "remove", "nobody")
        assert code == 1
        assert "no user 'nobody'" in err
        f.store.put_user(UserRecord(ADMIN, hash_password("changed"), ("ras-admins",)))
        code, out, err = await ras_admin(f, tmp_path, "status")
        assert code == 3


# -- hostile bodies, lockouts, stale launches -----------------------------------------------------

HOSTILE = [
    (b"[" * 60_000, "bad_json", None),  # was a RecursionError and a 500
    (b'{"username": "\\ud800", "password": "x"}', "bad_field", "username"),  # UnicodeEncodeError
    (b'{"username": "a", "password": ' + b"1" * 5000 + b"}", "bad_json", None),  # ValueError
    (b'{"username": "a", "username": "b", "password": "x"}', "bad_json", None),
    (b'{"username": "a", "password": NaN}', "bad_json", None),
    (b'{"username": "a", "password": "\xed\xa0\x80"}', "bad_json", None),  # a surrogate in UTF-8
]  # fmt: skip


async def test_hostile_json_is_a_400_never_a_500(tmp_path, caplog):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        for body, code, field in HOSTILE:
            # unauthenticated: the logon reads its body before anyone is known
            status, answer = await raw(f, "POST", "/api/session/logon", body)
            assert (status, answer["error"], answer.get("field")) == (400, code, field), body[:60]
            assert answer["message"]
        deep = b'{"name": "carol", "password": "pw", "groups": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        status, answer = await raw(f, "POST", "/api/users", deep, token=api.token)
        assert (status, answer["error"]) == (400, "bad_json")
        assert "nested deeper than" in str(answer["message"])
        status, answer = await raw(
            f, "POST", "/api/users", b'{"name": "carol", "password": 1' + b"0" * 4400 + b"}",
            token=api.token,
        )  # fmt: skip
        assert (status, answer["error"]) == (400, "bad_json")
    assert "bug in the admin API" not in caplog.text


async def test_a_lockout_says_when_it_ends_and_an_admin_can_lift_it(tmp_path):
    async with farm(tmp_path) as f:
        api = await logged_on(with_admin(f))
        for _ in range(5):
            with pytest.raises(AuthError):
                await login(f, USER, "wrong")
        with pytest.raises(AuthError) as info:
            await login(f, USER, PASSWORD)
        # It was "too many failed logins; try again later".
        assert info.value.code is ErrorCode.THROTTLED
        assert "try again in 5 min" in str(info.value)

        anonymous = admin_client(f)
        for _ in range(5):
            await refused(anonymous, "POST", "session/logon", {"username": USER, "password": "x"})
        err = await refused(
            anonymous, "POST", "session/logon", {"username": USER, "password": PASSWORD}
        )
        assert err.status == 429
        assert "try again in 5 min" in str(err)

        assert await call(api, "POST", f"users/{USER}/unlock") == {"user": USER, "unlocked": True}
        assert await login(f, USER, PASSWORD) == USER
        err = await refused(
            anonymous, "POST", "session/logon", {"username": USER, "password": PASSWORD}
        )
        assert err.status == 403  # tried again (alice is no admin), not throttled
        assert await call(api, "POST", f"users/{USER}/unlock") == {"user": USER, "unlocked": False}


async def test_a_launch_nobody_connected_to_leaves_the_session_list(tmp_path):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", 3389)]) as f:
        api = await logged_on(with_admin(f))
        async with as_gateway(f) as chan:
            await chan.request(Authenticate(USER, PASSWORD))
            await chan.request(Launch("desktop", Mode.GATEWAY_SSL))
        [launching] = await call(api, "GET", "sessions")
        assert launching["state"] == "launching"
        # The client never connected, and launch_timeout_s has passed: the list drops it
        # (it kept it until the next launch or the agent's next detailed report).
        f.broker.sessions.launch_timeout_s = 0.0
        assert await call(api, "GET", "sessions") == []
        assert (await call(api, "GET", "status"))["sessions"]["total"] == 0


async def test_ras_admin_session_times_and_unlock(tmp_path):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", 3389)]) as f:
        with_admin(f)
        async with as_gateway(f) as chan:
            await chan.request(Authenticate(USER, PASSWORD))
            await chan.request(Launch("desktop", Mode.GATEWAY_SSL))
        code, out, err = await ras_admin(f, tmp_path, "session", "list")
        assert code == 0, err
        since = out.splitlines()[0].index("SINCE")
        # It was the raw epoch (1796284800.123); now the UTC time and how long ago.
        shown = out.splitlines()[1][since:]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(\d+s ago\)", shown.strip()), shown
        code, out, err = await ras_admin(f, tmp_path, "--json", "session", "list")
        assert isinstance(json.loads(out)[0]["since"], float)  # scripts keep the number

        for _ in range(5):
            with pytest.raises(AuthError):
                await login(f, USER, "wrong")
        code, out, err = await ras_admin(f, tmp_path, "user", "unlock", USER)
        assert code == 0, err
        assert out == f"{USER}: unlocked\n"
        assert await login(f, USER, PASSWORD) == USER
