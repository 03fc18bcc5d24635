"""A local etcd cluster (Debian's etcd-server) for tests, benchmarks and labs.

``etcd_cluster(folder, members=3)`` starts the members on 127.0.0.1 high ports with data
directories under ``folder``, waits until the cluster answers a linearizable read, and always
kills every member it started (by PID) when the block ends. ``Cluster.kill(i)`` SIGKILLs one
member and ``Cluster.start(i)`` brings it back with its data.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ras.broker.etcd import Etcd, EtcdConfig, EtcdUnavailable

__all__ = ["ETCD", "Cluster", "etcd_cluster", "free_ports", "member_argv"]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def member_argv(name: str, data_dir: Path, address: str, members: dict[str, str]) -> list[str]:
    """``etcd`` for member ``name`` of a new cluster on ``address`` (ports 2379 for clients,
    2380 for peers), ``members`` naming every member's address: a lab host's member."""
    initial = ",".join(f"{m}=http://{a}:2380" for m, a in members.items())
    return [
        ETCD, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://{address}:2379",
        "--advertise-client-urls", f"http://{address}:2379",
        "--listen-peer-urls", f"http://{address}:2380",
        "--initial-advertise-peer-urls", f"http://{address}:2380",
        "--initial-cluster", initial, "--initial-cluster-state", "new",
        "--initial-cluster-token", "ras-lab", "--heartbeat-interval", "100",
        "--election-timeout", "1000", "--log-level", "error", "--logger", "zap",
    ]  # fmt: skip


@dataclass
class Cluster:
    tmp: Path
    client_ports: list[int]
    peer_ports: list[int]
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{p}" for p in self.client_ports)

    def config(self, *, prefix: str = "/ras/", timeout_s: float = 5.0) -> EtcdConfig:
        return EtcdConfig(endpoints=self.endpoints, prefix=prefix, timeout_s=timeout_s)

    def _argv(self, i: int) -> list[str]:
        initial = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(self.peer_ports))
        return [
            ETCD,
            "--name", f"m{i}",
            "--data-dir", str(self.tmp / f"m{i}.etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"ras-test-{self.peer_ports[0]}",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--log-level", "error",
            "--logger", "zap",
        ]  # fmt: skip

    def start(self, i: int) -> None:
        log = (self.tmp / f"m{i}.log").open("ab")
        proc = subprocess.Popen(self._argv(i), stdout=log, stderr=log)
        log.close()
        self.procs[i] = proc

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait()
            self.procs[i] = None

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        etcd = Etcd(self.config(timeout_s=2.0))
        end = time.monotonic() + deadline_s
        while True:
            try:
                etcd.revision()
                return
            except EtcdUnavailable:
                if time.monotonic() > end:
                    logs = [(self.tmp / f"m{i}.log") for i in range(len(self.procs))]
                    text = "\n".join(p.read_text()[-2000:] for p in logs if p.exists())
                    raise TimeoutError(f"etcd did not become ready:\n{text}") from None
                time.sleep(0.2)


@contextlib.contextmanager
def etcd_cluster(tmp: Path, members: int = 3) -> Iterator[Cluster]:
    tmp.mkdir(parents=True, exist_ok=True)
    ports = free_ports(2 * members)
    cluster = Cluster(tmp, ports[:members], ports[members:], [None] * members)
    try:
        for i in range(members):
            cluster.start(i)
        cluster.wait_ready()
        yield cluster
    finally:
        for i in range(members):
            cluster.kill(i)
