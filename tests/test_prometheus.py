"""deploy/prometheus against the real Prometheus (Debian's prometheus and promtool).

``promtool`` checks the shipped scrape config and alert rules and runs the rules' unit tests;
every metric the rules and the Grafana dashboard name is one the daemons export. Then a real
Prometheus scrapes a farm of real ``ras broker``, ``ras gateway`` and ``ras agent`` processes
(each with ``--metrics``) while a client logs in and opens tunnels, and its HTTP API must show
what the client did: tunnels opened equal to the launches made, the bytes they carried.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import promkit
import pytest
import trio
from farmkit import Listener
from peerkit import skip_or_fail
from promkit import DEPLOY

from ras.client.config import ClientConfig
from ras.client.session import ClientSession
from ras.config import load
from ras.lab.etcdcluster import free_ports
from ras.ops import metrics


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        skip_or_fail("promtool is not installed (Debian: prometheus; scripts/install-peers)")
    return subprocess.run(
        ["promtool", *args], cwd=DEPLOY, capture_output=True, text=True, check=False, timeout=60
    )


def test_promtool_checks_the_scrape_config_and_the_rules():
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool("check", "rules", "ras-rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 12 rules found" in rules.stdout


def test_the_alert_rules_fire_when_they_should():
    """ras-rules.test.yml: a broker down, a broker cut off from etcd, brokers without a primary
    (or with two), no healthy gateway behind the VIP, a split brain, certificates near expiry,
    lying and silent hosts (promtool's rule unit tests)."""
    result = _promtool("test", "rules", "ras-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _exported() -> set[str]:
    """Every series name the daemons can export (counters with _total, histograms' parts)."""
    names = set(metrics._STATE)
    for collector in (
        metrics.BROKER_LOGINS, metrics.BROKER_LAUNCHES, metrics.BROKER_LAUNCH_SECONDS,
        metrics.BROKER_PLACEMENTS, metrics.BROKER_TICKETS, metrics.TUNNELS_OPENED,
        metrics.TUNNELS_OPEN, metrics.TUNNEL_BYTES, metrics.TUNNEL_SECONDS,
        metrics.GATEWAY_PREAUTH_REFUSALS, metrics.HALB_VRRP_TRANSITIONS,
        metrics.HALB_BACKEND_CONNECTIONS, metrics.HALB_NO_BACKEND, metrics.AGENT_REPORTS,
        metrics.CERT_EXPIRY, metrics.ETCD_FAILURES,
    ):  # fmt: skip
        for family in collector.describe():
            names.update(s.name for s in family.samples)
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + part for part in ("_bucket", "_sum", "_count"))
    return names | {"up", "time"}


_NAME = re.compile(r"\b((?:ras_|up\b)[a-z_]*)")


def test_the_rules_and_the_dashboard_name_only_exported_metrics():
    exported = _exported()
    rules = (DEPLOY / "ras-rules.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana-ras-farm.json").read_text())
    exprs = [
        t["expr"]
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]  # fmt: skip
    assert len(exprs) >= 20
    used = set(_NAME.findall(rules)) | {n for e in exprs for n in _NAME.findall(e)}
    assert used - exported == set()
    assert {"ras_broker_agents", "ras_halb_healthy_backends"} <= used
    assert {"ras_broker_etcd_up", "ras_broker_primary", "ras_broker_etcd_failures_total"} <= used


# -- a real Prometheus scraping a farm of real processes ---------------------------------------


class _Processes:
    """Processes started with their output in a log file each; all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (self.logs / f"{name}.log").open("wb") as out:  # the child keeps its own copy
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)  # type: ignore[no-any-return]


async def _query(base: str, expr: str) -> float | None:
    try:
        answer = await trio.to_thread.run_sync(_get_json, base + promkit.query_path(expr))
    except OSError:
        return None
    return promkit.first_value(answer)


async def _until_equal(base: str, expr: str, expected: float, deadline_s: float = 90) -> None:
    """Ask Prometheus until ``expr`` is ``expected`` (it scrapes every second)."""
    got = None
    with trio.move_on_after(deadline_s):
        while (got := await _query(base, expr)) != expected:  # noqa: ASYNC110 (another process)
            await trio.sleep(0.5)
    assert got == expected, f"{expr}: Prometheus says {got}, expected {expected}"


@pytest.mark.peers
async def test_a_real_prometheus_sees_the_tunnels_the_client_opened(tmp_path, nursery):
    promkit.require_prometheus()
    host = Listener()
    await nursery.start(host.serve)
    plain, tls, rdp, brokers, agents, admin, m_broker, m_gateway, m_agent, web = free_ports(10)
    state = tmp_path / "state"
    ras = [sys.executable, "-m", "ras"]
    await trio.run_process(
        [*ras, "farm", "init", "--state-dir", str(state), "--rdp", f"127.0.0.1:{host.port}",
         "--gateway-port", str(plain), "--gateway-tls-port", str(tls), "--gateway-rdp-port",
         str(rdp), "--broker-port", str(brokers), "--agent-port", str(agents), "--admin-port",
         str(admin)],
        capture_stdout=True, capture_stderr=True,
    )  # fmt: skip
    prom_config = promkit.write_config(
        tmp_path / "prometheus.yml",
        {
            "ras-broker": [f"127.0.0.1:{m_broker}"],
            "ras-gateway": [f"127.0.0.1:{m_gateway}"],
            "ras-agent": [f"127.0.0.1:{m_agent}"],
        },
        rules=promkit.RULES,
    )
    base = f"http://127.0.0.1:{web}"
    launches = 3
    payload = b"metrics " * 4096  # 32 KiB each way per tunnel
    procs = _Processes(tmp_path)
    try:
        for daemon, port in (("broker", m_broker), ("gateway", m_gateway), ("agent", m_agent)):
            config_file = str(state / f"{daemon}.toml")
            procs.start(daemon, [*ras, daemon, "--config", config_file, "--metrics", str(port)])
        procs.start("prometheus", promkit.argv(prom_config, tmp_path / "tsdb", f"127.0.0.1:{web}"))
        # the farm is up when Prometheus sees the agent reporting and the gateway linked
        await _until_equal(base, 'sum(up{job=~"ras-.*"})', 3)
        await _until_equal(base, 'ras_broker_agents{state="reporting"}', 1)
        await _until_equal(base, "sum(ras_gateway_broker_link_up)", 1)
        # one broker on SQLite: always the primary, and no etcd link to show
        await _until_equal(base, 'ras_broker_primary{broker="broker"}', 1)
        assert await _query(base, "ras_broker_etcd_up") is None

        config = load(ClientConfig, state / "client.toml")
        password = (state / "demo.password").read_text().strip()
        async with await ClientSession.connect(config) as session:
            await session.authenticate(config.username, password)
            for _ in range(launches):
                launched = await session.launch("desktop")
                tunnel = await session.open_tunnel(launched.ticket)
                async with tunnel:  # gateway SSL mode (client.toml): closed, not half-closed
                    await tunnel.send_all(payload)
                    got = bytearray()
                    while len(got) < len(payload):
                        got += await tunnel.receive_some()

        await _until_equal(base, 'sum(ras_broker_logins_total{result="ok"})', 1)
        await _until_equal(base, 'sum(ras_broker_launches_total{result="ok"})', launches)
        await _until_equal(base, 'sum(ras_gateway_tunnels_total{mode="ticket"})', launches)
        # tunnels opened == launches made, as Prometheus computes it
        opened, made = "ras_gateway_tunnels_total", 'ras_broker_launches_total{result="ok"}'
        await _until_equal(base, f"sum({opened}) - sum({made})", 0)
        await _until_equal(base, "sum(ras_gateway_tunnels_open)", 0)
        up = len(payload) * launches
        await _until_equal(base, 'sum(ras_gateway_tunnel_bytes_total{direction="up"})', up)
        await _until_equal(base, 'sum(ras_gateway_tunnel_bytes_total{direction="down"})', up)
        await _until_equal(base, 'sum(ras_broker_tickets_total{event="redeemed"})', launches)
        await _until_equal(base, 'sum(ras_broker_sessions{state="launching"})', launches)
        # the certificates' expiry, from the files the daemons present
        expiry = "ras_certificate_expiry_timestamp_seconds"
        farm_certs = f'count({expiry}{{certificate="farm"}} > time())'
        assert await _query(base, farm_certs) == 3  # broker, gateway, agent
        assert await _query(base, f'count({expiry}{{daemon="gateway", certificate="public"}})') == 1
        # the shipped rules load in a real Prometheus, and none fires on a healthy farm
        rules_answer = await trio.to_thread.run_sync(_get_json, f"{base}/api/v1/rules")
        groups = rules_answer["data"]["groups"]  # type: ignore[index]
        assert sum(len(g["rules"]) for g in groups) == 12
        assert await _query(base, 'count(ALERTS{alertstate="firing"})') is None
    finally:
        procs.stop()
