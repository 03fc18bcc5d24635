"""The second-factor challenge round, end to end through the gateway, with TOTP (RFC 6238)."""

from __future__ import annotations

import time

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, farm

from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.broker.totp import hotp, otpauth_uri, totp, verify_totp
from ras.client.session import ClientSession
from ras.errors import AuthError, ErrorCode
from ras.protocol import AuthChallenge

# RFC 6238 appendix B: the SHA-1 secret and its expected 8-digit codes.
RFC_SECRET = b"12345678901234567890"
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("now", "code"), RFC_VECTORS)
def test_rfc6238_vectors(now, code):
    assert totp(RFC_SECRET, now, digits=8) == code


def test_rfc4226_vectors():
    expected = [
        "755224",
        "287082",
        "359152",
        "969429",
        "338314",
        "254676",
        "287922",
        "162583",
        "399871",
        "520489",
    ]
    assert [hotp(RFC_SECRET, i) for i in range(10)] == expected


def test_codes_of_the_neighbouring_steps_are_accepted_once_newer():
    now = 1_700_000_000.0
    code = totp(RFC_SECRET, now)
    step = int(now // 30)
    assert verify_totp(RFC_SECRET, code, now) == step
    assert verify_totp(RFC_SECRET, code, now + 30) == step  # clock skew, one step
    assert verify_totp(RFC_SECRET, code, now + 90) is None  # too old
    assert verify_totp(RFC_SECRET, code, now, last_step=step) is None  # already used
    assert verify_totp(RFC_SECRET, "12345", now) is None
    assert verify_totp(RFC_SECRET, "abcdef", now) is None


def test_otpauth_uri():
    uri = otpauth_uri(RFC_SECRET, "alice")
    assert uri.startswith("otpauth://totp/RAS%3Aalice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&")
    assert "period=30" in uri and "digits=6" in uri  # noqa: PT018


async def test_totp_challenge_round_through_the_gateway(tmp_path, nursery):
    host = Listener()
    await nursery.start(host.serve)
    secret = b"0123456789abcdef0123"
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        f.store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",), True, secret))
        prompts: list[AuthChallenge] = []

        async def answer_with(code: str):
            async def on_challenge(challenge: AuthChallenge) -> str:
                prompts.append(challenge)
                return code

            return on_challenge

        good = totp(secret, time.time())
        async with await ClientSession.connect(f.client_config()) as session:
            with pytest.raises(AuthError) as wrong:
                await session.authenticate(
                    USER, PASSWORD, await answer_with("000000" if good != "000000" else "111111")
                )
        assert wrong.value.code is ErrorCode.AUTH_FAILED
        async with await ClientSession.connect(f.client_config()) as session:
            ok = await session.authenticate(USER, PASSWORD, await answer_with(good))
            assert ok.user == USER
            assert [r.id for r in await session.list_resources()] == ["desktop"]
        async with await ClientSession.connect(f.client_config()) as session:
            with pytest.raises(AuthError):  # the same code again: replay
                await session.authenticate(USER, PASSWORD, await answer_with(good))
        async with await ClientSession.connect(f.client_config()) as session:
            with pytest.raises(AuthError):  # a client that cannot answer the challenge
                await session.authenticate(USER, PASSWORD)
        # the prompt reached the client through the gateway, and the password alone was not enough
        assert len(prompts) == 3
        assert all("code" in p.prompt for p in prompts)
    await trio.lowlevel.checkpoint()
