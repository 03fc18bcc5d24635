"""Tests of the sans-I/O VRRPv3 (``ras.protocol.vrrp``): no trio, no sockets, time as numbers.

Layout:

* codec: a golden packet as keepalived sends it (checksum re-derived here by a plain one's
  complement sum), each rejection, property tests (round trip, mutation, truncation), and the
  raw IPv4 datagram parser;
* transcripts of one router (``Playbook``: events in, commands and deadlines out);
* a small in-memory LAN of several routers (``Lan``): elections, crash and graceful failover,
  preemption, partitions, priority changes (gateway tracking), with takeover times checked
  against RFC 5798's formulas.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ras.errors import LocalProtocolError, RemoteProtocolError
from ras.protocol.vrrp import (
    DROP_MALFORMED,
    DROP_NOT_RUNNING,
    DROP_OWN,
    DROP_OWNER,
    DROP_TTL,
    DROP_VIPS,
    DROP_VRID,
    VRRP_GROUP,
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

PROPERTY = settings(max_examples=200, deadline=None)
INIT, BACKUP, MASTER = VrrpState.INITIALIZE, VrrpState.BACKUP, VrrpState.MASTER

NET = "10.213.0."
SRC = IPv4Address(NET + "11")
PEER = IPv4Address(NET + "12")
VIP = IPv4Address(NET + "100")
VIPS = (VIP,)

# What keepalived sends for ``virtual_router_id 51, priority 100, advert_int 1`` (VRRPv3,
# VIP 10.213.0.100) from 10.213.0.11. The checksum by hand, 16-bit words:
#   pseudo-header 0ad5+000b (src) + e000+0012 (dst) + 0070 (proto 112) + 000c (length 12)
#   = eb6e; packet 3133+6401+0064+0000+0ad5+0064 = a0d1; eb6e+a0d1 = 1_8c3f -> 8c40;
#   checksum = ~8c40 = 73bf.
GOLDEN = bytes.fromhex("31 33 64 01 00 64 73bf 0ad50064")
GOLDEN_ADVERT = Advertisement(vrid=51, priority=100, max_advert_int_cs=100, addresses=VIPS)


def ones_complement_sum_checksum(data: bytes) -> int:
    """RFC 1071, written out independently of the module under test."""
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | (data[i + 1] if i + 1 < len(data) else 0)
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src: IPv4Address, length: int, dst: IPv4Address = VRRP_GROUP) -> bytes:
    return src.packed + dst.packed + bytes([0, 112]) + length.to_bytes(2, "big")


def forge(
    *,
    vers_type: int = 0x31,
    vrid: int = 51,
    priority: int = 100,
    count: int | None = None,
    interval: int = 100,
    addresses: tuple[IPv4Address, ...] = VIPS,
    extra: bytes = b"",
    src: IPv4Address = SRC,
) -> bytes:
    """A VRRP packet with any field values and a correct checksum."""
    count = len(addresses) if count is None else count
    head = bytes([vers_type, vrid, priority, count]) + interval.to_bytes(2, "big")
    body = b"".join(a.packed for a in addresses) + extra
    checksum = ones_complement_sum_checksum(pseudo(src, 8 + len(body)) + head + b"\0\0" + body)
    return head + checksum.to_bytes(2, "big") + body


def ipv4(
    payload: bytes,
    *,
    src: IPv4Address = SRC,
    dst: IPv4Address = VRRP_GROUP,
    ttl: int = 255,
    protocol: int = VRRP_PROTOCOL,
    version: int = 4,
    options: bytes = b"",
    total: int | None = None,
    frag: int = 0,
) -> bytes:
    """An IPv4 datagram as a raw socket hands it over (header checksum left at 0)."""
    ihl = (20 + len(options)) // 4
    total = 20 + len(options) + len(payload) if total is None else total
    header = (
        bytes([version << 4 | ihl, 0xC0])
        + total.to_bytes(2, "big")
        + b"\0\0"
        + frag.to_bytes(2, "big")
        + bytes([ttl, protocol])
        + b"\0\0"
        + src.packed
        + dst.packed
    )
    return header + options + payload


# -- codec --------------------------------------------------------------------------------------


def test_golden_packet_is_what_keepalived_sends():
    assert GOLDEN_ADVERT.encode(SRC) == GOLDEN
    assert Advertisement.decode(GOLDEN, SRC) == GOLDEN_ADVERT
    # The checksum, re-derived here: over pseudo-header + packet the sum folds to zero...
    assert ones_complement_sum_checksum(pseudo(SRC, 12) + GOLDEN) == 0
    # ...and computed with the field zeroed it is the value on the wire.
    zeroed = GOLDEN[:6] + b"\0\0" + GOLDEN[8:]
    assert ones_complement_sum_checksum(pseudo(SRC, 12) + zeroed) == 0x73BF


def test_golden_datagram_from_a_raw_socket():
    datagram = ipv4(GOLDEN)
    src, dst, ttl, protocol, payload = parse_ipv4_packet(datagram)
    assert (src, dst, ttl, protocol, payload) == (SRC, VRRP_GROUP, 255, 112, GOLDEN)
    assert Advertisement.decode(payload, src, dst) == GOLDEN_ADVERT


def test_checksum_covers_the_pseudo_header():
    with pytest.raises(RemoteProtocolError, match="checksum"):
        Advertisement.decode(GOLDEN, PEER)  # another source address
    with pytest.raises(RemoteProtocolError, match="checksum"):
        Advertisement.decode(GOLDEN, SRC, IPv4Address("224.0.0.19"))
    unicast = GOLDEN_ADVERT.encode(SRC, PEER)
    assert Advertisement.decode(unicast, SRC, PEER) == GOLDEN_ADVERT


def test_every_single_bit_flip_is_refused():
    for bit in range(len(GOLDEN) * 8):
        flipped = bytearray(GOLDEN)
        flipped[bit // 8] ^= 0x80 >> bit % 8
        with pytest.raises(RemoteProtocolError):
            Advertisement.decode(bytes(flipped), SRC)


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"", "too short"),
        (GOLDEN[:7], "too short"),
        (forge(vers_type=0x21), "version 2"),
        (forge(vers_type=0x32), "type 2"),
        (forge(count=2), "cannot carry 2"),
        (forge(extra=b"\0\0\0\0"), "cannot carry 1"),
        (GOLDEN[:-1], "cannot carry 1"),
        (GOLDEN[:6] + b"\x73\xbe" + GOLDEN[8:], "checksum"),
        (forge(vrid=0), "VRID 0"),
        (forge(interval=0), "interval 0"),
        (forge(interval=0xF000), "interval 0"),  # the reserved bits are not the interval
        (forge(addresses=()), "addresses"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_decode_refuses(packet: bytes, message: str):
    with pytest.raises(RemoteProtocolError, match=message):
        Advertisement.decode(packet, SRC)


def test_reserved_bits_are_ignored_and_priority_zero_is_valid():
    assert Advertisement.decode(forge(interval=0xF000 | 100), SRC) == GOLDEN_ADVERT
    stop = Advertisement.decode(forge(priority=0), SRC)
    assert stop.priority == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"vrid": 0},
        {"vrid": 256},
        {"vrid": True},
        {"priority": -1},
        {"priority": 256},
        {"max_advert_int_cs": 0},
        {"max_advert_int_cs": 4096},
        {"addresses": ()},
        {"addresses": tuple(IPv4Address(i) for i in range(256))},
        {"addresses": [VIP]},
        {"addresses": ("10.213.0.100",)},
    ],
)
def test_advertisement_validates_its_fields(fields: dict[str, Any]):
    args = {"vrid": 51, "priority": 100, "max_advert_int_cs": 100, "addresses": VIPS} | fields
    with pytest.raises(LocalProtocolError):
        Advertisement(**args)


addresses = st.integers(0, 2**32 - 1).map(IPv4Address)
adverts = st.builds(
    Advertisement,
    vrid=st.integers(1, 255),
    priority=st.integers(0, 255),
    max_advert_int_cs=st.integers(1, 4095),
    addresses=st.lists(addresses, min_size=1, max_size=255).map(tuple),
)


@PROPERTY
@given(advert=adverts, src=addresses, dst=addresses)
def test_round_trip(advert: Advertisement, src: IPv4Address, dst: IPv4Address):
    packet = advert.encode(src, dst)
    assert len(packet) == 8 + 4 * len(advert.addresses)
    assert ones_complement_sum_checksum(pseudo(src, len(packet), dst) + packet) == 0
    assert Advertisement.decode(packet, src, dst) == advert


@PROPERTY
@given(advert=adverts, data=st.data())
def test_any_mutation_is_refused_or_decodes_to_a_valid_advert(
    advert: Advertisement, data: st.DataObject
):
    packet = bytearray(advert.encode(SRC))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(packet) - 1))
        packet[i] = data.draw(st.integers(0, 255).filter(lambda b, i=i: b != packet[i]))
    try:
        result = Advertisement.decode(bytes(packet), SRC)
    except RemoteProtocolError:
        return
    # A mutation the checksum cannot see (one's complement has two zeros): still valid.
    assert isinstance(result, Advertisement)
    assert Advertisement.decode(result.encode(SRC), SRC) == result


@PROPERTY
@given(advert=adverts, data=st.data())
def test_any_truncation_is_refused(advert: Advertisement, data: st.DataObject):
    packet = advert.encode(SRC)
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(RemoteProtocolError):
        Advertisement.decode(packet[:cut], SRC)


@PROPERTY
@given(junk=st.binary(max_size=64))
def test_random_bytes_never_raise_anything_else(junk: bytes):
    with contextlib.suppress(RemoteProtocolError):
        Advertisement.decode(junk, SRC)
    with contextlib.suppress(RemoteProtocolError):
        parse_ipv4_packet(junk)


def test_ipv4_options_and_link_padding():
    datagram = ipv4(GOLDEN, options=b"\x94\x04\x00\x00")  # Router Alert
    assert parse_ipv4_packet(datagram)[4] == GOLDEN
    padded = ipv4(GOLDEN) + b"\0" * 14  # Ethernet minimum frame padding
    assert parse_ipv4_packet(padded)[4] == GOLDEN


@pytest.mark.parametrize(
    ("datagram", "message"),
    [
        (ipv4(GOLDEN)[:19], "too short"),
        (ipv4(GOLDEN, version=6), "version 6"),
        (b"\x44" + ipv4(GOLDEN)[1:], "header length 16"),
        (b"\x4f" + ipv4(GOLDEN)[1:], "total length"),  # 60-byte header in 32 bytes
        (ipv4(GOLDEN, total=33), "total length 33"),
        (ipv4(GOLDEN, total=19), "total length 19"),
        (ipv4(GOLDEN, frag=0x2000), "fragment"),
        (ipv4(GOLDEN, frag=0x0001), "fragment"),
    ],
)
def test_parse_ipv4_refuses(datagram: bytes, message: str):
    with pytest.raises(RemoteProtocolError, match=message):
        parse_ipv4_packet(datagram)


@PROPERTY
@given(advert=adverts, ttl=st.integers(0, 255), data=st.data())
def test_ipv4_round_trip_truncation_and_mutation(
    advert: Advertisement, ttl: int, data: st.DataObject
):
    payload = advert.encode(SRC)
    datagram = ipv4(payload, ttl=ttl)
    assert parse_ipv4_packet(datagram) == (SRC, VRRP_GROUP, ttl, VRRP_PROTOCOL, payload)
    with pytest.raises(RemoteProtocolError):
        parse_ipv4_packet(datagram[: data.draw(st.integers(0, len(datagram) - 1))])
    mutated = bytearray(datagram)
    mutated[data.draw(st.integers(0, 19))] = data.draw(st.integers(0, 255))
    try:
        result = parse_ipv4_packet(bytes(mutated))
    except RemoteProtocolError:
        return
    assert len(result) == 5


# -- one router: transcripts ---------------------------------------------------------------------


class _Anything:
    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Anything()


def router(
    priority: int = 100,
    primary: IPv4Address = SRC,
    *,
    interval: float = 1.0,
    vips: tuple[IPv4Address, ...] = VIPS,
    **kwargs: Any,
) -> VrrpRouter:
    return VrrpRouter(
        vrid=51,
        priority=priority,
        primary=primary,
        vips=vips,
        advert_interval_s=interval,
        **kwargs,
    )


def adv(priority: int, *, interval_cs: int = 100, vrid: int = 51, vips=VIPS) -> Advertisement:
    return Advertisement(vrid, priority, interval_cs, vips)


def mdi(priority: int, interval: float = 1.0) -> float:
    """RFC 5798 6.1: Master_Down_Interval, written out independently."""
    return 3 * interval + skew(priority, interval)


def skew(priority: int, interval: float = 1.0) -> float:
    return (256 - priority) * interval / 256


# Events fed to a router, and the expectation of its deadline (timers are outputs too).
@dataclass(frozen=True)
class Start:
    t: float

    def apply(self, r: VrrpRouter) -> list[Command]:
        return r.start(self.t)


@dataclass(frozen=True)
class Tick:
    t: float

    def apply(self, r: VrrpRouter) -> list[Command]:
        return r.tick(self.t)


@dataclass(frozen=True)
class Shutdown:
    t: float

    def apply(self, r: VrrpRouter) -> list[Command]:
        return r.shutdown(self.t)


@dataclass(frozen=True)
class SetPriority:
    t: float
    priority: int

    def apply(self, r: VrrpRouter) -> list[Command]:
        return r.set_priority(self.t, self.priority)


@dataclass(frozen=True)
class Receive:
    t: float
    advert: Advertisement | bytes
    src: IPv4Address = PEER
    ttl: int = 255

    def apply(self, r: VrrpRouter) -> list[Command]:
        packet = self.advert
        if isinstance(packet, Advertisement):
            packet = packet.encode(self.src)
        return r.receive(self.t, self.src, self.ttl, packet)


@dataclass(frozen=True)
class Deadline:
    t: float | None


class Playbook:
    """``assert Playbook(r) >> Event(...) << Command(...) << Deadline(t)``: feeds the events in
    order and compares everything the router returned (and its deadline where asked) with the
    expectations (mitmproxy ``tutils.Playbook`` style)."""

    def __init__(self, r: VrrpRouter) -> None:
        self.router = r
        self.script: list[object] = []

    def __rshift__(self, event: object) -> Playbook:
        self.script.append(event)
        return self

    def __lshift__(self, expected: object) -> Playbook:
        self.script.append(expected)
        return self

    def __bool__(self) -> bool:
        actual: list[object] = []
        for step in self.script:
            if isinstance(step, Deadline):
                d = self.router.deadline
                actual.append(step if d == pytest.approx(step.t, abs=1e-9) else Deadline(d))
            elif hasattr(step, "apply"):
                actual.append(step)
                actual.extend(step.apply(self.router))
        if actual == self.script:
            return True
        print("expected:", *self.script, sep="\n  ")
        print("actual:", *actual, sep="\n  ")
        return False


def master_at(t: float, priority: int = 255, **kwargs: Any) -> VrrpRouter:
    """A router that has been MASTER since ``t``."""
    r = router(priority, **kwargs)
    if priority == 255:
        r.start(t)
    else:
        r.start(t - mdi(priority))
        r.tick(t)
    assert r.state is MASTER
    return r


def test_backup_start_and_master_down():
    r = router(100)
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, "started")
        << Deadline(mdi(100))  # 3.609375
        >> Tick(3.6)  # early: nothing
        << Deadline(mdi(100))
        >> Tick(mdi(100))
        << StateChanged(BACKUP, MASTER, "no advertisement from any master for 3.609 s")
        << SendAdvertisement(adv(100))
        << TakeVips(VIPS)
        << Deadline(mdi(100) + 1)
        >> Tick(mdi(100) + 1)
        << SendAdvertisement(adv(100))
        << Deadline(mdi(100) + 2)
    )
    assert r.master_address == SRC


def test_address_owner_is_master_at_once():
    assert (
        Playbook(router(255))
        >> Start(5)
        << StateChanged(INIT, MASTER, "address owner (priority 255)")
        << SendAdvertisement(adv(255))
        << TakeVips(VIPS)
        << Deadline(6)
    )


def test_backup_follows_the_master_and_learns_its_interval():
    r = router(100)
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(200, interval_cs=50))
        << Deadline(1 + mdi(100, interval=0.5))
        >> Receive(2, adv(100))  # equal priority, lower address: still followed (>=)
        << Deadline(2 + mdi(100))
    )
    assert r.master_adver_interval_s == 1.0
    assert r.master_address == PEER


def test_backup_takes_over_skew_time_after_a_priority_zero_advert():
    r = router(100)
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(200))
        >> Receive(2, adv(0))
        << Deadline(2 + skew(100))
        >> Tick(2 + skew(100))
        << StateChanged(BACKUP, MASTER, f"master {PEER} left (priority 0)")
        << SendAdvertisement(adv(100))
        << TakeVips(VIPS)
    )


def test_preempting_backup_ignores_a_lower_master():
    r = router(150)
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(100))
        << Deadline(mdi(150))  # not reset
        >> Tick(mdi(150))
        << StateChanged(BACKUP, MASTER, f"preempting master {PEER} of lower priority (100 < 150)")
        << SendAdvertisement(adv(150))
        << TakeVips(VIPS)
    )


def test_non_preempting_backup_follows_a_lower_master():
    assert (
        Playbook(router(150, preempt=False))
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(100))
        << Deadline(1 + mdi(150))
    )


def test_master_yields_to_higher_priority():
    r = master_at(10, 100)
    assert (
        Playbook(r)
        >> Receive(10.5, adv(200, interval_cs=200))
        << StateChanged(MASTER, BACKUP, f"{PEER} has higher priority (200 > 100)")
        << ReleaseVips(VIPS)
        << Deadline(10.5 + mdi(100, interval=2.0))
    )
    assert r.master_address == PEER


def test_master_with_equal_priority_yields_to_the_higher_address_only():
    low = IPv4Address(NET + "5")
    assert (
        Playbook(master_at(10, 100))
        >> Receive(10.5, adv(100), src=low)
        << Deadline(11)  # ignored: we keep sending
        >> Receive(10.6, adv(99), src=PEER)
        << Deadline(11)
        >> Receive(10.7, adv(100), src=PEER)
        << StateChanged(MASTER, BACKUP, f"{PEER} has the same priority (100) and a higher address")
        << ReleaseVips(VIPS)
    )


def test_master_answers_a_priority_zero_advert_at_once():
    assert (
        Playbook(master_at(10, 100))
        >> Receive(10.25, adv(0))
        << SendAdvertisement(adv(100))
        << Deadline(11.25)
    )


def test_master_shutdown_sends_priority_zero_then_releases():
    r = master_at(10, 100)
    assert (
        Playbook(r)
        >> Shutdown(12)
        << StateChanged(MASTER, INIT, "shutdown")
        << SendAdvertisement(adv(0))
        << ReleaseVips(VIPS)
        << Deadline(None)
        >> Shutdown(13)  # again: nothing
        >> Tick(20)
        >> Receive(21, adv(200))
        << Dropped(DROP_NOT_RUNNING, ANY)
    )
    assert r.master_address is None


def test_backup_shutdown_is_silent():
    assert (
        Playbook(router(100))
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Shutdown(1)
        << StateChanged(BACKUP, INIT, "shutdown")
        << Deadline(None)
    )


@pytest.mark.parametrize("state", [BACKUP, MASTER])
def test_refused_packets_are_dropped_with_reasons_and_change_nothing(state: VrrpState):
    r = master_at(10, 100) if state is MASTER else router(100)
    if state is BACKUP:
        r.start(9)
    deadline = r.deadline
    bad_checksum = bytearray(adv(200).encode(PEER))
    bad_checksum[7] ^= 1
    other = IPv4Address(NET + "101")
    assert (
        Playbook(r)
        >> Receive(10.1, adv(200), ttl=254)
        << Dropped(DROP_TTL, f"TTL 254 from {PEER}")
        >> Receive(10.2, adv(200, vrid=52))
        << Dropped(DROP_VRID, f"VRID 52 from {PEER}, ours is 51")
        >> Receive(10.3, adv(200, vips=(other,)))
        << Dropped(DROP_VIPS, f"{PEER} advertises {other}, ours are {VIP}")
        >> Receive(10.4, adv(200, vips=(VIP, other)))
        << Dropped(DROP_VIPS, ANY)
        >> Receive(10.5, bytes(bad_checksum))
        << Dropped(DROP_MALFORMED, f"from {PEER}: bad VRRP checksum")
        >> Receive(10.6, b"\x31\x33")
        << Dropped(DROP_MALFORMED, ANY)
        >> Receive(10.7, adv(200), src=SRC)
        << Dropped(DROP_OWN, ANY)
        << Deadline(deadline)
    )
    assert r.state is state


def test_vip_order_does_not_matter():
    other = IPv4Address(NET + "101")
    r = router(100, vips=(VIP, other))
    r.start(0)
    assert r.receive(1, PEER, 255, adv(200, vips=(other, VIP)).encode(PEER)) == []
    assert r.deadline == pytest.approx(1 + mdi(100))


def test_address_owner_ignores_adverts():
    assert (
        Playbook(router(255))
        >> Start(0)
        << StateChanged(INIT, MASTER, ANY)
        << SendAdvertisement(adv(255))
        << TakeVips(VIPS)
        >> Receive(0.5, adv(0))
        << Dropped(DROP_OWNER, ANY)
        << Deadline(1)
    )


def test_set_priority_moves_a_backups_timer_by_the_skew_change():
    r = router(100)
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> SetPriority(1, 200)
        << Deadline(mdi(200))
        >> Tick(mdi(200))
        << StateChanged(BACKUP, MASTER, ANY)
        << SendAdvertisement(adv(200))
        << TakeVips(VIPS)
    )
    assert r.priority == 200


# Priority changes, as gateway tracking makes them: the master whose gateways all died lowers
# its priority, a preempting backup takes over, and the old master's restored priority takes
# the VIPs back (or, at a tie, does not).


def test_master_lowering_its_priority_says_so_in_its_next_advert_and_yields():
    r = master_at(10, 200)
    assert (
        Playbook(r)
        >> SetPriority(10.5, 1)
        << Deadline(11)  # no extra advert: the next one carries the new priority
        >> Tick(11)
        << SendAdvertisement(adv(1))
        << Deadline(12)
        >> Receive(11.3, adv(100))  # the backup has taken over (see the next test)
        << StateChanged(MASTER, BACKUP, f"{PEER} has higher priority (100 > 1)")
        << ReleaseVips(VIPS)
        << Deadline(11.3 + mdi(1))
    )
    assert r.priority == 1
    assert r.master_address == PEER


def test_preempting_backup_takes_over_from_a_master_that_lowered_its_priority():
    r = router(100)
    last_high = 2.0
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(200))
        << Deadline(1 + mdi(100))
        >> Receive(last_high, adv(200))
        << Deadline(last_high + mdi(100))
        >> Receive(3, adv(1))  # discarded: the down timer runs on from the last higher advert
        << Deadline(last_high + mdi(100))
        >> Receive(4, adv(1))
        << Deadline(last_high + mdi(100))
        >> Tick(last_high + mdi(100))
        << StateChanged(BACKUP, MASTER, f"preempting master {PEER} of lower priority (1 < 100)")
        << SendAdvertisement(adv(100))
        << TakeVips(VIPS)
        << Deadline(last_high + mdi(100) + 1)
    )


def test_non_preempting_backup_leaves_a_lowered_master_alone():
    assert (
        Playbook(router(100, preempt=False))
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(200))
        >> Receive(2, adv(1))
        << Deadline(2 + mdi(100))  # followed: the timer is reset by every advert
    )


def test_the_preempt_delay_also_holds_back_the_takeover_from_a_lowered_master():
    r = router(100, preempt_delay_s=3.0)
    assert (
        Playbook(r)
        >> Start(0)
        << StateChanged(INIT, BACKUP, ANY)
        >> Receive(1, adv(200))
        >> Receive(2, adv(1))  # the delay starts: until 5, lower adverts count as a master
        << Deadline(2 + mdi(100))
        >> Receive(4, adv(1))
        << Deadline(4 + mdi(100))
        >> Receive(5, adv(1))  # the delay is over: discarded
        << Deadline(4 + mdi(100))
        >> Tick(4 + mdi(100))
        << StateChanged(BACKUP, MASTER, ANY)
        << SendAdvertisement(adv(100))
        << TakeVips(VIPS)
    )


def test_restored_priority_takes_the_vips_back_with_preempt():
    r = master_at(10, 200)
    assert (
        Playbook(r)
        >> SetPriority(10.5, 1)  # no gateway
        >> Receive(10.6, adv(100))
        << StateChanged(MASTER, BACKUP, ANY)
        << ReleaseVips(VIPS)
        >> Receive(11.6, adv(100))
        << Deadline(11.6 + mdi(1))
        >> SetPriority(12, 200)  # a gateway is healthy again: the timer moves by the skew
        << Deadline(11.6 + mdi(200))
        >> Receive(12.6, adv(100))  # now lower than ours: discarded
        << Deadline(11.6 + mdi(200))
        >> Tick(11.6 + mdi(200))
        << StateChanged(BACKUP, MASTER, f"preempting master {PEER} of lower priority (100 < 200)")
        << SendAdvertisement(adv(200))
        << TakeVips(VIPS)
    )


def test_restored_priority_equal_to_the_new_masters_leaves_the_vips_where_they_are():
    low = IPv4Address(NET + "5")  # the new master's address is lower than ours: no matter
    r = master_at(10, 100)
    assert (
        Playbook(r)
        >> SetPriority(10.5, 1)
        >> Receive(10.6, adv(100), src=low)
        << StateChanged(MASTER, BACKUP, ANY)
        << ReleaseVips(VIPS)
        >> SetPriority(11, 100)
        >> Receive(11.6, adv(100), src=low)  # equal: followed (RFC 5798 6.4.2)
        << Deadline(11.6 + mdi(100))
        >> Receive(12.6, adv(100), src=low)
        << Deadline(12.6 + mdi(100))
    )
    assert r.state is BACKUP


def test_the_address_owner_ignores_adverts_and_keeps_its_priority():
    r = router(255)
    r.start(0)
    with pytest.raises(LocalProtocolError, match="fixed at 255"):
        r.set_priority(0.5, 1)
    assert r.receive(0.6, PEER, 255, adv(254).encode(PEER)) == [Dropped(DROP_OWNER, ANY)]
    assert r.state is MASTER
    assert r.priority == 255


def test_misuse_is_refused():
    r = router(100)
    r.start(0)
    with pytest.raises(LocalProtocolError):
        r.start(1)
    with pytest.raises(ValueError, match="1-254"):
        r.set_priority(1, 255)
    with pytest.raises(ValueError, match="1-254"):
        r.set_priority(1, 0)
    with pytest.raises(LocalProtocolError, match="owner"):
        router(255).set_priority(0, 100)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vrid": 0},
        {"vrid": 256},
        {"priority": 0},
        {"priority": 256},
        {"advert_interval_s": 0},
        {"advert_interval_s": 0.005},
        {"advert_interval_s": 40.96},
        {"advert_interval_s": math.nan},
        {"vips": ()},
        {"vips": (VIP, VIP)},
        {"vips": ("10.213.0.100",)},
        {"primary": "10.213.0.11"},
        {"preempt_delay_s": -1},
    ],
)
def test_router_configuration_is_checked(kwargs: dict[str, Any]):
    args = {
        "vrid": 51,
        "priority": 100,
        "primary": SRC,
        "vips": VIPS,
        "advert_interval_s": 1.0,
    } | kwargs
    with pytest.raises(ValueError):  # noqa: PT011 - the message is the parameter's own
        VrrpRouter(**args)


# -- several routers on an in-memory LAN ---------------------------------------------------------


def host(n: int) -> IPv4Address:
    return IPv4Address(NET + str(n))


class Lan:
    """Routers wired together in memory, carrying out their commands like the HALB shell.

    Each advert reaches every other live router ``delay`` seconds after it was sent, unless the
    link is cut when it would arrive. Time jumps to the next delivery or router deadline.
    """

    def __init__(self, *routers: VrrpRouter, delay: float = 0.001) -> None:
        self.routers = {r.primary: r for r in routers}
        self.delay = delay
        self.now = 0.0
        self.dead: set[IPv4Address] = set()
        self.cut: set[frozenset[IPv4Address]] = set()
        self.holders: set[IPv4Address] = set()
        self.log: list[tuple[float, IPv4Address, Command]] = []
        self.deliveries: list[tuple[float, IPv4Address, IPv4Address, Advertisement]] = []
        self._queue: list[tuple[float, int, IPv4Address, IPv4Address, bytes]] = []
        self._seq = itertools.count()

    def _do(self, who: IPv4Address, commands: list[Command]) -> None:
        for command in commands:
            self.log.append((self.now, who, command))
            match command:
                case SendAdvertisement(advert=advert):
                    packet = advert.encode(who)
                    for other in self.routers:
                        if other != who:
                            at = self.now + self.delay
                            heapq.heappush(self._queue, (at, next(self._seq), who, other, packet))
                case TakeVips():
                    self.holders.add(who)
                case ReleaseVips():
                    self.holders.discard(who)

    def start(self, *who: IPv4Address) -> None:
        for w in who:
            self.dead.discard(w)
            self._do(w, self.routers[w].start(self.now))

    def crash(self, who: IPv4Address) -> None:
        """The process dies: sends, receives and ticks no more, and keeps the VIP (as a
        SIGKILLed keepalived does)."""
        self.dead.add(who)

    def replace(self, r: VrrpRouter) -> None:
        """A restarted process: a fresh router on the same host, started now. Like the HALB
        shell at startup, it first removes a VIP its crashed predecessor left behind."""
        self.routers[r.primary] = r
        self.holders.discard(r.primary)
        self.start(r.primary)

    def command(self, who: IPv4Address, call: Callable[[VrrpRouter], list[Command]]) -> None:
        self._do(who, call(self.routers[who]))

    def partition(self, side_a: set[IPv4Address], side_b: set[IPv4Address]) -> None:
        self.cut |= {frozenset((a, b)) for a in side_a for b in side_b}

    def heal(self) -> None:
        self.cut.clear()

    def run(self, until: float) -> None:
        while True:
            timers = [
                (r.deadline, p)
                for p, r in self.routers.items()
                if p not in self.dead and r.deadline
            ]
            next_timer = min(timers, default=(math.inf, None))
            next_packet = self._queue[0][0] if self._queue else math.inf
            t = min(next_timer[0], next_packet)
            if t > until:
                break
            self.now = t
            if next_packet <= next_timer[0]:
                _, _, src, dst, packet = heapq.heappop(self._queue)
                if dst in self.dead or frozenset((src, dst)) in self.cut:
                    continue
                self.deliveries.append((t, dst, src, Advertisement.decode(packet, src)))
                self._do(dst, self.routers[dst].receive(t, src, 255, packet))
            else:
                who = next_timer[1]
                assert who is not None
                self._do(who, self.routers[who].tick(t))
        self.now = until

    # -- read-outs -------------------------------------------------------------------------

    def masters(self) -> set[IPv4Address]:
        return {p for p, r in self.routers.items() if p not in self.dead and r.state is MASTER}

    def live_holders(self) -> set[IPv4Address]:
        return self.holders - self.dead

    def changes(self, who: IPv4Address, new: VrrpState) -> list[float]:
        """When ``who`` entered state ``new``."""
        return [
            t for t, w, c in self.log if w == who and isinstance(c, StateChanged) and c.new is new
        ]

    def received(self, dst: IPv4Address, src: IPv4Address) -> Iterator[tuple[float, int]]:
        """(time, priority) of each advert from ``src`` that reached ``dst``."""
        for t, d, s, advert in self.deliveries:
            if d == dst and s == src:
                yield t, advert.priority

    def dropped(self) -> list[Dropped]:
        return [c for _, _, c in self.log if isinstance(c, Dropped)]


def settled_lan(*priorities: int, **kwargs: Any) -> tuple[Lan, list[IPv4Address]]:
    """Routers .11, .12, ... with these priorities, started together, run for 10 s."""
    hosts = [host(11 + i) for i in range(len(priorities))]
    lan = Lan(*(router(p, h, **kwargs) for p, h in zip(priorities, hosts, strict=True)))
    lan.start(*hosts)
    lan.run(10)
    return lan, hosts


def test_election_of_three_ends_with_the_highest_priority_as_only_master():
    lan, (a, b, c) = settled_lan(100, 200, 150)
    assert lan.masters() == {b}
    assert lan.holders == {b}
    # b's down timer ran out first and nobody else was ever master.
    assert lan.changes(b, MASTER) == [pytest.approx(mdi(200))]
    assert lan.changes(a, MASTER) == lan.changes(c, MASTER) == []
    assert lan.dropped() == []  # every advert passed every check of every peer
    lan.run(60)
    assert lan.masters() == lan.holders == {b}


def test_equal_priorities_break_on_the_higher_primary_address():
    lan, (a, b, c) = settled_lan(100, 100, 100)
    # All three time out together, all become master, the two lower addresses yield.
    for h in (a, b, c):
        assert lan.changes(h, MASTER) == [pytest.approx(mdi(100))]
    assert lan.masters() == lan.holders == {c}
    assert lan.changes(a, BACKUP)[-1] == pytest.approx(mdi(100) + lan.delay)


def test_an_established_equal_priority_master_is_not_preempted_by_a_higher_address():
    a, c = host(11), host(13)
    lan = Lan(router(100, a), router(100, c))
    lan.start(a)
    lan.run(5)
    lan.start(c)
    lan.run(20)
    assert lan.masters() == {a}  # RFC 5798 6.4.2: a backup follows priority >= its own


@pytest.mark.parametrize("interval", [1.0, 0.1])
def test_crash_of_the_master_next_takes_over_after_master_down_interval(interval: float):
    lan, (a, b, c) = settled_lan(100, 200, 150, interval=interval)
    lan.crash(b)
    crash = lan.now
    lan.run(20)
    assert lan.masters() == {c}
    assert lan.live_holders() == {c}
    [takeover] = lan.changes(c, MASTER)
    last_heard = max(t for t, _ in lan.received(c, b))
    # RFC 5798: Master_Down_Interval after the last advert accepted from the master...
    assert takeover - last_heard == pytest.approx(mdi(150, interval), abs=1e-9)
    # ...which a user sees as between (MDI - one interval) and MDI after the crash.
    assert mdi(150, interval) - interval < takeover - crash <= mdi(150, interval) + lan.delay
    assert lan.changes(a, MASTER) == []  # a's own timer (longer skew) was reset in time


def test_graceful_shutdown_hands_over_after_skew_time():
    lan, (a, b, c) = settled_lan(100, 200, 150)
    lan.command(b, lambda r: r.shutdown(lan.now))
    lan.crash(b)  # the process exits
    stop = lan.now
    lan.run(20)
    assert lan.masters() == lan.live_holders() == {c}
    assert lan.holders == {c}  # b released the VIP on its way out
    [takeover] = lan.changes(c, MASTER)
    assert takeover - (stop + lan.delay) == pytest.approx(skew(150), abs=1e-9)
    assert takeover - stop < 0.5  # vs. 3.4 s for a crash
    assert lan.changes(a, MASTER) == []


def restart_old_master(**kwargs: Any) -> tuple[Lan, IPv4Address, IPv4Address, float]:
    """b (200) crashes, c (150) takes over, b comes back at t=20 with ``kwargs``."""
    lan, (_a, b, c) = settled_lan(100, 200, 150)
    lan.crash(b)
    lan.run(20)
    assert lan.masters() == {c}
    lan.replace(router(200, b, **kwargs))
    lan.run(60)
    return lan, b, c, 20.0


def test_old_master_coming_back_preempts():
    lan, b, c, back = restart_old_master()
    # b discards c's lower adverts, so its first down timer runs out untouched.
    assert lan.changes(b, MASTER)[-1] == pytest.approx(back + mdi(200))
    assert lan.changes(c, BACKUP)[-1] == pytest.approx(back + mdi(200) + lan.delay)
    assert lan.masters() == lan.live_holders() == {b}


def test_old_master_coming_back_waits_for_the_preempt_delay():
    lan, b, c, back = restart_old_master(preempt_delay_s=5.0)
    first_heard = min(t for t, p in lan.received(b, c) if t > back)
    [takeover] = lan.changes(b, MASTER)[-1:]
    # Lower adverts count as a live master until the delay ends; the last one accepted is
    # less than one interval before its end, and master down comes MDI after that.
    assert first_heard + 5 - 1 + mdi(200) <= takeover < first_heard + 5 + mdi(200)
    assert takeover > back + mdi(200) + 1
    assert lan.masters() == lan.live_holders() == {b}


def test_old_master_coming_back_without_preempt_stays_backup():
    lan, b, c, _ = restart_old_master(preempt=False)
    assert lan.routers[b].state is BACKUP
    assert lan.masters() == lan.live_holders() == {c}
    assert lan.routers[b].master_address == c


def test_partition_gives_two_masters_and_healing_leaves_one():
    lan, (a, b) = settled_lan(200, 100)
    assert lan.masters() == {a}
    lan.partition({a}, {b})
    lan.run(20)
    assert lan.masters() == lan.holders == {a, b}  # split brain, as VRRP must
    lan.heal()
    healed = lan.now
    lan.run(30)
    assert lan.masters() == lan.holders == {a}
    # b steps down on the first advert of a after the heal (at most one interval later).
    assert healed < lan.changes(b, BACKUP)[-1] <= healed + 1 + lan.delay


def test_lowering_the_masters_priority_lets_a_preempting_backup_take_over():
    lan, (a, b) = settled_lan(200, 150)
    lan.command(a, lambda r: r.set_priority(lan.now, 100))
    lan.run(20)
    assert lan.masters() == lan.holders == {b}
    last_high = max(t for t, p in lan.received(b, a) if p == 200)
    assert lan.changes(b, MASTER) == [pytest.approx(last_high + mdi(150))]
    assert lan.routers[a].state is BACKUP


def test_lowering_the_masters_priority_leaves_a_non_preempting_backup_alone():
    lan, (a, b) = settled_lan(200, 150, preempt=False)
    lan.command(a, lambda r: r.set_priority(lan.now, 100))
    lan.run(30)
    assert lan.masters() == lan.holders == {a}
    assert lan.routers[b].master_address == a


def test_raising_a_backups_priority_makes_it_preempt():
    lan, (a, b) = settled_lan(200, 150)
    lan.command(b, lambda r: r.set_priority(lan.now, 250))
    lan.run(30)
    assert lan.masters() == lan.holders == {b}
    assert lan.routers[a].state is BACKUP


def test_gateways_lost_and_back_the_vips_go_and_come_back():
    """a (200) loses its gateways (priority 1): b (150) takes over; a's gateways come back
    (200 again): a preempts b, Master_Down_Interval after its priority came back at most."""
    lan, (a, b) = settled_lan(200, 150)
    lan.command(a, lambda r: r.set_priority(lan.now, 1))
    lan.run(20)
    assert lan.masters() == lan.holders == {b}
    lost = lan.changes(a, BACKUP)[-1]
    lan.command(a, lambda r: r.set_priority(lan.now, 200))
    back = lan.now
    lan.run(40)
    assert lan.masters() == lan.holders == {a}
    [retaken] = [t for t in lan.changes(a, MASTER) if t > lost]
    assert back < retaken <= back + mdi(200)


def test_gateways_lost_everywhere_the_master_keeps_the_vips():
    """Every node without a gateway is at priority 1: nobody preempts, no flapping."""
    lan, (a, b, c) = settled_lan(200, 150, 100)
    for h in (a, b, c):
        lan.command(h, lambda r: r.set_priority(lan.now, 1))
    lan.run(60)
    assert lan.masters() == lan.holders == {a}
    assert len(lan.changes(a, MASTER)) == 1
    assert lan.changes(b, MASTER) == lan.changes(c, MASTER) == []
