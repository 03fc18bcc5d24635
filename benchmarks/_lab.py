"""Lab pieces for the HALB benchmark: gateways, fast backends, the two balancer stacks (our
``ras halb``, and keepalived + haproxy), node death and graceful stop, the probe log, CPU times.

Everything is synchronous (subprocesses and polling); the processes that do the work in the
lab are real daemons started with `Host.popen`, so `Lab.close()` stops them all.

Hosts: ``client``, ``gw1``, ``gw2`` (a `ras gateway` on 8080 each, trusting the lab subnet for
PROXY v2; for the rate test also a haproxy answering HTTP on 9000 behind PROXY v2 and on 9001
without), ``n1`` and ``n2`` (the balancer nodes, priorities 150 and 100).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ras.lab import Host, Lab
from ras.lab.daemons import (
    Probe,
    gateway_config,
    halb_config,
    haproxy_config,
    keepalived_config,
    probe,
)
from ras.pki import FarmPKI

HERE = Path(__file__).resolve().parent
RAS = [sys.executable, "-m", "ras", "--log-level", "warning"]
SERVICE_PORT = 8080  # the gateways' plain port, and the VIP port balanced to it
FAST_PORT = 9000  # the fast backend, behind PROXY v2
DIRECT_PORT = 9001  # the same fast backend without PROXY v2: the no-balancer baseline
HOSTS = ("client", "gw1", "gw2", "n1", "n2")
HEALTH_INTERVAL_S = 0.2  # both stacks check every gateway this often; rise 2, fall 2
KEEPALIVED = shutil.which("keepalived", path="/usr/sbin:/usr/bin:/sbin:/bin") or "keepalived"
HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin") or "haproxy"

T = TypeVar("T")


class BenchError(Exception):
    """The lab did not reach the state a measurement needs."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    step: float = 0.01,
    last: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` every `step` s until it returns something true; BenchError after
    `timeout` s (saying what `last()` says then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            state = f" ({last()})" if last is not None else ""
            raise BenchError(f"{what}: not after {timeout} s{state}")
        time.sleep(step)


# -- CPU accounting -------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def machine_cpu() -> tuple[float, float, float]:
    """(busy, stolen, total) CPU seconds of the whole machine, all cores, from /proc/stat:
    busy = user + nice + system + irq + softirq; stolen = taken by the hypervisor."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq
    return busy / CLK_TCK, steal / CLK_TCK, sum(values) / CLK_TCK


# -- the probe log ---------------------------------------------------------------------------------


@dataclass
class ProbeLog:
    """What `_probe.py` wrote so far: (start, end, result) per finished probe, in the order
    they finished."""

    path: Path
    probes: list[tuple[float, float, str]] = field(default_factory=list)
    _offset: int = 0

    def poll(self) -> list[tuple[float, float, str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.probes
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            start, end, result = line.split()
            self.probes.append((float(start), float(end), result))
        return self.probes

    def first_ok_after(self, instant: float) -> tuple[float, float] | None:
        """(start, end) of the first probe started at or after `instant` that succeeded."""
        for start, end, result in self.poll():
            if start >= instant and result == "ok":
                return start, end
        return None

    def steady_since(self, instant: float, count: int) -> bool:
        """Whether the last `count` probes finished were all started after `instant` and all
        succeeded."""
        recent = self.poll()[-count:]
        return len(recent) == count and all(s >= instant and r == "ok" for s, _, r in recent)


# -- the lab ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    """One node's balancer stack: its processes, and the one that balances (for CPU)."""

    kind: str  # "ras" or "haproxy" (keepalived + haproxy)
    host: Host
    procs: list[subprocess.Popen[bytes]]
    balancer: subprocess.Popen[bytes]
    pidfiles: list[Path] = field(default_factory=list)  # keepalived's children


class Bench:
    def __init__(self, lab: Lab, tmp: Path, pki: FarmPKI) -> None:
        self.lab = lab
        self.tmp = tmp
        self.pki = pki
        self.hosts = lab.hosts
        self.client = lab.hosts["client"]
        self.gateways = {n: lab.hosts[n] for n in ("gw1", "gw2")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def hosts_for(cls, lab: Lab) -> None:
        lab.add_hosts(*HOSTS)
        for name in HOSTS:  # many short connections: wide port range, quick reuse
            host = lab.hosts[name]
            host.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
            host.sysctl("net.ipv4.tcp_tw_reuse", 1)

    # -- gateways and backends ---------------------------------------------------------------

    def start_gateways(self) -> None:
        for name, host in self.gateways.items():
            conf = gateway_config(
                self.tmp / f"{self.lab.prefix}-{name}.toml",
                name,
                host,
                self.pki,
                port=SERVICE_PORT,
                trusted=self.lab.subnet,
            )
            self.procs[name] = host.popen([*RAS, "gateway", "--config", str(conf)])
        for name, host in self.gateways.items():
            self._wait_serving(name, str(host.address), SERVICE_PORT, control_probe)

    def start_fast_backends(self) -> None:
        """haproxy answering a static HTTP 200 and closing, on 9000 (PROXY v2 required) and
        9001 (none): a backend in C that a Python or C balancer in front cannot outrun."""
        for name, host in self.gateways.items():
            conf = self.tmp / f"{self.lab.prefix}-{name}-fast.cfg"
            conf.write_text(f"""
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout http-request 5s
frontend fast
    bind :{FAST_PORT} accept-proxy
    bind :{DIRECT_PORT}
    http-request return status 200 content-type text/plain string "ok"
""")
            self.procs[f"{name}-fast"] = host.popen([HAPROXY, "-db", "-f", str(conf)])
        for name, host in self.gateways.items():
            self._wait_serving(f"{name}-fast", str(host.address), DIRECT_PORT, http_probe)

    def _wait_serving(
        self, name: str, address: str, port: int, check: Callable[[Host, str, int], bool]
    ) -> None:
        proc = self.procs[name]

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited: {self.lab.log_tail(proc)}")
            return check(self.client, address, port)

        wait_for(up, 30, f"{name} serving on {address}:{port}", step=0.05)

    # -- the balancer stacks -----------------------------------------------------------------

    def start_ras(
        self,
        node: str,
        priority: int,
        *,
        vip: str,
        vrid: int,
        advert_s: float,
        port: int,
        backend_port: int,
        profile: Path | None = None,
    ) -> Stack:
        """`ras halb` on `node`; with `profile`, under cProfile, the stats written there when
        it stops."""
        conf = halb_config(
            self.tmp / f"{self.lab.prefix}-{node}-halb.toml",
            node,
            vip_cidr=f"{vip}/{self.lab.subnet.prefixlen}",
            vrid=vrid,
            priority=priority,
            advert_s=advert_s,
            gateways=self.gateways,
            listen_port=port,
            backend_port=backend_port,
            health_port=SERVICE_PORT,
            health_interval_s=HEALTH_INTERVAL_S,
        )
        host = self.hosts[node]
        argv = [*RAS, "halb", "--config", str(conf)]
        if profile is not None:
            argv[1:3] = ["-m", "cProfile", "-o", str(profile), "-m", "ras"]
        proc = host.popen(argv)
        return Stack("ras", host, [proc], proc)

    def start_keepalived_haproxy(
        self,
        node: str,
        priority: int,
        *,
        vip: str,
        vrid: int,
        advert_s: float,
        port: int,
        backend_port: int,
    ) -> Stack:
        host = self.hosts[node]
        host.sysctl("net.ipv4.ip_nonlocal_bind", 1)  # haproxy binds the VIP before holding it
        run = self.tmp / f"{self.lab.prefix}-{node}-{vrid}"
        run.mkdir(exist_ok=True)
        for stale in run.glob("*.pid"):
            stale.unlink()
        keepalived_conf = keepalived_config(
            run / "keepalived.conf",
            router_id=node,
            vrid=vrid,
            priority=priority,
            advert_s=advert_s,
            vip_cidr=f"{vip}/{self.lab.subnet.prefixlen}",
        )
        haproxy_conf = haproxy_config(
            run / "haproxy.cfg",
            vip=vip,
            ports={port: backend_port},
            servers={g: h.address for g, h in self.gateways.items()},
            health_interval_s=HEALTH_INTERVAL_S,
        )
        haproxy = host.popen([HAPROXY, "-db", "-f", str(haproxy_conf)])
        keepalived = host.popen(
            [
                KEEPALIVED,
                "-n",
                "-l",
                "-D",
                "-f",
                str(keepalived_conf),
                "-p",
                str(run / "keepalived.pid"),
                "-r",
                str(run / "vrrp.pid"),
                "-c",
                str(run / "checkers.pid"),
            ]
        )
        return Stack(
            "haproxy",
            host,
            [keepalived, haproxy],
            haproxy,
            [run / "vrrp.pid", run / "checkers.pid"],
        )

    # -- node faults ---------------------------------------------------------------------------

    def _pids(self, stack: Stack) -> list[int]:
        """Children first: keepalived's VRRP child gets SIGTERM when its parent dies
        (PDEATHSIG) and would send a priority-0 advert if the SIGKILL reached it second."""
        pids = []
        for path in stack.pidfiles:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(path.read_text().strip()))
        return pids + [p.pid for p in stack.procs if p.poll() is None]

    def kill_node(self, stack: Stack) -> float:
        """The node dies: SIGKILL every process of its stack, then its link goes down.
        Returns the instant of the first SIGKILL (time.monotonic())."""
        pids = self._pids(stack)
        instant = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "-n", stack.host.netns, "link", "set", "eth0", "down"], check=True)
        for proc in stack.procs:
            proc.wait(10)
        return instant

    def stop_node(self, stack: Stack) -> float:
        """A graceful stop: SIGTERM to `ras halb` (it sends a priority-0 advert and releases
        the VIP), or to keepalived (the same) with haproxy's soft stop (SIGUSR1). Returns the
        instant of the signal."""
        instant = time.monotonic()
        for proc in stack.procs:
            soft = stack.kind == "haproxy" and proc is stack.balancer
            proc.send_signal(signal.SIGUSR1 if soft else signal.SIGTERM)
        for proc in stack.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return instant

    def revive(self, node: str, vip: str) -> None:
        """Bring a dead node's link back, first removing the VIP a crashed stack left on it (a
        rebooted machine would not have it)."""
        host = self.hosts[node]
        if vip in host.addresses():
            host.run(["ip", "addr", "del", f"{vip}/{self.lab.subnet.prefixlen}", "dev", "eth0"])
        host.run(["ip", "link", "set", "eth0", "up"])

    def holders(self, vip: str, nodes: Iterable[str] = ("n1", "n2")) -> list[str]:
        """The nodes whose eth0 holds `vip` now (a node whose link is down holds nothing)."""
        held = []
        for node in nodes:
            host = self.hosts[node]
            out = subprocess.run(
                ["ip", "-n", host.netns, "-j", "-4", "addr", "show", "dev", "eth0", "up"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            addresses = [
                info["local"]
                for link in json.loads(out or "[]")
                for info in link.get("addr_info", [])
            ]
            if vip in addresses:
                held.append(node)
        return held

    # -- the client ----------------------------------------------------------------------------

    def start_probe(self, vip: str, port: int) -> tuple[subprocess.Popen[bytes], ProbeLog]:
        out = self.tmp / f"{self.lab.prefix}-probes.txt"
        out.unlink(missing_ok=True)
        proc = self.client.popen(
            [sys.executable, str(HERE / "_probe.py"), vip, str(port), str(out)]
        )
        return proc, ProbeLog(out)


# -- one-shot checks from the client host ---------------------------------------------------------


def control_probe(client: Host, address: str, port: int) -> bool:
    """One control-protocol hello/ping/pong to address:port from the client host."""
    return probe(client, address, port) is Probe.OK


def http_probe(client: Host, address: str, port: int) -> bool:
    """One request as the load generator makes it: True if the reply is a 200."""
    sock = client.socket()
    sock.settimeout(1.0)
    try:
        sock.connect((address, port))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return b" 200 " in reply[:16]
    except OSError:
        return False
    finally:
        sock.close()


def tcp_open(client: Host, address: str, port: int) -> bool:
    sock = client.socket()
    sock.settimeout(0.5)
    try:
        sock.connect((address, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


__all__ = [
    "DIRECT_PORT",
    "FAST_PORT",
    "HOSTS",
    "SERVICE_PORT",
    "Bench",
    "BenchError",
    "ProbeLog",
    "Stack",
    "control_probe",
    "http_probe",
    "machine_cpu",
    "process_cpu_s",
    "tcp_open",
    "wait_for",
]
