"""The hosts the agents registered, their load, and the least-loaded choice (pure logic).

Load score (resource-based balancing, as RAS does it): the used share of sessions, CPU and
memory combined, ``0.5 * sessions/max_sessions + 0.25 * cpu + 0.25 * memory`` (each 0..1);
the lowest score wins, ties go to the name. Launches since a host's last report count as
sessions, so a burst of launches spreads before the next report arrives. A host that has not
reported within ``timeout_s``, or whose agent disconnected, or which is full, gets nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ras.protocol import HostKind, LoadReport

__all__ = ["Host", "HostRegistry"]


@dataclass(slots=True)
class Host:
    name: str
    kind: HostKind
    rdp_host: str
    rdp_port: int
    max_sessions: int
    last_report: float
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    sessions: int = 0
    disconnected: int = 0
    pending: int = 0  # launches since the last report
    online: bool = True

    @property
    def score(self) -> float:
        used = (self.sessions + self.pending) / self.max_sessions
        return 0.5 * used + 0.25 * self.cpu_percent / 100 + 0.25 * self.memory_percent / 100

    @property
    def full(self) -> bool:
        return self.sessions + self.disconnected + self.pending >= self.max_sessions


class HostRegistry:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.hosts: dict[str, Host] = {}

    def register(
        self, name: str, kind: HostKind, rdp_host: str, rdp_port: int, max_sessions: int, now: float
    ) -> Host:
        host = Host(name, kind, rdp_host, rdp_port, max_sessions, last_report=now)
        self.hosts[name] = host
        return host

    def report(self, name: str, load: LoadReport, now: float) -> None:
        host = self.hosts[name]
        host.cpu_percent = load.cpu_percent
        host.memory_percent = load.memory_percent
        host.sessions = load.sessions
        host.disconnected = load.disconnected
        host.pending = 0
        host.last_report = now

    def disconnect(self, name: str, host: Host) -> None:
        if self.hosts.get(name) is host:
            host.online = False

    def usable(self, now: float, names: Iterable[str] = ()) -> list[Host]:
        wanted = set(names)
        return [
            h for h in self.hosts.values()
            if h.online and now - h.last_report <= self.timeout_s and not h.full
            and (not wanted or h.name in wanted)
        ]  # fmt: skip

    def pick(self, now: float, names: Iterable[str] = ()) -> Host | None:
        """The least-loaded usable host among ``names`` (all hosts if empty), counted as used."""
        hosts = self.usable(now, names)
        if not hosts:
            return None
        best = min(hosts, key=lambda h: (h.score, h.name))
        best.pending += 1
        return best
