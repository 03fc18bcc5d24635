"""Three ``ras broker`` processes on a real three-member etcd cluster; the primary SIGKILLed.

Clients log in, launch and open a tunnel in a loop through a gateway that knows all three
brokers, and a long session keeps its tunnel; an agent reports to all three. The primary
broker process is SIGKILLed in the middle: the loop goes on through the other brokers, the
long session is not cut, every ticket is redeemed exactly once (counted in etcd), and admin
writes come back after promotion. Real processes: run under ``flock /tmp/ras-heavy.lock``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from etcdkit import Cluster, free_ports, needs_etcd
from farmkit import LOOPBACK, PASSWORD, USER, Farm, Listener, add_agent, add_gateway

from ras.broker.etcdstore import EtcdStore
from ras.broker.passwords import hash_password
from ras.broker.store import UserRecord
from ras.cli.admin import AdminApiError, AdminClient
from ras.client.session import ClientSession
from ras.pki import FarmPKI
from ras.protocol import Mode

pytestmark = needs_etcd
NAMES = ("broker-a", "broker-b", "broker-c")
WORKERS = 3


def _broker_toml(
    tmp: Path, pki: FarmPKI, name: str, priority: int, ports: list[int], etcd: Cluster, prefix: str
) -> Path:
    cert, key = pki.ensure(name, LOOPBACK)
    gw, ag, admin = ports
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    path = tmp / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nlisten_host = "127.0.0.1"\ngateway_port = {gw}\nagent_port = {ag}\n'
        f'admin_port = {admin}\nadmin_cert_names = ["ops-admin"]\n'
        f'database = "{name}.sqlite3"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'ca_file = "{pki.ca_path}"\nreport_interval_s = 1\nhost_timeout_s = 10\n'
        '[[resources]]\nid = "desktop"\nname = "Desktop"\nkind = "desktop"\n'
        f'[etcd]\nendpoints = [{endpoints}]\nprefix = "{prefix}"\n'
        f"[roles]\npriority = {priority}\nprimary_lease_s = 3\n"
        f'admin_url = "https://127.0.0.1:{admin}"\n'
    )
    return path


class Loop:
    """Clients logging in, launching and tunnelling, over and over; what happened."""

    def __init__(self, f: Farm) -> None:
        self.f = f
        self.ok = 0
        self.failed: list[str] = []
        self.stop = trio.Event()
        self.progress = trio.Event()

    async def worker(self) -> None:
        while not self.stop.is_set():
            try:
                with trio.fail_after(60):
                    session = await ClientSession.connect(self.f.client_config(mode=Mode.GATEWAY))
                    async with session:
                        await session.authenticate(USER, PASSWORD)
                        launched = await session.launch("desktop")
                        tunnel = await session.open_tunnel(launched.ticket)
                        async with tunnel:
                            await tunnel.send_all(b"x")
                            assert await tunnel.receive_some() == b"x"
            except Exception as exc:  # counted: the test says how many may fail
                self.failed.append(repr(exc))
                await trio.sleep(0.2)
                continue
            self.ok += 1
            self.progress.set()
            self.progress = trio.Event()

    async def until_ok(self, n: int) -> None:
        with trio.fail_after(120):  # hang guard
            while self.ok < n:
                await self.progress.wait()


async def test_the_primary_broker_sigkilled_while_clients_log_in_and_launch(
    cluster: Cluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = FarmPKI(tmp_path / "pki")
    pki.init_ca()
    admin_cert, admin_key = pki.ensure("ops-admin")
    prefix = f"/ras-sigkill-{time.time_ns()}/"
    store = EtcdStore(cluster.config(prefix=prefix))
    store.put_user(UserRecord(USER, hash_password(PASSWORD), ("users",)))
    ports = {name: free_ports(3) for name in NAMES}
    procs: dict[str, trio.Process] = {}
    apis = {
        name: AdminClient(
            f"https://127.0.0.1:{ports[name][2]}", pki.ca_path, cert_file=admin_cert,
            key_file=admin_key, timeout_s=10,
        )
        for name in NAMES
    }  # fmt: skip

    def call(name: str, method: str, path: str, body: object = None) -> object:
        return apis[name].request(method, path, body)

    async def primary_seen_by(name: str) -> str:
        try:
            got = await trio.to_thread.run_sync(call, name, "GET", "brokers")
        except AdminApiError:
            return "?"
        assert isinstance(got, dict)
        return str(got["primary"])

    try:
        for priority, name in enumerate(NAMES):
            config = _broker_toml(tmp_path, pki, name, priority, ports[name], cluster, prefix)
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs[name] = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "ras", "broker", "--config", str(config)],
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            with trio.fail_after(60):  # the first one started is the primary
                while await primary_seen_by(name) != "broker-a":  # noqa: ASYNC110 (another process's state)
                    await trio.sleep(0.3)
        gateways = [f"127.0.0.1:{ports[n][0]}" for n in NAMES]
        agents = [f"127.0.0.1:{ports[n][1]}" for n in NAMES]
        host = Listener()
        rdp_port = await nursery.start(host.serve)
        gw, ag, _ = ports["broker-a"]
        addrs = {"gateways": ("127.0.0.1", gw), "agents": ("127.0.0.1", ag)}
        f = Farm(pki, None, store, addrs)  # type: ignore[arg-type]
        await add_gateway(f, nursery, "gateway", brokers=gateways, broker_failover_s=2.0)
        await add_agent(f, nursery, "rdsh1", "127.0.0.1", rdp_port, brokers=agents)

        long = await ClientSession.connect(f.client_config(mode=Mode.GATEWAY))
        await long.authenticate(USER, PASSWORD)
        long_tunnel = await long.open_tunnel((await long.launch("desktop")).ticket)
        loop = Loop(f)
        async with trio.open_nursery() as clients:
            for _ in range(WORKERS):
                clients.start_soon(loop.worker)
            await loop.until_ok(10)
            procs["broker-a"].kill()  # SIGKILL the primary in the middle of it all
            await procs["broker-a"].wait()
            before = loop.ok
            await loop.until_ok(before + 20)  # logins and launches go on through b and c
            loop.stop.set()
        assert len(loop.failed) <= WORKERS, loop.failed  # at most the rounds in flight

        await long_tunnel.send_all(b"still here")  # the long session was not cut
        got = b""
        with trio.fail_after(30):
            while len(got) < 10:
                got += await long_tunnel.receive_some()
        assert got == b"still here"

        # every ticket of a tunnel that opened was redeemed exactly once: one key each
        redeemed = store.etcd.get_prefix(store.key("tickets", b""), keys_only=True)
        assert loop.ok + 1 <= len(redeemed) <= loop.ok + 1 + len(loop.failed)

        # admin writes: none while the farm has no primary, then back after promotion
        with trio.fail_after(60):
            while await primary_seen_by("broker-b") != "":  # noqa: ASYNC110 (another process's state)
                await trio.sleep(0.5)
        with pytest.raises(AdminApiError) as info:
            await trio.to_thread.run_sync(call, "broker-b", "POST", "pools", {"name": "p1"})
        assert info.value.code == "no_primary"
        await trio.to_thread.run_sync(call, "broker-c", "POST", "brokers/broker-b/promote")
        with trio.fail_after(60):
            while await primary_seen_by("broker-c") != "broker-b":  # noqa: ASYNC110 (another process's state)
                await trio.sleep(0.3)
        await trio.to_thread.run_sync(call, "broker-b", "POST", "pools", {"name": "p1"})
        with trio.fail_after(60):  # c follows the new primary at its next tick
            while True:
                with pytest.raises(AdminApiError) as info:
                    await trio.to_thread.run_sync(call, "broker-c", "POST", "pools", {"name": "p2"})
                if info.value.code != "no_primary":
                    break
                await trio.sleep(0.3)
        assert info.value.code == "not_primary"
        assert "the primary broker-b at https://127.0.0.1:" in str(info.value)
        await long_tunnel.aclose()
        await long.aclose()
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
