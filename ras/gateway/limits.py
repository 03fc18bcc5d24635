"""Limits per client address, bounded: pre-authentication slots and the rate of new connections.

Theory of operation. Every connection takes a pre-authentication slot for its client address
when it is accepted (and again for the real client after a trusted PROXY v2 header: proxies
themselves are not counted, or one HALB would use up everybody's slots). The slot is given back
when the client authenticates, when its tunnel opens (a redeemed ticket is an authentication),
or when the connection ends; the pre-authentication deadline (absolute from accept, see the
gateway) bounds how long a slot can be held. New connections per address are rate limited by
a token bucket (``max_new_per_ip_per_s``, bursts of ``max_new_per_ip_burst``). Both tables are
bounded: buckets of addresses that have been quiet long enough to be full again are dropped,
and the table never holds more than ``_MAX_BUCKETS`` entries (the oldest go first), so a
flood of spoofed-looking sources cannot grow memory without bound.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Refusal", "Slot", "SourceLimits"]

_MAX_BUCKETS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class Refusal(str):
    """Why a connection was refused (for the log line)."""


class Slot:
    """One held pre-authentication slot; ``release`` is idempotent."""

    __slots__ = ("_limits", "address")

    def __init__(self, limits: SourceLimits, address: str) -> None:
        self._limits: SourceLimits | None = limits
        self.address = address

    def release(self) -> None:
        if self._limits is not None:
            self._limits._release(self.address)
            self._limits = None


class SourceLimits:
    """Counts pre-authentication connections and new connections per client address."""

    def __init__(
        self,
        *,
        per_ip: int,
        total: int,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_ip = per_ip
        self.total = total
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._preauth: dict[str, int] = {}
        self._held = 0
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    @property
    def held(self) -> int:
        """Pre-authentication slots held now (all addresses)."""
        return self._held

    def preauth(self, address: str) -> int:
        return self._preauth.get(address, 0)

    def admit(self, address: str) -> Slot | Refusal:
        """A slot for a new connection from ``address``, or why not (counted against the
        address's rate of new connections either way)."""
        if not self._take_token(address):
            return Refusal(f"more than {self.rate_per_s:g} new connections a second")
        if self._held >= self.total:
            return Refusal(f"{self.total} connections are waiting to authenticate")
        count = self._preauth.get(address, 0)
        if count >= self.per_ip:
            return Refusal(f"{count} connections from this address are waiting to authenticate")
        self._preauth[address] = count + 1
        self._held += 1
        return Slot(self, address)

    def _release(self, address: str) -> None:
        count = self._preauth.get(address, 0) - 1
        if count > 0:
            self._preauth[address] = count
        else:
            self._preauth.pop(address, None)
        self._held -= 1

    def _take_token(self, address: str) -> bool:
        now = self._clock()
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate_per_s
            )
            bucket.stamp = now
        self._buckets[address] = bucket  # most recent last
        self._expire(now)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _expire(self, now: float) -> None:
        """Drop buckets that are full again (nothing to remember) and keep the table bounded."""
        full_after = self.burst / self.rate_per_s
        while self._buckets:
            address, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) <= _MAX_BUCKETS and now - oldest.stamp < full_after:
                break
            del self._buckets[address]

    def buckets(self) -> int:
        return len(self._buckets)
