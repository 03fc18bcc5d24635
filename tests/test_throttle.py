"""Failed-login throttling: the pure counter (clock injected), then through a real broker,
where a locked user is refused before the directory is asked anything."""

from __future__ import annotations

import pytest
import trio
from farmkit import PASSWORD, USER, broker_session, farm, login

from ras.broker.directory import BuiltinDirectory, Identity
from ras.broker.store import Store
from ras.broker.throttle import Lockout, Throttle, wait_text
from ras.errors import ErrorCode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, per_user: int = 3, per_address: int = 10) -> Throttle:
    return Throttle(
        max_failures_per_user=per_user,
        max_failures_per_address=per_address,
        window_s=60.0,
        lockout_s=300.0,
        clock=clock,
    )


def test_a_user_is_locked_after_the_limit_for_the_lockout_time():
    clock = Clock()
    t = throttle(clock)
    assert t.check("alice", "192.0.2.1") is None
    assert t.failed("alice", "192.0.2.1") is None
    assert t.failed("Alice", "192.0.2.2") is None  # names are counted without regard to case
    assert t.failed("ALICE", "192.0.2.3") == Lockout("user", 300.0)
    assert t.check("alice", "198.51.100.9") == Lockout("user", 300.0)  # from anywhere
    clock.now += 299
    assert t.check("alice", "192.0.2.1") == Lockout("user", 1.0)
    assert t.check("bob", "192.0.2.1") is None  # others are not affected
    clock.now += 1
    assert t.check("alice", "192.0.2.1") is None


def test_failures_outside_the_window_are_forgotten():
    clock = Clock()
    t = throttle(clock)
    t.failed("alice", "a")
    t.failed("alice", "a")
    clock.now += 61
    assert t.failed("alice", "a") is None  # the first two are older than the window
    assert t.check("alice", "a") is None


def test_an_address_is_locked_whatever_name_it_tries():
    clock = Clock()
    t = throttle(clock, per_user=100, per_address=4)
    for name in ("alice", "bob", "carol"):
        assert t.failed(name, "203.0.113.5") is None
    assert t.failed("dave", "203.0.113.5") == Lockout("address", 300.0)
    assert t.check("erin", "203.0.113.5") == Lockout("address", 300.0)
    assert t.check("erin", "203.0.113.6") is None


def test_success_clears_the_users_failures_but_not_the_addresses():
    clock = Clock()
    t = throttle(clock, per_user=3, per_address=5)
    t.failed("alice", "a")
    t.failed("alice", "a")
    t.succeeded("alice")
    assert t.failed("alice", "a") is None  # counting from 0 again
    assert t.failed("alice", "a") is None
    assert t.failed("bob", "a") == Lockout("address", 300.0)  # the address kept all five


def test_an_admin_unlocks_a_name_but_not_an_address():
    clock = Clock()
    t = throttle(clock, per_user=3, per_address=3)
    for _ in range(3):
        t.failed("alice", "a")
    assert t.unlock("ALICE") is True  # any spelling of the name
    assert t.check("alice", "b") is None
    assert t.check("alice", "a") == Lockout("address", 300.0)  # the address may guess others
    assert t.unlock("alice") is False  # nothing to lift


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "1 s"), (59.1, "60 s"), (119, "119 s"), (120, "2 min"), (300, "5 min")],
)
def test_wait_text(seconds, text):
    assert wait_text(seconds) == text


def test_attempts_while_locked_are_not_counted_and_memory_is_bounded():
    clock = Clock()
    t = Throttle(
        max_failures_per_user=2, max_failures_per_address=1000, window_s=60, lockout_s=10,
        clock=clock, max_entries=100,
    )  # fmt: skip
    t.failed("alice", "a")
    t.failed("alice", "a")
    clock.now += 10
    assert t.check("alice", "a") is None  # the lock did not grow
    for i in range(1000):
        t.failed(f"user{i}", "a")
    assert len(t._users.entries) == 100


# -- through the broker ---------------------------------------------------------------------


class CountingDirectory:
    """The built-in directory, counting how often it is asked (each ask costs an scrypt)."""

    def __init__(self, store: Store) -> None:
        self.inner = BuiltinDirectory(store)
        self.asked = 0

    async def authenticate(self, username: str, password: str) -> Identity | None:
        self.asked += 1
        return await self.inner.authenticate(username, password)

    async def lookup(self, username: str) -> Identity | None:
        return await self.inner.lookup(username)


@pytest.mark.parametrize("who", [USER, "nobody-such"])
async def test_a_locked_user_is_refused_without_asking_the_directory(tmp_path, who):
    async with farm(
        tmp_path, gateways=(), max_failures_per_user=3, directory=CountingDirectory
    ) as f:
        directory = f.broker.directory
        assert isinstance(directory, CountingDirectory)
        async with broker_session(f, client="192.0.2.10") as chan:
            for _ in range(3):
                code, message = await login(chan, who, "wrong password")
                assert (code, message) == (ErrorCode.AUTH_FAILED, "wrong user name or password")
            assert directory.asked == 3
            # Locked now: refused at once, the same way for a real and an unknown user, even
            # with the right password, and the directory is not asked.
            code, message = await login(chan, who, PASSWORD)
            assert code is ErrorCode.THROTTLED
            assert message == "too many failed logins; try again in 5 min"  # lockout_s = 300
        async with broker_session(f, client="198.51.100.20") as chan:  # from elsewhere too
            assert (await login(chan, who, PASSWORD))[0] is ErrorCode.THROTTLED
        assert directory.asked == 3
        # Another user from the same address is not locked (the address has 3 of 20).
        async with broker_session(f, client="192.0.2.10") as chan:
            assert (await login(chan, "carol", "x"))[0] is ErrorCode.AUTH_FAILED
        assert directory.asked == 4
    await trio.lowlevel.checkpoint()


async def test_a_locked_address_is_refused_for_every_name(tmp_path):
    async with farm(
        tmp_path, gateways=(), max_failures_per_address=4, directory=CountingDirectory
    ) as f:
        async with broker_session(f, client="203.0.113.66") as chan:
            for name in ("a1", "a2", "a3", "a4"):
                assert (await login(chan, name, "guess"))[0] is ErrorCode.AUTH_FAILED
            assert (await login(chan, USER, PASSWORD))[0] is ErrorCode.THROTTLED
        async with broker_session(f, client="203.0.113.67") as chan:
            assert (await login(chan, USER, PASSWORD))[0] is None  # logged in
