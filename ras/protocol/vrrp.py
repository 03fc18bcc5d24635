"""VRRPv3 for IPv4 (RFC 5798), sans-I/O: the advertisement codec and one virtual router.

Theory of operation. A :class:`VrrpRouter` is one VRRP router's view of one virtual router
(VRID). It never reads a clock, never sleeps and never touches a socket: the caller (the HALB
shell) passes the current time into every call and acts on the commands each call returns, in
order. ``router.deadline`` is the earliest time at which the shell must call ``tick(now)``;
calling ``tick`` early is harmless.

Commands: :class:`SendAdvertisement` (encode with our primary address as the IP source, send to
224.0.0.18 with TTL 255), :class:`TakeVips` (add the addresses, then send a gratuitous ARP for
each), :class:`ReleaseVips` (remove them), :class:`StateChanged` (log and notify) and
:class:`Dropped` (a received packet was refused: count and log it).

Timers (RFC 5798 6.1, all intervals in centiseconds on the wire, seconds here)::

    Skew_Time            = ((256 - Priority) * Master_Adver_Interval) / 256
    Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time

Only one timer runs at a time: the Adver_Timer in MASTER, the Master_Down_Timer in BACKUP.
Master_Adver_Interval starts as our own Advertisement_Interval and is learned from the adverts
a backup accepts.

A received packet is first filtered; each of these gives ``Dropped(reason, detail)`` and
changes nothing: not running (INITIALIZE), TTL other than 255, our own packet (source = our primary
address), a malformed packet (length, version, type, count, checksum, VRID 0, interval 0),
another VRID, a VIP list that differs from ours (keepalived does the same), and, while our
priority is 255, any advert (RFC 5798 7.1: the address owner ignores adverts). A valid advert
then becomes one input, classified by the state:

* RX_STOP: its priority is 0 (the master is leaving).
* RX_YIELD, in MASTER: its priority is higher than ours, or equal and the sender's primary
  address is higher than ours. In BACKUP: its priority is >= ours, or preempt is off, or the
  preempt delay has not run out (see below).
* RX_IGNORE: any other advert.

State rules (one table, ``_TRANSITIONS`` below; no other state/input pair can occur)::

    INITIALIZE --START (priority 255)--> MASTER     send advert, take VIPs, arm Adver_Timer
    INITIALIZE --START-->                BACKUP     Master_Adver_Interval := ours, arm down timer
    BACKUP     --MASTER_DOWN-->          MASTER     send advert, take VIPs, arm Adver_Timer
    BACKUP     --RX_STOP-->              BACKUP     down timer := Skew_Time
    BACKUP     --RX_YIELD-->             BACKUP     learn interval, arm down timer
    BACKUP     --RX_IGNORE-->            BACKUP     (discard: we will preempt at master down)
    BACKUP     --SHUTDOWN-->             INITIALIZE cancel the timer
    MASTER     --ADVER_TIMER-->          MASTER     send advert, arm Adver_Timer
    MASTER     --RX_STOP-->              MASTER     send advert at once, arm Adver_Timer
    MASTER     --RX_YIELD-->             BACKUP     release VIPs, learn interval, arm down timer
    MASTER     --RX_IGNORE-->            MASTER     (discard: our next advert wins)
    MASTER     --SHUTDOWN-->             INITIALIZE send advert with priority 0, release VIPs

``start`` outside INITIALIZE is a :class:`LocalProtocolError`; ``shutdown`` in INITIALIZE does
nothing.

Preempt delay (keepalived's ``preempt_delay``; RFC 5798 only has Preempt_Mode): the first
lower-priority advert a preempting backup accepts starts the delay; until it runs out, lower
adverts still count as a live master (RX_YIELD). After it, they are discarded and the backup
takes over when its master-down timer fires, so a takeover comes Master_Down_Interval or less
after the delay ends. An advert of priority >= ours cancels a running delay, and every entry
into BACKUP starts afresh.

Priority changes (``set_priority``, health tracking) follow keepalived: the new priority counts
from the next advert on, and a backup's running down timer moves by the change in Skew_Time.
An address owner's priority (255) is fixed. No new transition is needed, the rules above give:

* a master that drops below a preempting backup keeps sending its lower adverts; the backup
  discards them (RX_IGNORE), its down timer runs out Master_Down_Interval after the last higher
  advert, it becomes MASTER, and the old master yields to its first advert (RX_YIELD). A
  non-preempting backup, or one whose priority is not above the new one, follows it on;
* a backup raised above the master preempts it the same way (after the preempt delay, if any);
* at equal priority a backup follows the master whatever the addresses, so a node restored to
  the priority of the node that took over from it does not take the VIPs back.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from ras.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DROP_MALFORMED",
    "DROP_NOT_RUNNING",
    "DROP_OWN",
    "DROP_OWNER",
    "DROP_TTL",
    "DROP_VIPS",
    "DROP_VRID",
    "OWNER_PRIORITY",
    "VRRP_GROUP",
    "VRRP_PROTOCOL",
    "VRRP_TTL",
    "VRRP_VERSION",
    "Advertisement",
    "Command",
    "Dropped",
    "PacketType",
    "ReleaseVips",
    "SendAdvertisement",
    "StateChanged",
    "TakeVips",
    "VrrpRouter",
    "VrrpState",
    "parse_ipv4_packet",
]

VRRP_GROUP = IPv4Address("224.0.0.18")
VRRP_PROTOCOL = 112
VRRP_TTL = 255
VRRP_VERSION = 3
OWNER_PRIORITY = 255
MAX_ADDRESSES = 255
MAX_ADVERT_INT_CS = 0x0FFF

_HEADER = struct.Struct("!BBBBHH")  # version|type, VRID, priority, count, rsvd|interval, csum
_PSEUDO = struct.Struct("!4s4sBBH")  # source, destination, zero, protocol, VRRP length
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_MF_FLAG = 0x2000
_FRAGMENT_OFFSET = 0x1FFF


class PacketType(enum.IntEnum):
    """VRRP packet types (RFC 5798 5.2.2): only ADVERTISEMENT exists."""

    ADVERTISEMENT = 1


# -- codec --------------------------------------------------------------------------------------


def _internet_checksum(data: bytes) -> int:
    """The 16-bit one's complement of the one's complement sum of ``data`` (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: IPv4Address, dst: IPv4Address, length: int) -> bytes:
    return _PSEUDO.pack(src.packed, dst.packed, 0, VRRP_PROTOCOL, length)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"Advertisement.{name}: must be an int", ErrorCode.BAD_FIELD)
    if not low <= value <= high:
        raise LocalProtocolError(
            f"Advertisement.{name}: {value} is not between {low} and {high}", ErrorCode.BAD_FIELD
        )


@dataclass(frozen=True, slots=True)
class Advertisement:
    """A VRRPv3 ADVERTISEMENT (RFC 5798 5.2): the IP payload, without the IP header."""

    vrid: int
    priority: int  # 0: the master is leaving; 255: the address owner
    max_advert_int_cs: int  # centiseconds
    addresses: tuple[IPv4Address, ...]

    def __post_init__(self) -> None:
        _check_int("vrid", self.vrid, 1, 255)
        _check_int("priority", self.priority, 0, 255)
        _check_int("max_advert_int_cs", self.max_advert_int_cs, 1, MAX_ADVERT_INT_CS)
        if not isinstance(self.addresses, tuple) or not all(
            isinstance(a, IPv4Address) for a in self.addresses
        ):
            raise LocalProtocolError(
                "Advertisement.addresses: must be a tuple of IPv4Address", ErrorCode.BAD_FIELD
            )
        if not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise LocalProtocolError(
                f"Advertisement.addresses: {len(self.addresses)} entries, not 1 to {MAX_ADDRESSES}",
                ErrorCode.BAD_FIELD,
            )

    def encode(self, src: IPv4Address, dst: IPv4Address = VRRP_GROUP) -> bytes:
        """The VRRP packet (IP payload). ``src`` and ``dst`` are the IP header's addresses:
        they enter the checksum through the pseudo-header (RFC 5798 5.2.8)."""
        body = b"".join(a.packed for a in self.addresses)
        header = _HEADER.pack(
            VRRP_VERSION << 4 | PacketType.ADVERTISEMENT,
            self.vrid,
            self.priority,
            len(self.addresses),
            self.max_advert_int_cs,
            0,
        )
        length = len(header) + len(body)
        checksum = _internet_checksum(_pseudo_header(src, dst, length) + header + body)
        return header[:6] + checksum.to_bytes(2, "big") + body

    @classmethod
    def decode(
        cls, packet: bytes, src: IPv4Address, dst: IPv4Address = VRRP_GROUP
    ) -> Advertisement:
        """Parse and check a VRRP packet received from ``src`` for ``dst``.

        Raises :class:`RemoteProtocolError` for a short packet, a version other than 3, a type
        other than ADVERTISEMENT, an address count that does not match the length, a bad
        checksum, VRID 0 or a zero interval. The 4 reserved bits are ignored (RFC 5798 5.2.6).
        """
        if len(packet) < _HEADER.size:
            raise RemoteProtocolError(f"VRRP packet of {len(packet)} bytes is too short")
        vers_type, vrid, priority, count, rsvd_interval, _ = _HEADER.unpack_from(packet)
        if vers_type >> 4 != VRRP_VERSION:
            raise RemoteProtocolError(f"VRRP version {vers_type >> 4}, not {VRRP_VERSION}")
        if vers_type & 0x0F != PacketType.ADVERTISEMENT:
            raise RemoteProtocolError(f"VRRP packet type {vers_type & 0x0F}, not ADVERTISEMENT")
        if len(packet) != _HEADER.size + 4 * count:
            raise RemoteProtocolError(
                f"VRRP packet of {len(packet)} bytes cannot carry {count} IPv4 addresses"
            )
        # The sum over pseudo-header and packet, checksum included, folds to 0xffff.
        if _internet_checksum(_pseudo_header(src, dst, len(packet)) + packet) != 0:
            raise RemoteProtocolError("bad VRRP checksum")
        if vrid == 0:
            raise RemoteProtocolError("VRID 0")
        interval = rsvd_interval & MAX_ADVERT_INT_CS
        if interval == 0:
            raise RemoteProtocolError("advertisement interval 0")
        addresses = tuple(
            IPv4Address(packet[i : i + 4]) for i in range(_HEADER.size, len(packet), 4)
        )
        try:
            return cls(vrid, priority, interval, addresses)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc), exc.code) from None


def parse_ipv4_packet(datagram: bytes) -> tuple[IPv4Address, IPv4Address, int, int, bytes]:
    """Split a raw IPv4 datagram (as a raw socket returns it) into
    ``(source, destination, ttl, protocol, payload)``.

    The header length comes from IHL and the payload ends at the total length; bytes past it
    (link-layer padding) are ignored. The header checksum is not checked: the kernel did.
    Raises :class:`RemoteProtocolError` for a malformed header or a fragment.
    """
    if len(datagram) < _IPV4.size:
        raise RemoteProtocolError(f"IPv4 datagram of {len(datagram)} bytes is too short")
    ver_ihl, _, total, _, frag, ttl, protocol, _, src, dst = _IPV4.unpack_from(datagram)
    if ver_ihl >> 4 != 4:
        raise RemoteProtocolError(f"IP version {ver_ihl >> 4}, not 4")
    header_length = (ver_ihl & 0x0F) * 4
    if header_length < _IPV4.size:
        raise RemoteProtocolError(f"IPv4 header length {header_length} is under 20")
    if not header_length <= total <= len(datagram):
        raise RemoteProtocolError(
            f"IPv4 total length {total} does not fit a {header_length}-byte header "
            f"in {len(datagram)} bytes"
        )
    if frag & (_MF_FLAG | _FRAGMENT_OFFSET):
        raise RemoteProtocolError("IPv4 fragment")
    return IPv4Address(src), IPv4Address(dst), ttl, protocol, datagram[header_length:total]


# -- commands -----------------------------------------------------------------------------------


class VrrpState(enum.Enum):
    INITIALIZE = "initialize"
    BACKUP = "backup"
    MASTER = "master"


@dataclass(frozen=True, slots=True)
class SendAdvertisement:
    """Send ``advert`` from our primary address to 224.0.0.18 with TTL 255."""

    advert: Advertisement


@dataclass(frozen=True, slots=True)
class TakeVips:
    """Add the virtual addresses to the interface, then send a gratuitous ARP for each."""

    vips: tuple[IPv4Address, ...]


@dataclass(frozen=True, slots=True)
class ReleaseVips:
    """Remove the virtual addresses from the interface."""

    vips: tuple[IPv4Address, ...]


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: VrrpState
    new: VrrpState
    reason: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """A received packet was refused; nothing changed.

    ``reason`` is one of a few fixed phrases (the ``DROP_*`` constants: count by it);
    ``detail`` names the sender and what was wrong (log it)."""

    reason: str
    detail: str = ""


Command = SendAdvertisement | TakeVips | ReleaseVips | StateChanged | Dropped

DROP_NOT_RUNNING = "not running"
DROP_TTL = "TTL is not 255"
DROP_OWN = "our own advertisement"
DROP_MALFORMED = "malformed packet"
DROP_VRID = "another VRID"
DROP_VIPS = "VIP list differs from ours"
DROP_OWNER = "address owner ignores adverts"


# -- state machine ------------------------------------------------------------------------------


class _Input(enum.Enum):
    START = "start"
    START_OWNER = "start as address owner"
    SHUTDOWN = "shutdown"
    ADVER_TIMER = "advertisement timer"
    MASTER_DOWN = "master-down timer"
    RX_STOP = "priority 0 advertisement"
    RX_YIELD = "advertisement we yield to"
    RX_IGNORE = "advertisement we ignore"


class _Do(enum.Enum):
    SEND_ADVERT = enum.auto()  # an advert with our priority
    SEND_STOP = enum.auto()  # an advert with priority 0
    TAKE_VIPS = enum.auto()
    RELEASE_VIPS = enum.auto()
    OWN_INTERVAL = enum.auto()  # Master_Adver_Interval := Advertisement_Interval
    LEARN_MASTER = enum.auto()  # Master_Adver_Interval := the advert's; note the sender
    ARM_ADVER_TIMER = enum.auto()  # timer := now + Advertisement_Interval
    ARM_DOWN_TIMER = enum.auto()  # timer := now + Master_Down_Interval
    ARM_SKEW_TIMER = enum.auto()  # timer := now + Skew_Time
    CANCEL_TIMER = enum.auto()
    TRACK_PREEMPT_DELAY = enum.auto()  # start or cancel the preempt delay
    NOTE_PREEMPT = enum.auto()  # remember why the down timer will fire


_I, _B, _M = VrrpState.INITIALIZE, VrrpState.BACKUP, VrrpState.MASTER
_BECOME_MASTER = (_Do.SEND_ADVERT, _Do.TAKE_VIPS, _Do.ARM_ADVER_TIMER)
# The one transition table (see the module docstring for the rules it encodes).
_TRANSITIONS: dict[tuple[VrrpState, _Input], tuple[VrrpState, tuple[_Do, ...]]] = {
    (_I, _Input.START_OWNER): (_M, _BECOME_MASTER),
    (_I, _Input.START): (_B, (_Do.OWN_INTERVAL, _Do.ARM_DOWN_TIMER)),
    (_B, _Input.MASTER_DOWN): (_M, _BECOME_MASTER),
    (_B, _Input.RX_STOP): (_B, (_Do.ARM_SKEW_TIMER,)),
    (_B, _Input.RX_YIELD): (_B, (_Do.LEARN_MASTER, _Do.ARM_DOWN_TIMER, _Do.TRACK_PREEMPT_DELAY)),
    (_B, _Input.RX_IGNORE): (_B, (_Do.NOTE_PREEMPT,)),
    (_B, _Input.SHUTDOWN): (_I, (_Do.CANCEL_TIMER,)),
    (_M, _Input.ADVER_TIMER): (_M, (_Do.SEND_ADVERT, _Do.ARM_ADVER_TIMER)),
    (_M, _Input.RX_STOP): (_M, (_Do.SEND_ADVERT, _Do.ARM_ADVER_TIMER)),
    (_M, _Input.RX_YIELD): (_B, (_Do.RELEASE_VIPS, _Do.LEARN_MASTER, _Do.ARM_DOWN_TIMER)),
    (_M, _Input.RX_IGNORE): (_M, ()),
    (_M, _Input.SHUTDOWN): (_I, (_Do.SEND_STOP, _Do.RELEASE_VIPS, _Do.CANCEL_TIMER)),
}


class VrrpRouter:
    """One VRRP router of one virtual router (see the module docstring).

    ``priority`` is 1-254, or 255 for the owner of the virtual addresses, which becomes MASTER
    at once. ``advert_interval_s`` must be a whole number of centiseconds from 0.01 to 40.95 s.
    Configuration errors raise :class:`ValueError`.
    """

    def __init__(
        self,
        *,
        vrid: int,
        priority: int,
        primary: IPv4Address,
        vips: Iterable[IPv4Address],
        advert_interval_s: float,
        preempt: bool = True,
        preempt_delay_s: float = 0.0,
    ) -> None:
        vips = tuple(vips)
        if not isinstance(vrid, int) or not 1 <= vrid <= 255:
            raise ValueError(f"vrid must be 1-255, not {vrid!r}")
        if not isinstance(priority, int) or not 1 <= priority <= OWNER_PRIORITY:
            raise ValueError(f"priority must be 1-255, not {priority!r}")
        if not isinstance(primary, IPv4Address):
            raise ValueError(f"primary must be an IPv4Address, not {primary!r}")
        if not 1 <= len(vips) <= MAX_ADDRESSES or not all(isinstance(v, IPv4Address) for v in vips):
            raise ValueError("vips must be 1 to 255 IPv4Address values")
        if len(set(vips)) != len(vips):
            raise ValueError("vips must not repeat an address")
        interval_cs = round(advert_interval_s * 100) if math.isfinite(advert_interval_s) else 0
        if not 1 <= interval_cs <= MAX_ADVERT_INT_CS or not math.isclose(
            interval_cs, advert_interval_s * 100, abs_tol=1e-6
        ):
            raise ValueError(
                f"advert_interval_s must be a whole number of centiseconds from 0.01 to 40.95, "
                f"not {advert_interval_s!r}"
            )
        if not math.isfinite(preempt_delay_s) or preempt_delay_s < 0:
            raise ValueError(f"preempt_delay_s must be >= 0, not {preempt_delay_s!r}")
        self.vrid = vrid
        self.primary = primary
        self.vips = vips
        self.advert_interval_cs = interval_cs
        self.preempt = preempt
        self.preempt_delay_s = float(preempt_delay_s)
        self.state = VrrpState.INITIALIZE
        self._base_priority = priority
        self._priority = priority
        self._master_adver_int_cs = interval_cs
        self._timer: float | None = None  # Adver_Timer in MASTER, Master_Down_Timer in BACKUP
        self._preempt_until: float | None = None
        self._down_reason = ""  # what the Master_Down_Timer firing will mean
        self._master: IPv4Address | None = None

    # -- public read-outs ------------------------------------------------------------------

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def master_address(self) -> IPv4Address | None:
        """The primary address of the current master as far as we know: ours in MASTER, the
        sender of the last advert heard in BACKUP (None before one, or after a priority 0)."""
        return self._master

    @property
    def deadline(self) -> float | None:
        """When the shell must call :meth:`tick` next (None: no timer runs)."""
        return self._timer

    @property
    def master_adver_interval_s(self) -> float:
        """Master_Adver_Interval: ours, or the one learned from the master's adverts."""
        return self._master_adver_int_cs / 100

    @property
    def skew_time_s(self) -> float:
        """Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256."""
        return (256 - self._priority) * self._master_adver_int_cs / 256 / 100

    @property
    def master_down_interval_s(self) -> float:
        """Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time."""
        return 3 * self._master_adver_int_cs / 100 + self.skew_time_s

    def advertisement(self, priority: int | None = None) -> Advertisement:
        """The advert this router sends (with ``priority`` instead of ours if given)."""
        return Advertisement(
            self.vrid,
            self._priority if priority is None else priority,
            self.advert_interval_cs,
            self.vips,
        )

    # -- events ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Command]:
        """Startup event: MASTER at once for the address owner, else BACKUP."""
        if self.state is not VrrpState.INITIALIZE:
            raise LocalProtocolError(f"start: the router is already {self.state.value}")
        if self._priority == OWNER_PRIORITY:
            return self._run(_Input.START_OWNER, now, "address owner (priority 255)")
        return self._run(_Input.START, now, "started")

    def shutdown(self, now: float) -> list[Command]:
        """Shutdown event: a master sends a priority 0 advert and releases the VIPs."""
        if self.state is VrrpState.INITIALIZE:
            return []
        return self._run(_Input.SHUTDOWN, now, "shutdown")

    def tick(self, now: float) -> list[Command]:
        """Run the timer if it has expired at ``now`` (else do nothing)."""
        if self._timer is None or now < self._timer:
            return []
        if self.state is VrrpState.MASTER:
            return self._run(_Input.ADVER_TIMER, now, "")
        return self._run(_Input.MASTER_DOWN, now, self._down_reason)

    def receive(
        self,
        now: float,
        src: IPv4Address,
        ttl: int,
        packet: bytes,
        *,
        dst: IPv4Address = VRRP_GROUP,
    ) -> list[Command]:
        """A VRRP packet (IP payload) arrived from ``src`` with IP TTL ``ttl``, sent to ``dst``
        (for the checksum). Never raises: a refused packet gives ``[Dropped(reason, detail)]``."""
        if self.state is VrrpState.INITIALIZE:
            return [Dropped(DROP_NOT_RUNNING, f"packet from {src}")]
        if ttl != VRRP_TTL:
            return [Dropped(DROP_TTL, f"TTL {ttl} from {src}")]
        if src == self.primary:
            return [Dropped(DROP_OWN, f"source {src} is our primary address")]
        try:
            advert = Advertisement.decode(packet, src, dst)
        except RemoteProtocolError as exc:
            return [Dropped(DROP_MALFORMED, f"from {src}: {exc}")]
        if advert.vrid != self.vrid:
            return [Dropped(DROP_VRID, f"VRID {advert.vrid} from {src}, ours is {self.vrid}")]
        if len(advert.addresses) != len(self.vips) or set(advert.addresses) != set(self.vips):
            theirs = ",".join(map(str, advert.addresses))
            ours = ",".join(map(str, self.vips))
            return [Dropped(DROP_VIPS, f"{src} advertises {theirs}, ours are {ours}")]
        if self._priority == OWNER_PRIORITY:
            return [Dropped(DROP_OWNER, f"advert from {src} (RFC 5798 7.1)")]
        return self._run(self._classify(now, advert, src), now, "", advert, src)

    def set_priority(self, now: float, priority: int) -> list[Command]:
        """Change our priority (health tracking): 1-254, and never for the address owner.

        The change shows in our next advert; a backup's running master-down timer moves by the
        change in Skew_Time (as keepalived does). Returns no commands today."""
        if self._base_priority == OWNER_PRIORITY:
            raise LocalProtocolError("the address owner's priority is fixed at 255")
        if not isinstance(priority, int) or not 1 <= priority < OWNER_PRIORITY:
            raise ValueError(f"priority must be 1-254, not {priority!r}")
        old_skew = self.skew_time_s
        self._priority = priority
        if self.state is VrrpState.BACKUP and self._timer is not None:
            self._timer += self.skew_time_s - old_skew
        return []

    # -- the machine -----------------------------------------------------------------------

    def _classify(self, now: float, advert: Advertisement, src: IPv4Address) -> _Input:
        if advert.priority == 0:
            return _Input.RX_STOP
        if self.state is VrrpState.MASTER:
            if (advert.priority, int(src)) > (self._priority, int(self.primary)):
                return _Input.RX_YIELD
            return _Input.RX_IGNORE
        if not self.preempt or advert.priority >= self._priority:
            return _Input.RX_YIELD
        if self.preempt_delay_s > 0 and (self._preempt_until is None or now < self._preempt_until):
            return _Input.RX_YIELD
        return _Input.RX_IGNORE

    def _run(
        self,
        event: _Input,
        now: float,
        reason: str,
        advert: Advertisement | None = None,
        src: IPv4Address | None = None,
    ) -> list[Command]:
        transition = _TRANSITIONS.get((self.state, event))
        if transition is None:  # pragma: no cover - the public methods never ask
            raise LocalProtocolError(f"no transition for {event.value} in {self.state.value}")
        new_state, actions = transition
        out: list[Command] = []
        if new_state is not self.state:
            if advert is not None and src is not None:
                reason = self._yield_reason(advert, src)
            out.append(StateChanged(self.state, new_state, reason))
            if new_state is VrrpState.BACKUP:
                self._preempt_until = None
            self._master = self.primary if new_state is VrrpState.MASTER else None
            self.state = new_state
        for action in actions:
            match action:
                case _Do.SEND_ADVERT:
                    out.append(SendAdvertisement(self.advertisement()))
                case _Do.SEND_STOP:
                    out.append(SendAdvertisement(self.advertisement(priority=0)))
                case _Do.TAKE_VIPS:
                    out.append(TakeVips(self.vips))
                case _Do.RELEASE_VIPS:
                    out.append(ReleaseVips(self.vips))
                case _Do.OWN_INTERVAL:
                    self._master_adver_int_cs = self.advert_interval_cs
                case _Do.LEARN_MASTER:
                    assert advert is not None
                    self._master_adver_int_cs = advert.max_advert_int_cs
                    self._master = src
                case _Do.ARM_ADVER_TIMER:
                    self._timer = now + self.advert_interval_cs / 100
                case _Do.ARM_DOWN_TIMER:
                    self._timer = now + self.master_down_interval_s
                    who = f"master {src}" if src is not None else "any master"
                    self._down_reason = (
                        f"no advertisement from {who} for {self.master_down_interval_s:.3f} s"
                    )
                case _Do.ARM_SKEW_TIMER:
                    self._timer = now + self.skew_time_s
                    self._down_reason = f"master {src} left (priority 0)"
                    self._master = None
                case _Do.CANCEL_TIMER:
                    self._timer = None
                case _Do.TRACK_PREEMPT_DELAY:
                    assert advert is not None
                    self._track_preempt_delay(now, advert)
                case _Do.NOTE_PREEMPT:
                    assert advert is not None
                    self._master = src
                    self._down_reason = (
                        f"preempting master {src} of lower priority "
                        f"({advert.priority} < {self._priority})"
                    )
        return out

    def _track_preempt_delay(self, now: float, advert: Advertisement) -> None:
        if not self.preempt or self.preempt_delay_s <= 0:
            return
        if advert.priority >= self._priority:
            self._preempt_until = None
        elif self._preempt_until is None:
            self._preempt_until = now + self.preempt_delay_s

    def _yield_reason(self, advert: Advertisement, src: IPv4Address) -> str:
        if advert.priority > self._priority:
            return f"{src} has higher priority ({advert.priority} > {self._priority})"
        return f"{src} has the same priority ({advert.priority}) and a higher address"
