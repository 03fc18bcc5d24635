"""The farm's brokers as gateways, agents and HALBs see them: a list in priority order.

A farm may run several brokers (a primary and secondaries sharing their state on etcd, see
``docs/brokers.md``); every one of them serves logins, launches, redemptions and agents.
A daemon's config names them all (``brokers = ["b1:20002", "b2:20002"]``, highest priority
first; the older ``broker_host`` + ``broker_port`` still name a single one).

:class:`BrokerChoice` picks where a new connection goes: the first broker in priority order
that is not marked down. A broker that could not be reached, or did not answer within the
attempt's deadline, is marked down for ``retry_s`` and the next one is tried at once, so a
dead broker costs one attempt, not one per connection; when its time is up it is tried first
again, so traffic comes back to it by itself once it is back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from ras.config import Invalid, check_host, check_port
from ras.errors import PeerError, RasError, TransportError

__all__ = ["BrokerChoice", "broker_addresses", "parse_address"]

T = TypeVar("T")
Address = tuple[str, int]
RETRY_S = 5.0


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port``; ValueError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        check_host("host", host)
        check_port("port", int(port), zero_ok=False)
    except Invalid as exc:
        raise ValueError(f"{text!r}: {exc.why}") from None
    return host, int(port)


def broker_addresses(brokers: Sequence[str], host: str, port: int) -> tuple[Address, ...]:
    """The brokers of a config: its ``brokers`` list (``Invalid`` naming a bad entry), or the
    single ``broker_host``:``broker_port``."""
    if not brokers:
        return ((host, port),)
    out: list[Address] = []
    for i, text in enumerate(brokers):
        try:
            out.append(parse_address(text))
        except ValueError as exc:
            raise Invalid(f"brokers[{i}]", str(exc)) from None
    if len(set(out)) != len(out):
        raise Invalid("brokers", "names a broker twice")
    return tuple(out)


class BrokerChoice:
    """Where the next connection to a broker goes (priority order, skipping down ones)."""

    def __init__(self, addresses: Sequence[Address], *, retry_s: float = RETRY_S) -> None:
        if not addresses:
            raise ValueError("no broker")
        self.addresses = tuple(addresses)
        self.retry_s = retry_s
        self._down_until: dict[Address, float] = {}

    def order(self) -> list[Address]:
        """Brokers not marked down, by priority; then the down ones (all down: try anyway)."""
        now = trio.current_time()
        up = [a for a in self.addresses if self._down_until.get(a, 0.0) <= now]
        return up + [a for a in self.addresses if a not in up]

    def failed(self, address: Address) -> None:
        self._down_until[address] = trio.current_time() + self.retry_s

    def worked(self, address: Address) -> None:
        self._down_until.pop(address, None)

    async def connect(self, open_at: Callable[[str, int], Awaitable[T]], *, attempt_s: float) -> T:
        """``open_at`` the first broker that answers within ``attempt_s``. A broker that
        refuses us (``PeerError``: our certificate, say) is not failed over: the others would
        refuse the same. ``TransportError`` when none answered."""
        failures: list[str] = []
        for address in self.order():
            try:
                with trio.fail_after(attempt_s):
                    got = await open_at(*address)
            except PeerError:
                raise
            except (RasError, trio.TooSlowError) as exc:
                self.failed(address)
                failures.append(f"{address[0]}:{address[1]}: {exc or 'no answer in time'}")
                continue
            self.worked(address)
            return got
        raise TransportError("no broker answered (" + "; ".join(failures) + ")")
