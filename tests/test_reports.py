"""Reports: the broker's history of logins and launches, grouped over a time range."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from adminkit import call, logged_on, ras_admin, refused, with_admin
from farmkit import PASSWORD, USER, Listener, add_gateway, farm

from ras.broker.history import History
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.client.session import ClientSession
from ras.errors import AuthError
from ras.ops.reports import parse_time, report_range
from ras.protocol import Mode

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC).timestamp()


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
        {"host": "h1", "sessions": 2, "users": 1},
        {"host": "h2", "sessions": 1, "users": 1},
    ]
    assert by_host["totals"] == {
        "sessions": 3, "users": 2, "logins": {"ok": 2, "failed": 1},
    }  # fmt: skip
    by_gateway = history.report(now - 60, now + 60, "gateway")
    assert by_gateway["rows"][0] == {
        "gateway": "gw1", "sessions": 2, "users": 1, "logins": {"ok": 1, "failed": 1},
    }  # fmt: skip
    day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
    assert history.report(now - 60, now + 60, "day")["rows"][0]["day"] == day
    # outside the range: nothing
    assert history.report(now - 7200, now - 3600, "resource")["rows"] == []
    history.close()
    # the file keeps them: a broker restart loses no history
    again = History(tmp_path / "h.sqlite3")
    assert again.report(now - 60, now + 60, "resource")["rows"] == [
        {"resource": "desktop", "sessions": 3, "users": 2},
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
            {"gateway": "gateway", "sessions": 2, "users": 1, "logins": {"ok": 2}},
            {"gateway": "gw2", "sessions": 1, "users": 1, "logins": {"ok": 1, "failed": 1}},
        ]
        assert by_gateway["totals"] == {
            "sessions": 3, "users": 2, "logins": {"ok": 3, "failed": 1},
        }  # fmt: skip
        err = await refused(api, "GET", "reports", query={"from": "last week"})
        assert (err.status, err.field) == (400, "from")
        err = await refused(api, "GET", "reports", query={"by": "client"})
        assert (err.status, err.field) == (400, "by")

        code, out, err_text = await ras_admin(f, tmp_path, "report", "--by", "host", "--from", "1h")
        assert code == 0, err_text
        lines = out.splitlines()
        assert lines[1].split() == ["host", "sessions", "users"]
        assert lines[2].split() == ["host1", "3", "2"]
        assert (
            lines[-1]
            == "total: 3 sessions, 2 users; logins: ok 3, failed 1, throttled 0, unavailable 0"
        )
