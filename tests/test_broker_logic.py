"""The broker's pure logic and its state: tickets, host choice, password hashes, the SQLite store.

Tickets and host choice take the clock as an argument, so every test states the time; nothing
here sleeps. The store runs on a real SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import string
import time
from collections import Counter

import pytest

from ras.broker.hosts import HostRegistry
from ras.broker.passwords import hash_password, verify_password
from ras.broker.store import SQLiteStore, UserRecord
from ras.broker.tickets import TicketAuthority, TicketClaims
from ras.errors import TicketError
from ras.protocol import HostKind, LoadReport

KEY = bytes(range(32))
NOW = 1_700_000_000.0


def issue(ta: TicketAuthority, now: float = NOW, ttl_s: float = 60.0) -> tuple[str, TicketClaims]:
    return ta.issue(
        user="alice",
        resource="desktop",
        host="10.0.0.5",
        port=3389,
        gateway="gw1",
        client="192.0.2.7",
        now=now,
        ttl_s=ttl_s,
    )


# -- tickets ------------------------------------------------------------------------------------


def test_ticket_verifies_and_carries_its_claims():
    ta = TicketAuthority(KEY)
    token, claims = issue(ta)
    assert token.startswith("t1.")
    assert token.count(".") == 2
    got = ta.verify(token, now=NOW)
    assert got == claims
    assert (got.user, got.resource, got.host, got.port, got.gateway, got.client) == (
        "alice", "desktop", "10.0.0.5", 3389, "gw1", "192.0.2.7",
    )  # fmt: skip
    assert got.expires == NOW + 60
    # Another authority with the same key (the broker after a restart) accepts it too.
    assert TicketAuthority(bytes(KEY)).verify(token, now=NOW + 1) == claims


def test_every_ticket_has_its_own_id():
    ta = TicketAuthority(KEY)
    ids = {issue(ta)[1].id for _ in range(200)}
    assert len(ids) == 200


def test_ticket_expires_exactly_at_its_expiry_time():
    ta = TicketAuthority(KEY)
    token, claims = issue(ta, ttl_s=30)
    assert ta.verify(token, now=claims.expires - 0.001) == claims
    with pytest.raises(TicketError, match="expired"):
        ta.verify(token, now=claims.expires)
    with pytest.raises(TicketError, match="expired"):
        ta.verify(token, now=claims.expires + 3600)


def test_any_single_character_change_is_refused():
    ta = TicketAuthority(KEY)
    token, _ = issue(ta)
    alphabet = string.ascii_letters + string.digits + "-_.=+/ "
    accepted = []
    for i, original in enumerate(token):
        for ch in alphabet:
            if ch == original:
                continue
            changed = token[:i] + ch + token[i + 1 :]
            try:
                ta.verify(changed, now=NOW)
            except TicketError:
                continue
            accepted.append((i, original, ch))
    assert accepted == [], f"{len(accepted)} altered tokens accepted, e.g. {accepted[:3]}"


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t[:-1],
        lambda t: t + "A",
        lambda t: t + ".",
        lambda t: "t2" + t[2:],
        lambda t: t.replace(".", "", 1),
        lambda t: "",
        lambda t: "...",
        lambda t: t.split(".")[0] + "." + t.split(".")[1] + ".",
    ],
)
def test_truncated_or_extended_tokens_are_refused(change):
    ta = TicketAuthority(KEY)
    token, _ = issue(ta)
    with pytest.raises(TicketError):
        ta.verify(change(token), now=NOW)


@pytest.mark.parametrize("odd", ["\u00e9", "\udc80", "\x00", "\uff21"])
@pytest.mark.parametrize("part", [0, 1, 2])
def test_non_ascii_in_any_part_is_a_ticket_error(odd, part):
    ta = TicketAuthority(KEY)
    parts = issue(ta)[0].split(".")
    parts[part] += odd
    with pytest.raises(TicketError):
        ta.verify(".".join(parts), now=NOW)


def test_claims_changed_without_the_key_are_refused():
    ta = TicketAuthority(KEY)
    token, _claims = issue(ta)
    prefix, body, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert data["user"] == "alice"
    data["host"] = "10.0.0.99"  # a different target, same signature
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(TicketError):
        ta.verify(f"{prefix}.{forged}.{mac}", now=NOW)


def test_ticket_from_another_key_is_refused():
    token, _ = issue(TicketAuthority(b"\x01" * 32))
    with pytest.raises(TicketError):
        TicketAuthority(KEY).verify(token, now=NOW)


def test_short_ticket_key_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        TicketAuthority(b"x" * 31)
    with pytest.raises(ValueError, match="32 bytes"):
        TicketAuthority(b"")
    TicketAuthority(b"x" * 32)  # the minimum is fine


# -- host choice --------------------------------------------------------------------------------


def registry(*names: str, max_sessions: int = 50, now: float = 0.0) -> HostRegistry:
    reg = HostRegistry(timeout_s=20.0)
    for name in names:
        reg.register(name, HostKind.RDSH, f"10.0.0.{len(reg.hosts) + 1}", 3389, max_sessions, now)
    return reg


def load(cpu: float = 0.0, mem: float = 0.0, sessions: int = 0, disc: int = 0) -> LoadReport:
    return LoadReport(cpu_percent=cpu, memory_percent=mem, sessions=sessions, disconnected=disc)


def test_least_loaded_host_wins_by_the_combined_score():
    reg = registry("busy-cpu", "many-sessions")
    # busy-cpu: 0.5*0/50 + 0.25*0.9 + 0.25*0.9 = 0.45; many-sessions: 0.5*20/50 + 0 + 0 = 0.2
    reg.report("busy-cpu", load(cpu=90, mem=90), now=1)
    reg.report("many-sessions", load(sessions=20), now=1)
    assert reg.hosts["busy-cpu"].score == pytest.approx(0.45)
    assert reg.hosts["many-sessions"].score == pytest.approx(0.2)
    host = reg.pick(now=2)
    assert host is not None
    assert host.name == "many-sessions"
    assert (host.rdp_host, host.rdp_port) == ("10.0.0.2", 3389)


def test_sessions_weigh_half_cpu_and_memory_a_quarter_each():
    reg = registry("a", "b")
    # a: 0.5*10/50 = 0.1; b: 0.25*0.2 + 0.25*0.2 = 0.1 + a hair -> a wins
    reg.report("a", load(sessions=10), now=1)
    reg.report("b", load(cpu=20, mem=20.4), now=1)
    assert reg.pick(now=1).name == "a"  # type: ignore[union-attr]
    reg2 = registry("a", "b")
    reg2.report("a", load(sessions=10), now=1)
    reg2.report("b", load(cpu=20, mem=19.6), now=1)
    assert reg2.pick(now=1).name == "b"  # type: ignore[union-attr]


def test_ties_go_to_the_name():
    reg = registry("zeta", "alpha", "mid")
    assert reg.pick(now=0).name == "alpha"  # type: ignore[union-attr]


def test_a_burst_of_launches_spreads_across_hosts_before_the_next_report():
    reg = registry("h1", "h2", "h3")
    picks = Counter(reg.pick(now=1).name for _ in range(30))  # type: ignore[union-attr]
    assert picks == {"h1": 10, "h2": 10, "h3": 10}


def test_a_report_replaces_the_pending_count():
    reg = registry("h1", "h2")
    for _ in range(4):
        reg.pick(now=1)
    assert reg.hosts["h1"].pending == 2
    assert reg.hosts["h2"].pending == 2
    reg.report("h1", load(sessions=2), now=2)  # the two launches arrived as sessions
    assert reg.hosts["h1"].pending == 0
    reg.report("h2", load(sessions=0), now=2)  # the two launches never arrived
    assert reg.pick(now=3).name == "h2"  # type: ignore[union-attr]


def test_a_silent_host_gets_nothing():
    reg = registry("quiet", "loud")
    reg.report("loud", load(cpu=99, mem=99, sessions=40), now=15)
    # "quiet" reported at 0 (registration); timeout is 20 s.
    assert reg.pick(now=20).name == "quiet"  # type: ignore[union-attr]
    assert reg.pick(now=20.5).name == "loud"  # type: ignore[union-attr]
    assert reg.pick(now=35.5) is None  # loud is silent too now
    reg.report("quiet", load(), now=36)
    assert reg.pick(now=36).name == "quiet"  # type: ignore[union-attr]


def test_an_offline_host_gets_nothing():
    reg = registry("h1", "h2")
    h1 = reg.hosts["h1"]
    reg.disconnect("h1", h1)
    assert [reg.pick(now=1).name for _ in range(3)] == ["h2"] * 3  # type: ignore[union-attr]
    # The agent reconnects (a new registration); the old connection's end must not take
    # the new one offline.
    reg.register("h1", HostKind.RDSH, "10.0.0.1", 3389, 50, now=2)
    reg.disconnect("h1", h1)
    assert reg.pick(now=2).name == "h1"  # type: ignore[union-attr]


def test_a_full_host_gets_nothing():
    reg = registry("small", "big", max_sessions=4)
    # "sessions" counts the disconnected ones too (protocol: "of which disconnected"): they
    # hold their seats.
    reg.report("small", load(sessions=4, disc=3), now=1)
    reg.report("big", load(cpu=90, mem=90, sessions=3), now=1)
    assert reg.pick(now=1).name == "big"  # type: ignore[union-attr]
    assert reg.pick(now=1) is None  # big is full with the pending launch
    reg.report("small", load(sessions=3, disc=3), now=2)
    assert reg.pick(now=2).name == "small"  # type: ignore[union-attr]
    assert reg.pick(now=2) is None


def test_names_restrict_the_choice():
    reg = registry("h1", "h2", "h3")
    reg.report("h3", load(cpu=80, mem=80, sessions=30), now=1)
    assert reg.pick(now=1, names=["h3"]).name == "h3"  # type: ignore[union-attr]
    picks = {reg.pick(now=1, names=("h2", "h3")).name for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {"h2"}
    assert reg.pick(now=1, names=["nope"]) is None
    assert reg.pick(now=1).name == "h1"  # type: ignore[union-attr]


def test_no_hosts_no_choice():
    assert HostRegistry(timeout_s=20).pick(now=0) is None


# -- password hashes ----------------------------------------------------------------------------


def test_password_verifies_and_a_wrong_one_does_not():
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("Correct horse", stored)
    assert not verify_password("", stored)


def test_unicode_password():
    stored = hash_password("pässwörd ✓")
    assert verify_password("pässwörd ✓", stored)
    assert not verify_password("passwo\u0308rd ✓", stored)


def test_unknown_user_never_verifies():
    assert verify_password("no user has this password", None) is False
    assert verify_password("anything", None) is False


def test_hash_format():
    stored = hash_password("secret")
    scheme, log2_n, r, p, salt, digest = stored.split("$")
    assert (scheme, log2_n, r, p) == ("scrypt", "14", "8", "1")
    assert len(base64.b64decode(salt, validate=True)) == 16
    assert len(base64.b64decode(digest, validate=True)) == 32
    assert "secret" not in stored
    assert hash_password("secret") != stored  # a fresh salt every time
    cheap = hash_password("secret", log2_n=10)
    assert cheap.split("$")[1] == "10"
    assert verify_password("secret", cheap)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "secret",
        "$$$$$",
        "scrypt$14$8$1$c2FsdA==",
        "scrypt$14$8$1$c2FsdA==$aGFzaA==$extra",
        "bcrypt$14$8$1$c2FsdA==$aGFzaA==",
        "scrypt$x$8$1$c2FsdA==$aGFzaA==",
        "scrypt$14$8$1$not base64!$aGFzaA==",
        "scrypt$14$8$1$c2FsdA==$",
        "scrypt$0$8$1$c2FsdA==$aGFzaA==",
        "scrypt$-3$8$1$c2FsdA==$aGFzaA==",
        "scrypt$14$0$1$c2FsdA==$aGFzaA==",
        "scrypt$40$8$1$c2FsdA==$aGFzaA==",  # would need terabytes of memory
        "scrypt$14$8$1$c2FsdA==$aGFzaA",  # bad padding
    ],
)
def test_malformed_stored_hash_never_verifies(stored):
    assert verify_password("secret", stored) is False


def test_hash_with_another_password_in_a_valid_shape_does_not_verify():
    a, b = hash_password("a", log2_n=10), hash_password("b", log2_n=10)
    spliced = "$".join(a.split("$")[:5] + b.split("$")[5:])  # a's salt with b's digest
    assert not verify_password("a", spliced)
    assert not verify_password("b", spliced)


# -- the SQLite store ---------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state" / "broker.sqlite3"


def test_users_round_trip(db):
    store = SQLiteStore(db)
    try:
        alice = UserRecord("alice", hash_password("a", log2_n=10), ("users", "admins"))
        bob = UserRecord("bob", hash_password("b", log2_n=10), (), enabled=False)
        store.put_user(bob)
        store.put_user(alice)
        assert store.get_user("alice") == alice
        assert store.get_user("bob") == bob
        assert store.get_user("carol") is None
        assert store.list_users() == [alice, bob]  # sorted by name
        changed = UserRecord("alice", alice.password_hash, ("users",), enabled=False)
        store.put_user(changed)
        assert store.get_user("alice") == changed
        assert len(store.list_users()) == 2
    finally:
        store.close()
    store = SQLiteStore(db)  # and it is all on disk
    try:
        assert store.get_user("alice") == changed
        assert store.get_user("bob") == bob
    finally:
        store.close()


def test_user_names_are_case_insensitive(db):
    store = SQLiteStore(db)
    try:
        store.put_user(UserRecord("Alice", "h1", ("users",)))
        got = store.get_user("ALICE")
        assert got is not None
        assert got.name == "Alice"
        assert got.password_hash == "h1"
        store.put_user(UserRecord("alice", "h2"))  # the same user, updated
        assert [u.password_hash for u in store.list_users()] == ["h2"]
        assert store.delete_user("aLiCe") is True
        assert store.get_user("Alice") is None
    finally:
        store.close()


def test_delete_user(db):
    store = SQLiteStore(db)
    try:
        store.put_user(UserRecord("bob", "h"))
        store.put_user(UserRecord("carol", "h"))
        assert store.delete_user("bob") is True
        assert store.delete_user("bob") is False
        assert store.delete_user("nobody") is False
        assert [u.name for u in store.list_users()] == ["carol"]
    finally:
        store.close()


def test_secrets_are_random_named_and_stable_across_reopen(db):
    store = SQLiteStore(db)
    try:
        key = store.secret("ticket-key")
        assert len(key) == 32
        assert store.secret("ticket-key") == key
        other = store.secret("other", size=48)
        assert len(other) == 48
        assert other != key[:48]
    finally:
        store.close()
    store = SQLiteStore(db)
    try:
        assert store.secret("ticket-key") == key
        assert store.secret("other", size=48) == other
    finally:
        store.close()
    elsewhere = SQLiteStore(db.parent / "other.sqlite3")
    try:
        assert elsewhere.secret("ticket-key") != key  # each farm its own key
    finally:
        elsewhere.close()


def test_a_ticket_is_redeemed_once_even_across_a_restart(db):
    expires = time.time() + 60
    store = SQLiteStore(db)
    try:
        assert store.redeem_once("ticket-1", expires) is True
        assert store.redeem_once("ticket-1", expires) is False
        assert store.redeem_once("ticket-2", expires) is True
    finally:
        store.close()
    store = SQLiteStore(db)
    try:
        assert store.redeem_once("ticket-1", expires) is False
        assert store.redeem_once("ticket-2", expires) is False
        assert store.redeem_once("ticket-3", expires) is True
    finally:
        store.close()


def test_store_files_are_private_even_with_a_permissive_umask(db):
    old = os.umask(0)
    try:
        store = SQLiteStore(db)
        try:
            store.secret("ticket-key")
            store.put_user(UserRecord("alice", "h"))
            files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
            assert db in files
            for path in files:  # the database and its -wal/-shm companions
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        finally:
            store.close()
    finally:
        os.umask(old)


# -- everything configured survives a restart ---------------------------------------------------


async def test_what_an_administrator_configures_survives_a_broker_restart(tmp_path):
    from farmkit import farm

    from ras.broker.model import (
        Balancing,
        Factor,
        FactorRule,
        Filter,
        GroupRecord,
        HostRecord,
        PoolRecord,
        ResourceKind,
        ResourceRecord,
    )  # fmt: skip
    from ras.broker.server import Broker

    configured = [
        GroupRecord("Staff", ("alice", "bob"), "office staff"),
        PoolRecord("rr", Balancing.ROUND_ROBIN),
        HostRecord("h1", pools=("rr",), max_sessions=3),
        ResourceRecord("calc", "Calculator", ResourceKind.APPLICATION, command="calc.exe",
                       pools=("rr",), filter=Filter(groups=("staff",), clients=("10.0.0.0/8",))),
        FactorRule("outside", Factor.RADIUS, Filter(clients=("0.0.0.0/0",)), order=5),
    ]  # fmt: skip
    async with farm(tmp_path) as f:
        for record in configured:
            f.store.put_object(record)
        await f.broker.catalog.drain_host("h2", True)  # a host no agent has registered yet
        config = f.broker.config
    store = SQLiteStore(config.database)
    try:
        broker = Broker(config, store)
        for record in configured:
            assert store.get_object(type(record), record.key.upper()) == record
        assert store.get_object(HostRecord, "h2") == HostRecord("h2", drained=True)
        assert [r.id for r in broker.catalog.resources()] == ["desktop", "calc"]
        assert broker.catalog.resource_origins() == {"desktop": "config", "calc": "store"}
        assert broker.hosts.pool_members("RR") == ["h1"]
        assert broker.hosts.settings["h2"].drained
        assert store.delete_object(PoolRecord, "RR") is True
        assert store.list_objects(PoolRecord) == []
    finally:
        store.close()


def test_a_damaged_stored_record_is_a_clear_state_error(db):
    from ras.broker.model import HostRecord
    from ras.broker.store import StateError

    store = SQLiteStore(db)
    try:
        store.put_object(HostRecord("h1"))
        store._db.execute('UPDATE objects SET body = \'{"name": "h1", "colour": 1}\'')
        with pytest.raises(StateError, match="stored host 'h1' is damaged: colour: unknown"):
            store.list_objects(HostRecord)
    finally:
        store.close()
