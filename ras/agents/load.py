"""What a Linux host's load is, read from /proc: CPU and memory use, RDP sessions.

Sessions are the established TCP connections to the host's RDP port (each RDP client holds
one); disconnected sessions are not visible from /proc and are reported as 0 on Linux.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSampler", "memory_percent", "rdp_sessions"]


@dataclass(slots=True)
class CpuSampler:
    """CPU use in percent between successive calls of ``sample``, from /proc/stat."""

    proc: Path = Path("/proc")
    _last: tuple[int, int] | None = None

    def _read(self) -> tuple[int, int]:
        fields = (self.proc / "stat").read_text().splitlines()[0].split()[1:]
        # user nice system idle iowait irq softirq steal; the guest columns after them are
        # already counted in user and nice.
        values = [int(v) for v in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    def sample(self) -> float:
        total, idle = self._read()
        last, self._last = self._last, (total, idle)
        if last is None or total <= last[0]:
            return 0.0
        busy = (total - last[0]) - (idle - last[1])
        return max(0.0, min(100.0, 100.0 * busy / (total - last[0])))


def memory_percent(proc: Path = Path("/proc")) -> float:
    info: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])
    total = info.get("MemTotal", 0)
    if total <= 0:
        return 0.0
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return max(0.0, min(100.0, 100.0 * (total - available) / total))


def rdp_sessions(port: int, proc: Path = Path("/proc")) -> int:
    """Established TCP connections whose local port is ``port`` (IPv4 and IPv6)."""
    count = 0
    for name in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count
