"""What a Linux host's load is, read from /proc: CPU and memory use, RDP sessions.

Sessions are either the established TCP connections to the host's RDP port (each RDP client
holds one), or the user sessions of utmp (what ``who`` lists: xrdp's sesman and other login
services write them), which also say whose they are. Neither tells a disconnected session on
Linux (they report 0); xrdp's own sessions do (``ras.agents.xrdp``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuSampler",
    "UtmpSession",
    "listening",
    "memory_percent",
    "rdp_sessions",
    "utmp_sessions",
]


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


def listening(port: int, proc: Path = Path("/proc")) -> bool:
    """Whether a TCP socket listens on ``port`` here (any address, IPv4 or IPv6)."""
    for name in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


# struct utmp on Linux (glibc, x86-64 and aarch64; <bits/utmp.h>): 384 bytes.
_UTMP = struct.Struct("<hhi32s4s32s256shhiii16s20s")
USER_PROCESS = 7


@dataclass(frozen=True, slots=True)
class UtmpSession:
    """A logged-in session from utmp (what ``who`` lists)."""

    pid: int
    user: str
    line: str  # the terminal or display (``pts/3``, ``:10``)
    host: str  # where the user came from, if known
    since: int  # unix seconds


def utmp_sessions(path: Path = Path("/var/run/utmp")) -> list[UtmpSession]:
    """The user sessions in a utmp file (USER_PROCESS entries), in file order. A missing file
    means no sessions; a truncated last record is ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    found = []
    for offset in range(0, len(data) - _UTMP.size + 1, _UTMP.size):
        fields = _UTMP.unpack_from(data, offset)
        kind, pid, line, user, host, since = (
            fields[0], fields[2], fields[3], fields[5], fields[6], fields[10]
        )  # fmt: skip
        if kind != USER_PROCESS or pid <= 0:
            continue
        found.append(UtmpSession(pid, _c(user), _c(line), _c(host), since))
    return found


def _c(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
