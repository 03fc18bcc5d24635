"""An agent on a utmp file a test writes: user sessions that start and end as the test says.

`write_utmp(path, (pid, user, line), ...)` writes the sessions that exist now (none: all
ended); `start_agent(f, nursery, path)` runs a real agent for host ``rdsh1`` of the in-process
farm ``f``, counting its sessions from that file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import trio
from farmkit import Farm

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig

__all__ = ["UTMP", "start_agent", "utmp_record", "write_utmp"]

UTMP = struct.Struct("<hhi32s4s32s256shhiii16s20s")


def utmp_record(kind: int, pid: int, user: str, line: str, since: int = 1_700_000_000) -> bytes:
    return UTMP.pack(kind, 0, pid, line.encode(), b"", user.encode(), b"10.0.0.9", 0, 0, 0,
                     since, 0, b"", b"")  # fmt: skip


def write_utmp(path: Path, *entries: tuple[int, str, str]) -> None:
    boot = UTMP.pack(2, 0, 0, b"~", b"", b"reboot", b"", 0, 0, 0, 0, 0, b"", b"")
    path.write_bytes(boot + b"".join(utmp_record(7, pid, u, line) for pid, u, line in entries))


async def start_agent(f: Farm, nursery: trio.Nursery, utmp: Path, **options: object) -> Agent:
    cert, key = f.pki.ensure("rdsh1")
    cfg = AgentConfig(
        name="rdsh1", cert_file=cert, key_file=key, ca_file=f.pki.ca_path,
        rdp_host="127.0.0.1", rdp_port=3389, broker_port=f.broker_addrs["agents"][1],
        sessions_from="utmp", utmp_file=utmp, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    agent = Agent(cfg)
    await nursery.start(agent.run)
    return agent
