"""Forwarding gateways in front of a normal one: a DMZ chain, client -> fw1 -> fw2 -> gw.

Each test runs a real in-process farm on loopback. The forwarders connect onwards from their
own addresses (``source_address``: fw1 from 127.0.0.11, fw2 from 127.0.0.12) and each next hop
trusts exactly the one before it, so the client's own address (127.0.0.1) is trusted by
nobody: where it shows up at the broker and in the normal gateway's audit line, it came
through the PROXY v2 headers of the chain. fw1 passes TLS through; fw2 ends it with its own
certificate and opens its own TLS to gw, verifying gw's certificate.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl

import pytest
import trio
from conftest import SHADOW_PASSWORD, SHADOW_USER, require_peers
from farmkit import PASSWORD, USER, Farm, add_gateway, farm, replace
from rdp_peers import XrdpServer, xfreerdp

from ras.client.forwarder import serve_forwarder
from ras.client.session import ClientSession
from ras.config import from_mapping
from ras.errors import ConfigError
from ras.gateway.config import GatewayConfig, NextHop
from ras.gateway.front import decode_path, encode_path
from ras.protocol import Mode

FW1_SOURCE, FW2_SOURCE = "127.0.0.11", "127.0.0.12"


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _chain(f: Farm, nursery: trio.Nursery, *, dead_first: bool = True) -> None:
    """gw (normal), fw2 (terminates TLS) and fw1 (passes TLS, a dead next hop first)."""
    await add_gateway(f, nursery, "gw", trusted_proxies=(FW2_SOURCE,))
    gw = f.gateway_addrs["gw"]
    await add_gateway(
        f,
        nursery,
        "fw2",
        mode="forwarding",
        next_hops=(NextHop("127.0.0.1", gw["plain"][1], gw["tls"][1]),),
        trusted_proxies=(FW1_SOURCE,),
        source_address=FW2_SOURCE,
        terminate_tls=True,
        next_hop_ca_file=f.pki.directory / "gw-public.pem",
        next_hop_server_name="localhost",
        health_interval_s=0.5,
    )
    fw2 = f.gateway_addrs["fw2"]
    hops = [NextHop("127.0.0.1", fw2["plain"][1], fw2["tls"][1])]
    if dead_first:
        dead = _dead_port()
        hops.insert(0, NextHop("127.0.0.1", dead, dead))
    await add_gateway(
        f,
        nursery,
        "fw1",
        mode="forwarding",
        next_hops=tuple(hops),
        source_address=FW1_SOURCE,
        health_interval_s=0.5,
    )


def _client_config(f: Farm, mode: Mode):
    # fw1 passes TLS through and fw2 ends it: the client sees fw2's certificate.
    return replace(f.client_config("fw1", mode=mode), ca_file=f.pki.directory / "fw2-public.pem")


def _lines(caplog: pytest.LogCaptureFixture, logger: str, start: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and r.getMessage().startswith(start)
    ]


def _audits(caplog: pytest.LogCaptureFixture, via: str) -> list[str]:
    """The gateways' audit lines of the tunnels of one kind (ticket, token, forward)."""
    return [x for x in _lines(caplog, "ras.gateway", "tunnel closed ") if f" via={via} " in x]


# the native client's modes; the browser's through the chain: test_the_user_portal_through_the_chain
@pytest.mark.parametrize("mode", [m for m in Mode if m is not Mode.WEB])
async def test_all_client_modes_through_a_chain_of_two_forwarders(
    tmp_path, nursery, host, caplog, mode
):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await _chain(f, nursery)
        cfg = _client_config(f, mode)
        with trio.fail_after(30):
            async with await ClientSession.connect(cfg) as session:
                assert (await session.authenticate(USER, PASSWORD)).user == USER
                assert [r.id for r in await session.list_resources()] == ["desktop"]
                launched = await session.launch("desktop")
                assert (launched.host, launched.port) == ("127.0.0.1", host.port)
                tunnel = await session.open_tunnel(launched.ticket) if mode.tunnelled else None
            if tunnel is not None:
                payload = bytes(range(256)) * 512
                async with tunnel:
                    await tunnel.send_all(payload)
                    got = bytearray()
                    while len(got) < len(payload):
                        got += await tunnel.receive_some()
                assert bytes(got) == payload
            # the audit lines come when the relays have ended
            while mode.tunnelled and not _audits(caplog, "ticket"):  # noqa: ASYNC110 (polling another task's state)
                await trio.sleep(0.05)
            while not (  # noqa: ASYNC110 (polling another task's state)
                any("path=fw1 " in x for x in _audits(caplog, "forward"))
                and any("path=fw1>fw2 " in x for x in _audits(caplog, "forward"))
            ):
                await trio.sleep(0.05)

    # The broker saw the original client, not a forwarder, for every request.
    for what in ("auth ok", "launch"):
        lines = _lines(caplog, "ras.broker", what)
        assert lines, what
        assert all("client=127.0.0.1 " in line for line in lines), lines
    if mode.tunnelled:
        assert all("client=127.0.0.1 " in x for x in _lines(caplog, "ras.broker", "ticket redee"))
        (audit,) = _audits(caplog, "ticket")
        fields = dict(re.findall(r"(\w+)=(\S+)", audit))
        assert fields["user"] == USER
        assert fields["resource"] == "desktop"
        assert fields["client"].startswith("127.0.0.1:")
        assert fields["rdp"] == f"127.0.0.1:{host.port}"
        assert fields["path"] == "fw1>fw2>gw"
        assert fields["bytes_up"] == fields["bytes_down"] == str(256 * 512)
        assert float(fields["seconds"]) >= 0
        assert fields["reset"] == "False"
        assert host.connections == 1
    # fw1 skipped its dead first next hop and said so
    assert any("next hop down" in r.getMessage() for r in caplog.records)
    # each forwarder wrote its own line, with the original client
    for line in _audits(caplog, "forward"):
        if "path=fw1 " in line or "path=fw1>fw2 " in line:
            assert "client=127.0.0.1:" in line


async def test_a_dead_first_next_hop_fails_over_to_the_second(tmp_path, nursery, host, caplog):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await _chain(f, nursery)
        fw1 = f.gateways["fw1"]
        with trio.fail_after(30):
            # the health checks find the dead hop down and the live one up (through fw2 to gw)
            while [h.healthy for h in fw1._forwarder.hops] != [False, True]:  # type: ignore[union-attr]  # noqa: ASYNC110 (polling another task's state)
                await trio.sleep(0.05)
            for _ in range(3):
                async with await ClientSession.connect(_client_config(f, Mode.GATEWAY)) as s:
                    await s.authenticate(USER, PASSWORD)
    dead = f.gateways["fw1"].config.next_hops[0]
    assert any(f"next hop down hop={dead}" in r.getMessage() for r in caplog.records)
    assert len(_lines(caplog, "ras.broker", "auth ok")) == 3


async def test_an_untrusted_forwarder_cannot_name_the_client(tmp_path, nursery, host, caplog):
    """gw trusts only fw2's address: a forwarder elsewhere (fw1 pointed straight at gw) is
    refused, and nothing reaches the broker or the host."""
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gw", trusted_proxies=(FW2_SOURCE,))
        gw = f.gateway_addrs["gw"]
        await add_gateway(
            f,
            nursery,
            "rogue",
            mode="forwarding",
            next_hops=(NextHop("127.0.0.1", gw["plain"][1], gw["tls"][1]),),
            source_address=FW1_SOURCE,
        )
        cfg = replace(f.client_config("rogue", mode=Mode.GATEWAY))
        with trio.fail_after(30), pytest.raises(Exception):  # noqa: B017,PT011
            async with await ClientSession.connect(cfg) as session:
                await session.authenticate(USER, PASSWORD)
    assert any("PROXY v2 from an untrusted source" in r.getMessage() for r in caplog.records)
    assert not _lines(caplog, "ras.broker", "auth ok")
    assert host.connections == 0


def test_gateway_path_tlv_round_trip_and_refusals():
    assert decode_path(encode_path(("dmz1", "dmz2"))) == ("dmz1", "dmz2")
    assert decode_path(b"") == ()
    assert decode_path(b"bad name") is None
    assert decode_path(b",".join([b"x"] * 33)) is None
    assert decode_path(b"\xff") is None


def test_forwarding_config_errors_name_the_key(tmp_path):
    base = {"name": "fw", "mode": "forwarding"}
    cases = [
        ({}, "next_hops"),
        ({"next_hops": [{"host": "gw1", "plain_port": 0}]}, "next_hops[0].plain_port"),
        ({"next_hops": [{"host": "gw1"}], "terminate_tls": True}, "public_cert_file"),
        ({"next_hops": [{"host": "gw1"}], "source_address": "gw1"}, "source_address"),
        ({"next_hops": [{"host": "gw1"}], "nexthops": []}, "nexthops"),
    ]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_mapping(GatewayConfig, {**base, **extra}, source="gw.toml")
    cfg = from_mapping(
        GatewayConfig,
        {**base, "next_hops": [{"host": "10.0.1.5"}, {"host": "10.0.1.6", "tls_port": 8443}]},
        source="gw.toml",
    )
    assert [str(h) for h in cfg.next_hops] == ["10.0.1.5:80/443", "10.0.1.6:80/8443"]
    with pytest.raises(ConfigError, match="cert_file"):  # a normal gateway needs its broker
        from_mapping(GatewayConfig, {"name": "gw"}, source="gw.toml")


# -- real RDP through the chain ----------------------------------------------------------------


async def _xfreerdp(port: int, user: str, password: str, display: str, *extra: str):
    return await trio.to_thread.run_sync(
        lambda: xfreerdp("127.0.0.1", port, user, password, display=display, extra=list(extra))
    )


async def _forwarder(f: Farm, nursery: trio.Nursery) -> tuple[ClientSession, int]:
    session = await ClientSession.connect(_client_config(f, Mode.GATEWAY_SSL))
    await session.authenticate(USER, PASSWORD)
    _, port = await nursery.start(serve_forwarder, session, "desktop")
    return session, port


@pytest.mark.peers
async def test_xfreerdp_nla_through_the_chain(tmp_path, shadow, display, caplog):
    caplog.set_level(logging.INFO)
    async with (
        farm(tmp_path, rdp_hosts=[("host1", shadow.host, shadow.port)], gateways=()) as f,
        trio.open_nursery() as nursery,
    ):
        await _chain(f, nursery)
        session, port = await _forwarder(f, nursery)
        right = await _xfreerdp(port, SHADOW_USER, SHADOW_PASSWORD, display, "+auth-only")
        wrong = await _xfreerdp(port, SHADOW_USER, "not the password", display, "+auth-only")
        await session.aclose()
        nursery.cancel_scope.cancel()
    assert right.returncode == 0, right.summary()
    assert wrong.returncode == 147, wrong.summary()
    opened = _lines(caplog, "ras.gateway", "tunnel open")
    assert len(opened) == 2
    assert all("path=fw1>fw2>gw" in x and "client=127.0.0.1:" in x for x in opened)


@pytest.mark.peers
async def test_xfreerdp_xrdp_login_through_the_chain(tmp_path, display):
    require_peers(xrdp=True)
    with XrdpServer(desktop_seconds=2) as server:
        async with (
            farm(tmp_path, rdp_hosts=[("host1", server.host, server.port)], gateways=()) as f,
            trio.open_nursery() as nursery,
        ):
            await _chain(f, nursery)
            session, port = await _forwarder(f, nursery)
            result = await _xfreerdp(port, server.user, server.password, display, "/sec:tls")
            await session.aclose()
            nursery.cancel_scope.cancel()
    assert result.returncode == 12, f"{result.summary()}\n{server.log_tail()}"


async def _https(f: Farm, request: bytes) -> bytes:
    """One HTTPS request to fw1's TLS port, as a browser sends it (fw2's certificate)."""
    ctx = ssl.create_default_context(cafile=str(f.pki.directory / "fw2-public.pem"))
    tcp = await trio.open_tcp_stream(*f.gateway_addrs["fw1"]["tls"])
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost", https_compatible=True)
    reply = bytearray()
    async with stream:
        await stream.send_all(request)
        # the close after the answer may come as a reset through the forwarders' relays
        with trio.fail_after(20), contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some():
                reply += data
    return bytes(reply)


async def test_the_user_portal_through_the_chain(tmp_path, nursery, caplog):
    """A browser reaches the portal through both forwarders, and logs in as itself: the normal
    gateway and the broker see its own address, not a forwarder's."""
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, gateways=()) as f:
        await _chain(f, nursery, dead_first=False)
        page = await _https(f, b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200 ")
        token = re.search(rb"ras_portal_login=([A-Za-z0-9_-]+);", page)
        assert token is not None
        form = b"csrf=%s&username=%s&password=%s" % (
            token.group(1),
            USER.encode(),
            PASSWORD.replace(" ", "+").encode(),
        )
        logged_in = await _https(
            f,
            b"POST /login HTTP/1.1\r\nHost: localhost\r\ncookie: ras_portal_login=%s\r\n"
            b"content-type: application/x-www-form-urlencoded\r\ncontent-length: %d\r\n\r\n%s"
            % (token.group(1), len(form), form),
        )
        assert logged_in.startswith(b"HTTP/1.1 303 ")
        assert b"location: /resources\r\n" in logged_in.lower()
    logins = _lines(caplog, "ras.portal", "portal login ok ")
    assert logins == [f"portal login ok user={USER} client=127.0.0.1"]
    assert any(
        m.startswith(f"auth ok user={USER} client=127.0.0.1 gateway=gw ")
        for m in _lines(caplog, "ras.broker", "auth ok ")
    )
