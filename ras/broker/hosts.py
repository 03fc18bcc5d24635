"""The hosts the agents registered, their load, and the choice of a host (pure logic).

Theory of operation. Each agent's link registers a :class:`Host` and feeds it load reports.
A report that cannot be true (not finite, negative, CPU or memory over 100 %, more sessions
than ``max_sessions`` allows by far, more disconnected sessions than sessions, a session list
that disagrees with the counts) is refused: the host is marked *lying* and takes no new
session until a sane report arrives. A host that has not reported within ``timeout_s`` is
*silent*, one whose agent disconnected is *offline*, one whose agent says it is not ready (a
VDI guest booting or being reset) is *not ready*; none of them takes anything.

Choosing a host for a launch (:meth:`HostRegistry.choose`), among the resource's candidates:

1. **Affinity.** A host where the user already has a session the launch should go back to
   (a disconnected one; on VDI and Remote PC also an active one) wins if it is reachable
   (online, reporting, sane, enabled), even when drained or full: the session is there.
2. Otherwise only *usable* hosts count: reachable, enabled, not drained, not full. Full means
   ``sessions + pending >= max_sessions``, where ``sessions`` includes the disconnected ones
   (they hold a seat) and ``max_sessions`` is the agent's, capped by the administrator's, and
   1 for VDI and Remote PC hosts (one user each).
3. **Resource-based** (the RAS way): the lowest load wins, ties to the name. The load adds the
   used shares of the three counters, each weighted (``weight_*`` in broker.toml; 0 removes a
   counter)::

       load = w_sessions * (sessions + pending) / max_sessions
            + w_memory   * memory_percent / 100
            + w_cpu      * cpu_percent / 100          (defaults 0.5, 0.25, 0.25)

   which is the same as picking the best combined free/used ratio. Launches since a host's
   last report count as sessions (``pending``), so a burst spreads before the next report,
   in proportion to the free capacity.
4. **Round robin**: the usable hosts in name order, each in turn, per pool.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ras.broker.model import Balancing, HostRecord
from ras.protocol import AppStart, HostKind, LoadReport

__all__ = ["Candidate", "Choice", "Host", "HostRegistry"]

# A report claiming more sessions than this many times max_sessions is not believed.
INSANE_SESSIONS_FACTOR = 2
SINGLE_USER = (HostKind.VDI, HostKind.REMOTE_PC)


@dataclass(slots=True)
class Host:
    name: str
    kind: HostKind
    rdp_host: str
    rdp_port: int
    max_sessions: int  # as the agent announced it
    last_report: float
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    sessions: int = 0
    disconnected: int = 0
    pending: int = 0  # launches since the last report
    online: bool = True
    insane: str = ""  # why the last report was refused; "" when it was sane
    weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # sessions, memory, cpu
    settings: HostRecord | None = None  # the administrator's, if any
    rdp_cert_sha256: str = ""  # its RDP server's TLS certificate, as its agent saw it
    # Kept by HostRegistry so that a launch's loop over thousands of hosts reads two fields:
    # no new session whatever the load (offline, lying, disabled or drained), and the memory
    # and CPU parts of the score (they change with each report only).
    closed: bool = field(default=False, repr=False)
    memory_load: float = field(default=0.0, repr=False)
    cpu_load: float = field(default=0.0, repr=False)
    seats: int = field(default=1, repr=False)  # capacity, as of the last refresh
    apps: AppStart = AppStart.SHELL  # how the host starts published applications
    ready: bool = True  # the agent's word: False while a VDI guest boots or is being reset

    def refresh(self) -> None:
        """Recompute ``closed`` and the load parts after a report or a change of settings."""
        _, wm, wc = self.weights
        self.memory_load = wm * self.memory_percent / 100
        self.cpu_load = wc * self.cpu_percent / 100
        self.seats = self.capacity
        self.closed = (
            not self.online or bool(self.insane) or self.drained or not self.enabled
            or not self.ready
        )  # fmt: skip

    @property
    def capacity(self) -> int:
        cap = self.max_sessions
        if self.settings is not None and self.settings.max_sessions is not None:
            cap = min(cap, self.settings.max_sessions)
        return 1 if self.kind in SINGLE_USER else cap

    @property
    def score(self) -> float:
        used = (self.sessions + self.pending) / self.capacity
        return self.weights[0] * used + self.memory_load + self.cpu_load

    @property
    def full(self) -> bool:
        return self.sessions + self.pending >= self.capacity

    @property
    def drained(self) -> bool:
        return self.settings is not None and self.settings.drained

    @property
    def enabled(self) -> bool:
        return self.settings is None or self.settings.enabled

    def unreachable(self, now: float, timeout_s: float) -> str:
        """Why no session at all can go here now ("" if one can)."""
        if not self.online:
            return "offline: its agent is not connected"
        if now - self.last_report > timeout_s:
            return f"silent: no load report for {now - self.last_report:.0f} s"
        if self.insane:
            return f"lying: its last report was refused ({self.insane})"
        if not self.ready:
            return "not ready: its agent reports it cannot take a session yet"
        if not self.enabled:
            return "disabled by an administrator"
        return ""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One host considered for a launch, and what was thought of it (for ``explain``)."""

    host: str
    usable: bool
    reason: str  # why not, or "" when usable
    score: float | None = None
    sessions: int = 0
    capacity: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "usable": self.usable,
            "reason": self.reason,
            "score": None if self.score is None else round(self.score, 4),
            "sessions": self.sessions,
            "capacity": self.capacity,
        }


@dataclass(slots=True)
class Choice:
    host: Host | None
    method: str  # "affinity", "resource", "round_robin", or "none"
    why: str
    candidates: list[Candidate] = field(default_factory=list)  # only for a dry run (explain)


def check_report(load: LoadReport, max_sessions: int) -> str:
    """Why a report cannot be true ("" if it can)."""
    for key in ("cpu_percent", "memory_percent"):
        value = getattr(load, key)
        if not math.isfinite(value) or not 0 <= value <= 100:
            return f"{key} {value!r} is not a percentage"
    for key in ("sessions", "disconnected"):
        value = getattr(load, key)
        if not isinstance(value, int) or value < 0:
            return f"{key} {value!r} is not a count"
    if load.sessions > INSANE_SESSIONS_FACTOR * max_sessions:
        return f"{load.sessions} sessions on a host of at most {max_sessions}"
    if load.disconnected > load.sessions:
        return f"{load.disconnected} disconnected of {load.sessions} sessions"
    detail = getattr(load, "sessions_detail", ())
    if detail:
        if len(detail) != load.sessions:
            return f"{len(detail)} sessions listed, {load.sessions} counted"
        disconnected = sum(1 for s in detail if s.state == "disconnected")
        if disconnected != load.disconnected:
            return f"{disconnected} disconnected sessions listed, {load.disconnected} counted"
    return ""


class HostRegistry:
    def __init__(
        self, timeout_s: float, weights: tuple[float, float, float] = (0.5, 0.25, 0.25)
    ) -> None:
        self.timeout_s = timeout_s
        self.weights = weights
        self.hosts: dict[str, Host] = {}
        self.settings: dict[str, HostRecord] = {}  # by case-folded name
        self._turn: dict[str, str] = {}  # round robin: the last host picked, per pool
        self._named_cache: dict[tuple[str, ...] | None, tuple[list[Host], dict[str, Host]]] = {}
        self.kinds: dict[str, HostKind] = {}  # host name -> kind, for session affinity
        # the Remote PCs and VDI guests among them (a launch checks their assignments only)
        self.single_user: dict[str, HostKind] = {}

    def register(
        self,
        name: str,
        kind: HostKind,
        rdp_host: str,
        rdp_port: int,
        max_sessions: int,
        now: float,
        *,
        apps: AppStart = AppStart.SHELL,
    ) -> Host:
        host = Host(
            name, kind, rdp_host, rdp_port, max_sessions, last_report=now, weights=self.weights,
            settings=self.settings.get(name.casefold()), apps=apps,
        )  # fmt: skip
        host.refresh()
        self.hosts[name] = host
        self.kinds[name] = kind
        if kind in SINGLE_USER:
            self.single_user[name] = kind
        else:
            self.single_user.pop(name, None)
        self._named_cache.clear()
        return host

    def configure(self, records: Iterable[HostRecord]) -> None:
        """The administrator's host settings (all of them, replacing the previous ones)."""
        self.settings = {r.name.casefold(): r for r in records}
        for host in self.hosts.values():
            host.settings = self.settings.get(host.name.casefold())
            host.refresh()
        self._named_cache.clear()

    def report(self, name: str, load: LoadReport, now: float) -> str:
        """Take a load report; returns why it was refused ("" if taken)."""
        host = self.hosts[name]
        host.last_report = now
        why = check_report(load, host.max_sessions)
        host.insane = why
        if why:
            host.refresh()
            return why
        host.cpu_percent = load.cpu_percent
        host.memory_percent = load.memory_percent
        host.sessions = load.sessions
        host.disconnected = load.disconnected
        host.ready = load.ready
        host.pending = 0
        host.refresh()
        return ""

    def disconnect(self, name: str, host: Host) -> None:
        if self.hosts.get(name) is host:
            host.online = False
            host.refresh()

    def pool_members(self, pool: str) -> list[str]:
        wanted = pool.casefold()
        return [r.name for r in self.settings.values() if wanted in (p.casefold() for p in r.pools)]

    def _named(self, names: tuple[str, ...] | None) -> tuple[list[Host], dict[str, Host]]:
        """The registered hosts among ``names`` (None: all), and the same by case-folded name.
        Kept per ``names`` until a host registers or the settings change: a launch should not
        pay for matching names against the whole farm."""
        found = self._named_cache.get(names)
        if found is None:
            if names is None:
                hosts = list(self.hosts.values())
            else:
                wanted = {n.casefold() for n in names}
                hosts = [h for h in self.hosts.values() if h.name.casefold() in wanted]
            if len(self._named_cache) >= 1024:  # many resources or pools: start again
                self._named_cache.clear()
            found = self._named_cache[names] = (hosts, {h.name.casefold(): h for h in hosts})
        return found

    def usable(self, now: float, names: Iterable[str] | None = None) -> list[Host]:
        return [
            h for h in self._named(None if names is None else tuple(names))[0]
            if not h.unreachable(now, self.timeout_s) and not h.drained and not h.full
        ]  # fmt: skip

    def choose(
        self,
        now: float,
        names: Iterable[str] | None = None,
        *,
        method: Balancing = Balancing.RESOURCE,
        turn_key: str = "",
        affinity: Sequence[tuple[str, str]] = (),
        dry_run: bool = False,
    ) -> Choice:
        """Pick a host among ``names`` (None: every host). ``affinity``: (host, why) where
        the user has a session to go back to, best first. ``dry_run`` changes nothing and
        lists every candidate with what was thought of it (for ``explain``); a launch does
        not build that list, it only looks for the best host."""
        names = None if names is None else tuple(names)
        hosts, folded = self._named(names)
        candidates = self._candidates(hosts, names, now) if dry_run else []
        for name, why in affinity:
            host = folded.get(name.casefold())
            if host is not None and not host.unreachable(now, self.timeout_s):
                return Choice(host, "affinity", why, candidates)
        if method is Balancing.ROUND_ROBIN:
            last = self._turn.get(turn_key, "")
            best = self._next_in_turn(hosts, now, last)
            why = f"round robin: next after {last!r}" if last else "round robin: first in turn"
        else:
            best = self._least_loaded(hosts, now)
            why = "" if best is None else f"resource-based: lowest load {best.score:.3f}"
        if best is None:
            return Choice(None, "none", "no candidate host can take a session now", candidates)
        if not dry_run:
            if method is Balancing.ROUND_ROBIN:
                self._turn[turn_key] = best.name
            best.pending += 1
        return Choice(best, str(method), why, candidates)

    def _candidates(
        self, hosts: list[Host], names: tuple[str, ...] | None, now: float
    ) -> list[Candidate]:
        """Every host considered, in name order, then the named ones no agent registered."""
        candidates = [self._judge(h, now) for h in sorted(hosts, key=lambda h: h.name)]
        known = {h.name.casefold() for h in hosts}
        candidates += [
            Candidate(n, False, "unknown: no agent registered") for n in sorted(set(names or ()))
            if n.casefold() not in known
        ]  # fmt: skip
        return candidates

    def _least_loaded(self, hosts: list[Host], now: float) -> Host | None:
        """The usable host with the lowest score, ties to the name (one pass, no sorting: this
        runs at every launch over every candidate host)."""
        best: Host | None = None
        best_score = 0.0
        timeout_s = self.timeout_s
        for h in hosts:
            if h.closed or now - h.last_report > timeout_s:
                continue
            capacity = h.seats
            taken = h.sessions + h.pending
            if taken >= capacity:
                continue
            score = h.weights[0] * (taken / capacity) + h.memory_load + h.cpu_load  # as Host.score
            if best is None or score < best_score or (score == best_score and h.name < best.name):
                best, best_score = h, score
        return best

    def _next_in_turn(self, hosts: list[Host], now: float, last: str) -> Host | None:
        """Round robin: the first usable host in name order after ``last``, else the first."""
        first: Host | None = None
        after: Host | None = None
        for h in hosts:
            if h.unreachable(now, self.timeout_s) or h.drained or h.full:
                continue
            if first is None or h.name < first.name:
                first = h
            if h.name > last and (after is None or h.name < after.name):
                after = h
        return after or first

    def pick(self, now: float, names: Iterable[str] = ()) -> Host | None:
        """The least-loaded usable host among ``names`` (all hosts if empty), counted as used."""
        names = tuple(names)
        return self.choose(now, names or None).host

    def _judge(self, host: Host, now: float) -> Candidate:
        why = host.unreachable(now, self.timeout_s)
        if not why and host.drained:
            why = "drained: takes no new sessions"
        if not why and host.full:
            why = f"full: {host.sessions + host.pending} of {host.capacity} sessions"
        return Candidate(
            host.name,
            not why,
            why,
            None if why else host.score,
            host.sessions + host.pending,
            host.capacity,
        )
