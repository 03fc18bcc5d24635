"""Moving the virtual IPs: add or remove them on the interface, and announce them with a
gratuitous ARP so that neighbours update their ARP caches at once (without it, clients keep
the old master's MAC for tens of seconds).

Needs CAP_NET_ADMIN (addresses) and CAP_NET_RAW (the ARP frame); ``PermissionError`` is
turned into a ``RasError`` that says which is missing.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

import trio

from ras.errors import RasError

__all__ = [
    "ArpAnnouncer",
    "add_vip",
    "arp_announcement",
    "interface_mac",
    "interface_primary",
    "missing_capabilities",
    "remove_vip",
]

_ETH_P_ARP = 0x0806
_SIOCGIFHWADDR = 0x8927
_BROADCAST = b"\xff" * 6


_CAP_NET_ADMIN = 12
_CAP_NET_RAW = 13


def missing_capabilities(status: Path = Path("/proc/self/status")) -> list[str]:
    """The capabilities the HALB needs and this process lacks (from its effective set)."""
    try:
        line = next(x for x in status.read_text().splitlines() if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return []  # not Linux /proc: let the first operation say what fails
    effective = int(line.split()[1], 16)
    return [
        name
        for bit, name in (
            (_CAP_NET_ADMIN, "CAP_NET_ADMIN (add and remove the VIPs)"),
            (_CAP_NET_RAW, "CAP_NET_RAW (VRRP raw sockets, gratuitous ARP)"),
        )
        if not effective & (1 << bit)
    ]


def interface_mac(interface: str) -> bytes:
    path = Path("/sys/class/net") / interface / "address"
    try:
        return bytes.fromhex(path.read_text().strip().replace(":", ""))
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            info = fcntl.ioctl(
                s.fileno(), _SIOCGIFHWADDR, struct.pack("256s", interface.encode()[:15])
            )
        except OSError as exc:
            raise RasError(f"interface {interface!r}: {exc.strerror}") from None
    return info[18:24]


async def _ip(*args: str) -> str:
    try:
        proc = await trio.run_process(
            ["ip", *args], capture_stdout=True, capture_stderr=True, check=False
        )
    except FileNotFoundError:
        raise RasError("the `ip` command (iproute2) is needed to move the VIP") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if "Operation not permitted" in err:
            raise RasError(f"ip {' '.join(args)}: needs CAP_NET_ADMIN ({err})")
        raise RasError(f"ip {' '.join(args)}: {err}")
    return str(proc.stdout.decode())


async def interface_primary(interface: str) -> ipaddress.IPv4Address:
    """The first IPv4 address of ``interface`` (VRRP sends from it)."""
    out = await _ip("-4", "-o", "addr", "show", "dev", interface)
    for line in out.splitlines():
        words = line.split()
        if "inet" in words and "secondary" not in words:
            return ipaddress.IPv4Interface(words[words.index("inet") + 1]).ip
    raise RasError(f"interface {interface!r} has no IPv4 address")


async def add_vip(interface: str, vip: ipaddress.IPv4Interface) -> None:
    await _ip("addr", "replace", str(vip), "dev", interface)


async def remove_vip(interface: str, vip: ipaddress.IPv4Interface) -> None:
    out = await _ip("-4", "-o", "addr", "show", "dev", interface)
    if f" {vip.ip}/" in out:
        await _ip("addr", "del", str(vip), "dev", interface)


def arp_announcement(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """An Ethernet frame carrying a gratuitous ARP request: sender = target = ``address``."""
    ip = address.packed
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, _BROADCAST, ip)
    return _BROADCAST + mac + struct.pack("!H", _ETH_P_ARP) + arp


class ArpAnnouncer:
    """Sends gratuitous ARP on one interface from a packet socket opened once. (Opening,
    binding and closing one per takeover costs tens of milliseconds of RCU grace periods in the
    kernel, on the critical path of a failover.)"""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.mac = interface_mac(interface)
        try:
            # Protocol 0: a send-only socket, so the kernel queues it no received frames.
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._sock.bind((interface, 0))
        except PermissionError:
            raise RasError("gratuitous ARP needs CAP_NET_RAW") from None
        except OSError as exc:
            raise RasError(f"gratuitous ARP on {interface}: {exc.strerror}") from None

    def announce(self, addresses: list[ipaddress.IPv4Address]) -> None:
        try:
            for address in addresses:
                self._sock.send(arp_announcement(self.mac, address))
        except OSError as exc:
            raise RasError(f"gratuitous ARP on {self.interface}: {exc.strerror}") from None

    def close(self) -> None:
        self._sock.close()
