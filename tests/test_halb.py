"""HALB pieces that need no lab: config checks, capabilities, least-connections choice, health
checks against a real gateway (a port that only accepts TCP is not healthy), the retry of a
failed connect on the next gateway, and gateway tracking (the priority follows the gateways)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys

import pytest
import trio
from farmkit import farm
from labkit import await_until

from ras.config import from_mapping
from ras.errors import ConfigError, RasError
from ras.halb.balancer import Balancer
from ras.halb.config import GatewayRef, HalbConfig
from ras.halb.daemon import Halb
from ras.halb.vip import arp_announcement, missing_capabilities
from ras.net.channel import Channel
from ras.net.health import probe
from ras.protocol import PROTOCOL_VERSION, Hello, Ping, Pong, Side, Welcome


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
        ("no_gateway_priority", 0, r"between 1 and priority \(100\)"),
        ("no_gateway_priority", 101, r"between 1 and priority \(100\)"),
        ("no_gateway_priority", True, "expected int"),
    ],
)
def test_bad_halb_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"halb.toml: key '{key}'.*{message}"):
        _config(**{key: value})


def test_the_address_owner_cannot_follow_its_gateways():
    with pytest.raises(ConfigError, match=r"key 'no_gateway_priority'.*address owner.*254"):
        _config(priority=255, no_gateway_priority=100)
    assert _config(priority=255).tracked_priority is None  # the owner keeps 255


@pytest.mark.parametrize(
    ("settings", "tracked"),
    [
        ({}, 1),  # by default: below every node that has a gateway
        ({"priority": 150, "no_gateway_priority": 90}, 90),
        ({"priority": 150, "no_gateway_priority": 150}, None),  # tracking off
        ({"priority": 1}, None),  # nothing lower to drop to
    ],
)
def test_priority_while_no_gateway_is_healthy(settings, tracked):
    assert _config(**settings).tracked_priority == tracked


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


# -- gateway tracking ----------------------------------------------------------------------------


async def test_the_priority_follows_the_gateways(nursery):
    """No election runs here (it needs a lab): what the daemon asks of it is read back."""
    halb = Halb(
        _config(
            priority=150,
            no_gateway_priority=20,
            gateways=[{"name": "a", "host": "10.0.0.1"}, {"name": "b", "host": "10.0.0.2"}],
        )
    )
    bal, election = halb.balancer, halb.election
    halb._track_gateways()
    assert election.priority == 20  # a cold start: low until a check passes
    nursery.start_soon(halb._follow_gateways)

    async def priority_becomes(value: int) -> None:
        with trio.fail_after(5):
            await await_until(lambda: election.priority == value, what=f"priority {value}")

    for _ in range(2):  # rise = 2
        bal._result(bal.backends["a"], ok=True, why="")
    await priority_becomes(150)
    assert halb.status()["priority"] == 150
    assert halb.status()["base_priority"] == 150
    for _ in range(2):  # fall = 2: a is down, and no other gateway is up
        bal._result(bal.backends["a"], ok=False, why="refused")
    await priority_becomes(20)
    for _ in range(2):
        bal._result(bal.backends["b"], ok=True, why="")
    await priority_becomes(150)
    bal.set_gateways((GatewayRef("c", "10.0.0.3"),))  # a reload that leaves no healthy gateway
    await priority_becomes(20)
    assert halb.status()["priority"] == 20
    assert halb.status()["base_priority"] == 150


# -- a failed connect tries the next gateway -----------------------------------------------------


async def _mini_gateway(stream: trio.SocketStream) -> None:
    """A gateway's control port, as far as a health check or a probing client goes."""
    async with Channel(stream, Side.SERVER) as chan:
        with contextlib.suppress(RasError):  # the peer closed: done
            if isinstance(await chan.receive(), Hello):
                await chan.send(Welcome(PROTOCOL_VERSION, "mini-gateway"))
                while True:
                    msg = await chan.receive()
                    if isinstance(msg, Ping):
                        await chan.send(Pong(msg.nonce))


async def _gateways_on_one_port(nursery, *hosts: str) -> tuple[int, list[trio.CancelScope]]:
    """Mini gateways on ``hosts`` (loopback addresses), all on one port (the balancer's
    backend port is per service). Cancel a scope to kill that gateway: its port refuses."""
    for _ in range(20):
        first = await trio.open_tcp_listeners(0, host=hosts[0])
        port = first[0].socket.getsockname()[1]
        try:
            rest = [await trio.open_tcp_listeners(port, host=h) for h in hosts[1:]]
        except OSError:  # the port is taken on another address: pick another
            for lst in first:
                await lst.aclose()
            continue
        scopes = []
        for listeners in (first, *rest):
            scope = trio.CancelScope()
            scopes.append(scope)

            async def serve(listeners=listeners, scope=scope) -> None:
                with scope:
                    await trio.serve_listeners(_mini_gateway, listeners)
                for lst in listeners:
                    await lst.aclose()

            nursery.start_soon(serve)
        return port, scopes
    raise AssertionError("no port free on every address")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def _balancer_over(nursery, hosts: dict[str, str]) -> tuple[Balancer, list, str, int]:
    """A balancer on VIP 127.0.0.3 over mini gateways; checks every hour (rise 1, fall 2), so
    what happens between two checks is up to the forwarding alone."""
    port, scopes = await _gateways_on_one_port(nursery, *hosts.values())
    vip, listen = "127.0.0.3", _free_port("127.0.0.3")
    bal = Balancer(
        _config(
            vips=[f"{vip}/32"],
            services=[{"listen_port": listen, "backend_port": port, "proxy_protocol": False}],
            gateways=[{"name": n, "host": h} for n, h in hosts.items()],
            health_port=port,
            health_interval_s=3600.0,
            rise=1,
            fall=2,
            connect_timeout_s=2.0,
        )
    )
    await nursery.start(bal.serve)
    with trio.fail_after(10):
        await bal.ready.wait()
    assert all(b.healthy for b in bal.backends.values())
    return bal, scopes, vip, listen


async def test_a_gateway_killed_between_checks_costs_no_client_connection(nursery):
    bal, (_, kill_b), vip, port = await _balancer_over(
        nursery, {"a": "127.0.0.1", "b": "127.0.0.2"}
    )
    kill_b.cancel()  # b dies; the next health check is an hour away
    with trio.fail_after(5):
        await await_until(lambda: _refused("127.0.0.2", port=bal.config.health_port), what="b dead")
    for _ in range(10):
        with trio.fail_after(10):
            await probe(vip, port, software="test-client")  # raises if not served
    b = bal.backends["b"]
    # b was tried (least connections, ties rotate), refused, and its failed connects took it
    # down (fall = 2) with no health check: clients go straight to a now.
    assert not b.healthy
    assert b.last_error.startswith("forward: ")
    assert bal.backends["a"].healthy
    assert bal.backends["a"].total >= 10
    with trio.fail_after(5):  # failed attempts left no connection counted
        await await_until(
            lambda: all(x.active == 0 for x in bal.backends.values()), what="no active left"
        )


async def test_a_client_is_given_up_once_every_gateway_refused(nursery):
    bal, scopes, vip, port = await _balancer_over(nursery, {"a": "127.0.0.1", "b": "127.0.0.2"})
    for scope in scopes:
        scope.cancel()
    with trio.fail_after(5):
        await await_until(
            lambda: all(_refused(h, bal.config.health_port) for h in ("127.0.0.1", "127.0.0.2")),
            what="both dead",
        )
    with trio.fail_after(10), pytest.raises(RasError):
        await probe(vip, port, software="test-client")
    # each gateway was tried once, and each failure counts toward its fall
    assert {n: (b.total, b.failures) for n, b in bal.backends.items()} == {
        "a": (1, 1),
        "b": (1, 1),
    }


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
        return False
