"""One front door for every port: the RDP port (3389) gets what the plain and TLS ports get.

The tunnel registry (drain, idle timeout) and the one audit line, in a normal gateway and
through a forwarding gateway; and health checks through a forwarder that write no INFO line.
Each test runs a real in-process farm on loopback with a stand-in RDP host that echoes; native
RDP clients are played with a Connection Request carrying the broker's routing token. (The RDP
port's per-address slots and its pre-authentication deadline from the accept are tested over
memory streams, in tests/test_gateway_sessions.py.)
"""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing
from farmkit import PASSWORD, USER, Farm, Listener, add_gateway, farm

from ras.client.session import ClientSession
from ras.config import from_mapping
from ras.errors import ConfigError
from ras.gateway.config import GatewayConfig, NextHop
from ras.gateway.tunnels import TunnelInfo, Tunnels, Via
from ras.net.health import probe
from ras.protocol import Mode
from ras.protocol.x224 import encode_connection_request

PAYLOAD = b"first RDP bytes after the request"
FW_SOURCE, HALB = "127.0.0.12", "127.0.0.11"


@pytest.fixture
async def decoy(nursery: trio.Nursery) -> Listener:
    """A listener nobody may reach."""
    listener = Listener()
    await nursery.start(listener.serve)
    return listener


async def _token(f: Farm, gateway: str = "gw") -> str:
    async with await ClientSession.connect(f.client_config(gateway, Mode.GATEWAY)) as session:
        await session.authenticate(USER, PASSWORD)
        return (await session.rdp_token("desktop")).token


async def _connect(addr: tuple[str, int], source: str = "127.0.0.1") -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(addr)
    return trio.SocketStream(sock)


async def _echo(stream: trio.abc.Stream, data: bytes) -> bytes:
    """Send ``data``, read as many bytes back (less if the stream ends first)."""
    await stream.send_all(data)
    got = b""
    with trio.fail_after(20):  # a hang guard only
        while len(got) < len(data) and (chunk := await stream.receive_some()):
            got += chunk
    return got


async def _rdp(addr: tuple[str, int], token: str, source: str = "127.0.0.1") -> trio.SocketStream:
    """A native RDP client's connection, routed: its Connection Request came back echoed."""
    stream = await _connect(addr, source)
    wire = encode_connection_request(f"Cookie: msts={token}") + PAYLOAD
    assert await _echo(stream, wire) == wire
    return stream


async def _ended(stream: trio.abc.Stream) -> bool:
    """Wait until the gateway closes ``stream``: True (a hang guard fails the test instead)."""
    with trio.fail_after(30):
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
    return True


def _messages(caplog: pytest.LogCaptureFixture, start: str, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= level and r.getMessage().startswith(start)
    ]


async def _until_logged(caplog: pytest.LogCaptureFixture, start: str, count: int = 1) -> None:
    with trio.fail_after(30):  # a hang guard only
        while len(_messages(caplog, start)) < count:  # noqa: ASYNC110 (polling the log)
            await trio.sleep(0.02)


async def _rdp_gateway(f: Farm, nursery: trio.Nursery, name: str = "gw", **options: object):
    return await add_gateway(f, nursery, name, rdp_lb_enabled=True, rdp_port=0, **options)


# -- the tunnel registry: idle timeout and drain ----------------------------------------------


async def test_an_idle_rdp_port_tunnel_is_closed_and_audited(tmp_path, nursery, host, caplog):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        gw = await _rdp_gateway(f, nursery, tunnel_idle_timeout_s=1)
        token = await _token(f)
        stream = await _rdp(f.gateway_addrs["gw"]["rdp"], token)
        async with stream:
            assert len(gw.tunnels) == 1
            assert await _ended(stream)  # silence: the gateway ends the tunnel
        await _until_logged(caplog, "tunnel closed ")
    assert len(_messages(caplog, "tunnel idle ")) == 1
    (audit,) = _messages(caplog, "tunnel closed ")
    assert " via=token " in audit
    assert audit.endswith("ended_by=idle timeout")
    wire = len(encode_connection_request(f"Cookie: msts={token}") + PAYLOAD)
    assert f" bytes_up={wire} bytes_down={wire} " in audit  # the request went through it


@pytest.mark.parametrize("ends", ["client closes", "drain timeout"])
async def test_a_routed_rdp_connection_runs_through_the_drain(tmp_path, host, caplog, ends):
    """stop(): the gateway leaves the broker and stops accepting, while an open RDP-port tunnel
    carries on until its client closes it or ``drain_timeout_s`` passes; then serve returns."""
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        drain_s = 60 if ends == "client closes" else 1
        with trio.fail_after(60):  # a hang guard only
            async with trio.open_nursery() as serving:  # ends when the gateway's serve returns
                gw = await _rdp_gateway(f, serving, drain_timeout_s=drain_s)
                addr = f.gateway_addrs["gw"]["rdp"]
                stream = await _rdp(addr, await _token(f))
                gw.stop()
                while f.broker.gateways["gw"].online:  # noqa: ASYNC110 (the broker's state)
                    await trio.sleep(0.02)
                with pytest.raises(OSError, match="connect"):
                    await trio.open_tcp_stream(*addr)
                assert await _echo(stream, b"during the drain") == b"during the drain"
                if ends == "client closes":
                    await stream.aclose()
                else:
                    assert await _ended(stream)
                    await stream.aclose()
    assert _messages(caplog, "draining name=gw tunnels=1 ")
    assert _messages(caplog, "stopped name=gw")
    (audit,) = _messages(caplog, "tunnel closed ")
    assert f"user={USER} resource=desktop client=127.0.0.1:" in audit
    assert f" rdp=127.0.0.1:{host.port} gateway=gw path=gw via=token " in audit
    if ends == "drain timeout":
        assert audit.endswith("ended_by=drain timeout")
    else:
        assert "ended_by" not in audit


# -- through a forwarding gateway -------------------------------------------------------------


async def _behind_a_forwarder(f: Farm, nursery: trio.Nursery, **gw_options: object) -> None:
    """gw (normal, trusting only fw's source address) behind fw (forwarding, RDP port on)."""
    await _rdp_gateway(f, nursery, trusted_proxies=(FW_SOURCE,), **gw_options)
    gw = f.gateway_addrs["gw"]
    await add_gateway(
        f,
        nursery,
        "fw",
        mode="forwarding",
        next_hops=(NextHop("127.0.0.1", gw["plain"][1], gw["tls"][1], gw["rdp"][1]),),
        trusted_proxies=(HALB,),
        source_address=FW_SOURCE,
        rdp_lb_enabled=True,
        rdp_port=0,
        health_interval_s=0.2,
    )


async def test_rdp_port_through_a_forwarding_gateway(tmp_path, nursery, host, decoy, caplog):
    """A native RDP client on the forwarder's RDP port reaches the host its routing token
    names, through the normal gateway's RDP port; the normal gateway sees the real client
    (the forwarder's PROXY v2 header), and each gateway writes one audit line."""
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, gateways=(), rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        await _behind_a_forwarder(f, nursery)
        fw = f.gateways["fw"]
        token = await _token(f, "fw")  # the login goes through the forwarder too
        fw_rdp = f.gateway_addrs["fw"]["rdp"]
        async with await _rdp(fw_rdp, token) as stream:
            assert len(fw.tunnels) == len(f.gateways["gw"].tunnels) == 1
            assert await _echo(stream, b"more") == b"more"
        # a cookie naming the decoy goes nowhere through the chain either
        async with await _connect(fw_rdp) as stream:
            await stream.send_all(encode_connection_request(f"Cookie: msts=127.0.0.1:{decoy.port}"))
            assert await _ended(stream)
        await _until_logged(caplog, "tunnel closed ", 4)
    assert host.connections == 1
    assert decoy.connections == 0
    audits = _messages(caplog, "tunnel closed ")
    served = [a for a in audits if " via=token " in a]
    gw_rdp = f.gateway_addrs["gw"]["rdp"][1]
    forwarded = [a for a in audits if f" next_hop=127.0.0.1:{gw_rdp} " in a]
    # one line per tunnel at each gateway it went through (and one for the login's forward)
    assert len(audits) == 4
    assert len(served) == 1
    assert len(forwarded) == 2  # the routed connection and the refused one
    assert "client=127.0.0.1:" in served[0]
    assert f" rdp=127.0.0.1:{host.port} gateway=gw path=fw>gw " in served[0]
    assert all(" gateway=fw path=fw via=forward " in a for a in forwarded)
    assert all("client=127.0.0.1:" in a for a in forwarded)
    routes = [m for m in _messages(caplog, "route user=") if "via=token" in m]
    assert len(routes) == 1
    assert "client=127.0.0.1 " in routes[0]  # the broker saw the client, not the forwarder


async def test_health_checks_through_a_forwarder_write_no_info_line(tmp_path, nursery, caplog):
    """A HALB node's control-protocol ping through a forwarder to a normal gateway, and the
    forwarder's own checks of its next hop, are logged at DEBUG only, at both gateways."""
    caplog.set_level(logging.DEBUG, logger="ras.gateway")
    async with farm(tmp_path, gateways=()) as f:
        await _behind_a_forwarder(f, nursery)
        fw = f.gateways["fw"]
        with trio.fail_after(30):
            while fw._forwarder.hops[0].healthy is not True:  # type: ignore[union-attr]  # noqa: ASYNC110
                await trio.sleep(0.02)
            for _ in range(3):  # a HALB node's checks: straight from a trusted proxy
                await probe(
                    "127.0.0.1", f.gateway_addrs["fw"]["plain"][1], software="halb", source=HALB
                )
        await _until_logged_debug(caplog, f"tunnel closed client={HALB}:", 3)
    gateway = [r for r in caplog.records if r.name == "ras.gateway"]
    checks = [
        r.getMessage() for r in gateway if HALB in r.getMessage() or FW_SOURCE in r.getMessage()
    ]
    assert checks  # they were logged ...
    loud = [r.getMessage() for r in gateway if r.levelno >= logging.INFO]
    assert not [m for m in loud if HALB in m or FW_SOURCE in m]  # ... but not at INFO
    # at the serving gateway too, through the forwarder: the HALB node's checks reached it
    assert len([m for m in checks if m.startswith(f"health check client={HALB}:")]) == 3


async def _until_logged_debug(caplog: pytest.LogCaptureFixture, start: str, count: int) -> None:
    with trio.fail_after(30):  # a hang guard only
        while len(_messages(caplog, start, logging.DEBUG)) < count:  # noqa: ASYNC110
            await trio.sleep(0.02)


# -- the registry and the audit line, over memory streams --------------------------------------


async def test_every_kind_of_tunnel_gets_one_audit_line(caplog, autojump_clock):
    caplog.set_level(logging.DEBUG, logger="ras.gateway")
    tunnels = Tunnels()
    client_at = ("198.51.100.7", 5)
    host, hop = ("10.0.0.21", 3389), ("10.0.2.21", 3389)
    kinds = [
        TunnelInfo(Via.TICKET, client_at, host, "gw1", ("gw1",), True, "alice", "desktop"),
        TunnelInfo(Via.TOKEN, client_at, host, "gw1", ("dmz1", "gw1"), False, "alice", "desktop"),
        TunnelInfo(Via.FORWARD, client_at, hop, "dmz1", ("dmz1",)),
    ]
    for info in kinds:
        client, client_end = trio.testing.memory_stream_pair()
        far, far_end = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tunnels.run, info, client_end, far_end)
            await trio.sleep(1)
            assert len(tunnels) == 1
            await client.send_all(b"up")
            assert await far.receive_some() == b"up"
            await far.send_all(b"down!")
            assert await client.receive_some() == b"down!"
            await client.aclose()
            await far.aclose()
        assert len(tunnels) == 0, info.via
    audits = [r for r in caplog.records if r.getMessage().startswith("tunnel closed ")]
    assert [r.levelno for r in audits] == [logging.INFO] * 3
    ticket, token, forward = (r.getMessage() for r in audits)
    assert ticket == (
        "tunnel closed user=alice resource=desktop client=198.51.100.7:5 rdp=10.0.0.21:3389 "
        "gateway=gw1 path=gw1 via=ticket tls=True bytes_up=2 bytes_down=5 seconds=1.0 "
        "reset=False"
    )
    assert " path=dmz1>gw1 via=token tls=False bytes_up=2 bytes_down=5 " in token
    assert forward.startswith(
        "tunnel closed client=198.51.100.7:5 next_hop=10.0.2.21:3389 gateway=dmz1 path=dmz1 "
        "via=forward tls=False bytes_up=2 bytes_down=5 "
    )
    opened = [r for r in caplog.records if r.getMessage().startswith("tunnel open ")]
    assert [r.levelno for r in opened] == [logging.INFO, logging.INFO, logging.DEBUG]


# -- config ------------------------------------------------------------------------------------


def test_rdp_port_forwarding_config():
    base = {"name": "fw", "mode": "forwarding", "rdp_lb_enabled": True}
    cfg = from_mapping(
        GatewayConfig, {**base, "next_hops": [{"host": "10.0.2.21", "rdp_port": 3390}]}, source="g"
    )
    assert cfg.next_hops[0].rdp_port == 3390
    cases = [
        ({"next_hops": [{"host": "gw1", "rdp_port": 0}]}, "next_hops[0].rdp_port"),
        ({"next_hops": [{"host": "gw1", "rdp_port": 70000}]}, "next_hops[0].rdp_port"),
        ({"next_hops": [{"host": "gw1"}], "rdp_lb_mstshash": True}, "rdp_lb_mstshash"),
        ({"next_hops": [{"host": "gw1", "rdp_prot": 3389}]}, "rdp_prot"),
        ({"next_hops": [{"host": "gw1"}], "workers": 2, "rdp_port": 0}, "workers"),
    ]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_mapping(GatewayConfig, {**base, **extra}, source="gw.toml")
