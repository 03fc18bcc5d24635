"""One session, one id, in every daemon's log lines: the broker makes it at the launch, the
ticket carries it to the gateway, the agent's report ties it to the host's own session id."""

from __future__ import annotations

import json
import logging

from farmkit import PASSWORD, USER, Listener, farm

from ras.broker.sessions import SessionTable
from ras.client.session import ClientSession
from ras.logs import JsonFormatter, fields, render
from ras.protocol import Mode, SessionInfo, SessionState


def test_a_reported_session_keeps_the_id_of_its_launch():
    table = SessionTable()
    table.launched(
        user="alice", host="h1", resource="desktop", gateway="gw1", client="10.0.0.9", now=1.0,
        session="s-0123456789ab",
    )  # fmt: skip
    assert table.farm_id("s-0123456789ab") == "s-0123456789ab"  # while it is launching
    started = table.reported("h1", [SessionInfo("7", "ALICE", SessionState.ACTIVE)], now=2.0)
    assert [s.id for s in started] == ["h1:7"]
    assert table.farm_id("h1:7") == "s-0123456789ab"
    # the next report changes its state, not its id; and nothing new started
    assert table.reported("h1", [SessionInfo("7", "alice", SessionState.DISCONNECTED)], 3.0) == []
    assert table.farm_id("h1:7") == "s-0123456789ab"
    # a session nobody launched through the farm has none; a gone one is forgotten
    table.reported("h1", [SessionInfo("8", "bob", SessionState.ACTIVE)], now=4.0)
    assert table.farm_id("h1:8") == ""
    assert table.farm_id("h1:7") == ""


async def test_the_launch_ticket_and_tunnel_lines_name_one_session(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO, logger="ras")
    host = Listener()
    await nursery.start(host.serve)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        async with await ClientSession.connect(f.client_config(mode=Mode.GATEWAY)) as session:
            await session.authenticate(USER, PASSWORD)
            launched = await session.launch("desktop")
            tunnel = await session.open_tunnel(launched.ticket)
        async with tunnel:
            await tunnel.send_all(b"x")
            await tunnel.receive_some()
        await f.gateways["gateway"].tunnels.wait_empty()
    assert launched.session.startswith("s-")
    assert len(launched.session) == 14
    lines = {}
    for record in caplog.records:
        message = render(record)
        for start in ("launch user=", "ticket redeemed", "tunnel open", "tunnel closed"):
            if message.startswith(start):
                lines[start] = record
    assert set(lines) == {"launch user=", "ticket redeemed", "tunnel open", "tunnel closed"}
    for record in lines.values():
        assert fields(render(record))["session"] == launched.session
        assert json.loads(JsonFormatter().format(record))["session"] == launched.session
