"""VRRPv3 datagrams as the HALB's raw socket hands them over (``ras.protocol.vrrp``):
``parse_ipv4_packet``, ``Advertisement.decode`` and three routers' ``receive``.

Input: one or more IPv4 datagrams back to back (each ends where its total length says), fed
half a second apart to a backup, a master and a non-preempting backup of VRID 51 with the VIP
10.213.0.100, each of whose timers is run when due. Every datagram is fed as it is, then with
its VRRP checksum made right, so that the fuzzer gets past the checksum to the state machine.

Only ``parse_ipv4_packet`` and ``decode`` may raise (``RemoteProtocolError``); ``receive``
never does. A refused packet gives one ``Dropped`` and changes nothing; a state change is
announced by one ``StateChanged`` matching it, with the VIPs taken on entering MASTER and
released on leaving it. What decodes encodes back to an equal advertisement.
"""

from __future__ import annotations

import math
from ipaddress import IPv4Address

from ras.errors import RemoteProtocolError
from ras.protocol.vrrp import (
    VRRP_PROTOCOL,
    Advertisement,
    Command,
    Dropped,
    ReleaseVips,
    SendAdvertisement,
    StateChanged,
    TakeVips,
    VrrpRouter,
    VrrpState,
    parse_ipv4_packet,
)

NET = "10.213.0."
VIPS = (IPv4Address(NET + "100"),)
MAX_DATAGRAMS = 16
DICTIONARY = (
    b"\x45\xc0",  # IPv4, 20-byte header, DSCP CS6
    b"\xff\x70",  # TTL 255, protocol 112 (VRRP)
    bytes(IPv4Address(NET + "11").packed),
    bytes(IPv4Address("224.0.0.18").packed),
    b"\x31\x33",  # VRRPv3 advertisement, VRID 51
    b"\x00\x64",  # interval 100 cs
    bytes(VIPS[0].packed),
)


def _router(priority: int, last: int, *, preempt: bool = True, delay: float = 0.0) -> VrrpRouter:
    return VrrpRouter(
        vrid=51,
        priority=priority,
        primary=IPv4Address(NET + str(last)),
        vips=VIPS,
        advert_interval_s=1.0,
        preempt=preempt,
        preempt_delay_s=delay,
    )


def _routers() -> list[VrrpRouter]:
    backup = _router(100, 12)
    master = _router(200, 13, delay=2.0)
    lazy = _router(150, 14, preempt=False)
    for router in (backup, master, lazy):
        router.start(0.0)
    master.tick(4.0)  # its master-down timer (3 s + skew) has run out: it takes over
    assert master.state is VrrpState.MASTER
    return [backup, master, lazy]


def _checksum(data: bytes) -> int:
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | (data[i + 1] if i + 1 < len(data) else 0)
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _fix_checksum(packet: bytes, src: IPv4Address, dst: IPv4Address) -> bytes:
    if len(packet) < 8:
        return packet
    zeroed = packet[:6] + b"\0\0" + packet[8:]
    pseudo = src.packed + dst.packed + bytes([0, VRRP_PROTOCOL]) + len(packet).to_bytes(2, "big")
    return packet[:6] + _checksum(pseudo + zeroed).to_bytes(2, "big") + packet[8:]


def _check(router: VrrpRouter, before: VrrpState, commands: list[Command], now: float) -> None:
    after = router.state
    assert all(
        isinstance(c, SendAdvertisement | TakeVips | ReleaseVips | StateChanged | Dropped)
        for c in commands
    ), commands
    if any(isinstance(c, Dropped) for c in commands):
        assert len(commands) == 1, commands
        assert after is before, commands
    changes = [c for c in commands if isinstance(c, StateChanged)]
    if after is before:
        assert not changes, commands
    else:
        assert [(c.old, c.new) for c in changes] == [(before, after)], commands
    took = any(isinstance(c, TakeVips) for c in commands)
    released = any(isinstance(c, ReleaseVips) for c in commands)
    assert took == (after is VrrpState.MASTER and before is not VrrpState.MASTER), commands
    assert released == (before is VrrpState.MASTER and after is not VrrpState.MASTER), commands
    deadline = router.deadline
    assert deadline is not None
    assert math.isfinite(deadline)
    assert deadline >= now - 1e-9, (deadline, now)


def _decode(packet: bytes, src: IPv4Address, dst: IPv4Address) -> None:
    try:
        advert = Advertisement.decode(packet, src, dst)
    except RemoteProtocolError:
        return
    assert Advertisement.decode(advert.encode(src, dst), src, dst) == advert


def fuzz_one(data: bytes) -> None:
    routers = _routers()
    now = 4.0
    for _ in range(MAX_DATAGRAMS):
        if not data:
            break
        try:
            src, dst, ttl, protocol, payload = parse_ipv4_packet(data)
        except RemoteProtocolError:
            return
        header_length = (data[0] & 0x0F) * 4
        data = data[header_length + len(payload) :]
        if protocol != VRRP_PROTOCOL:
            continue
        for packet in (payload, _fix_checksum(payload, src, dst)):
            _decode(packet, src, dst)
            now += 0.5
            for router in routers:
                while router.deadline is not None and router.deadline <= now:
                    before, due = router.state, router.deadline
                    _check(router, before, router.tick(due), due)
                before = router.state
                _check(router, before, router.receive(now, src, ttl, packet, dst=dst), now)
