"""The gateway behind a proxy: PROXY v2 headers from trusted sources name the real client.

Each test runs a real in-process farm (broker, gateway, agent over mutual TLS on loopback) with
a stand-in RDP host that echoes. The test plays the proxy (a HALB node or forwarding gateway)
from 127.0.0.1: it writes a PROXY v2 header, then the client's bytes.
"""

from __future__ import annotations

import logging
import re
import struct
from pathlib import Path

import pytest
import trio
from farmkit import PASSWORD, USER, add_gateway, farm

from ras.config import load
from ras.errors import ConfigError, ErrorCode
from ras.gateway.config import GatewayConfig
from ras.net.channel import Channel, PeerError
from ras.net.sniff import PrefixedStream
from ras.pki import client_context
from ras.protocol import (
    PROXY_V2_SIGNATURE,
    Authenticate,
    AuthOk,
    Hello,
    Launch,
    LaunchOk,
    Message,
    Mode,
    OpenTunnel,
    Ping,
    Pong,
    Role,
    Side,
    TunnelOpen,
    Welcome,
    encode_body,
    encode_v2,
    encode_v2_local,
    preface,
)

CLIENT = ("10.9.8.7", 5555)  # the client behind the proxy
TRUSTED = ("192.0.2.0/24", "127.0.0.1")


async def _open(
    addr: tuple[str, int], header: bytes = b"", *, ca_file: Path | None = None
) -> trio.abc.Stream:
    """A connection from 127.0.0.1 that starts with ``header``, then TLS if ``ca_file``."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(*addr)
    if header:
        await stream.send_all(header)
    if ca_file is not None:
        stream = trio.SSLStream(stream, client_context(ca_file), server_hostname="localhost")
        await stream.do_handshake()
    return stream


async def _session(
    addr: tuple[str, int], header: bytes = b"", *, ca_file: Path | None = None
) -> Channel:
    """A control-protocol session, past hello/welcome, behind ``header``."""
    chan = Channel(await _open(addr, header, ca_file=ca_file), Side.CLIENT)
    with trio.fail_after(10):
        await chan.send(Hello(Role.CLIENT, "test"))
        assert isinstance(await chan.receive(), Welcome)
    return chan


async def _launch(chan: Channel, mode: Mode) -> LaunchOk:
    with trio.fail_after(10):
        assert isinstance(await chan.request(Authenticate(USER, PASSWORD)), AuthOk)
        launched = await chan.request(Launch("desktop", mode))
    assert isinstance(launched, LaunchOk)
    return launched


async def _echo_through_tunnel(chan: Channel, payload: bytes) -> bytes:
    tunnel = PrefixedStream(chan.stream, chan.into_tunnel())
    await tunnel.send_all(payload)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(payload):
            got += await tunnel.receive_some()
    return got


async def _closed_without_answer(stream: trio.abc.Stream) -> bool:
    """True when the gateway closes the connection without sending a byte."""
    with trio.fail_after(10):
        try:
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:  # closed with our bytes unread: a reset
            return True


def _frame(msg: Message) -> bytes:
    body = encode_body(msg)
    return struct.pack("!I", len(body)) + body


def _clients(caplog: pytest.LogCaptureFixture, logger: str, what: str) -> list[str]:
    """The client= field of every ``logger`` line that starts with ``what``."""
    return [
        re.search(r"client=(\S+)", r.getMessage()).group(1)
        for r in caplog.records
        if r.name == logger and r.getMessage().startswith(what)
    ]


# -- (a) a trusted proxy on the plain port --------------------------------------------------


async def test_trusted_proxy_names_the_client_and_binds_its_ticket(tmp_path, nursery, host, caplog):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gateway", trusted_proxies=TRUSTED)
        plain = f.gateway_addrs["gateway"]["plain"]
        header = encode_v2(CLIENT, plain)

        async with await _session(plain, header) as chan:
            launched = await _launch(chan, Mode.GATEWAY)
        assert _clients(caplog, "ras.broker", "auth ok") == ["10.9.8.7"]
        assert _clients(caplog, "ras.broker", "launch") == ["10.9.8.7"]

        # The ticket is bound to the client the proxy named: the proxy's own address, on a
        # direct connection without the header, cannot redeem it ...
        async with await _session(plain) as chan:
            with pytest.raises(PeerError) as info:
                await chan.request(OpenTunnel(launched.ticket))
        assert info.value.code is ErrorCode.TICKET_INVALID
        assert _clients(caplog, "ras.broker", "ticket refused") == ["127.0.0.1"]
        assert host.connections == 0

        # ... and through the proxy it opens the tunnel (the refusal did not burn it).
        async with await _session(plain, header) as chan:
            assert isinstance(await chan.request(OpenTunnel(launched.ticket)), TunnelOpen)
            assert await _echo_through_tunnel(chan, b"x224 bytes") == b"x224 bytes"
        assert _clients(caplog, "ras.broker", "ticket redeemed") == ["10.9.8.7"]
        assert _clients(caplog, "ras.gateway", "tunnel open") == ["10.9.8.7:5555"]
    assert host.connections == 1


# -- (b) the TLS port: PROXY v2 comes before the ClientHello --------------------------------


async def test_trusted_proxy_on_the_tls_port_comes_before_tls(tmp_path, nursery, host, caplog):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gateway", trusted_proxies=TRUSTED)
        tls = f.gateway_addrs["gateway"]["tls"]
        ca_file = f.pki.directory / "gateway-public.pem"
        header = encode_v2(CLIENT, tls)

        async with await _session(tls, header, ca_file=ca_file) as chan:
            launched = await _launch(chan, Mode.GATEWAY_SSL)
        async with await _session(tls, header, ca_file=ca_file) as chan:
            assert isinstance(await chan.request(OpenTunnel(launched.ticket)), TunnelOpen)
            assert await _echo_through_tunnel(chan, b"over TLS") == b"over TLS"
        assert _clients(caplog, "ras.broker", "launch") == ["10.9.8.7"]
        assert _clients(caplog, "ras.broker", "ticket redeemed") == ["10.9.8.7"]
        tunnel_lines = [r.getMessage() for r in caplog.records if "tunnel open" in r.getMessage()]
        assert len(tunnel_lines) == 1
        assert "client=10.9.8.7:5555" in tunnel_lines[0]
        assert "tls=True" in tunnel_lines[0]

        # A header is read once, outside TLS: inside TLS it is just not the control protocol.
        async with await _open(tls, header, ca_file=ca_file) as stream:
            await stream.send_all(header + preface())
            assert await _closed_without_answer(stream)
    assert host.connections == 1


# -- (c) an untrusted source ----------------------------------------------------------------


@pytest.mark.parametrize("trusted", [("10.0.0.0/8",), ()], ids=["other-network", "none"])
@pytest.mark.parametrize("port", ["plain", "tls"])
async def test_untrusted_source_is_refused_and_nothing_reaches_the_broker(
    tmp_path, nursery, caplog, trusted, port
):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, gateways=()) as f:
        await add_gateway(f, nursery, "gateway", trusted_proxies=trusted)
        addr = f.gateway_addrs["gateway"][port]
        # the header, then a client's hello and login, in one write
        async with await _open(addr) as stream:
            await stream.send_all(
                encode_v2(CLIENT, addr)
                + preface()
                + _frame(Hello(Role.CLIENT, "test"))
                + _frame(Authenticate(USER, PASSWORD))
            )
            assert await _closed_without_answer(stream)
        refused = [r.getMessage() for r in caplog.records if r.name == "ras.gateway"]
        assert any(
            re.fullmatch(
                r"refused peer=127\.0\.0\.1:\d+ reason=PROXY v2 from an untrusted source", line
            )
            for line in refused
        )
        assert not [
            r for r in caplog.records if r.name == "ras.broker" and "client=" in r.getMessage()
        ]
        # the gateway keeps serving everyone else
        await (await _session(f.gateway_addrs["gateway"]["plain"])).aclose()


# -- (d) LOCAL: a proxy's health check ------------------------------------------------------


async def test_local_header_is_a_health_check_from_the_proxy_itself(
    tmp_path, nursery, host, caplog
):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gateway", trusted_proxies=TRUSTED)
        for port in ("plain", "tls"):
            addr = f.gateway_addrs["gateway"][port]
            tls = port == "tls"
            ca_file = f.pki.directory / "gateway-public.pem" if tls else None
            async with await _session(addr, encode_v2_local(), ca_file=ca_file) as chan:
                with trio.fail_after(10):
                    await chan.send(Ping(41))
                    assert await chan.receive() == Pong(41)
                # a LOCAL connection is the proxy's own: it is the client
                await _launch(chan, Mode.GATEWAY_SSL if tls else Mode.GATEWAY)
        assert _clients(caplog, "ras.broker", "launch") == ["127.0.0.1", "127.0.0.1"]

        # haproxy's TCP check: connect, LOCAL header, close. Quietly, and nothing breaks.
        checks = []
        for port in ("plain", "tls"):
            async with await _open(f.gateway_addrs["gateway"][port], encode_v2_local()) as stream:
                checks.append(f"peer=127.0.0.1:{stream.socket.getsockname()[1]} ")
                await stream.send_eof()
                assert await _closed_without_answer(stream)
        await trio.sleep(0.2)  # the gateway's handlers finish
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert not [line for line in lines if any(check in line for check in checks)]
        await (await _session(f.gateway_addrs["gateway"]["plain"], encode_v2_local())).aclose()


# -- (e) a broken header closes that connection only ----------------------------------------

_ADDRESSES = bytes(12)
# what follows the signature; all but the truncated one are refused as bad headers
BROKEN = [
    b"\x99" * 20,  # version 9
    b"\x21\x77\x00\x0c" + _ADDRESSES,  # family 0x77
    b"\x21\x11\xff\xff" + b"\x00" * 64,  # over the length limit
    b"\x21\x21\x00\x0c" + _ADDRESSES,  # IPv6 in 12 bytes
    b"\x21\x11\x00\x10" + _ADDRESSES + b"\x01\x00\x09\x00",  # a TLV past the end
    bytes(range(256)),  # version 0
]
TRUNCATED = b"\x21\x11\x00\x0c\x7f\x00"  # then the proxy closes


@pytest.mark.parametrize("port", ["plain", "tls"])
async def test_a_broken_header_closes_the_connection_and_the_gateway_keeps_serving(
    tmp_path, nursery, host, caplog, port
):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gateway", trusted_proxies=TRUSTED)
        addr = f.gateway_addrs["gateway"][port]
        for tail in [*BROKEN, TRUNCATED]:
            async with await _open(addr, PROXY_V2_SIGNATURE + tail) as stream:
                if tail is TRUNCATED:
                    await stream.send_eof()
                assert await _closed_without_answer(stream)
        # no handler crashed, and a good header still works
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        tls = port == "tls"
        ca_file = f.pki.directory / "gateway-public.pem" if tls else None
        async with await _session(addr, encode_v2(CLIENT, addr), ca_file=ca_file) as chan:
            await _launch(chan, Mode.GATEWAY_SSL if tls else Mode.GATEWAY)
        assert _clients(caplog, "ras.broker", "launch") == ["10.9.8.7"]
    lines = [r.getMessage() for r in caplog.records if r.name == "ras.gateway"]
    assert len([line for line in lines if "reason=bad PROXY v2 header" in line]) == len(BROKEN)
    assert any("closed in the middle of the PROXY v2 header" in line for line in lines)


async def test_a_header_trickled_past_the_handshake_deadline_is_dropped(tmp_path, nursery):
    async with farm(tmp_path, gateways=()) as f:
        await add_gateway(f, nursery, "gateway", trusted_proxies=TRUSTED, handshake_timeout_s=0.5)
        addr = f.gateway_addrs["gateway"]["plain"]
        header = encode_v2(CLIENT, addr)
        async with await _open(addr, header[:20]) as stream:
            await trio.sleep(0.3)
            await stream.send_all(header[20:22])
            start = trio.current_time()
            assert await _closed_without_answer(stream)
            assert trio.current_time() - start < 5


# -- configuration --------------------------------------------------------------------------

_REQUIRED = """
name = "gw1"
public_cert_file = "pub.pem"
public_key_file = "pub.key"
cert_file = "gw1.pem"
key_file = "gw1.key"
ca_file = "ca.pem"
"""


def test_trusted_proxies_load_from_toml(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(_REQUIRED + 'trusted_proxies = ["10.0.1.0/24", "192.0.2.10", "fd00::/8"]\n')
    cfg = load(GatewayConfig, path)
    assert cfg.trusted_proxies == ("10.0.1.0/24", "192.0.2.10", "fd00::/8")
    assert load(GatewayConfig, _write(tmp_path, "")).trusted_proxies == ()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('["10.0.1.0/24", "halb1.lab"]', r"key 'trusted_proxies\[1\]': 'halb1.lab' does not"),
        ('["10.0.1.1/24"]', r"has host bits set \(the network is 10\.0\.1\.0/24\)"),
        ('["10.0.0.0/33"]', r"key 'trusted_proxies\[0\]'"),
        ('"10.0.0.0/8"', r"key 'trusted_proxies': expected a list"),
        ("[8]", r"key 'trusted_proxies\[0\]': expected str"),
    ],
)
def test_bad_trusted_proxies_are_config_errors(tmp_path, value, error):
    path = _write(tmp_path, f"trusted_proxies = {value}\n")
    with pytest.raises(ConfigError, match=error):
        load(GatewayConfig, path)


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(_REQUIRED + extra)
    return path


def test_the_commented_example_in_gateway_toml_loads(tmp_path):
    example = Path(__file__).parent.parent / "deploy" / "examples" / "gateway.toml"
    text = example.read_text()
    assert "\n# trusted_proxies = [" in text
    path = tmp_path / "gateway.toml"
    path.write_text(text.replace("\n# trusted_proxies = [", "\ntrusted_proxies = ["))
    assert load(GatewayConfig, path).trusted_proxies
