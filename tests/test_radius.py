"""The RADIUS second factor: packets on plain bytes, then the client against a real FreeRADIUS
that each test configures and starts (tests/radiuskit.py), then the farm end to end."""

from __future__ import annotations

import hashlib
import logging
import re
import socket
from pathlib import Path

import pytest
import trio
from farmkit import PASSWORD, USER, farm
from hypothesis import given
from hypothesis import strategies as st
from pyrad import packet as rad
from radiuskit import (
    CHALLENGE_PASSWORD,
    CHALLENGE_USER,
    CODE,
    DENIED,
    GUARD_S,
    PAP_PASSWORD,
    PAP_USER,
    PROMPT,
    SECRET,
    WELCOME,
    FreeRadius,
    farm_radius,
    free_udp_port,
    freeradius,
)

from ras.broker.config import BrokerConfig
from ras.broker.passwords import hash_password
from ras.broker.radius import (
    Accept,
    Challenge,
    IgnoredResponse,
    RadiusClient,
    RadiusConfig,
    RadiusUnavailable,
    Reject,
    dictionary,
    encode_request,
    parse_server,
    read_response,
)
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.config import load
from ras.errors import AuthError, ConfigError, ErrorCode, RasError
from ras.protocol import AuthChallenge

EXAMPLES = Path(__file__).parent.parent / "deploy" / "examples"
SECRET_B = SECRET.encode()


def client(*servers: str, secret_file, **options) -> RadiusClient:
    """A client with room for a busy machine: a live server's answer never comes too late."""
    options = {"timeout_s": 2.0, "retries": 1, **options}
    return RadiusClient(RadiusConfig(tuple(servers), secret_file, **options))


# --- packets on plain bytes -------------------------------------------------------------------


def request(**kw):
    return encode_request(SECRET_B, "alice", "s3cret pass", nas_identifier="ras-test", **kw)


def reply_to(req, code=rad.AccessAccept, *, secret=SECRET_B, sign=True, **attributes):
    """What a server with ``secret`` would answer to ``req`` (pyrad's server side)."""
    reply = rad.AuthPacket(code, req.id, secret, req.authenticator, dict=dictionary())
    for key, value in attributes.items():
        reply[key.replace("_", "-")] = value
    if sign:
        reply.add_message_authenticator()
    return reply.ReplyPacket()


def test_request_hides_the_password_and_is_signed():
    req = request(state=b"0x3132", calling_station="192.0.2.7", nas_ip_address="10.0.0.2")
    raw = req.RequestPacket()
    assert b"s3cret" not in raw
    seen = rad.AuthPacket(secret=SECRET_B, dict=dictionary(), packet=raw)
    assert seen.PwDecrypt(seen[2][0]) == "s3cret pass"
    assert seen.verify_message_authenticator()
    assert seen["User-Name"] == ["alice"]
    assert seen["NAS-Identifier"] == ["ras-test"]
    assert seen["NAS-IP-Address"] == ["10.0.0.2"]
    assert seen["Calling-Station-Id"] == ["192.0.2.7"]
    # State goes back byte for byte, even when it looks like hex to pyrad
    assert seen[24] == [b"0x3132"]
    # a wrong secret cannot produce this signature
    other = rad.AuthPacket(secret=b"wrong", dict=dictionary(), packet=raw)
    assert not other.verify_message_authenticator()


def test_password_and_name_that_pap_cannot_carry_are_refused():
    with pytest.raises(ValueError, match="128 bytes"):
        encode_request(SECRET_B, "alice", "x" * 129, nas_identifier="n")
    with pytest.raises(ValueError, match="user name"):
        encode_request(SECRET_B, "", "x", nas_identifier="n")


def test_answers_are_read():
    req = request()
    ok = reply_to(req, Reply_Message=b"Welcome")
    assert read_response(req, ok, require_message_authenticator=True) == Accept("Welcome")
    no = reply_to(req, rad.AccessReject)
    assert read_response(req, no, require_message_authenticator=True) == Reject("")
    challenge = reply_to(
        req,
        rad.AccessChallenge,
        Reply_Message=b"Enter the\r\ncode\x07 from your token",
        State=b"\x00\x01state",
        Prompt="No-Echo",
    )
    got = read_response(req, challenge, require_message_authenticator=True)
    assert got == Challenge("Enter the code from your token", b"\x00\x01state", echo=False)


def test_answers_that_are_not_ours_are_ignored():
    req = request()
    forged = reply_to(req, secret=b"not the secret")
    with pytest.raises(IgnoredResponse, match="shared secret"):
        read_response(req, forged, require_message_authenticator=False)
    other_id = bytearray(reply_to(req))
    other_id[1] ^= 1
    with pytest.raises(IgnoredResponse, match="identifier"):
        read_response(req, bytes(other_id), require_message_authenticator=False)
    with pytest.raises(IgnoredResponse, match="too short"):
        read_response(req, b"\x02" * 19, require_message_authenticator=False)
    unsigned = reply_to(req, sign=False)
    with pytest.raises(IgnoredResponse, match="no Message-Authenticator"):
        read_response(req, unsigned, require_message_authenticator=True)
    assert read_response(req, unsigned, require_message_authenticator=False) == Accept()
    accounting = reply_to(req, rad.AccountingResponse)
    with pytest.raises(IgnoredResponse, match="code 5"):
        read_response(req, accounting, require_message_authenticator=False)


_REQ = request()
_GOOD = reply_to(_REQ, rad.AccessChallenge, Reply_Message=b"Code?", State=b"s" * 16)


@given(st.integers(0, len(_GOOD) - 1), st.integers(1, 255))
def test_any_changed_byte_makes_an_answer_ignored(index, delta):
    """Header, authenticator and attributes are all covered: a changed byte is never read as
    another answer (a spoofed Reject or Accept), only ignored."""
    data = bytearray(_GOOD)
    data[index] = (data[index] + delta) % 256
    with pytest.raises(IgnoredResponse):
        read_response(_REQ, bytes(data), require_message_authenticator=True)


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("radius.lab", ("radius.lab", 1812)),
        ("10.0.0.5:1645", ("10.0.0.5", 1645)),
        ("[2001:db8::5]:1812", ("2001:db8::5", 1812)),
        ("2001:db8::5", ("2001:db8::5", 1812)),
    ],
)
def test_server_addresses(text, address):
    assert parse_server(text) == address


def test_the_example_radius_table_loads(tmp_path):
    """The commented-out [radius] example in deploy/examples/broker.toml, uncommented, is a
    valid configuration."""
    text = (EXAMPLES / "broker.toml").read_text()
    start = text.index("# [radius]")
    end = text.find("\n\n", start)  # the block ends at a blank line or the end
    end = len(text) if end < 0 else end
    block = "\n".join(line.removeprefix("# ") for line in text[start:end].splitlines())
    path = tmp_path / "broker.toml"
    path.write_text(text[:start] + text[end:] + "\n" + block + "\n")
    cfg = load(BrokerConfig, path)
    assert cfg.radius is not None
    assert cfg.radius.addresses == (("10.0.0.5", 1812), ("10.0.0.6", 1812))
    assert cfg.radius.require_message_authenticator


def _broker_toml(tmp_path, radius: str):
    path = tmp_path / "broker.toml"
    path.write_text(
        'database = "b.db"\ncert_file = "c.pem"\nkey_file = "k.pem"\nca_file = "ca.pem"\n'
        f"[radius]\n{radius}\n"
    )
    return path


def test_radius_config_errors_name_the_file_and_key(tmp_path):
    path = _broker_toml(tmp_path, 'servers = ["10.0.0.5", "10.0.0.6:99999"]\nsecret_file = "s"')
    with pytest.raises(ConfigError, match=r"broker\.toml: key 'radius\.servers\[1\]'.*99999"):
        load(BrokerConfig, path)
    path = _broker_toml(tmp_path, 'servers = ["10.0.0.5"]\nsecret = "hunter2"')
    with pytest.raises(ConfigError, match=r"unknown key 'radius\.secret'.*secret_file"):
        load(BrokerConfig, path)
    path = _broker_toml(tmp_path, 'servers = []\nsecret_file = "s"')
    with pytest.raises(ConfigError, match=r"'radius\.servers'"):
        load(BrokerConfig, path)
    # a relative secret_file is next to broker.toml
    path = _broker_toml(tmp_path, 'servers = ["10.0.0.5"]\nsecret_file = "radius-secret"')
    assert load(BrokerConfig, path).radius.secret_file == tmp_path / "radius-secret"


def test_secret_file_errors_name_the_file_never_the_secret(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope: RADIUS secret_file does not exist"):
        RadiusClient(RadiusConfig(("127.0.0.1",), missing))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty: the RADIUS secret_file is empty"):
        RadiusClient(RadiusConfig(("127.0.0.1",), empty))


# --- against a real FreeRADIUS ---------------------------------------------------------------


async def test_pap_right_and_wrong_password(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with freeradius(tmp_path / "radius") as server:
        radius = client(server.address, secret_file=server.secret_file)
        with trio.fail_after(GUARD_S):
            assert await radius.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)
            assert await radius.authenticate(PAP_USER, "wrong") == Reject(DENIED)
            assert await radius.authenticate("nobody", PAP_PASSWORD) == Reject(DENIED)
    # FreeRADIUS saw the password we meant (PAP hiding with the shared secret works)
    assert f"Login OK: [{PAP_USER}]" in server.log_text()
    _no_secrets_logged(caplog, PAP_PASSWORD)


async def test_challenge_answered_right_and_wrong(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with freeradius(tmp_path / "radius") as server:
        radius = client(server.address, secret_file=server.secret_file)
        with trio.fail_after(GUARD_S):
            first = await radius.authenticate(CHALLENGE_USER, CHALLENGE_PASSWORD)
            assert isinstance(first, Challenge)
            assert first.prompt == PROMPT and first.echo and first.state  # noqa: PT018
            assert await radius.authenticate(CHALLENGE_USER, CODE, state=first.state) == Accept(
                WELCOME
            )
            # the State of a finished round is spent: replaying the answer does not log in
            again = await radius.authenticate(CHALLENGE_USER, CODE, state=first.state)
            assert again == Reject(DENIED)

            second = await radius.authenticate(CHALLENGE_USER, CHALLENGE_PASSWORD)
            assert isinstance(second, Challenge) and second.state != first.state  # noqa: PT018
            wrong = "000000" if CODE != "000000" else "111111"
            assert await radius.authenticate(CHALLENGE_USER, wrong, state=second.state) == (
                Reject(DENIED)
            )
    _no_secrets_logged(caplog, CHALLENGE_PASSWORD, CODE)


async def test_challenge_not_answered_is_never_accepted(tmp_path):
    """A client that starts over without the State gets the challenge again, and the code
    alone, without the round's State, is a wrong password."""
    async with freeradius(tmp_path / "radius") as server:
        radius = client(server.address, secret_file=server.secret_file)
        with trio.fail_after(GUARD_S):
            first = await radius.authenticate(CHALLENGE_USER, CHALLENGE_PASSWORD)
            assert isinstance(first, Challenge)
            again = await radius.authenticate(CHALLENGE_USER, CHALLENGE_PASSWORD)
            assert isinstance(again, Challenge)
            assert await radius.authenticate(CHALLENGE_USER, CODE) == Reject(DENIED)


async def test_wrong_shared_secret_is_unavailable_not_a_reject(tmp_path, caplog):
    """FreeRADIUS drops a request whose Message-Authenticator does not verify, so a broker
    with the wrong secret hears nothing: the user is denied (RadiusUnavailable, "the service
    is unavailable"), and the log says which server did not answer."""
    caplog.set_level(logging.WARNING)
    async with freeradius(tmp_path / "radius") as server:
        wrong = tmp_path / "wrong-secret"
        wrong.write_text("not-the-shared-secret\n")
        radius = client(server.address, secret_file=wrong, timeout_s=0.3, retries=1)
        with trio.fail_after(GUARD_S), pytest.raises(RadiusUnavailable) as exc:
            await radius.authenticate(PAP_USER, PAP_PASSWORD)
    assert exc.value.code is ErrorCode.UNAVAILABLE
    assert server.address in str(exc.value)
    assert "no answer after 2 tries" in str(exc.value)
    assert "Shared secret is incorrect" in server.log_text()  # what its administrator sees
    _no_secrets_logged(caplog, PAP_PASSWORD, "not-the-shared-secret")


async def test_unsigned_answers_are_refused_unless_allowed(tmp_path, caplog):
    """A server that does not sign its answers (FreeRADIUS before 3.2.5) is unavailable with
    require_message_authenticator, the default; with it off its answers count."""
    caplog.set_level(logging.WARNING)
    async with freeradius(tmp_path / "radius", sign=False) as server:
        strict = client(server.address, secret_file=server.secret_file, retries=0)
        with trio.fail_after(GUARD_S), pytest.raises(RadiusUnavailable, match="1 invalid"):
            await strict.authenticate(PAP_USER, PAP_PASSWORD)
        assert "no Message-Authenticator" in caplog.text
        lax = client(
            server.address, secret_file=server.secret_file, require_message_authenticator=False
        )
        with trio.fail_after(GUARD_S):
            assert await lax.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)


async def test_failover_from_dead_and_silent_servers(tmp_path, caplog):
    """The first server has nothing on its port (ICMP unreachable: next server at once), the
    second swallows packets (next server after its tries); the third answers."""
    caplog.set_level(logging.WARNING)
    dead = f"127.0.0.1:{free_udp_port()}"
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        await hole.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{hole.getsockname()[1]}"
        async with freeradius(tmp_path / "radius") as server:
            radius = client(
                dead, silent, server.address, secret_file=server.secret_file, timeout_s=1.0
            )
            with trio.fail_after(GUARD_S):
                assert await radius.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)
                # a challenge round goes on with the server that asked
                first = await radius.authenticate(CHALLENGE_USER, CHALLENGE_PASSWORD)
                assert isinstance(first, Challenge)
                assert await radius.authenticate(CHALLENGE_USER, CODE, state=first.state) == Accept(
                    WELCOME
                )
    assert f"radius server {dead}: nothing listens" in caplog.text
    assert f"radius server {silent}: no answer after 2 tries" in caplog.text


async def test_answer_to_a_challenge_goes_to_the_server_that_asked(tmp_path):
    """Two servers; the first is down when the challenge comes from the second, and back
    when the user answers. The answer goes to the second, which knows the State."""
    async with freeradius(tmp_path / "b") as second:
        first = FreeRadius(tmp_path / "a")
        try:
            radius = client(first.address, second.address, secret_file=second.secret_file)
            with trio.fail_after(GUARD_S):
                challenge = await radius.authenticate(CHALLENGE_USER, CHALLENGE_PASSWORD)
                assert isinstance(challenge, Challenge)
                await first.start()
                assert await radius.authenticate(
                    CHALLENGE_USER, CODE, state=challenge.state
                ) == Accept(WELCOME)
                # and a new login asks the first server again
                assert await radius.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)
        finally:
            await first.stop()
    assert f"Login OK: [{PAP_USER}]" in first.log_text()
    assert f"Login OK: [{CHALLENGE_USER}]" in second.log_text()


async def test_server_stopped_mid_test_then_restarted(tmp_path):
    async with freeradius(tmp_path / "radius") as server:
        radius = client(server.address, secret_file=server.secret_file)
        with trio.fail_after(GUARD_S):
            assert await radius.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)
            await server.stop()
            with pytest.raises(RadiusUnavailable, match="no RADIUS server answered"):
                await radius.authenticate(PAP_USER, PAP_PASSWORD)
            await server.start()
            assert await radius.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)


async def test_silent_server_is_unavailable_after_its_tries(tmp_path):
    """A server that is up but never answers (a firewall drops the packets): unavailable
    after 1 + retries sends of timeout_s each, never allowed."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        await hole.bind(("127.0.0.1", 0))
        secret = tmp_path / "secret"
        secret.write_text(SECRET)
        radius = client(
            f"127.0.0.1:{hole.getsockname()[1]}",
            secret_file=secret,
            timeout_s=0.2,
            retries=2,
        )
        with trio.fail_after(GUARD_S), pytest.raises(RadiusUnavailable, match="3 tries"):
            await radius.authenticate(PAP_USER, PAP_PASSWORD)
        # all three sends were the same request (a retransmission, RFC 5080)
        datagrams = []
        with trio.move_on_after(0.5):
            while True:
                datagrams.append(await hole.recv(4096))
        assert len(datagrams) == 3 and len(set(datagrams)) == 1  # noqa: PT018


async def test_many_logins_at_once(tmp_path):
    async with freeradius(tmp_path / "radius") as server:
        radius = client(server.address, secret_file=server.secret_file)
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            password = PAP_PASSWORD if i % 2 else "wrong"
            results[i] = await radius.authenticate(PAP_USER, password)

        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
    assert results == {i: Accept(WELCOME) if i % 2 else Reject(DENIED) for i in range(40)}


# --- a tampering middlebox between the client and FreeRADIUS -----------------------------------


async def middlebox(target_port: int, transform, *, task_status=trio.TASK_STATUS_IGNORED):
    """Relays one request at a time to FreeRADIUS; ``transform(request, reply)`` gives the
    datagrams sent back instead of the reply."""
    with (
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as front,
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as back,
    ):
        await front.bind(("127.0.0.1", 0))
        await back.connect(("127.0.0.1", target_port))
        task_status.started(front.getsockname()[1])
        while True:
            data, peer = await front.recvfrom(4096)
            await back.send(data)
            reply = await back.recv(4096)
            for out in transform(data, reply):
                await front.sendto(out, peer)


def forged_reject_first(req: bytes, reply: bytes) -> list[bytes]:
    """Someone who knows the Identifier but not the secret answers first with a Reject."""
    forged = rad.AuthPacket(rad.AccessReject, req[1], b"guessed", req[4:20], dict=dictionary())
    forged.add_message_authenticator()
    return [forged.ReplyPacket(), reply]


def spoiled_message_authenticator(req: bytes, reply: bytes) -> list[bytes]:
    """The reply with a changed Message-Authenticator and a valid Response Authenticator
    (which needs the secret): only the Message-Authenticator check can catch it."""
    data = bytearray(reply)
    at = 20
    while at < len(data):
        kind, length = data[at], data[at + 1]
        if kind == 80:
            data[at + 2] ^= 0xFF
        at += length
    data[4:20] = hashlib.md5(bytes(data[:4]) + req[4:20] + bytes(data[20:]) + SECRET_B).digest()
    return [bytes(data)]


async def test_a_forged_reject_does_not_end_the_login(tmp_path, nursery, caplog):
    caplog.set_level(logging.WARNING)
    async with freeradius(tmp_path / "radius") as server:
        port = await nursery.start(middlebox, server.port, forged_reject_first)
        radius = client(f"127.0.0.1:{port}", secret_file=server.secret_file)
        with trio.fail_after(GUARD_S):
            assert await radius.authenticate(PAP_USER, PAP_PASSWORD) == Accept(WELCOME)
    assert "ignored a response: bad Response Authenticator" in caplog.text


async def test_a_bad_message_authenticator_is_ignored(tmp_path, nursery, caplog):
    caplog.set_level(logging.WARNING)
    async with freeradius(tmp_path / "radius") as server:
        port = await nursery.start(middlebox, server.port, spoiled_message_authenticator)
        radius = client(f"127.0.0.1:{port}", secret_file=server.secret_file, retries=0)
        with trio.fail_after(GUARD_S), pytest.raises(RadiusUnavailable, match="1 invalid"):
            await radius.authenticate(PAP_USER, PAP_PASSWORD)
    assert "Message-Authenticator (is the shared secret right?)" in caplog.text


def _no_secrets_logged(caplog, *secrets: str) -> None:
    for secret in (SECRET, *secrets):
        assert secret not in caplog.text
        for record in caplog.records:
            assert secret not in repr(record.args)


# --- end to end through the farm ---------------------------------------------------------------


def _answers(prompts: list[AuthChallenge], code: str):
    """Answer RADIUS's code prompt with ``code``; a prompt for the RADIUS password (if the
    broker asks for one before it asks RADIUS) with the user's password."""

    async def on_challenge(challenge: AuthChallenge) -> str:
        prompts.append(challenge)
        return code if challenge.prompt == PROMPT else PASSWORD

    return on_challenge


async def test_farm_radius_challenge_shown_to_the_client(tmp_path):
    users = {USER: (PASSWORD, True)}
    prompts: list[AuthChallenge] = []
    with trio.fail_after(GUARD_S):
        async with (
            freeradius(tmp_path / "radius", users=users) as server,
            farm(tmp_path / "farm", **farm_radius(server)) as f,
        ):
            async with await ClientSession.connect(f.client_config()) as session:
                ok = await session.authenticate(USER, PASSWORD, _answers(prompts, CODE))
                assert ok.user == USER
                assert [r.id for r in await session.list_resources()] == ["desktop"]
            assert PROMPT in [p.prompt for p in prompts]

            async with await ClientSession.connect(f.client_config()) as session:
                with pytest.raises(AuthError) as wrong:
                    await session.authenticate(USER, PASSWORD, _answers(prompts, "000000"))
            assert wrong.value.code is ErrorCode.AUTH_FAILED

            async with await ClientSession.connect(f.client_config()) as session:
                with pytest.raises(AuthError):  # a client that cannot answer the challenge
                    await session.authenticate(USER, PASSWORD)
    assert f"Login OK: [{USER}]" in server.log_text()


async def test_farm_radius_down_denies_and_the_broker_keeps_serving(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    users = {USER: (PASSWORD, True)}
    prompts: list[AuthChallenge] = []
    with trio.fail_after(GUARD_S):
        async with (
            freeradius(tmp_path / "radius", users=users) as server,
            farm(tmp_path / "farm", **farm_radius(server)) as f,
        ):
            f.store.put_user(UserRecord("bob", hash_password("bobs password"), ("users",)))
            await server.stop()
            async with await ClientSession.connect(f.client_config()) as session:
                with pytest.raises(RasError) as denied:
                    await session.authenticate(USER, PASSWORD, _answers(prompts, CODE))
            # not "wrong password": the user learns the second-factor service is down
            assert getattr(denied.value, "code", None) is ErrorCode.UNAVAILABLE
            assert re.search(r"(?i)radius|second.factor", str(denied.value))
            assert PROMPT not in [p.prompt for p in prompts]
            # another user on another session is served meanwhile
            async with await ClientSession.connect(f.client_config()) as session:
                assert (await session.authenticate("bob", "bobs password")).user == "bob"
                assert [r.id for r in await session.list_resources()] == ["desktop"]
            # and once RADIUS is back, so is alice
            await server.start()
            async with await ClientSession.connect(f.client_config()) as session:
                ok = await session.authenticate(USER, PASSWORD, _answers(prompts, CODE))
                assert ok.user == USER
    assert "radius" in caplog.text.lower()
