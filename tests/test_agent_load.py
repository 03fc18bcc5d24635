"""The host agent's load readings (``ras.agents.load``): fake /proc trees, then the real one.

The fake trees hold lines copied in shape from a Linux 6.x host, so the parsing is tested on
what the kernel really writes; the last tests read this machine's /proc and open a real TCP
connection to check that a session on the RDP port is counted.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from ras.agents.load import CpuSampler, memory_percent, rdp_sessions

STAT_HEAD = (
    "cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} {guest} {guest_nice}\n"
)
STAT_REST = """\
cpu0 5000 20 1500 80000 300 0 100 0 0 0
cpu1 5100 21 1400 81000 310 0 90 0 0 0
intr 123456789 9 0 0 0 0 0 0 0 1 0 0 0 0 0 0 0
ctxt 987654321
btime 1714000000
processes 123456
procs_running 2
procs_blocked 0
softirq 1234567 1 2 3 4 5 6 7 8 9 10
"""


def write_stat(proc: Path, **fields: int) -> None:
    values = {"user": 0, "nice": 0, "system": 0, "idle": 0, "iowait": 0, "irq": 0,
              "softirq": 0, "steal": 0, "guest": 0, "guest_nice": 0} | fields  # fmt: skip
    (proc / "stat").write_text(STAT_HEAD.format(**values) + STAT_REST)


MEMINFO = """\
MemTotal:       16314876 kB
MemFree:         1019284 kB
MemAvailable:    {available} kB
Buffers:          412180 kB
Cached:          6123456 kB
SwapCached:            0 kB
Active:          8123456 kB
Inactive:        5123456 kB
SwapTotal:       2097148 kB
SwapFree:        2097148 kB
Dirty:               388 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
DirectMap4k:      412316 kB
"""

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)
TCP_TAIL = (
    " 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000"
    " 20 4 30 10 -1\n"
)


def tcp_line(n: int, local: str, remote: str, state: str) -> str:
    return f"{n:4d}: {local} {remote} {state}" + TCP_TAIL.format(inode=40000 + n)


# 3389 = 0x0D3D, 22 = 0x0016, 50000 = 0xC350
TCP = TCP_HEADER + "".join(
    [
        tcp_line(0, "00000000:0D3D", "00000000:0000", "0A"),  # listening on 3389
        tcp_line(1, "0100007F:0016", "00000000:0000", "0A"),  # listening on 22
        tcp_line(2, "0500000A:0D3D", "0700000A:C350", "01"),  # session from 10.0.0.7
        tcp_line(3, "0500000A:0D3D", "0800000A:D431", "01"),  # session from 10.0.0.8
        tcp_line(4, "0500000A:0D3D", "0900000A:D432", "06"),  # TIME_WAIT: ended
        tcp_line(5, "0500000A:0D3D", "0A00000A:D433", "08"),  # CLOSE_WAIT: not established
        tcp_line(6, "0500000A:0016", "0700000A:C351", "01"),  # ssh session
        tcp_line(7, "0500000A:C352", "0B00000A:0D3D", "01"),  # we are the client of 3389
        tcp_line(8, "0500000A:0D3E", "0700000A:C353", "01"),  # port 3390
    ]
)
TCP6 = TCP_HEADER + "".join(
    [
        tcp_line(0, "00000000000000000000000000000000:0D3D",
                 "00000000000000000000000000000000:0000", "0A"),
        tcp_line(1, "0000000000000000FFFF00000500000A:0D3D",
                 "0000000000000000FFFF00000C00000A:C354", "01"),  # v4-mapped session
        tcp_line(2, "B80D0120000000000000000001000000:0D3D",
                 "B80D0120000000000000000002000000:C355", "01"),  # 2001:db8::1 <- ::2
        tcp_line(3, "B80D0120000000000000000001000000:C356",
                 "B80D0120000000000000000003000000:0D3D", "01"),  # outgoing to 3389
    ]
)  # fmt: skip


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    (root / "net").mkdir(parents=True)
    write_stat(root, user=10000, system=3000, idle=160000, iowait=600, softirq=200)
    (root / "meminfo").write_text(MEMINFO.format(available=4078719))
    (root / "net" / "tcp").write_text(TCP)
    (root / "net" / "tcp6").write_text(TCP6)
    return root


# -- CPU ----------------------------------------------------------------------------------------


def test_first_cpu_sample_has_nothing_to_compare_with(proc):
    assert CpuSampler(proc).sample() == 0.0


def test_cpu_use_between_two_samples(proc):
    cpu = CpuSampler(proc)
    cpu.sample()
    # +1000 jiffies: 600 user, 50 system, 50 softirq busy; 250 idle + 50 iowait not busy.
    write_stat(proc, user=10600, system=3050, idle=160250, iowait=650, softirq=250)
    assert cpu.sample() == pytest.approx(70.0)
    # Next interval: all idle.
    write_stat(proc, user=10600, system=3050, idle=161250, iowait=650, softirq=250)
    assert cpu.sample() == pytest.approx(0.0)
    # Next: fully busy, with steal counted as busy (the hypervisor took it).
    write_stat(proc, user=11100, system=3050, idle=161250, iowait=650, softirq=250, steal=500)
    assert cpu.sample() == pytest.approx(100.0)


def test_guest_time_is_not_counted_twice(proc):
    """On a VDI host the kernel counts the guests' time in user (and nice) and again, for
    information, in the guest columns: half the CPU running guests is 50 %, not 67 %."""
    cpu = CpuSampler(proc)
    cpu.sample()
    write_stat(proc, user=10500, system=3000, idle=160500, iowait=600, softirq=200, guest=500)
    assert cpu.sample() == pytest.approx(50.0)
    write_stat(proc, user=10500, nice=400, system=3000, idle=160600, iowait=600, softirq=200,
               guest=500, guest_nice=400)  # fmt: skip
    assert cpu.sample() == pytest.approx(80.0)


def test_cpu_with_no_time_passed_or_counters_reset_is_zero(proc):
    cpu = CpuSampler(proc)
    cpu.sample()
    assert cpu.sample() == 0.0  # same counters
    write_stat(proc, user=10, system=3, idle=160, iowait=6, softirq=2)  # counters went back
    assert cpu.sample() == 0.0
    write_stat(proc, user=20, system=3, idle=170, iowait=6, softirq=2)  # and on from there
    assert cpu.sample() == pytest.approx(50.0)


# -- memory -------------------------------------------------------------------------------------


def test_memory_use_is_what_is_not_available(proc):
    # 16314876 kB total, 4078719 kB available -> 75 % used
    assert memory_percent(proc) == pytest.approx(75.0, abs=0.001)
    (proc / "meminfo").write_text(MEMINFO.format(available=16314876))
    assert memory_percent(proc) == pytest.approx(0.0)


def test_memory_without_memavailable_uses_memfree(proc):
    lines = [ln for ln in MEMINFO.format(available=0).splitlines() if "MemAvailable" not in ln]
    (proc / "meminfo").write_text("\n".join(lines) + "\n")
    assert memory_percent(proc) == pytest.approx(100 * (16314876 - 1019284) / 16314876)


# -- sessions -----------------------------------------------------------------------------------


def test_established_connections_to_the_rdp_port_are_sessions(proc):
    # v4: lines 2 and 3; v6: the v4-mapped one and 2001:db8::1. Not the listeners, not
    # TIME_WAIT or CLOSE_WAIT, not other ports, not our own connections *to* a 3389 elsewhere.
    assert rdp_sessions(3389, proc) == 4
    assert rdp_sessions(22, proc) == 1
    assert rdp_sessions(3390, proc) == 1
    assert rdp_sessions(3391, proc) == 0


def test_sessions_without_ipv6(proc):
    (proc / "net" / "tcp6").unlink()
    assert rdp_sessions(3389, proc) == 2


def test_no_sessions_on_an_idle_host(proc):
    (proc / "net" / "tcp").write_text(
        TCP_HEADER + tcp_line(0, "00000000:0D3D", "00000000:0000", "0A")
    )
    (proc / "net" / "tcp6").write_text(TCP_HEADER)
    assert rdp_sessions(3389, proc) == 0


# -- the real /proc -----------------------------------------------------------------------------


def test_real_cpu_and_memory_are_percentages():
    cpu = CpuSampler()
    values = [cpu.sample()]
    busy = sum(i * i for i in range(200_000))  # let some jiffies pass
    assert busy > 0
    values.append(cpu.sample())
    assert all(0.0 <= v <= 100.0 for v in values)
    assert 0.0 < memory_percent() <= 100.0


async def test_a_real_connection_to_a_listening_port_is_counted():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    try:
        assert rdp_sessions(port) == 0  # a listener is not a session
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        try:
            assert rdp_sessions(port) == 1  # our end of it has another port
            client2 = await trio.open_tcp_stream("127.0.0.1", port)
            server2 = await listener.accept()
            assert rdp_sessions(port) == 2
            await client2.aclose()
            await server2.aclose()
            # Both ends closed: the server end (active close after the client) goes away.
            assert rdp_sessions(port) == 1
        finally:
            await client.aclose()
            await server.aclose()
    finally:
        await listener.aclose()


async def test_a_real_ipv6_connection_is_counted():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = (await trio.open_tcp_listeners(0, host="::1"))[0]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listener.socket.getsockname()[1]
    try:
        client = await trio.open_tcp_stream("::1", port)
        server = await listener.accept()
        try:
            assert rdp_sessions(port) == 1
        finally:
            await client.aclose()
            await server.aclose()
    finally:
        await listener.aclose()
