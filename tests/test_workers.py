"""``ras gateway --workers 2``: a real gateway process with two worker processes sharing the
listening port (SO_REUSEPORT). Both workers carry tunnels, and SIGTERM to the parent stops
every worker and the parent with exit code 0.

Which worker holds a tunnel is read from ``/proc``: the gateway-side socket of the client's
connection (local port = the gateway's, remote port = the client's) belongs to exactly one
worker process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import trio
from farmkit import Farm, farm
from gatewaykit import echo, gateway_toml, tunnel_through
from prometheus_client.parser import text_string_to_metric_families

#: Tunnels opened at most while waiting to see both workers (the kernel hashes each new
#: connection to one of them: 2 ** -60 to see only one by chance).
_MAX_TUNNELS = 60


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _inode_of(local_port: int, remote_port: int) -> int | None:
    """The inode of the established 127.0.0.1:local_port <-> :remote_port socket."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if (
            state == "01"
            and int(local.split(":")[1], 16) == local_port
            and int(remote.split(":")[1], 16) == remote_port
        ):
            return inode
    return None


def _worker_of(workers: list[int], gateway_port: int, tunnel: trio.abc.Stream) -> int:
    client_port = _client_port(tunnel)
    inode = _inode_of(gateway_port, client_port)
    assert inode is not None, "no gateway-side socket for the tunnel"
    owners = [pid for pid in workers if inode in _socket_inodes(pid)]
    assert len(owners) == 1, f"the tunnel's socket belongs to {owners}"
    return owners[0]


def _client_port(stream: object) -> int:
    for _ in range(8):
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return int(sock.getsockname()[1])
        stream = getattr(stream, "transport_stream", None) or getattr(stream, "stream", None)
    raise AssertionError("no socket under the tunnel stream")


async def _start_workers(f: Farm, config: str, n: int) -> tuple[trio.Process, list[int]]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ras", "gateway", "--config", config, "--workers", str(n)],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    with trio.fail_after(30):
        while len(workers := _children(proc.pid)) < n or not (
            "gwproc" in f.broker.gateways and f.broker.gateways["gwproc"].online
        ):
            if proc.poll() is not None:
                assert proc.stderr is not None
                out = bytearray()
                while data := await proc.stderr.receive_some():
                    out += data
                raise AssertionError(f"the gateway exited early: {out.decode()[-2000:]}")
            await trio.sleep(0.05)
    return proc, workers


def _two_free_ports() -> int:
    """A port p with p + 1 free too (each worker's /metrics: port + its index)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return int(p)
    raise AssertionError("no two free ports in a row")


def _tunnels_counted(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ras_gateway_tunnels_total" and s.labels.get("mode") == "ticket"
    )


async def test_two_workers_share_the_port_and_stop_on_sigterm(tmp_path, host):
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        config, port = gateway_toml(f, tmp_path, drain_timeout_s=5)
        metrics = _two_free_ports()
        with open(config, "a") as toml:  # noqa: ASYNC230 (a few bytes, before anything runs)
            toml.write(f"[metrics]\nport = {metrics}\n")
        proc, workers = await _start_workers(f, config, 2)
        assert len(workers) == 2
        stderr = bytearray()
        try:
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:

                    async def collect() -> None:
                        assert proc.stderr is not None
                        while data := await proc.stderr.receive_some():
                            stderr.extend(data)

                    nursery.start_soon(collect)
                    serving: dict[int, int] = {}
                    tunnels = []
                    while len(serving) < 2 and len(tunnels) < _MAX_TUNNELS:
                        tunnel = await tunnel_through(f, port)
                        tunnels.append(tunnel)
                        message = f"tunnel {len(tunnels)}".encode()
                        assert await echo(tunnel, message) == message
                        worker = _worker_of(workers, port, tunnel)
                        serving[worker] = serving.get(worker, 0) + 1
                    assert sorted(serving) == sorted(workers), serving
                    # each worker serves its own /metrics, on port + its index: both counted
                    # tunnels, and together every one
                    counted = [
                        await trio.to_thread.run_sync(_tunnels_counted, metrics + i)
                        for i in range(2)
                    ]
                    assert all(n > 0 for n in counted), counted
                    assert sum(counted) == len(tunnels)
                    for tunnel in tunnels:
                        await tunnel.aclose()
                    proc.send_signal(signal.SIGTERM)
                    assert await proc.wait() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
    for pid in workers:
        assert not _running(pid), f"worker {pid} still runs"
    log = stderr.decode()
    assert f"workers started count=2 pids={workers[0]},{workers[1]}" in log or (
        f"workers started count=2 pids={workers[1]},{workers[0]}" in log
    )
    assert log.count("tunnel closed ") == len(tunnels)
