"""Simulated agents (`ras agent --simulate N`): many hosts in one process, each a real agent
with its own farm certificate and mTLS connection, reporting scripted load; the broker lists
them through its admin API."""

from __future__ import annotations

import os
import random
import sys
from functools import partial

import pytest
import trio
from farmkit import Farm, farm

from ras.agents.config import AgentConfig
from ras.agents.simulate import Profile, Script, host_names, prepare_certificates, simulate
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.cli.admin import AdminClient
from ras.pki import FarmPKI

ADMIN, ADMIN_PASSWORD = "root", "admin password 1"


def agent_config(f: Farm, name: str = "sim") -> AgentConfig:
    # A simulation never presents the config's own certificate; the CA's folder is the PKI.
    cert, key = f.pki.ensure("unused")
    return AgentConfig(
        name=name,
        cert_file=cert,
        key_file=key,
        ca_file=f.pki.ca_path,
        broker_port=f.broker_addrs["agents"][1],
        max_sessions=20,
    )


async def admin(f: Farm) -> AdminClient:
    f.store.put_user(UserRecord(ADMIN, hash_password(ADMIN_PASSWORD), ("ras-admins",)))
    host, port = f.broker_addrs["admin"]
    api = AdminClient(f"https://{host}:{port}", f.pki.ca_path)
    await trio.to_thread.run_sync(api.logon, ADMIN, ADMIN_PASSWORD)
    return api


async def hosts(api: AdminClient) -> list[dict[str, object]]:
    return await trio.to_thread.run_sync(api.request, "GET", "hosts")  # type: ignore[no-any-return]


async def test_fifty_simulated_agents_register_report_and_are_listed(tmp_path):
    async with farm(tmp_path) as f, trio.open_nursery() as nursery:
        agents = await nursery.start(partial(simulate, agent_config(f), 50, ramp_s=0.5))
        with trio.fail_after(60):
            for agent in agents:
                await agent.registered.wait()
        api = await admin(f)
        listed = await hosts(api)
        assert sorted(h["name"] for h in listed) == host_names("sim", 50)
        assert all(h["online"] for h in listed)
        # Each reported its own scripted load (steady: CPU 0-50 %, up to a quarter full).
        assert all(0 <= h["cpu_percent"] <= 50 for h in listed)  # type: ignore[operator]
        assert all(0 <= h["sessions"] <= 5 for h in listed)  # type: ignore[operator]
        assert len({h["cpu_percent"] for h in listed}) > 10
        status = await trio.to_thread.run_sync(api.request, "GET", "status")
        assert status["hosts"]["reporting"] == 50
        nursery.cancel_scope.cancel()


def test_each_simulated_host_has_its_own_certificate_and_the_cache_is_reused(tmp_path):
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    names = host_names("sim", 5)
    paths = prepare_certificates(pki.directory, tmp_path / "cache", names)
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cns = [
        x509.load_pem_x509_certificate(p.read_bytes())
        .subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        .value
        for p in paths
    ]
    assert cns == names  # the broker's rule holds: each certificate names its one host
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in paths)
    before = [p.read_bytes() for p in paths]
    assert [
        p.read_bytes() for p in prepare_certificates(pki.directory, tmp_path / "cache", names)
    ] == before
    # A certificate from another CA in the cache is replaced.
    other = FarmPKI(tmp_path / "other")
    other.init_ca()
    theirs = prepare_certificates(other.directory, tmp_path / "cache", names[:1])[0].read_bytes()
    assert theirs != before[0]


@pytest.mark.parametrize("profile", list(Profile))
def test_load_scripts_stay_in_range_and_repeat_with_the_seed(profile):
    def run(seed: int) -> list[tuple[float, float, int, int]]:
        script = Script(profile, 50, random.Random(seed))
        out = []
        for t in range(0, 3600, 5):  # an hour of reports; LoadReport checks every range
            r = script.report(float(t))
            assert r.disconnected <= r.sessions <= 50
            out.append((r.cpu_percent, r.memory_percent, r.sessions, r.disconnected))
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)
    if profile is Profile.BUSY:
        assert min(c for c, *_ in run(3)) >= 50


async def test_ras_agent_simulate_command(tmp_path):
    async with farm(tmp_path) as f:
        cfg = agent_config(f, "cli")
        toml = tmp_path / "agent.toml"
        toml.write_text(
            f'name = "cli"\ncert_file = "{cfg.cert_file}"\nkey_file = "{cfg.key_file}"\n'
            f'ca_file = "{cfg.ca_file}"\nbroker_port = {cfg.broker_port}\n'
        )
        api = await admin(f)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ras", "agent", "--config", str(toml), "--simulate", "5",
             "--profile", "random", "--seed", "3"],
            env={k: v for k, v in os.environ.items() if not k.startswith("RAS_")},
        )  # fmt: skip
        try:
            with trio.fail_after(60):
                while True:  # another process: ask until all five are there
                    listed = await hosts(api)
                    if len(listed) == 5 and all(h["online"] for h in listed):
                        break
                    await trio.sleep(0.2)
            assert sorted(h["name"] for h in listed) == host_names("cli", 5)
        finally:
            proc.terminate()
            with trio.fail_after(30):
                code = await proc.wait()
        assert code == 0  # SIGTERM is a clean stop


async def test_an_admin_logs_off_and_disconnects_a_simulated_session(tmp_path):
    async with farm(tmp_path) as f, trio.open_nursery() as nursery:
        cfg = agent_config(f)
        agents = await nursery.start(partial(simulate, cfg, 3, profile=Profile.BUSY, ramp_s=0))
        with trio.fail_after(60):
            for agent in agents:
                await agent.registered.wait()
        api = await admin(f)
        sessions = await trio.to_thread.run_sync(api.request, "GET", "sessions")
        # The broker knows who is where from the agents' reports (busy: 10-18 each of 20).
        assert len(sessions) == sum(len(a.script.sessions) for a in agents)
        active = next(s for s in sessions if s["state"] == "active")
        host = next(a for a in agents if a.config.name == active["host"])
        before = len(host.script.sessions)

        done = await trio.to_thread.run_sync(
            api.request, "POST", f"sessions/{active['id']}/disconnect"
        )
        assert done["action"] == "disconnect"
        agent_id = active["id"].split(":", 1)[1]
        assert host.script.sessions[agent_id].state == "disconnected"

        await trio.to_thread.run_sync(api.request, "POST", f"sessions/{active['id']}/logoff")
        assert len(host.script.sessions) == before - 1
        listed = await trio.to_thread.run_sync(api.request, "GET", "sessions")
        assert active["id"] not in [s["id"] for s in listed]
        nursery.cancel_scope.cancel()
