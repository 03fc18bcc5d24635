"""Build HALB labs: real `ras gateway` and `ras halb` processes (and keepalived, haproxy) in
network namespaces, and a probe that goes through the VIP the way a client does.

A probe is a real control-protocol exchange (preface, hello, ping, pong) from the client host
to VIP:port: it passes through the master's balancer, which adds a PROXY v2 header, to a
gateway that trusts the lab subnet. So a good probe proves the whole path serves.
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
from dataclasses import dataclass, field
from pathlib import Path

from labkit import wait_until

from ras.errors import ProtocolError
from ras.lab import Host, Lab
from ras.lab.daemons import (
    Probe,
    gateway_config,
    halb_config,
    keepalived_argv,
    keepalived_config,
    probe,
)
from ras.pki import FarmPKI
from ras.protocol import Connection, Hello, Ping, Pong, Role, Side, Welcome

RAS = [sys.executable, "-m", "ras"]
SERVICE_PORT = 8080  # the gateways' plain port, and the VIP port the HALB balances to it
OFFLOAD_PORT = 8443  # a VIP port where the HALB terminates TLS (offload) and forwards to 8080
VRID = 51


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


@dataclass
class HalbLab:
    lab: Lab
    tmp: Path
    vip: str
    client: Host
    gateways: dict[str, Host] = field(default_factory=dict)
    nodes: dict[str, Host] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)  # nodes whose link is down

    # -- gateways -----------------------------------------------------------------------------

    def start_gateway(self, name: str, *, wait: bool = False) -> None:
        """Start gateway ``name``; with ``wait``, return once it serves (a probe from the client
        host, straight to it)."""
        host = self.gateways[name]
        conf = gateway_config(
            self.tmp / f"{name}.toml",
            name,
            host,
            FarmPKI(self.tmp / "pki"),
            port=SERVICE_PORT,
            trusted=self.lab.subnet,
        )
        self.procs[name] = host.popen([*RAS, "gateway", "--config", str(conf)])
        if wait:
            self.wait_gateway(name)

    def wait_gateway(self, name: str, timeout: float = 20.0) -> None:
        address = str(self.gateways[name].address)
        wait_until(
            lambda: probe(self.client, address, SERVICE_PORT, 0.5) is Probe.OK,
            timeout,
            what=f"{name} serves",
        )

    # -- HALB nodes ---------------------------------------------------------------------------

    def halb_config(
        self,
        name: str,
        priority: int,
        *,
        advert_s: float = 0.1,
        preempt: bool = True,
        preempt_delay_s: float = 0.0,
        offload: bool = False,
        gateways: list[str] | None = None,
        no_gateway_priority: int | None = None,
        extra: str = "",
    ) -> Path:
        """``gateways``: the names this node balances over (default: every gateway); ``extra``:
        TOML tables added at the end (e.g. ``[metrics]``)."""
        listed = self.gateways if gateways is None else {g: self.gateways[g] for g in gateways}
        conf = halb_config(
            self.tmp / f"{name}.toml",
            name,
            vip_cidr=f"{self.vip}/{self.lab.subnet.prefixlen}",
            vrid=VRID,
            priority=priority,
            advert_s=advert_s,
            gateways=listed,
            listen_port=SERVICE_PORT,
            backend_port=SERVICE_PORT,
            health_port=SERVICE_PORT,
            preempt=preempt,
            preempt_delay_s=preempt_delay_s,
            no_gateway_priority=no_gateway_priority,
            extra_services=self._offload_service() if offload else "",
        )
        if extra:
            conf.write_text(conf.read_text() + "\n" + extra)
        return conf

    def offload_cert(self) -> tuple[Path, Path]:
        """The certificate HALB nodes offload TLS with (self-signed for the VIP)."""
        return FarmPKI(self.tmp / "pki").ensure_self_signed("halb-offload", [self.vip])

    def _offload_service(self) -> str:
        cert, key = self.offload_cert()
        return (
            f"[[services]]\nlisten_port = {OFFLOAD_PORT}\nbackend_port = {SERVICE_PORT}\n"
            f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
        )

    def start_halb(
        self, name: str, priority: int, *, slow_ip_s: float = 0.0, **options: object
    ) -> None:
        """Start a node; ``slow_ip_s`` puts an ``ip`` first on its PATH that takes that long
        (moving the VIP then outlasts a 100 ms advert interval)."""
        conf = self.halb_config(name, priority, **options)  # type: ignore[arg-type]
        env = None
        if slow_ip_s:
            shim = self.tmp / f"{name}-slow-bin"
            shim.mkdir(exist_ok=True)
            real = shutil.which("ip")
            (shim / "ip").write_text(f'#!/bin/sh\nsleep {slow_ip_s}\nexec {real} "$@"\n')
            (shim / "ip").chmod(0o755)
            env = {"PATH": f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self.procs[name] = self.nodes[name].popen([*RAS, "halb", "--config", str(conf)], env=env)

    def start_keepalived(
        self, name: str, priority: int, *, advert_s: float = 0.1, preempt: bool = True
    ) -> None:
        """keepalived 2.2.7 in the same VRRP group (the interop peer), run as the notes say."""
        run = self.tmp / f"{name}-run"
        run.mkdir(exist_ok=True)
        conf = keepalived_config(
            run / "keepalived.conf",
            router_id=name,
            vrid=VRID,
            priority=priority,
            advert_s=advert_s,
            vip_cidr=f"{self.vip}/{self.lab.subnet.prefixlen}",
            preempt=preempt,
        )
        self.procs[name] = self.nodes[name].popen(keepalived_argv(conf, run))

    def kill_node(self, name: str) -> None:
        """The node dies: its process is SIGKILLed and its link goes down. (A process killed
        alone leaves the VIP on a host that still answers ARP for it, a different fault.)"""
        self.kill(name)
        host = self.nodes.get(name) or self.gateways[name]
        host.run(["ip", "link", "set", "eth0", "down"])
        self.dead.add(name)

    def kill(self, name: str) -> None:
        """A crash: SIGKILL the process (and keepalived's VRRP child, found by its pid file)."""
        proc = self.procs[name]
        child = self.tmp / f"{name}-run" / "vrrp.pid"
        if child.exists():
            with contextlib.suppress(OSError):
                subprocess.run(["kill", "-9", child.read_text().strip()], check=False)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, name: str) -> int:
        """A clean stop (SIGTERM); the process's exit code."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(15)

    def holders(self) -> list[str]:
        """The live nodes whose interface holds the VIP now."""
        return [
            n for n, h in self.nodes.items() if n not in self.dead and self.vip in h.addresses()
        ]

    def status(self, name: str) -> dict[str, object]:
        out = self.nodes[name].run([*RAS, "halb", "status", "--json"], timeout=20)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def log(self, name: str) -> str:
        return self.lab.log_tail(self.procs[name], lines=60)

    # -- the client's view ----------------------------------------------------------------------

    def probe(self, timeout: float = 1.0) -> bool:
        """One new connection through the VIP to a gateway: True if it was served."""
        return self.probe_result(timeout) is Probe.OK

    def probe_result(self, timeout: float = 1.0) -> Probe:
        return probe(self.client, self.vip, SERVICE_PORT, timeout)


class Session:
    """A long-lived control-protocol connection from ``client`` (hello done), for pings."""

    def __init__(self, client: Host, address: str, port: int, timeout: float = 5.0) -> None:
        self.sock = client.socket()
        self.sock.settimeout(timeout)
        self.sock.connect((address, port))
        self.conn = Connection(Side.CLIENT)
        self.sock.sendall(self.conn.send(Hello(Role.CLIENT, "lab-session")))
        self._until(Welcome)

    def _until(self, kind: type) -> bool:
        while True:
            data = self.sock.recv(4096)
            if not data:
                return False
            if any(isinstance(m, kind) for m in self.conn.receive_data(data)):
                return True

    def ping(self) -> bool:
        try:
            self.sock.sendall(self.conn.send(Ping(9)))
            return self._until(Pong)
        except (OSError, ProtocolError):
            return False

    def close(self) -> None:
        self.sock.close()


def wait_probe(lab: HalbLab, timeout: float) -> float:
    """Probe every 10 ms until one succeeds; the seconds it took."""
    start = time.monotonic()
    while not lab.probe(timeout=0.2):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no probe succeeded in {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def build(make_lab, tmp_path: Path, *, nodes: int = 3, gateways: int = 2) -> HalbLab:
    names = (
        ["client"] + [f"gw{i + 1}" for i in range(gateways)] + [f"h{i + 1}" for i in range(nodes)]
    )
    lab = make_lab(*names)
    vip = str(lab.spare_address())
    hl = HalbLab(lab, tmp_path, vip, lab.hosts["client"])
    hl.gateways = {n: lab.hosts[n] for n in names if n.startswith("gw")}
    hl.nodes = {n: lab.hosts[n] for n in names if n.startswith("h")}
    for name in hl.gateways:
        hl.start_gateway(name)
    # Nodes start with every gateway serving: a node whose first health checks found none
    # would start at its no-gateway priority, and the election would not be the one a test set.
    for name in hl.gateways:
        hl.wait_gateway(name)
    return hl
