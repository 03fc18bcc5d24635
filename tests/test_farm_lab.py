"""The whole farm behind a HALB pair, in a network-namespace lab, as users live through it.

Real `ras broker`, `ras agent`, three `ras gateway` and two `ras halb` processes, each in its
own host (ras/lab/farmlab.py); an echo server stands in for the RDP host, and the failover
harness (ras/lab/failover.py) runs on the client host: launches through the VIP in every
gateway mode and on the RDP port, long-lived sessions, and a part of the farm killed under
them. Real xfreerdp through the same topology is in tests/test_farm_lab_rdp.py.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from labkit import start_echo_server

from ras.lab.farmlab import (
    PLAIN_PORT,
    PUBLIC_NAME,
    RDP_PORT,
    TLS_PORT,
    USER,
    FarmLab,
    build_farm_lab,
    farm_hosts,
)

pytestmark = pytest.mark.lab


def _farm(make_lab, tmp_path: Path, **shape: int) -> FarmLab:
    lab = make_lab(*farm_hosts(**shape))
    start_echo_server(lab.hosts["rdp"], RDP_PORT)
    return build_farm_lab(lab, tmp_path, **shape)


def _harness(fl: FarmLab, mode: str, out: Path, *args: str):
    port = TLS_PORT if mode == "gateway_ssl" else PLAIN_PORT
    argv = [
        sys.executable, "-m", "ras.lab.failover",
        "--server", f"{fl.vip}:{port}", "--mode", mode,
        "--ca-file", str(fl.public_cert), "--server-name", PUBLIC_NAME,
        "--rdp", f"{fl.vip}:{RDP_PORT}",
        "--user", USER, "--password-file", str(fl.password_file),
        "--json", str(out), *args,
    ]  # fmt: skip
    return fl.client.popen(argv)


def _report(fl: FarmLab, proc, out: Path, timeout: float = 120.0) -> dict:
    code = proc.wait(timeout)
    assert code == 0, fl.lab.log_tail(proc, 40)
    return json.loads(out.read_text())


@pytest.fixture
def farm(make_lab, tmp_path):
    return _farm(make_lab, tmp_path)


@pytest.mark.parametrize("mode", ["gateway", "gateway_ssl", "rdp"])
def test_a_hundred_launches_through_the_vip_land_on_every_gateway(farm, tmp_path, mode):
    """Each tunnel is a new connection that the HALB may send to another gateway than the
    session's: any gateway of the farm redeems the ticket or routes the token."""
    out = tmp_path / f"{mode}.json"
    proc = _harness(farm, mode, out, "--launches", "100", "--interval-ms", "0")
    report = _report(farm, proc, out)
    assert report["launches"] == 100
    assert report["failed"] == 0, report["failures"]
    broker = farm.log("broker")
    if mode == "rdp":
        routed = [g for g in farm.gateways if f"route user={USER} " in broker and g in broker]
        assert routed
        served = [g for g in farm.gateways if "via=token" in farm.log(g)]
    else:
        served = [g for g in farm.gateways if f"gateway={g} issued_via=" in broker]
        # at least one tunnel landed on another gateway than the session that launched it
        assert any(
            f"gateway={a} issued_via={b}" in broker
            for a in farm.gateways
            for b in farm.gateways
            if a != b
        )
    assert len(served) >= 2, f"tunnels through {served} only"


def _kill_run(fl: FarmLab, tmp_path: Path, mode: str, kill) -> dict:
    out = tmp_path / f"kill-{mode}.json"
    proc = _harness(fl, mode, out, "--seconds", "9", "--interval-ms", "20", "--sessions", "4")
    time.sleep(3)  # launches and sessions under way (the harness counts from its own start)
    kill()
    proc.send_signal(signal.SIGUSR1)
    return _report(fl, proc, out)


def test_halb_master_crash_costs_a_reconnect_at_most(farm, tmp_path):
    master = farm.master()
    report = _kill_run(farm, tmp_path, "gateway", lambda: farm.crash_node(master))
    assert farm.master() != master
    assert report["settled_after_s"] is not None, report
    assert report["failed_after_settle"] == 0, report["failures"]
    assert report["max_reconnects_per_session"] <= 1, report
    assert report["launches"] - report["failed"] > 100


def test_gateway_crash_costs_a_reconnect_at_most(farm, tmp_path):
    report = _kill_run(farm, tmp_path, "gateway_ssl", lambda: farm.kill("gw1"))
    assert report["failed_after_settle"] == 0, report["failures"]
    assert report["max_reconnects_per_session"] <= 1, report
    assert report["launches"] - report["failed"] > 100


def test_forwarder_crash_in_a_dmz_chain(make_lab, tmp_path):
    fl = _farm(make_lab, tmp_path, gateways=2, forwarders=2)
    report = _kill_run(fl, tmp_path, "gateway", lambda: fl.kill("fw1"))
    assert report["failed_after_settle"] == 0, report["failures"]
    assert report["max_reconnects_per_session"] <= 1, report
    assert report["launches"] - report["failed"] > 100
