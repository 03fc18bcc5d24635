"""The gateway's limits that need real sockets: the tunnel idle timeout (the kernel's clock of
each socket) and the graceful drain of a real ``ras gateway`` process on SIGTERM; and the
per-address bookkeeping itself.

The absolute pre-authentication deadline and the slots and rate of new connections per client
address are tested over memory streams under the autojump clock, in
tests/test_gateway_sessions.py.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys

import pytest
import trio
from farmkit import PASSWORD, USER, Farm, add_gateway, farm
from gatewaykit import echo, gateway_toml, tunnel_through

from ras.client.session import ClientSession
from ras.gateway import limits as limits_module
from ras.gateway.limits import Refusal, Slot, SourceLimits
from ras.protocol import Mode


def test_source_limits_count_release_and_stay_bounded(monkeypatch):
    now = [0.0]
    limits = SourceLimits(per_ip=2, total=3, rate_per_s=1.0, burst=2, clock=lambda: now[0])
    a1, a2 = limits.admit("a"), limits.admit("a")
    assert isinstance(a1, Slot)
    assert isinstance(a2, Slot)
    assert isinstance(limits.admit("a"), Refusal)  # rate: the burst is used up
    now[0] += 5  # tokens back, but still two pre-auth connections from "a"
    assert "waiting to authenticate" in limits.admit("a")  # type: ignore[operator]
    a1.release()
    a1.release()  # idempotent
    assert isinstance(limits.admit("a"), Slot)
    assert isinstance(limits.admit("b"), Slot)
    assert "3 connections" in limits.admit("c")  # type: ignore[operator]
    # the bucket table forgets quiet addresses and never grows past its bound
    monkeypatch.setattr(limits_module, "_MAX_BUCKETS", 100)
    many = SourceLimits(per_ip=1, total=10**6, rate_per_s=1.0, burst=1, clock=lambda: now[0])
    for i in range(1000):
        slot = many.admit(f"10.0.{i // 256}.{i % 256}")
        assert isinstance(slot, Slot)
        slot.release()
    assert many.buckets() <= 100
    now[0] += 10
    many.admit("10.9.9.9")
    assert many.buckets() == 1


async def test_an_idle_tunnel_is_closed_and_audited(tmp_path, nursery, host, caplog):
    caplog.set_level(logging.INFO)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        await add_gateway(f, nursery, "gateway", tunnel_idle_timeout_s=1)
        cfg = f.client_config(mode=Mode.GATEWAY)
        with trio.fail_after(30):
            async with await ClientSession.connect(cfg) as session:
                await session.authenticate(USER, PASSWORD)
                ticket = (await session.launch("desktop")).ticket
                tunnel = await session.open_tunnel(ticket)
            async with tunnel:
                await tunnel.send_all(b"ping")
                got = b""
                while len(got) < 4:
                    got += await tunnel.receive_some()
                # then silence: the gateway ends the tunnel
                while await tunnel.receive_some():
                    pass
            while not any(r.getMessage().startswith("tunnel closed") for r in caplog.records):  # noqa: ASYNC110 (polling another task's state)
                await trio.sleep(0.05)
    (audit,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tunnel clo")]
    assert "ended_by=idle timeout" in audit
    assert "bytes_up=4 bytes_down=4" in audit


# -- graceful drain of a real `ras gateway` process ----------------------------------------


async def _start_gateway(f: Farm, config: str) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ras", "gateway", "--config", config],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    with trio.fail_after(30):
        while "gwproc" not in f.broker.gateways or not f.broker.gateways["gwproc"].online:
            if proc.poll() is not None:
                raise AssertionError("the gateway exited early")
            await trio.sleep(0.05)
    return proc


async def _read_all(proc: trio.Process) -> str:
    assert proc.stderr is not None
    out = bytearray()
    while data := await proc.stderr.receive_some():
        out += data
    return out.decode()


@pytest.mark.parametrize("ends", ["client closes", "drain timeout"])
async def test_sigterm_drains_then_exits_0(tmp_path, host, ends):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        config, port = gateway_toml(
            f, tmp_path, drain_timeout_s=60 if ends == "client closes" else 1
        )
        proc = await _start_gateway(f, config)
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    stderr: list[str] = []

                    async def collect() -> None:
                        stderr.append(await _read_all(proc))

                    nursery.start_soon(collect)
                    tunnel = await tunnel_through(f, port)
                    assert await echo(tunnel, b"before") == b"before"
                    proc.send_signal(signal.SIGTERM)
                    # it unregisters from the broker and stops accepting ...
                    while f.broker.gateways["gwproc"].online:  # noqa: ASYNC110 (polling another task's state)
                        await trio.sleep(0.05)
                    with pytest.raises(OSError, match="connect to"):
                        await trio.open_tcp_stream("127.0.0.1", port)
                    # ... while the open tunnel still carries bytes
                    assert await echo(tunnel, b"during the drain") == b"during the drain"
                    if ends == "client closes":
                        await tunnel.aclose()
                    else:  # the gateway closes it at the drain timeout
                        assert await tunnel.receive_some() == b""
                        await tunnel.aclose()
                    assert await proc.wait() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
    log = stderr[0]
    assert "draining name=gwproc tunnels=1" in log
    assert "unregistered from broker" in log
    (audit,) = re.findall(r"tunnel closed .*", log)
    assert f"user={USER} resource=desktop client=127.0.0.1:" in audit
    assert "path=gwproc" in audit
    assert "bytes_up=22 bytes_down=22" in audit
    if ends == "drain timeout":
        assert "ended_by=drain timeout" in audit
        assert "drain timeout: closing tunnels=1" in log
    else:
        assert "ended_by" not in audit
