"""The VRRP shell: raw sockets for IP protocol 112 around the sans-I/O ``VrrpRouter``.

Receiving: an unbound raw socket that joined 224.0.0.18 on the interface (bound to the device,
not to an address: a raw socket bound to the unicast address stops receiving multicast).
Sending: a raw socket bound to the primary address (it goes into the checksum's
pseudo-header) with multicast TTL 255 and no loopback. The router's commands are carried out
here: adverts sent, VIPs added (plus gratuitous ARP) or removed. Timers are the router's
``deadline``. On the way out a master sends a priority-0 advert and releases the VIPs, so a
backup takes over after Skew_Time instead of Master_Down_Interval.

Priority changes (gateway tracking) come from outside through :meth:`Election.want_priority`;
the loop applies them, so the router is only ever touched by the task that runs it. The wish
interrupts the wait for a packet, because a new priority moves a backup's down timer.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import struct
from collections.abc import Sequence

import trio

from ras.errors import RasError, RemoteProtocolError
from ras.halb.config import HalbConfig
from ras.halb.vip import ArpAnnouncer, add_vip, interface_primary, remove_vip
from ras.ops.metrics import HALB_VRRP_TRANSITIONS
from ras.protocol.vrrp import (
    VRRP_GROUP,
    VRRP_PROTOCOL,
    VRRP_TTL,
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

__all__ = ["Election"]

log = logging.getLogger("ras.halb")
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def _open_sockets(
    interface: str, primary: ipaddress.IPv4Address
) -> tuple[socket.socket, socket.socket]:
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        raise RasError(f"no interface {interface!r}") from None
    try:
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTOCOL)
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTOCOL)
    except PermissionError:
        raise RasError("VRRP needs CAP_NET_RAW (raw sockets for IP protocol 112)") from None
    try:
        rx.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
        mreqn = struct.pack("4s4si", VRRP_GROUP.packed, primary.packed, index)
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        tx.bind((str(primary), 0))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, VRRP_TTL)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, primary.packed)
        rx.setblocking(False)
        tx.setblocking(False)
    except OSError as exc:
        rx.close()
        tx.close()
        raise RasError(f"VRRP sockets on {interface}: {exc.strerror}") from exc
    return rx, tx


class Election:
    """One VRRP instance: who holds the VIPs. ``state`` and ``master`` are for status."""

    def __init__(self, config: HalbConfig) -> None:
        self.config = config
        self.state = VrrpState.INITIALIZE
        self.master: str | None = None
        self.primary: ipaddress.IPv4Address | None = None
        self.adverts_sent = 0
        self.adverts_received = 0
        self.dropped: dict[str, int] = {}
        self.holding = False
        self._router: VrrpRouter | None = None
        self._arp: ArpAnnouncer | None = None
        self._wanted: tuple[int, str] | None = None  # a priority asked for, not yet applied
        self._waiting: trio.CancelScope | None = None  # the loop's wait for a packet or timer

    @property
    def priority(self) -> int:
        """The priority we advertise now (the configured one, or what tracking set)."""
        if self._router is not None:
            return self._router.priority
        return self._wanted[0] if self._wanted is not None else self.config.priority

    def want_priority(self, priority: int, reason: str) -> None:
        """Advertise ``priority`` from now on (gateway tracking); ``reason`` is logged.

        Before :meth:`run` starts the router, the router starts with it."""
        self._wanted = (priority, reason)
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        self.primary = await interface_primary(cfg.interface)
        rx_raw, tx_raw = _open_sockets(cfg.interface, self.primary)
        self._arp = ArpAnnouncer(cfg.interface)
        rx = trio.socket.from_stdlib_socket(rx_raw)
        tx = trio.socket.from_stdlib_socket(tx_raw)
        router = VrrpRouter(
            vrid=cfg.vrid,
            priority=cfg.priority,
            primary=self.primary,
            vips=tuple(v.ip for v in cfg.vip_interfaces),
            advert_interval_s=cfg.advert_interval_s,
            preempt=cfg.preempt,
            preempt_delay_s=cfg.preempt_delay_s,
        )
        self._router = router
        # A crashed master leaves its VIPs behind: a node starts holding none of them.
        await self._release()
        log.info(
            "vrrp start name=%s interface=%s primary=%s vrid=%d priority=%d vips=%s interval=%.2fs",
            cfg.name,
            cfg.interface,
            self.primary,
            cfg.vrid,
            cfg.priority,
            ",".join(cfg.vips),
            cfg.advert_interval_s,
        )
        try:
            with rx, tx:
                await self._apply(tx, self._reprioritize(router, trio.current_time()))
                await self._apply(tx, router.start(trio.current_time()))
                task_status.started()
                while True:
                    await self._apply(tx, self._reprioritize(router, trio.current_time()))
                    # Wait for a packet or the router's next timer (or a new priority); act on
                    # them OUTSIDE the wait's cancel scope, so a timer can never cut a VIP move
                    # in half.
                    deadline = router.deadline if router.deadline is not None else math.inf
                    data: bytes | None = None
                    with trio.move_on_at(deadline) as self._waiting:
                        data, _ = await rx.recvfrom(65535)
                    self._waiting = None
                    now = trio.current_time()
                    if data is None:  # a timer, or woken early (harmless: tick checks)
                        await self._apply(tx, router.tick(now))
                        continue
                    try:
                        src, dst, ttl, proto, payload = parse_ipv4_packet(data)
                    except RemoteProtocolError as exc:
                        self._drop("malformed IPv4", str(exc))
                        continue
                    if proto != VRRP_PROTOCOL:
                        continue
                    if src != self.primary:
                        self.adverts_received += 1
                    await self._apply(tx, router.receive(now, src, ttl, payload, dst=dst))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._leave(router)
            self._arp.close()

    def _reprioritize(self, router: VrrpRouter, now: float) -> list[Command]:
        """Apply the priority last asked for by :meth:`want_priority`, if it is new."""
        if self._wanted is None:
            return []
        priority, reason = self._wanted
        self._wanted = None
        if priority == router.priority:
            return []
        log.warning(
            "vrrp priority name=%s %d->%d state=%s reason=%s",
            self.config.name,
            router.priority,
            priority,
            router.state.name,
            reason,
        )
        return router.set_priority(now, priority)

    async def _leave(self, router: VrrpRouter) -> None:
        """Graceful stop: priority 0 advert from a master, VIPs released."""
        assert self.primary is not None
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTOCOL) as raw:
                raw.bind((str(self.primary), 0))
                raw.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, VRRP_TTL)
                raw.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                raw.setblocking(False)
                tx = trio.socket.from_stdlib_socket(raw)
                await self._apply(tx, router.shutdown(trio.current_time()))
        except (OSError, RasError) as exc:
            log.warning("vrrp stop incomplete reason=%s", exc)
        if self.holding:
            await self._release()

    def _drop(self, reason: str, detail: str = "") -> None:
        count = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if count in (1, 10, 100, 1000) or count % 10000 == 0:  # a flood must not flood the log
            log.info("vrrp dropped reason=%s count=%d %s", reason, count, detail)

    async def _apply(self, tx: trio.socket.SocketType, commands: Sequence[Command]) -> None:
        cfg = self.config
        # Hold the VIPs (and tell the neighbours by gratuitous ARP) before announcing
        # mastership: the old master releases them when it hears our advert, and a client must
        # never be left sending to a MAC that no longer has the address.
        ordered = sorted(commands, key=lambda c: not isinstance(c, TakeVips))
        for cmd in ordered:
            match cmd:
                case SendAdvertisement(advert=advert):
                    assert self.primary is not None
                    try:
                        await tx.sendto(advert.encode(self.primary), (str(VRRP_GROUP), 0))
                        self.adverts_sent += 1
                    except OSError as exc:
                        log.warning("vrrp send failed reason=%s", exc.strerror)
                case TakeVips():
                    for vip in cfg.vip_interfaces:
                        await add_vip(cfg.interface, vip)
                    self.holding = True
                    assert self._arp is not None
                    self._arp.announce([v.ip for v in cfg.vip_interfaces])
                    log.info(
                        "vip taken vips=%s interface=%s garp=sent",
                        ",".join(cfg.vips),
                        cfg.interface,
                    )
                case ReleaseVips():
                    await self._release()
                case StateChanged(old=old, new=new, reason=reason):
                    self.state = new
                    HALB_VRRP_TRANSITIONS.labels(str(cfg.vrid), new.value).inc()
                    log.warning(
                        "vrrp state name=%s %s->%s reason=%s", cfg.name, old.name, new.name, reason
                    )
                case Dropped(reason=reason, detail=detail):
                    self._drop(reason, detail)
        if self._router is not None:
            master = getattr(self._router, "master_address", None)
            self.master = str(master) if master is not None else None

    async def _release(self) -> None:
        cfg = self.config
        for vip in cfg.vip_interfaces:
            await remove_vip(cfg.interface, vip)
        self.holding = False
        log.info("vip released vips=%s interface=%s", ",".join(cfg.vips), cfg.interface)
