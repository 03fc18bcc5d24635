"""Broker benchmark: one broker, thousands of simulated agents, clients launching flat out.

    uv run python benchmarks/broker.py --quick                 # 500 agents, 10 s
    uv run python benchmarks/broker.py --json benchmarks/results/broker.json   # 5,000 agents, 60 s

Three processes. The broker (`ras broker`, its own process, measured from /proc/PID/stat), the
simulated agents (`ras agent --simulate N`, one process, each agent its own mTLS connection
and certificate, reporting every ``report_interval_s`` = 5 s), and this process, which plays
gateways: ``--clients`` connections to the broker's gateway port over mutual TLS with a
gateway certificate, each announcing one client session (``client_session``), logging in
once as its own user (before the clock starts: a login costs an scrypt) and then sending
``launch`` (gateway SSL mode: a signed ticket each)
again and again, one at a time per connection, as fast as the broker answers. Latency is
from sending ``launch`` to reading ``launch_ok``.

With ``--redeem`` each round is a launch and the redemption of its ticket (``redeem_ticket``
on the same connection, as a gateway does before it opens the tunnel): the store is written
once per round (a redeemed ticket is single use). ``--store etcd`` runs the same load with the
broker's state on a local three-member etcd cluster (``ras.lab.etcdcluster``; Debian's
etcd-server) instead of SQLite: the redemption becomes an etcd transaction. The figures of both
stores, and their ratio, are in benchmarks/README.md ("Broker on etcd").

Everything runs on this machine, so the three processes share its cores: the CPU of each is
reported, and the figures depend on the machine. Nothing asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from ras.agents.simulate import host_names, prepare_certificates
from ras.broker.etcd import EtcdConfig
from ras.broker.etcdstore import EtcdStore
from ras.broker.passwords import hash_password
from ras.broker.store import SQLiteStore, Store, UserRecord
from ras.cli.admin import AdminClient
from ras.lab.etcdcluster import etcd_cluster, free_ports
from ras.net.channel import greet
from ras.net.tls import connect_tls
from ras.pki import FarmPKI, client_context
from ras.protocol import (
    Authenticate,
    AuthOk,
    ClientSession,
    Launch,
    LaunchOk,
    Mode,
    RedeemTicket,
    Role,
    TicketOk,
)

RAS = [sys.executable, "-m", "ras"]
PASSWORD = "bench password"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def setup(
    state: Path, agents: int, clients: int, log_level: str, etcd: EtcdConfig | None
) -> dict[str, object]:
    pki = FarmPKI(state / "pki")
    pki.init_ca()
    loop = ("localhost", "127.0.0.1")
    pki.ensure("broker", loop)
    pki.ensure("bench-gw")
    pki.ensure("bench-admin")
    pki.ensure("sim-unused")
    gw_port, agent_port, admin_port = free_ports(3)
    (state / "broker.toml").write_text(
        f"""\
name = "broker"
listen_host = "127.0.0.1"
gateway_port = {gw_port}
agent_port = {agent_port}
admin_port = {admin_port}
admin_cert_names = ["bench-admin"]
database = "broker.sqlite3"
cert_file = "pki/broker.pem"
key_file = "pki/broker.key"
ca_file = "pki/ca.pem"
report_interval_s = 5
host_timeout_s = 20

[[resources]]
id = "desktop"
name = "Desktop"
kind = "desktop"
"""
        + (
            ""
            if etcd is None
            else f"\n[etcd]\nendpoints = {json.dumps(list(etcd.endpoints))}\n"
            f'prefix = "{etcd.prefix}"\n'
        )
    )
    (state / "agent.toml").write_text(
        f"""\
name = "sim"
cert_file = "pki/sim-unused.pem"
key_file = "pki/sim-unused.key"
ca_file = "pki/ca.pem"
rdp_host = "127.0.0.1"
rdp_port = 3389
max_sessions = 50
broker_port = {agent_port}
connect_timeout_s = 30
"""
    )
    # The simulated hosts' certificates, issued here so that the simulator only loads them.
    prepare_certificates(pki.directory, pki.directory / "simulated", host_names("sim", agents))
    store: Store = SQLiteStore(state / "broker.sqlite3") if etcd is None else EtcdStore(etcd)
    try:
        hashed = hash_password(PASSWORD)
        for i in range(clients):
            store.put_user(UserRecord(f"bench{i:03d}", hashed, ("users",)))
    finally:
        store.close()
    return {"gateway_port": gw_port, "agent_port": agent_port, "admin_port": admin_port}


def admin(state: Path, port: int) -> AdminClient:
    pki = state / "pki"
    return AdminClient(
        f"https://127.0.0.1:{port}",
        pki / "ca.pem",
        cert_file=pki / "bench-admin.pem",
        key_file=pki / "bench-admin.key",
    )


async def wait_reporting(api: AdminClient, want: int, timeout_s: float) -> float:
    """Seconds until the broker sees ``want`` hosts reporting."""
    start = time.monotonic()
    with trio.fail_after(timeout_s):
        while True:
            try:
                status = await trio.to_thread.run_sync(api.request, "GET", "status")
                if status["hosts"]["reporting"] >= want:
                    return time.monotonic() - start
            except Exception as exc:  # the broker may still be starting
                if "unreachable" not in repr(exc) and "admin API" not in str(exc):
                    raise
            await trio.sleep(1)


@dataclass
class Phase:
    """The launch phase: clients wait for ``go`` (all logged in), then launch until ``stop_at``."""

    go: trio.Event = field(default_factory=trio.Event)
    stop_at: float = 0.0


async def client(
    index: int,
    state: Path,
    port: int,
    phase: Phase,
    latencies: list[float],
    errors: list[str],
    *,
    redeem: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    pki = state / "pki"
    ctx = client_context(
        pki / "ca.pem", cert_file=pki / "bench-gw.pem", key_file=pki / "bench-gw.key"
    )
    stream = await connect_tls("127.0.0.1", port, ctx, server_hostname="localhost")
    chan = await greet(stream, Role.GATEWAY, "bench-gateway")
    async with chan:
        await chan.send(ClientSession("127.0.0.1", 40000 + index))
        reply = await chan.request(Authenticate(f"bench{index:03d}", PASSWORD))
        assert isinstance(reply, AuthOk), reply
        # Logged in (scrypt, once per client session): not part of what is measured.
        task_status.started()
        await phase.go.wait()
        while time.monotonic() < phase.stop_at:
            t0 = time.perf_counter()
            try:
                reply = await chan.request(Launch("desktop", Mode.GATEWAY_SSL))
            except Exception as exc:
                errors.append(str(exc))
                continue
            if not isinstance(reply, LaunchOk):
                errors.append(reply.TYPE)
                continue
            if redeem:
                got = await chan.request(RedeemTicket(reply.ticket))
                if not isinstance(got, TicketOk):
                    errors.append(got.TYPE)
                    continue
            latencies.append(time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ras-bench-broker-") as tmp:
        if args.store == "etcd":
            with etcd_cluster(Path(tmp) / "etcd") as cluster:
                return await run_in(Path(tmp), args, cluster.config(prefix="/ras-bench/"))
        return await run_in(Path(tmp), args, None)


async def run_in(tmp: Path, args: argparse.Namespace, etcd: EtcdConfig | None) -> dict[str, object]:
    state = tmp
    ports = setup(state, args.agents, args.clients, args.log_level, etcd)
    logs = Path(args.logdir) if args.logdir else state
    logs.mkdir(parents=True, exist_ok=True)
    broker_log = (logs / "broker.log").open("wb")
    sim_log = (logs / "simulate.log").open("wb")
    broker = await trio.lowlevel.open_process(
        [*RAS, "--log-level", args.log_level, "broker", "--config", str(state / "broker.toml")],
        stdout=broker_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    sim: trio.Process | None = None
    try:
        api = admin(state, int(ports["admin_port"]))  # type: ignore[call-overload]
        t0 = time.monotonic()
        ramp = args.ramp_s if args.ramp_s is not None else args.agents / 250
        sim = await trio.lowlevel.open_process(
            [*RAS, "--log-level", "warning", "agent", "--config", str(state / "agent.toml"),
             "--simulate", str(args.agents), "--profile", args.profile, "--seed",
             str(args.seed), "--ramp-s", str(ramp)],
            stdout=sim_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        registered_s = await wait_reporting(api, args.agents, args.register_timeout_s)
        print(f"{args.agents} agents reporting after {registered_s:.1f} s", file=sys.stderr)
        await trio.sleep(args.settle_s)  # a full report round under load, before measuring
        latencies: list[float] = []
        errors: list[str] = []
        phase = Phase()
        login0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(args.clients):  # connect and log in, one after the other
                await nursery.start(
                    partial(client, redeem=args.redeem),
                    i, state, ports["gateway_port"], phase, latencies, errors,
                )  # fmt: skip
            login_s = time.monotonic() - login0
            print(f"{args.clients} clients logged in after {login_s:.1f} s", file=sys.stderr)
            b_cpu0, s_cpu0 = cpu_seconds(broker.pid), cpu_seconds(sim.pid)
            self_cpu0 = time.process_time()
            start = time.monotonic()
            phase.stop_at = start + args.seconds
            phase.go.set()
        wall = time.monotonic() - start
        b_cpu = cpu_seconds(broker.pid) - b_cpu0
        s_cpu = cpu_seconds(sim.pid) - s_cpu0
        self_cpu = time.process_time() - self_cpu0
        status = await trio.to_thread.run_sync(api.request, "GET", "status")
        result: dict[str, object] = {
            "agents": args.agents,
            "agents_reporting_at_end": status["hosts"]["reporting"],
            "registration_s": round(registered_s, 1),
            "login_s": round(login_s, 1),
            "report_interval_s": 5,
            "clients": args.clients,
            "seconds": round(wall, 2),
            "store": args.store,
            "redeem": args.redeem,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "launches": len(latencies),
            "errors": len(errors),
            "error_samples": sorted(set(errors))[:5],
            "launches_per_s": round(len(latencies) / wall, 1),
            "latency_median_ms": round(1000 * statistics.median(latencies), 2),
            "latency_p99_ms": round(1000 * percentile(latencies, 0.99), 2),
            "latency_max_ms": round(1000 * max(latencies), 2),
            "broker_cpu_percent": round(100 * b_cpu / wall, 1),
            "broker_rss_mib": round(rss_mib(broker.pid), 1),
            "simulator_cpu_percent": round(100 * s_cpu / wall, 1),
            "simulator_rss_mib": round(rss_mib(sim.pid), 1),
            "clients_cpu_percent": round(100 * self_cpu / wall, 1),
            "broker_log_level": args.log_level,
            "profile": args.profile,
            "seed": args.seed,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall)),
            "total_s": round(time.monotonic() - t0, 1),
        }  # fmt: skip
        return result
    finally:
        with trio.CancelScope(shield=True):
            for proc in (sim, broker):
                if proc is not None:
                    proc.terminate()
                    with trio.move_on_after(30) as waited:
                        await proc.wait()
                    if waited.cancelled_caught:
                        proc.kill()
        broker_log.close()
        sim_log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=5000, help="simulated agents (5000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="launch phase length (60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client sessions (16)")
    parser.add_argument("--quick", action="store_true", help="500 agents, 10 s")
    parser.add_argument("--profile", default="steady", choices=["steady", "busy", "random"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ramp-s", type=float, help="agents connect over this long (N/250 s)")
    parser.add_argument("--settle-s", type=float, default=6.0, help="wait after registration (6)")
    parser.add_argument("--log-level", default="info", help="the broker's log level (info)")
    parser.add_argument(
        "--register-timeout-s", type=float, default=900.0, help="give up if not all report (900)"
    )
    parser.add_argument("--logdir", help="keep the broker's and the simulator's logs here")
    parser.add_argument("--json", help="write the result to this file")
    parser.add_argument(
        "--store", choices=["sqlite", "etcd"], default="sqlite", help="the broker's state (sqlite)"
    )
    parser.add_argument(
        "--redeem", action="store_true", help="redeem each launch's ticket (a store write)"
    )
    args = parser.parse_args()
    if args.quick:
        args.agents, args.seconds = 500, 10.0
    result = trio.run(run, args)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key.ljust(width)}  {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
