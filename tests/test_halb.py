"""HALB pieces that need no lab: config checks, capabilities, least-connections choice, and
health checks against a real gateway (a port that only accepts TCP is not healthy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import trio
from farmkit import farm
from labkit import await_until

from ras.config import from_mapping
from ras.errors import ConfigError
from ras.halb.balancer import Balancer
from ras.halb.config import GatewayRef, HalbConfig
from ras.halb.vip import arp_announcement, missing_capabilities


def _config(**kw):
    base = {
        "name": "h1",
        "vips": ["10.213.0.100/24"],
        "health_timeout_s": 2.0,
        "rise": 2,
        "fall": 2,
    }
    return from_mapping(HalbConfig, {**base, **kw}, source="halb.toml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("vips", [], "at least one virtual IP"),
        ("vips", ["fe80::1"], "only IPv4"),
        ("vips", ["10.0.0.300"], "not an IPv4 address"),
        ("vrid", 0, "between 1 and 255"),
        ("priority", 256, "255: the address owner"),
        ("advert_interval_s", 50.0, "centiseconds"),
        ("rise", 0, "at least 1"),
        ("interface", "x" * 16, "not an interface name"),
    ],
)
def test_bad_halb_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"halb.toml: key '{key}'.*{message}"):
        _config(**{key: value})


def test_gateway_names_must_be_unique():
    with pytest.raises(ConfigError, match="unique"):
        _config(gateways=[{"name": "a", "host": "10.0.0.1"}, {"name": "a", "host": "10.0.0.2"}])


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_without_capabilities_the_halb_says_which_are_missing(tmp_path):
    conf = tmp_path / "halb.toml"
    conf.write_text('name = "h1"\nvips = ["10.213.0.100/24"]\n')
    drop = "-net_raw,-net_admin"
    proc = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={drop}",
            f"--inh-caps={drop}",
            "--",
            sys.executable,
            "-m",
            "ras",
            "halb",
            "--config",
            str(conf),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "CAP_NET_ADMIN" in proc.stderr
    assert "CAP_NET_RAW" in proc.stderr
    assert missing_capabilities() == []  # and we, as root, have both


def test_gratuitous_arp_frame():
    import ipaddress

    frame = arp_announcement(bytes.fromhex("020000000001"), ipaddress.IPv4Address("10.0.0.5"))
    assert frame[:6] == b"\xff" * 6  # broadcast
    assert frame[12:14] == b"\x08\x06"  # ARP
    arp = frame[14:]
    assert arp[6:8] == b"\x00\x01"  # request
    assert arp[14:18] == arp[24:28] == bytes([10, 0, 0, 5])  # sender = target = the VIP


def test_least_connections_and_draining():
    bal = Balancer(
        _config(
            gateways=[{"name": n, "host": f"10.0.0.{i}"} for i, n in enumerate(("a", "b", "c"), 1)]
        )
    )
    for b in bal.backends.values():
        b.healthy = True
    bal.backends["a"].active = 3
    bal.backends["b"].active = 1
    bal.backends["c"].active = 1
    picks = {bal.pick().name for _ in range(10)}
    assert picks == {"b", "c"}  # the fewest, ties rotate
    bal.backends["b"].draining = True
    bal.backends["c"].healthy = False
    assert bal.pick().name == "a"
    bal.backends["a"].draining = True
    assert bal.pick() is None
    # a reload keeps the state of gateways that stay
    bal.set_gateways((GatewayRef("a", "10.0.0.1"), GatewayRef("d", "10.0.0.4")))
    assert bal.backends["a"].draining
    assert set(bal.backends) == {"a", "d"}


async def test_health_checks_need_a_serving_gateway(tmp_path, nursery):
    mute = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
    mute_port = mute[0].socket.getsockname()[1]
    async with farm(tmp_path) as f:
        gw_port = f.gateway_addrs["gateway"]["plain"][1]
        cfg = _config(
            gateways=[{"name": "real", "host": "127.0.0.1"}],
            health_port=gw_port,
            health_timeout_s=0.5,
        )
        bal = Balancer(cfg)
        real = bal.backends["real"]
        await bal.check(real)
        assert not real.healthy  # rise = 2
        await bal.check(real)
        assert real.healthy
        mute_cfg = _config(
            gateways=[{"name": "mute", "host": "127.0.0.1"}],
            health_port=mute_port,
            health_timeout_s=0.3,
        )
        silent = Balancer(mute_cfg).backends["mute"]
        silent.healthy = True
        checker = Balancer(mute_cfg)
        checker.backends["mute"] = silent
        await checker.check(silent)
        assert silent.healthy  # fall = 2
        await checker.check(silent)
        assert not silent.healthy
        assert "timed out" in silent.last_error
    for lst in mute:
        await lst.aclose()


async def test_gateways_come_from_the_broker_too(tmp_path, nursery):
    from ras.errors import ErrorCode
    from ras.halb.daemon import Halb
    from ras.net.channel import Channel, PeerError
    from ras.net.tls import connect_tls
    from ras.pki import client_context
    from ras.protocol import Hello, RedeemTicket, Role, Side, Welcome

    async with farm(tmp_path, gateways=("gw-a", "gw-b")) as f:
        for gw in f.gateways.values():
            with trio.fail_after(10):
                await gw.registered.wait()
        cert, key = f.pki.ensure("halb1", ("localhost",))
        cfg = _config(
            gateways=[{"name": "static", "host": "10.0.0.9"}, {"name": "gw-b", "host": "10.0.0.2"}],
            broker_host="127.0.0.1",
            broker_port=f.broker_addrs["gateways"][1],
            cert_file=str(cert),
            key_file=str(key),
            ca_file=str(f.pki.ca_path),
            broker_poll_interval_s=0.1,
        )
        halb = Halb(cfg)
        nursery.start_soon(halb._broker_gateways)
        with trio.fail_after(10):
            await await_until(lambda: "gw-a" in halb.balancer.backends, what="gw-a listed")
        hosts = {name: b.host for name, b in halb.balancer.backends.items()}
        # the broker's gw-a joins; for gw-b, named in the config too, the config wins
        assert hosts == {"static": "10.0.0.9", "gw-b": "10.0.0.2", "gw-a": "localhost"}

        # a HALB certificate gets the gateway list and nothing else
        ctx = client_context(f.pki.ca_path, cert_file=cert, key_file=key)
        stream = await connect_tls(
            "127.0.0.1", f.broker_addrs["gateways"][1], ctx, server_hostname="localhost"
        )
        async with Channel(stream, Side.CLIENT) as chan:
            await chan.send(Hello(Role.HALB, "test"))
            assert isinstance(await chan.receive(), Welcome)
            with pytest.raises(PeerError) as info:
                await chan.request(RedeemTicket("t1.x.y"))
        assert info.value.code is ErrorCode.UNEXPECTED
        nursery.cancel_scope.cancel()
