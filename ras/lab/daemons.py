"""Running our daemons and their reference peers in a lab: config files and a probe.

Shared by the lab tests (tests/halbkit.py) and the benchmarks, so both run the same gateway
and keepalived set-ups and judge a connection the same way.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from pathlib import Path

from ras.errors import ProtocolError
from ras.lab.netns import Host
from ras.pki import FarmPKI
from ras.protocol import Connection, Hello, Ping, Pong, Role, Side, Welcome

__all__ = [
    "Probe",
    "gateway_config",
    "halb_config",
    "haproxy_config",
    "keepalived_argv",
    "keepalived_config",
    "probe",
]


def gateway_config(
    path: Path,
    name: str,
    host: Host,
    pki: FarmPKI,
    *,
    port: int,
    trusted: ipaddress.IPv4Network,
) -> Path:
    """A `ras gateway` config for ``host``: plain port ``port`` only, trusting PROXY v2 from
    ``trusted`` (the lab subnet: HALB nodes), and a broker that is not there (health checks and
    pings need none)."""
    cert, key = pki.ensure(name)
    pub_cert, pub_key = pki.ensure_self_signed(f"{name}-public", [name, str(host.address)])
    path.write_text(f"""
name = "{name}"
listen_host = "0.0.0.0"
plain_port = {port}
tls_enabled = false
public_cert_file = "{pub_cert}"
public_key_file = "{pub_key}"
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{pki.ca_path}"
broker_host = "127.0.0.1"
trusted_proxies = ["{trusted}"]
""")
    return path


def halb_config(
    path: Path,
    name: str,
    *,
    vip_cidr: str,
    vrid: int,
    priority: int,
    advert_s: float,
    gateways: dict[str, Host],
    listen_port: int,
    backend_port: int,
    health_port: int,
    health_interval_s: float = 0.2,
    preempt: bool = True,
    preempt_delay_s: float = 0.0,
    no_gateway_priority: int | None = None,
    extra_services: str = "",
    interface: str = "eth0",
) -> Path:
    """A `ras halb` config: one balanced service, the given gateways, quick health checks.
    ``no_gateway_priority``: None leaves the daemon's default (gateway tracking at 1)."""
    listed = "".join(
        f'\n[[gateways]]\nname = "{g}"\nhost = "{h.address}"\n' for g, h in gateways.items()
    )
    path.write_text(f"""
name = "{name}"
interface = "{interface}"
vips = ["{vip_cidr}"]
vrid = {vrid}
priority = {priority}
advert_interval_s = {advert_s}
preempt = {"true" if preempt else "false"}
preempt_delay_s = {preempt_delay_s}
{"" if no_gateway_priority is None else f"no_gateway_priority = {no_gateway_priority}"}
health_port = {health_port}
health_interval_s = {health_interval_s}
health_timeout_s = 0.5
rise = 2
fall = 2
connect_timeout_s = 1

[[services]]
listen_port = {listen_port}
backend_port = {backend_port}
{extra_services}
{listed}""")
    return path


def keepalived_config(
    path: Path,
    *,
    router_id: str,
    vrid: int,
    priority: int,
    advert_s: float,
    vip_cidr: str,
    preempt: bool = True,
    interface: str = "eth0",
) -> Path:
    """keepalived 2.2.7 in a VRRPv3 group on ``interface`` (the interop and reference peer)."""
    path.write_text(f"""
global_defs {{
    vrrp_version 3
    router_id {router_id}
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 1
}}
vrrp_instance VI_{vrid} {{
    state BACKUP
    interface {interface}
    virtual_router_id {vrid}
    priority {priority}
    advert_int {advert_s}
    {"" if preempt else "nopreempt"}
    virtual_ipaddress {{
        {vip_cidr} dev {interface}
    }}
}}
""")
    return path


def keepalived_argv(conf: Path, rundir: Path) -> list[str]:
    """keepalived in the foreground with its own pid files (its VRRP child's in vrrp.pid)."""
    return [
        "keepalived",
        "-n",
        "-l",
        "-D",
        "-f",
        str(conf),
        "-p",
        str(rundir / "k.pid"),
        "-r",
        str(rundir / "vrrp.pid"),
        "-c",
        str(rundir / "chk.pid"),
    ]


def haproxy_config(
    path: Path,
    *,
    vip: str,
    ports: Mapping[int, int],
    servers: Mapping[str, ipaddress.IPv4Address | str],
    health_interval_s: float = 0.2,
    idle_timeout_s: float = 30.0,
    redispatch: bool = False,
) -> Path:
    """haproxy 2.6 as the reference balancer beside keepalived: ``mode tcp``, one ``listen``
    per ``ports`` entry (VIP port -> the servers' port), ``balance leastconn``, PROXY v2 to
    the servers, and a TCP connect check every ``health_interval_s`` (rise 2, fall 2), as
    `halb_config` checks ours. It binds the VIP before holding it: the node needs
    ``net.ipv4.ip_nonlocal_bind=1``. ``redispatch``: a failed connect is retried on another
    server at once (``retries 3``, ``option redispatch 1``), as ``ras halb`` does."""
    inter = int(health_interval_s * 1000)
    retry = "    retries 3\n    option redispatch 1\n" if redispatch else ""
    listens = "".join(
        f"listen ras-{port}\n    bind {vip}:{port}\n    balance leastconn\n"
        + "".join(
            f"    server {name} {address}:{backend_port} check inter {inter} rise 2 fall 2"
            " send-proxy-v2\n"
            for name, address in servers.items()
        )
        for port, backend_port in ports.items()
    )
    path.write_text(f"""
global
    nbthread 1
    maxconn 9000
defaults
    mode tcp
    timeout connect 1s
    timeout client {idle_timeout_s:g}s
    timeout server {idle_timeout_s:g}s
{retry}{listens}""")
    return path


class Probe(enum.Enum):
    OK = "ok"  # served: hello/welcome, ping/pong
    NOT_CONNECTED = "not connected"  # the new connection failed: refused, unanswered
    CUT = "cut"  # connected, then reset or closed before the pong (a connection in flight)


def probe(
    client: Host, address: str, port: int, timeout: float = 1.0, tls: object | None = None
) -> Probe:
    """One new control-protocol connection from ``client`` to ``address:port``. ``tls``: an
    ``ssl.SSLContext`` to wrap the connection in."""
    raw = client.socket()
    raw.settimeout(timeout)
    sock = raw if tls is None else tls.wrap_socket(raw, server_hostname=address)  # type: ignore[attr-defined]
    conn = Connection(Side.CLIENT)
    try:
        try:
            sock.connect((address, port))
        except OSError:
            return Probe.NOT_CONNECTED
        try:
            sock.sendall(conn.send(Hello(Role.CLIENT, "lab-probe")))
            for wanted, then in ((Welcome, Ping(7)), (Pong, None)):
                replies: list[object] = []
                while not any(isinstance(r, wanted) for r in replies):
                    data = sock.recv(4096)
                    if not data:
                        return Probe.CUT
                    replies += conn.receive_data(data)
                if then is not None:
                    sock.sendall(conn.send(then))
        except (OSError, ProtocolError):
            return Probe.CUT
        return Probe.OK
    finally:
        sock.close()
