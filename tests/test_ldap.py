"""The LDAP / Active Directory directory against a real OpenLDAP slapd (tests/slapdkit.py):
users found by uid, sAMAccountName or UPN, passwords checked by binding as the user, direct
and nested groups, LDAPS and StartTLS with certificate checks, failover, and every way a
directory can fail ending in a denial, never an allow."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import trio
from farmkit import Listener, farm
from slapdkit import BASE, SERVICE_DN, SERVICE_PASSWORD, USERS, Slapd, require_slapd

from ras.broker.config import BrokerConfig, ResourceConfig
from ras.broker.directory import (
    BuiltinDirectory,
    DirectoryUnavailable,
    Identity,
    LdapConfig,
    LdapDirectory,
    open_directory,
)
from ras.broker.store import SQLiteStore
from ras.client.session import ClientSession
from ras.config import load
from ras.errors import AuthError, ConfigError, ErrorCode
from ras.net.channel import PeerError
from ras.pki import FarmPKI
from ras.protocol import AuthOk, Mode

ALICE = USERS["alice"]
ALICE_GROUPS = ("Ops, West", "engineers", "everyone", "staff")  # direct: engineers, Ops, West
HANG_GUARD_S = 30  # only a hang guard: every test finishes far sooner
MODE = Mode.GATEWAY  # a plain client-gateway leg: TLS there is test_farm.py's subject


@pytest.fixture(scope="session")
def slapd(tmp_path_factory):
    """One slapd for the tests that do not stop it."""
    require_slapd()
    with Slapd(tmp_path_factory.mktemp("slapd")) as server:
        yield server


@pytest.fixture
def own_slapd(tmp_path):
    """A slapd of the test's own, for tests that stop and restart it."""
    require_slapd()
    with Slapd(tmp_path / "slapd") as server:
        yield server


def config(server: Slapd, **changes: object) -> LdapConfig:
    settings: dict[str, object] = {
        "servers": (server.ldap_url(),),
        "base_dn": BASE,
        "allow_plaintext": True,
        "user_base_dn": f"ou=people,{BASE}",
        "group_base_dn": f"ou=groups,{BASE}",
        "connect_timeout_s": 2.0,
        "receive_timeout_s": 2.0,
        "operation_timeout_s": 10.0,
    }
    settings.update(changes)
    return LdapConfig(**settings)  # type: ignore[arg-type]


def directory(server: Slapd, **changes: object) -> LdapDirectory:
    return LdapDirectory(config(server, **changes))


async def login(d: LdapDirectory, user: str, password: str) -> Identity | None:
    with trio.fail_after(HANG_GUARD_S):
        return await d.authenticate(user, password)


# ---------------------------------------------------------------------------------------------
# Passwords and groups


async def test_right_password_gives_the_user_with_direct_and_nested_groups(slapd):
    identity = await login(directory(slapd), "alice", ALICE.password)
    assert identity == Identity("alice", ALICE_GROUPS, "ldap")


async def test_wrong_password_and_unknown_user_both_give_none(slapd, caplog):
    caplog.set_level(logging.INFO, "ras.broker.ldap")
    d = directory(slapd)
    assert await login(d, "alice", "not her password") is None
    assert await login(d, "mallory", ALICE.password) is None
    assert await login(d, "alice", USERS["bob"].password) is None  # another user's password
    text = caplog.text
    assert "user='alice'" in text and "reason=wrong password" in text  # noqa: PT018
    assert "user='mallory'" in text and "reason=no such user" in text  # noqa: PT018
    assert ALICE.password not in text and "not her password" not in text  # noqa: PT018


async def test_empty_password_is_refused_without_asking_the_server(tmp_path, caplog):
    caplog.set_level(logging.INFO, "ras.broker.ldap")
    # No server listens here: an answer other than None would have needed one.
    d = LdapDirectory(
        LdapConfig(servers=("ldap://127.0.0.1:1",), base_dn=BASE, allow_plaintext=True)
    )
    assert await login(d, "alice", "") is None
    assert "empty password (not sent)" in caplog.text
    assert "failed" not in caplog.text


async def test_user_with_groups_from_the_member_search_when_memberof_is_not_used(slapd):
    d = directory(slapd, memberof_attribute="")
    identity = await login(d, "alice", ALICE.password)
    assert identity is not None
    assert identity.groups == ALICE_GROUPS


async def test_nested_depth_bounds_the_walk_and_cycles_end(slapd, caplog):
    direct = await login(directory(slapd, nested_depth=0), "alice", ALICE.password)
    assert direct is not None
    assert direct.groups == ("Ops, West", "engineers")
    one = await login(directory(slapd, nested_depth=1), "alice", ALICE.password)
    assert one is not None
    assert one.groups == ("Ops, West", "engineers", "staff")
    assert "nest deeper than nested_depth=1" in caplog.text
    carol = await login(directory(slapd), "carol", USERS["carol"].password)  # loop-a <-> loop-b
    assert carol is not None
    assert carol.groups == ("loop-a", "loop-b")
    dave = await login(directory(slapd), "dave", USERS["dave"].password)
    assert dave == Identity("dave", (), "ldap")


async def test_user_found_by_samaccountname_or_upn(slapd):
    d = directory(
        slapd, user_attributes=("sAMAccountName", "userPrincipalName"), domains=("example.test",)
    )
    for typed in ("alice", "alice@example.test", "ALICE@Example.Test", "EXAMPLE.TEST\\alice"):
        identity = await login(d, typed, ALICE.password)
        assert identity is not None, typed
        assert identity.name == "alice"  # the sAMAccountName, however it was typed
        assert identity.groups == ALICE_GROUPS
    assert await login(d, "alice@other.test", ALICE.password) is None  # not a listed domain
    upn_only = directory(slapd, user_attributes=("userPrincipalName",))
    identity = await login(upn_only, "alice@example.test", ALICE.password)
    assert identity is not None
    assert identity.name == "alice@example.test"
    assert await login(upn_only, "alice", ALICE.password) is None


async def test_filter_injection_finds_nobody(slapd):
    d = directory(slapd)
    for typed in ("*", "ali*", "alice)(uid=*", "*)(|(uid=*", "alice\\", "\\2a"):
        assert await login(d, typed, ALICE.password) is None, typed


async def test_two_entries_for_one_name_is_a_denial_with_a_clear_log(slapd, caplog):
    with pytest.raises(DirectoryUnavailable, match="more than one entry for 'twin'"):
        await login(directory(slapd), "twin", USERS["twin1"].password)
    assert "matches 2 entries" in caplog.text
    assert "cn=Twin One" in caplog.text and "cn=Twin Two" in caplog.text  # noqa: PT018


async def test_service_account_search_and_a_wrong_service_password(slapd, tmp_path):
    good = tmp_path / "bind-password"
    good.write_text(SERVICE_PASSWORD + "\n")
    d = directory(slapd, bind_dn=SERVICE_DN, bind_password_file=good)
    assert await login(d, "alice", ALICE.password) == Identity("alice", ALICE_GROUPS, "ldap")
    bad = tmp_path / "wrong-password"
    bad.write_text("not the service password")
    d = directory(slapd, bind_dn=SERVICE_DN, bind_password_file=bad)
    with pytest.raises(DirectoryUnavailable, match="search bind as 'cn=ras-broker") as err:
        await login(d, "alice", ALICE.password)
    assert "not the service password" not in str(err.value)


async def test_lookup_without_password(slapd):
    d = directory(slapd)
    with trio.fail_after(HANG_GUARD_S):
        assert await d.lookup("alice") == Identity("alice", ALICE_GROUPS, "ldap")
        assert await d.lookup("nobody") is None


async def test_active_directory_mode_against_a_server_without_the_in_chain_rule(slapd, caplog):
    # OpenLDAP does not implement LDAP_MATCHING_RULE_IN_CHAIN and answers its filter with no
    # entry: the AD mode then keeps the direct groups (memberOf) and says what is wrong.
    identity = await login(directory(slapd, active_directory=True), "alice", ALICE.password)
    assert identity == Identity("alice", ("Ops, West", "engineers"), "ldap")
    assert "LDAP_MATCHING_RULE_IN_CHAIN search found no group" in caplog.text


# ---------------------------------------------------------------------------------------------
# TLS


async def test_ldaps_with_the_right_ca(slapd):
    d = directory(slapd, servers=(slapd.ldaps_url("localhost"),), ca_file=slapd.ca_file)
    assert await login(d, "alice", ALICE.password) == Identity("alice", ALICE_GROUPS, "ldap")


async def test_starttls_with_the_right_ca(slapd):
    d = directory(
        slapd,
        servers=(slapd.ldap_url("localhost"),),
        start_tls=True,
        allow_plaintext=False,
        ca_file=slapd.ca_file,
    )
    assert await login(d, "alice", ALICE.password) == Identity("alice", ALICE_GROUPS, "ldap")


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
async def test_a_wrong_ca_is_refused_never_a_plain_fallback(slapd, tmp_path, caplog, start_tls):
    other = FarmPKI(tmp_path / "other-ca")
    other.init_ca("Some Other CA")
    url = slapd.ldap_url("localhost") if start_tls else slapd.ldaps_url("localhost")
    d = directory(slapd, servers=(url,), start_tls=start_tls, ca_file=other.ca_path)
    with pytest.raises(DirectoryUnavailable, match="TLS certificate check failed") as err:
        await login(d, "alice", ALICE.password)
    assert url in str(err.value)
    assert f"ldap server={url} failed: TLS certificate check failed" in caplog.text


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
async def test_a_certificate_for_another_name_is_refused(slapd, start_tls):
    # The certificate names localhost; 127.0.0.1 is not in it.
    url = slapd.ldap_url("127.0.0.1") if start_tls else slapd.ldaps_url("127.0.0.1")
    d = directory(slapd, servers=(url,), start_tls=start_tls, ca_file=slapd.ca_file)
    with pytest.raises(DirectoryUnavailable, match=r"certificate check failed.*(?i:mismatch)"):
        await login(d, "alice", ALICE.password)


# ---------------------------------------------------------------------------------------------
# Failures: down, stopped, slow


async def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (it was bound a moment ago)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_failover_from_a_dead_first_server(slapd, caplog):
    dead = f"ldap://127.0.0.1:{await _closed_port()}"
    d = directory(slapd, servers=(dead, slapd.ldap_url()))
    assert await login(d, "alice", ALICE.password) == Identity("alice", ALICE_GROUPS, "ldap")
    assert f"ldap server={dead} failed" in caplog.text
    # A wrong password on the live server is an answer: no other server is asked after it.
    caplog.clear()
    d = directory(slapd, servers=(slapd.ldap_url(), dead))
    assert await login(d, "alice", "wrong") is None
    assert f"ldap server={dead}" not in caplog.text  # never tried


async def test_every_server_down_is_a_denial_naming_them(slapd):
    dead1 = f"ldap://127.0.0.1:{await _closed_port()}"
    dead2 = f"ldap://127.0.0.1:{await _closed_port()}"
    d = directory(slapd, servers=(dead1, dead2))
    with pytest.raises(DirectoryUnavailable) as err:
        await login(d, "alice", ALICE.password)
    assert dead1 in str(err.value) and dead2 in str(err.value)  # noqa: PT018
    assert "refused" in str(err.value).lower()


async def test_slapd_stopped_mid_test_then_restarted(own_slapd, caplog):
    d = directory(own_slapd)
    assert await login(d, "alice", ALICE.password) is not None
    own_slapd.stop()
    with pytest.raises(DirectoryUnavailable, match=re.escape(own_slapd.ldap_url())):
        await login(d, "alice", ALICE.password)
    assert f"ldap server={own_slapd.ldap_url()} failed" in caplog.text
    own_slapd.start()
    assert await login(d, "bob", USERS["bob"].password) == Identity(
        "bob", ("everyone", "staff"), "ldap"
    )


class Hanging:
    """A TCP listener that accepts and never answers (and never closes first); or, given
    ``reply``, answers anything with those bytes."""

    def __init__(self, reply: bytes = b"") -> None:
        self.accepted = 0
        self.url = ""
        self.reply = reply

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"ldap://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

        async def hold(stream: trio.SocketStream) -> None:
            self.accepted += 1
            async with stream:
                if self.reply:
                    await stream.receive_some()
                    await stream.send_all(self.reply)
                await trio.sleep_forever()

        task_status.started()
        await trio.serve_listeners(hold, listeners)


async def test_a_hanging_server_is_a_denial_within_its_timeout(slapd, nursery, caplog):
    hang = Hanging()
    await nursery.start(hang.serve)
    d = directory(slapd, servers=(hang.url,), receive_timeout_s=1.0, operation_timeout_s=10.0)
    with pytest.raises(DirectoryUnavailable, match="timed out") as err:
        await login(d, "alice", ALICE.password)
    assert hang.url in str(err.value)
    assert hang.accepted == 1
    # ... and with a live server after it, the hanging one is passed over.
    d = directory(slapd, servers=(hang.url, slapd.ldap_url()), receive_timeout_s=1.0)
    assert await login(d, "alice", ALICE.password) == Identity("alice", ALICE_GROUPS, "ldap")


async def test_a_server_answering_garbage_is_a_denial_and_the_next_one_is_asked(slapd, nursery):
    junk = Hanging(b"\x30\x03\x01\x01\xff")  # well-framed BER, but no LDAP message
    await nursery.start(junk.serve)
    d = directory(slapd, servers=(junk.url,), receive_timeout_s=1.0)
    with pytest.raises(DirectoryUnavailable, match=re.escape(junk.url)) as err:
        await login(d, "alice", ALICE.password)
    assert "unreadable answer" in str(err.value)  # ldap3 raised IndexError: still a denial
    d = directory(slapd, servers=(junk.url, slapd.ldap_url()), receive_timeout_s=1.0)
    assert await login(d, "alice", ALICE.password) == Identity("alice", ALICE_GROUPS, "ldap")


async def test_the_operation_deadline_bounds_a_hanging_server(slapd, nursery):
    hang = Hanging()
    await nursery.start(hang.serve)
    # The receive timeout alone would let this wait 30 s; the operation deadline is 1 s.
    d = directory(slapd, servers=(hang.url,), receive_timeout_s=30.0, operation_timeout_s=1.0)
    with pytest.raises(DirectoryUnavailable, match="did not answer within 1 s"):
        await login(d, "alice", ALICE.password)


async def test_a_hanging_ldaps_handshake_is_a_denial(slapd, nursery):
    hang = Hanging()
    await nursery.start(hang.serve)
    url = hang.url.replace("ldap://", "ldaps://")
    d = directory(slapd, servers=(url,), ca_file=slapd.ca_file, receive_timeout_s=1.0)
    with pytest.raises(DirectoryUnavailable, match=r"TLS handshake failed.*timed out"):
        await login(d, "alice", ALICE.password)


# ---------------------------------------------------------------------------------------------
# Configuration


BROKER_TOML = """\
database = "broker.sqlite3"
cert_file = "broker.pem"
key_file = "broker.key"
ca_file = "ca.pem"
"""


def test_broker_config_with_an_ldap_table(tmp_path):
    (tmp_path / "broker.toml").write_text(
        BROKER_TOML
        + """
[ldap]
servers = ["ldaps://dc1.example.test", "ldaps://dc2.example.test:3269"]
base_dn = "dc=example,dc=test"
bind_dn = "cn=ras,ou=services,dc=example,dc=test"
bind_password_file = "ldap-password"
ca_file = "ad-ca.pem"
user_attributes = ["sAMAccountName", "userPrincipalName"]
domains = ["example.test", "EXAMPLE"]
active_directory = true
"""
    )
    cfg = load(BrokerConfig, tmp_path / "broker.toml")
    assert cfg.ldap is not None
    assert cfg.ldap.bind_password_file == tmp_path / "ldap-password"
    assert [(s.host, s.port, s.ldaps) for s in cfg.ldap.parsed_servers] == [
        ("dc1.example.test", 636, True),
        ("dc2.example.test", 3269, True),
    ]
    no_ldap = tmp_path / "plain.toml"
    no_ldap.write_text(BROKER_TOML)
    assert load(BrokerConfig, no_ldap).ldap is None


def test_the_commented_ldap_example_loads(tmp_path):
    example = Path(__file__).parent.parent / "deploy" / "examples" / "broker.toml"
    text = example.read_text()
    block = text[text.index("# [ldap]") :].split("\n\n")[0].splitlines()  # to its blank line
    path = tmp_path / "broker.toml"
    path.write_text(BROKER_TOML + "\n".join(re.sub(r"^# ?", "", line) for line in block))
    ldap = load(BrokerConfig, path).ldap
    assert ldap is not None
    assert ldap.active_directory
    assert ldap.user_attributes == ("sAMAccountName", "userPrincipalName")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('servers = []\nbase_dn = "dc=x"', "key 'ldap.servers': name at least one"),
        ('servers = ["http://x"]\nbase_dn = "dc=x"', "key 'ldap.servers[0]'"),
        ('servers = ["ldap://x"]\nbase_dn = "dc=x"', "passwords in clear text"),
        ('servers = ["ldaps://x"]\nbase_dn = "x"', "key 'ldap.base_dn'"),
        ('servers = ["ldaps://x"]\nbase_dn = "dc=x"\nbind_dn = "cn=a"', "bind_password_file"),
        ('servers = ["ldaps://x"]\nbase_dn = "dc=x"\nuser_filter = "uid=*"', "ldap.user_filter"),
        ('servers = ["ldaps://x"]\nbase_dn = "dc=x"\nuser_attributes = ["u id"]', "[0]"),
        ('servers = ["ldaps://x"]\nbase_dn = "dc=x"\nnested_depth = 99', "ldap.nested_depth"),
        ('servers = ["ldaps://x"]\nbase_dn = "dc=x"\nbind_pasword_file = "p"', "unknown key"),
    ],
)
def test_ldap_config_errors_name_file_and_key(tmp_path, table, message):
    path = tmp_path / "broker.toml"
    path.write_text(BROKER_TOML + "\n[ldap]\n" + table + "\n")
    with pytest.raises(ConfigError, match=r"broker\.toml") as err:
        load(BrokerConfig, path)
    assert message in str(err.value)


def _broker_config(tmp_path: Path, ldap: LdapConfig | None) -> BrokerConfig:
    return BrokerConfig(
        database=tmp_path / "b.sqlite3",
        cert_file=tmp_path / "b.pem",
        key_file=tmp_path / "b.key",
        ca_file=tmp_path / "ca.pem",
        ldap=ldap,
    )


def test_open_directory_picks_ldap_or_the_builtin_store(tmp_path):
    store = SQLiteStore(tmp_path / "b.sqlite3")
    try:
        assert isinstance(open_directory(_broker_config(tmp_path, None), store), BuiltinDirectory)
        ldap = LdapConfig(servers=("ldaps://dc1.example.test",), base_dn=BASE)
        assert isinstance(open_directory(_broker_config(tmp_path, ldap), store), LdapDirectory)
        missing = dataclasses.replace(
            ldap, bind_dn="cn=ras,dc=example,dc=test", bind_password_file=tmp_path / "nope"
        )
        with pytest.raises(ConfigError, match="nope: cannot read the LDAP bind password"):
            open_directory(_broker_config(tmp_path, missing), store)
        empty = tmp_path / "empty"
        empty.write_text("\n")
        with pytest.raises(ConfigError, match="file is empty"):
            LdapDirectory(dataclasses.replace(missing, bind_password_file=empty))
        with pytest.raises(ConfigError, match=r"ldap\.ca_file"):
            LdapDirectory(dataclasses.replace(ldap, ca_file=tmp_path / "no-ca.pem"))
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# Through the farm: client -> gateway -> broker -> slapd

RESOURCES = (
    ResourceConfig("desktop", "Desktop"),  # every authenticated user
    ResourceConfig("eng", "Engineering desktop", groups=("engineers",)),  # alice's direct group
    ResourceConfig("everyone", "Company desktop", groups=("everyone",)),  # two levels up
)


async def farm_login(f, user: str, password: str) -> tuple[ClientSession, AuthOk]:
    session = await ClientSession.connect(f.client_config(mode=MODE))
    try:
        with trio.fail_after(HANG_GUARD_S):
            return session, await session.authenticate(user, password)
    except BaseException:
        await session.aclose()
        raise


async def test_farm_login_with_an_ldap_user_sees_what_its_groups_allow(
    own_slapd, tmp_path, nursery
):
    host = Listener()
    await nursery.start(host.serve)
    ldap = config(own_slapd, servers=(own_slapd.ldaps_url("localhost"),), ca_file=own_slapd.ca_file)
    async with farm(
        tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], resources=RESOURCES, ldap=ldap
    ) as f:
        session, ok = await farm_login(f, "alice", ALICE.password)
        async with session:
            assert ok.user == "alice"
            assert set(ALICE_GROUPS) <= set(ok.groups)
            assert [r.id for r in await session.list_resources()] == ["desktop", "eng", "everyone"]
            launched = await session.launch("eng")
            assert launched.port == host.port
        session, ok = await farm_login(f, "bob", USERS["bob"].password)
        async with session:
            assert [r.id for r in await session.list_resources()] == ["desktop", "everyone"]
            with pytest.raises(PeerError) as err:  # not in engineers: not published to bob
                await session.launch("eng")
            assert err.value.code is ErrorCode.NOT_FOUND
        async with await ClientSession.connect(f.client_config(mode=MODE)) as session:
            with pytest.raises(AuthError) as failed:
                await session.authenticate("alice", "not her password")
            assert failed.value.code is ErrorCode.AUTH_FAILED
        async with await ClientSession.connect(f.client_config(mode=MODE)) as session:
            with pytest.raises(AuthError) as unknown:
                await session.authenticate("mallory", ALICE.password)
            assert unknown.value.code is ErrorCode.AUTH_FAILED
            assert str(unknown.value) == str(failed.value)  # the same answer for both


async def test_farm_slapd_stopped_denies_logins_and_the_broker_keeps_serving(
    own_slapd, tmp_path, caplog
):
    async with farm(tmp_path, resources=RESOURCES, ldap=config(own_slapd)) as f:
        before, _ = await farm_login(f, "alice", ALICE.password)
        async with before:
            own_slapd.stop()
            async with await ClientSession.connect(f.client_config(mode=MODE)) as session:
                with pytest.raises(PeerError) as err, trio.fail_after(HANG_GUARD_S):
                    await session.authenticate("bob", USERS["bob"].password)
            assert err.value.code is ErrorCode.UNAVAILABLE
            assert "directory cannot be reached" in err.value.error.message
            assert "auth unavailable user=bob" in caplog.text
            assert f"ldap server={own_slapd.ldap_url()} failed" in caplog.text
            # The broker still answers: the session opened before goes on working...
            assert [r.id for r in await before.list_resources()] == ["desktop", "eng", "everyone"]
            own_slapd.start()
            # ... and a login after slapd is back works.
            session, ok = await farm_login(f, "bob", USERS["bob"].password)
            async with session:
                assert ok.user == "bob"
