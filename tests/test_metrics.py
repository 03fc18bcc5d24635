"""Prometheus metrics: the /metrics listener (loopback, allow-list, TLS), what the daemons
count, and what the config refuses. A real in-process farm on loopback, scraped over HTTP."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import socket
import ssl
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, farm
from prometheus_client.parser import text_string_to_metric_families

from ras.cli.common import daemon_options, setup_logging
from ras.client.session import ClientSession
from ras.config import from_mapping
from ras.errors import AuthError, ConfigError
from ras.gateway.config import GatewayConfig, GatewayMode, NextHop
from ras.gateway.limits import Refusal, SourceLimits
from ras.gateway.server import Gateway
from ras.halb.config import GatewayRef, HalbConfig
from ras.halb.daemon import Halb
from ras.logs import JsonFormatter
from ras.net.channel import PeerError
from ras.ops.config import LogFormat, MetricsConfig
from ras.ops.listener import serve_metrics
from ras.ops.metrics import limit_reason, ticket_reason
from ras.ops.sources import gateway_state, halb_state
from ras.pki import FarmPKI
from ras.protocol import Mode
from ras.protocol.vrrp import VrrpState

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(
    address: tuple[str, int], path: str = "/metrics", *, context: ssl.SSLContext | None = None
) -> tuple[int, str]:
    scheme = "https" if context else "http"
    url = f"{scheme}://{address[0]}:{address[1]}{path}"

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await trio.to_thread.run_sync(get)


async def test_metrics_answers_get_only_on_its_path(nursery):
    address = await nursery.start(partial(serve_metrics, MetricsConfig(), port=0))
    status, text = await scrape(address)
    assert status == 200
    assert 'ras_build_info{version="' in text
    assert value(parse(text), "ras_gateway_tunnels_total", mode="ticket") >= 0
    assert (await scrape(address, "/"))[0] == 404
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}/metrics", method="POST")

    def post() -> int:
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    assert await trio.to_thread.run_sync(post) == 405


async def test_an_address_not_allowed_gets_nothing(nursery):
    config = MetricsConfig(allow=("192.0.2.0/24",))  # loopback listener, but not us
    address = await nursery.start(partial(serve_metrics, config, port=0))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # closed, no answer
        await scrape(address)


async def test_off_loopback_it_is_tls_and_the_allow_list(tmp_path, nursery):
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    cert, key = pki.ensure("metrics", ("localhost", "127.0.0.1"))
    config = MetricsConfig(cert_file=cert, key_file=key, allow=("127.0.0.0/8",))
    address = await nursery.start(partial(serve_metrics, config, port=0))
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    status, text = await scrape(address, context=context)
    assert status == 200
    assert "ras_build_info" in text
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP, TLS port
        await scrape(address)


async def test_an_address_not_allowed_gets_no_tls_handshake(tmp_path, nursery):
    """Closed before a byte is read: no certificate and no TLS work for an address not allowed
    (the listener once completed the handshake to send its close_notify)."""
    pki = FarmPKI(tmp_path / "pki")
    cert, key = pki.ensure("metrics", ("localhost", "127.0.0.1"))
    config = MetricsConfig(cert_file=cert, key_file=key, allow=("192.0.2.0/24",))
    address = await nursery.start(partial(serve_metrics, config, port=0))
    context = ssl.create_default_context(cafile=str(pki.ca_path))

    def handshake() -> bool:
        with socket.create_connection(address, timeout=10) as sock:
            try:
                context.wrap_socket(sock, server_hostname="127.0.0.1").close()
            except (ssl.SSLError, ConnectionError):
                return False
        return True

    assert not await trio.to_thread.run_sync(handshake)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"port": 9464, "listen_host": "0.0.0.0", "allow": ["10.0.0.0/8"]}, "metrics.cert_file"),
        (
            {"port": 9464, "listen_host": "0.0.0.0", "cert_file": "c.pem", "key_file": "k.pem"},
            "metrics.allow",
        ),
        ({"port": 9464, "allow": ["10.0.0.300"]}, "metrics.allow[0]"),
        ({"port": 9464, "prot": 1}, "metrics.prot"),
    ],
)
def test_a_bad_metrics_table_names_the_file_and_key(table, key):
    data = {"name": "gw1", "metrics": table}
    with pytest.raises(ConfigError) as info:
        from_mapping(GatewayConfig, data, source="/etc/ras/gateway.toml")
    assert "/etc/ras/gateway.toml" in str(info.value)
    assert f"'{key}'" in str(info.value)


async def test_tunnels_and_their_bytes_are_counted_when_they_end(tmp_path, nursery):
    host = Listener()
    await nursery.start(host.serve)
    address = await nursery.start(partial(serve_metrics, MetricsConfig(), port=0))
    before = parse((await scrape(address))[1])
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        async with await ClientSession.connect(f.client_config(mode=Mode.GATEWAY)) as session:
            await session.authenticate(USER, PASSWORD)
            launched = await session.launch("desktop")
            tunnel = await session.open_tunnel(launched.ticket)
        payload = b"x" * 100_000
        async with tunnel:
            await tunnel.send_all(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += await tunnel.receive_some()
            during = parse((await scrape(address))[1])
            await tunnel.send_eof()
            while await tunnel.receive_some():
                pass
        await f.gateways["gateway"].tunnels.wait_empty()  # its side ends just after ours
        after = parse((await scrape(address))[1])

    def delta(name: str, samples: Samples, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    assert delta("ras_gateway_tunnels_total", during, mode="ticket") == 1
    assert delta("ras_gateway_tunnels_open", during, mode="ticket") == 1
    assert delta("ras_gateway_tunnel_bytes_total", during, mode="ticket", direction="up") == 0
    assert delta("ras_gateway_tunnels_open", after, mode="ticket") == 0
    for direction in ("up", "down"):
        bytes_total = delta(
            "ras_gateway_tunnel_bytes_total", after, mode="ticket", direction=direction
        )
        assert bytes_total == 100_000
    assert delta("ras_gateway_tunnel_seconds_count", after, mode="ticket") == 1
    # the broker counted the login, the launch and the ticket
    assert delta("ras_broker_logins_total", after, result="ok", factor="password") == 1
    assert delta("ras_broker_launches_total", after, result="ok", mode="gateway") == 1
    assert delta("ras_broker_tickets_total", after, event="issued", reason="") == 1
    assert delta("ras_broker_tickets_total", after, event="redeemed", reason="") == 1
    assert delta("ras_broker_launch_seconds_count", after) == 1
    assert delta("ras_broker_placements_total", after, method="resource") == 1
    # the state read at scrape time: the agent reports, the gateway's link is up
    assert value(during, "ras_broker_agents", state="reporting") == 1
    assert value(during, "ras_broker_gateway_links", gateway="gateway") == 1
    assert value(during, "ras_broker_sessions", host="host1", state="launching") == 1
    assert value(during, "ras_gateway_broker_link_up", gateway="gateway") == 1
    assert value(during, "ras_agent_broker_connected", host="host1") == 1
    # nothing of the user or the client address in any label
    text = (await scrape(address))[1]
    assert USER not in text


def test_json_lines_carry_the_session_and_escape_what_a_peer_sent():
    record = logging.LogRecord(
        "ras.gateway", logging.INFO, __file__, 1,
        "tunnel open user=%s session=%s client=%s", ("a\nb", "s-0123abcd", "127.0.0.1:5"), None,
    )  # fmt: skip
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "INFO"
    assert obj["logger"] == "ras.gateway"
    assert obj["session"] == "s-0123abcd"
    assert obj["fields"]["user"] == "a\\nb"
    assert obj["message"].startswith("tunnel open user=a\\nb ")


async def test_refused_logins_and_tickets_are_counted_by_reason(tmp_path, nursery):
    host = Listener()
    await nursery.start(host.serve)
    address = await nursery.start(partial(serve_metrics, MetricsConfig(), port=0))
    before = parse((await scrape(address))[1])
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config(mode=Mode.GATEWAY)
        async with await ClientSession.connect(cfg) as session:
            with pytest.raises(AuthError):
                await session.authenticate(USER, "not the password")
            await session.authenticate(USER, PASSWORD)
            ticket = (await session.launch("desktop")).ticket
        tunnel = await ClientSession(cfg, None).open_tunnel(ticket)  # type: ignore[arg-type]
        await tunnel.aclose()
        with pytest.raises(PeerError):  # the same ticket again: used
            await ClientSession(cfg, None).open_tunnel(ticket)  # type: ignore[arg-type]
        after = parse((await scrape(address))[1])

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ras_broker_logins_total", result="failed", factor="password") == 1
    assert delta("ras_broker_logins_total", result="ok", factor="password") == 1
    assert delta("ras_broker_tickets_total", event="redeemed", reason="") == 1
    assert delta("ras_broker_tickets_total", event="refused", reason="used") == 1


@dataclasses.dataclass(frozen=True)
class _Daemon:  # what daemon_options reads of any daemon's config
    metrics: MetricsConfig | None = None


def test_the_metrics_flag_overrides_the_table_and_a_bad_one_names_itself():
    args = argparse.Namespace(metrics="10.0.0.5:9471", log_format=None, log_level="info")
    tls = MetricsConfig(cert_file=Path("c.pem"), key_file=Path("k.pem"), allow=("10.0.9.5",))
    base = _Daemon(metrics=tls)
    config = daemon_options(args, base)
    assert config.metrics is not None
    assert (config.metrics.listen_host, config.metrics.port) == ("10.0.0.5", 9471)
    assert config.metrics.allow == ("10.0.9.5",)  # the rest of the table stays
    plain = daemon_options(argparse.Namespace(metrics="9999"), _Daemon())
    assert plain.metrics == MetricsConfig(port=9999)
    for bad in ("nope", "70000", "0.0.0.0:9471"):  # the last: off loopback without TLS
        with pytest.raises(ConfigError, match=f"^--metrics {bad}: "):
            daemon_options(argparse.Namespace(metrics=bad), _Daemon())


def test_the_halb_state_a_scrape_reads():
    config = HalbConfig(
        name="halb1", vips=("10.0.0.254/24",), vrid=52,
        gateways=(GatewayRef("gw1", "10.0.0.21"), GatewayRef("gw2", "10.0.0.22")),
    )  # fmt: skip
    halb = Halb(config)
    samples = {(family, labels): v for family, labels, v in halb_state(halb)}
    assert samples["ras_halb_vrrp_state", ("52", "initialize")] == 1
    assert samples["ras_halb_vrrp_state", ("52", "master")] == 0
    assert samples["ras_halb_healthy_backends", ("52",)] == 0
    halb.election.state = VrrpState.MASTER
    halb.balancer.backends["gw2"].healthy = True
    halb.balancer.backends["gw2"].active = 3
    samples = {(family, labels): v for family, labels, v in halb_state(halb)}
    assert samples["ras_halb_vrrp_state", ("52", "master")] == 1
    assert samples["ras_halb_healthy_backends", ("52",)] == 1
    assert samples["ras_halb_backend_up", ("52", "gw1")] == 0
    assert samples["ras_halb_backend_active", ("52", "gw2")] == 3


def test_refusals_map_to_the_limit_and_reason_they_hit():
    limits = SourceLimits(per_ip=1, total=10, rate_per_s=1.0, burst=2, clock=lambda: 0.0)
    assert not isinstance(limits.admit("10.0.0.1"), Refusal)
    per_address = limits.admit("10.0.0.1")  # the second waiting one from the address
    rate = limits.admit("10.0.0.1")  # the third in the same instant: over the burst
    assert isinstance(per_address, Refusal)
    assert isinstance(rate, Refusal)
    assert (limit_reason(per_address), limit_reason(rate)) == ("per_address", "rate")
    assert ticket_reason("ticket has expired") == "expired"
    assert ticket_reason("ticket was already used") == "used"
    assert ticket_reason("ticket signature is not valid") == "forged"
    assert ticket_reason("ticket was issued to client 10.0.0.9") == "other_client"
    assert ticket_reason("it was issued through gateway 'gw-a'") == "other_gateway"
    assert ticket_reason("resource 'x' is no longer published") == "unpublished"


def test_json_logs_by_flag_or_by_the_daemons_config(capsys):
    log = logging.getLogger("ras.test")
    root = logging.getLogger("ras")
    saved = root.handlers[:], root.level, root.propagate
    try:
        setup_logging("info", "json")
        log.info("tunnel open user=%s session=%s", "alice", "s-00112233aabb")
        line = capsys.readouterr().err.strip()
        assert json.loads(line)["session"] == "s-00112233aabb"
        # no --log-format: the config's log_format = "json" switches the lines over
        setup_logging("info", "text")
        daemon_options(
            argparse.Namespace(log_format=None, log_level="info"),
            _Logged(log_format=LogFormat.JSON),
        )
        log.info("gateway ready name=%s", "gw1")
        assert json.loads(capsys.readouterr().err)["fields"] == {"name": "gw1"}
        # --log-format text wins over the config
        setup_logging("info", "text")
        daemon_options(
            argparse.Namespace(log_format="text", log_level="info"),
            _Logged(log_format=LogFormat.JSON),
        )
        log.info("gateway ready name=%s", "gw1")
        assert capsys.readouterr().err.split(" ", 1)[1] == "ras.test INFO gateway ready name=gw1\n"
    finally:
        root.handlers[:], root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])


@dataclasses.dataclass(frozen=True)
class _Logged:
    log_format: LogFormat = LogFormat.TEXT


def test_a_forwarders_next_hops_and_waiting_connections_as_a_scrape_reads_them():
    config = GatewayConfig(
        name="fw1", mode=GatewayMode.FORWARDING,
        next_hops=(NextHop("10.0.0.21", 80, 443), NextHop("10.0.0.22", 80, 443)),
    )  # fmt: skip
    gateway = Gateway(config)
    assert gateway.forwarder is not None
    gateway.forwarder.hops[1].healthy = True
    gateway.limits.admit("192.0.2.7")  # one connection waiting to authenticate
    samples = {(family, labels): v for family, labels, v in gateway_state(gateway)}
    assert samples == {
        ("ras_gateway_preauth_connections", ("fw1",)): 1.0,
        ("ras_gateway_next_hop_up", ("fw1", str(config.next_hops[0]))): 0.0,
        ("ras_gateway_next_hop_up", ("fw1", str(config.next_hops[1]))): 1.0,
    }  # a forwarder has no broker link
