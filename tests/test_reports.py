"""Reports: the broker's history of logins and launches, grouped over a time range."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import trio
from adminkit import call, logged_on, ras_admin, refused, with_admin
from farmkit import PASSWORD, USER, Listener, add_gateway, broker_session, farm, login, until
from utmpkit import start_agent, write_utmp

from ras.broker.history import History, merge
from ras.broker.passwords import hash_password
from ras.broker.sessions import SessionTable
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.errors import AuthError
from ras.ops.reports import parse_time, report_range
from ras.protocol import Launch, LaunchOk, Mode, Route, RouteOk, SessionInfo, SessionState

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC).timestamp()
NOT_ENDED = {"ended": 0, "session_s": 0.0, "mean_s": None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-03", dt.datetime(2026, 12, 3, tzinfo=dt.UTC).timestamp()),
        ("2026-12-03T10:30", NOW - 5400),
        ("2026-12-03T11:30:00+01:00", NOW - 5400),
        ("2026-12-03T10:30:00Z", NOW - 5400),
        ("90m", NOW - 5400),
        ("24h", NOW - 86400),
        ("7d", NOW - 7 * 86400),
        (str(NOW - 60), NOW - 60),
    ],
)
def test_times_a_report_takes(text, expected):
    assert parse_time(text, NOW) == expected


def test_a_bad_range_names_the_end_at_fault():
    assert report_range("", "", NOW) == (NOW - 86400, NOW)
    with pytest.raises(ValueError, match=r"^from: 'yesterday' is not a time"):
        report_range("yesterday", "", NOW)
    with pytest.raises(ValueError, match=r"^to: "):
        report_range("", "soon", NOW)
    with pytest.raises(ValueError, match=r"^from: must be before to"):
        report_range("1h", "2h", NOW)


def test_logins_and_launches_grouped_over_a_range(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    history.login(user="alice", gateway="gw1", result="ok", factor="password")
    history.login(user="alice", gateway="gw1", result="failed", factor="password")
    history.login(user="bob", gateway="gw2", result="ok", factor="totp")
    for user, host, gateway in (
        ("alice", "h1", "gw1"),
        ("alice", "h1", "gw1"),
        ("bob", "h2", "gw2"),
    ):
        history.launch(session="s-1", user=user, resource="desktop", host=host, gateway=gateway,
                       mode="gateway")  # fmt: skip
    now = time.time()
    by_host = history.report(now - 60, now + 60, "host")
    assert by_host["rows"] == [
        {"host": "h1", "sessions": 2, "users": 1} | NOT_ENDED,
        {"host": "h2", "sessions": 1, "users": 1} | NOT_ENDED,
    ]
    assert by_host["totals"] == {
        "sessions": 3, "users": 2, "logins": {"ok": 2, "failed": 1}, **NOT_ENDED,
    }  # fmt: skip
    by_gateway = history.report(now - 60, now + 60, "gateway")
    assert by_gateway["rows"][0] == {
        "gateway": "gw1", "sessions": 2, "users": 1, "logins": {"ok": 1, "failed": 1},
        **NOT_ENDED,
    }  # fmt: skip
    day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
    assert history.report(now - 60, now + 60, "day")["rows"][0]["day"] == day
    # outside the range: nothing
    assert history.report(now - 7200, now - 3600, "resource")["rows"] == []
    history.close()
    # the file keeps them: a broker restart loses no history
    again = History(tmp_path / "h.sqlite3")
    assert again.report(now - 60, now + 60, "resource")["rows"] == [
        {"resource": "desktop", "sessions": 3, "users": 2} | NOT_ENDED,
    ]
    with pytest.raises(ValueError, match="is not one of"):
        again.report(now - 60, now + 60, "client")
    again.close()


async def test_the_admin_api_and_ras_admin_report_what_the_farm_did(tmp_path, nursery):
    """Two users log in through two gateways (one fails once first) and launch; the report
    over the last hour, by gateway and by host, says so; a bad range is a 400 naming the
    parameter."""
    host = Listener()
    await nursery.start(host.serve)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        await add_gateway(f, nursery, "gw2")
        f.store.put_user(UserRecord("bob", hash_password(PASSWORD), ("users",)))
        with_admin(f)
        for user, gateway in ((USER, "gateway"), (USER, "gateway"), ("bob", "gw2")):
            cfg = f.client_config(gateway, mode=Mode.GATEWAY)
            async with await ClientSession.connect(cfg) as session:
                if user == "bob":
                    with pytest.raises(AuthError):
                        await session.authenticate(user, "wrong")
                await session.authenticate(user, PASSWORD)
                await session.launch("desktop")
        api = await logged_on(f)
        by_gateway = await call(api, "GET", "reports", query={"by": "gateway", "from": "1h"})
        assert by_gateway["rows"] == [
            {"gateway": "gateway", "sessions": 2, "users": 1, "logins": {"ok": 2}} | NOT_ENDED,
            {"gateway": "gw2", "sessions": 1, "users": 1, "logins": {"ok": 1, "failed": 1}}
            | NOT_ENDED,
        ]
        assert by_gateway["totals"] == {
            "sessions": 3, "users": 2, "logins": {"ok": 3, "failed": 1}, **NOT_ENDED,
        }  # fmt: skip
        # one broker on SQLite: the farm's report is its own
        assert by_gateway["brokers"] == {"included": ["broker"], "missing": []}
        err = await refused(api, "GET", "reports", query={"from": "last week"})
        assert (err.status, err.field) == (400, "from")
        err = await refused(api, "GET", "reports", query={"by": "client"})
        assert (err.status, err.field) == (400, "by")

        code, out, err_text = await ras_admin(f, tmp_path, "report", "--by", "host", "--from", "1h")
        assert code == 0, err_text
        lines = out.splitlines()
        assert lines[1].split() == ["host", "sessions", "users", "ended", "session", "time", "mean"]
        assert lines[2].split() == ["host1", "3", "2", "0", "0:00:00", "-"]
        assert lines[-2] == (
            "total: 3 sessions, 2 users, 0 ended, session time 0:00:00 (mean -); "
            "logins: ok 3, failed 1, throttled 0, unavailable 0"
        )
        assert lines[-1] == "brokers: broker"


class Clock:
    """The time History stamps its events with, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_session_time_from_launch_to_end(tmp_path):
    """A session's time is its end minus its launch: total and mean per group, counted over
    the sessions that ended; one still running counts as a session, not in the time."""
    clock = Clock(NOW)
    history = History(tmp_path / "h.sqlite3", clock=clock)
    launch = {"resource": "desktop", "gateway": "gw1", "mode": "gateway"}
    history.launch(session="s-1", user="alice", host="h1", **launch)
    clock.now = NOW + 60
    history.launch(session="s-2", user="bob", host="h1", **launch)
    history.launch(session="s-3", user="carol", host="h2", **launch)
    clock.now = NOW + 600
    history.ended("s-1")  # 600 s
    clock.now = NOW + 1260
    history.ended("s-2")  # 1200 s
    clock.now = NOW + 5000
    history.ended("s-2")  # a second end of the same session changes nothing
    history.ended("s-unknown")  # an end without a launch here: not a session of this report
    report = history.report(NOW - 60, NOW + 3600, "host")
    assert report["rows"] == [
        {"host": "h1", "sessions": 2, "users": 2, "ended": 2, "session_s": 1800.0,
         "mean_s": 900.0},
        {"host": "h2", "sessions": 1, "users": 1, **NOT_ENDED},
    ]  # fmt: skip
    totals = report["totals"]
    assert (totals["sessions"], totals["ended"], totals["session_s"], totals["mean_s"]) == (
        3, 2, 1800.0, 900.0,
    )  # fmt: skip
    # by day, user: the same sessions in other groups
    [day] = history.report(NOW - 60, NOW + 3600, "day")["rows"]
    assert (day["day"], day["ended"], day["session_s"]) == ("2026-12-03", 2, 1800.0)
    by_user = {r["user"]: r["mean_s"] for r in history.report(NOW - 60, NOW + 61, "user")["rows"]}
    assert by_user == {"alice": 600.0, "bob": 1200.0, "carol": None}
    # a range takes the sessions launched in it (to excluded), with their whole time
    assert [r["user"] for r in history.report(NOW, NOW + 60, "user")["rows"]] == ["alice"]
    history.close()


def test_parts_of_two_brokers_merge_into_one_report(tmp_path):
    """Each broker's part counts its own launches; merged, the counts add up and a user seen
    by both brokers is one user."""
    a = History(tmp_path / "a.sqlite3", clock=Clock(NOW))
    b = History(tmp_path / "b.sqlite3", clock=Clock(NOW + 10))
    a.login(user="alice", gateway="gw1", result="ok", factor="password")
    a.launch(session="s-1", user="alice", resource="desktop", host="h1", gateway="gw1",
             mode="gateway")  # fmt: skip
    b.login(user="alice", gateway="gw1", result="ok", factor="password")
    b.login(user="bob", gateway="gw2", result="failed", factor="password")
    b.launch(session="s-2", user="alice", resource="desktop", host="h1", gateway="gw1",
             mode="gateway")  # fmt: skip
    b.ended("s-2")
    parts = [h.part(NOW - 60, NOW + 60, "gateway") for h in (a, b)]
    report = merge(parts)
    assert report["rows"] == [
        {"gateway": "gw1", "sessions": 2, "users": 1, "logins": {"ok": 2}, "ended": 1,
         "session_s": 0.0, "mean_s": 0.0},
        {"gateway": "gw2", "sessions": 0, "users": 0, "logins": {"failed": 1}, **NOT_ENDED},
    ]  # fmt: skip
    assert report["totals"]["users"] == 1
    assert report["totals"]["logins"] == {"ok": 2, "failed": 1}
    assert merge(parts[:1])["totals"]["sessions"] == 1
    a.close()
    b.close()


def test_the_session_table_tells_when_a_launched_session_ends():
    """on_end gets the farm's id of a launch once its host stops reporting the session, or an
    admin logged it off; a launch that never started, or a session without a launch, did not
    end a launch."""
    ended: list[str] = []
    table = SessionTable(launch_timeout_s=60.0)
    table.on_end = ended.append
    for user, session in (("alice", "s-1"), ("bob", "s-2"), ("carol", "s-3")):
        table.launched(user=user, host="h1", resource="desktop", gateway="gw", client="",
                       now=0.0, session=session)  # fmt: skip
    active = SessionState.ACTIVE
    table.reported("h1", [SessionInfo("7", "alice", active), SessionInfo("8", "bob", active),
                          SessionInfo("9", "dave", active)], now=1.0)  # fmt: skip
    table.reported("h1", [SessionInfo("8", "bob", active)], now=2.0)  # alice and dave log off
    assert ended == ["s-1"]
    table.expire(100.0)  # carol never connected: no end
    table.remove("h1:8")  # an admin logs bob off
    assert ended == ["s-1", "s-2"]
    assert table.list() == []


async def test_the_report_gives_the_time_of_sessions_that_ended(tmp_path, nursery):
    """A launch whose session the agent reports, then no longer: the report has its time,
    between what the test measured around it. An RDP-port route held by a gateway, then
    closed (``route ended``): its time too. Real broker and agent, in process."""
    utmp = tmp_path / "utmp"
    write_utmp(utmp)
    async with farm(tmp_path, gateways=(), report_interval_s=0.1, mstshash_routing=True) as f:
        with_admin(f)
        await start_agent(f, nursery, utmp)
        await until(lambda: "rdsh1" in f.broker.hosts.hosts)
        before_launch = time.time()
        async with broker_session(f, gateway="gw-test", client="192.0.2.44") as chan:
            assert (await login(chan, USER, PASSWORD))[0] is None
            await chan.send(Launch("desktop", Mode.DIRECT))
            assert isinstance(await chan.receive_reply(), LaunchOk)
        after_launch = time.time()
        write_utmp(utmp, (4242, USER, ":10"))  # the session starts on the host
        await until(lambda: f.broker.sessions.get("rdsh1:4242") is not None)
        await trio.sleep(0.5)  # it lasts a while (measured below, not assumed)
        before_logoff = time.time()
        write_utmp(utmp)  # and ends
        await until(lambda: f.broker.sessions.get("rdsh1:4242") is None)
        api = await logged_on(f)
        [row] = (await call(api, "GET", "reports", query={"from": "1h"}))["rows"]
        seen = time.time()
        assert (row["host"], row["sessions"], row["ended"]) == ("rdsh1", 1, 1)
        # (rounded to 0.1 s)
        assert before_logoff - after_launch - 0.1 <= row["session_s"] <= seen - before_launch + 0.1
        assert row["mean_s"] == row["session_s"]

        first = row["session_s"]

        # a routed RDP connection: the gateway holds the broker connection while it lasts
        async with broker_session(f, gateway="gw-test", client="192.0.2.45") as chan:
            assert (await login(chan, USER, PASSWORD))[0] is None
            before_route = time.time()
            await chan.send(Route("", USER))
            assert isinstance(await chan.receive_reply(), RouteOk)
            after_route = time.time()
            await trio.sleep(0.5)
            before_close = time.time()
        with trio.fail_after(20):  # the broker sees the gateway's connection close
            while True:
                got = await call(api, "GET", "reports", query={"from": "1h"})
                if got["totals"]["ended"] == 2:
                    break
                await trio.sleep(0.05)
        seen = time.time()
        report = await call(api, "GET", "reports", query={"from": "1h"})
        [row] = report["rows"]
        assert (row["sessions"], row["ended"]) == (2, 2)
        routed = row["session_s"] - first
        # (each figure is rounded to 0.1 s: their difference is within 0.2 s of the time)
        assert before_close - after_route - 0.2 <= routed <= seen - before_route + 0.2
        code, out, err = await ras_admin(f, tmp_path, "report", "--by", "user", "--from", "1h")
        assert code == 0, err
        assert out.splitlines()[2].split()[:4] == [USER, "2", "1", "2"]
