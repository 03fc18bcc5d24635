"""The network-namespace lab (ras.lab) that multi-host tests stand on."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from labkit import (
    WaitTimeout,
    accepted_from,
    await_until,
    echo,
    reachable,
    require_lab,
    start_echo_server,
    wait_until,
)

from ras.lab import (
    CommandError,
    Lab,
    LabError,
    LabUnavailableError,
    lab_namespaces,
    lab_unavailable,
)

pytest_plugins = ["labkit"]  # the lab and make_lab fixtures

PORT = 7000


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _root_network() -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """The root namespace's interfaces, IPv4 addresses and routes."""

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    links = sorted(link["ifname"] for link in json.loads(ip("-j", "link", "show")))
    addrs = sorted(
        (link["ifname"], info["local"])
        for link in json.loads(ip("-j", "-4", "addr", "show"))
        for info in link.get("addr_info", [])
    )
    routes = sorted(ip("-4", "route", "show", "table", "all").splitlines())
    return links, addrs, routes


# ---------------------------------------------------------------------------------------------
# Reachability inside the lab


def test_hosts_ping_each_other(make_lab):
    require_lab("ping")
    lab = make_lab("a", "b", "c")
    hosts = list(lab.hosts.values())
    assert [str(h.address) for h in hosts] == ["10.213.0.10", "10.213.0.11", "10.213.0.12"]
    for src, dst in itertools.permutations(hosts, 2):
        done = src.run(["ping", "-c1", "-W1", str(dst.address)], check=False)
        assert done.returncode == 0, f"{src.name} -> {dst.name}: {done.stdout}{done.stderr}"
    # Nothing outside the lab's subnet has a route: the packet is refused before it is sent.
    outside = hosts[0].run(["ping", "-c1", "-W1", "192.0.2.1"], check=False)
    assert outside.returncode != 0
    assert "unreachable" in (outside.stdout + outside.stderr).lower()


def _icmp_echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    data = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    return struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload


def test_raw_icmp_socket_made_inside_a_host(lab):
    """A raw socket from `Host.socket` sends from that host's address (what VRRP needs)."""
    a, b = lab.add_host("a"), lab.add_host("b")
    ident = os.getpid() & 0xFFFF
    with a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(2.0)
        sock.sendto(_icmp_echo_request(ident, 1, b"lab"), (str(b.address), 0))
        while True:
            packet, (source, _) = sock.recvfrom(1500)
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                break
    assert source == str(b.address)
    assert packet[16:20] == a.address.packed  # the reply's destination: a's own address
    assert icmp[8:] == b"lab"


async def test_trio_reaches_a_server_in_the_lab_through_host_socket(make_lab):
    lab = make_lab("server", "client")
    server, client = lab.hosts["server"], lab.hosts["client"]
    proc = start_echo_server(server, PORT)
    sock = trio.socket.from_stdlib_socket(client.socket())
    with sock:
        await sock.connect((str(server.address), PORT))
        await sock.send(b"through the lab\n")
        assert await sock.recv(100) == b"through the lab\n"
        # The server saw the client's lab address: the socket lives in the client's namespace.
        assert sock.getsockname()[0] == str(client.address)
        with trio.fail_after(5):
            await await_until(
                lambda: accepted_from(server, proc) == [str(client.address)],
                what="the server logging the client's connection",
            )


def test_host_socket_is_made_in_the_hosts_namespace(lab):
    a = lab.add_host("a")
    host_netns = os.stat(f"/run/netns/{a.netns}").st_ino
    with a.socket() as inside, socket.socket() as outside:
        assert _netns_of(inside) == host_netns
        assert _netns_of(outside) != host_netns
        inside.bind((str(a.address), 0))  # that address exists only in a
    assert sorted(name for _, name in a.call(socket.if_nameindex)) == ["eth0", "lo"]


def _netns_of(sock: socket.socket) -> int:
    """The inode of the network namespace a socket lives in (ioctl SIOCGSKNS)."""
    fd = fcntl.ioctl(sock.fileno(), 0x894C)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Isolation


def test_the_lab_is_isolated_from_the_root_namespace(make_lab):
    before = _root_network()
    lab = make_lab("a", "b")
    a, b = lab.hosts["a"], lab.hosts["b"]
    server = start_echo_server(a, PORT)
    assert _root_network() == before, "building the lab changed the root namespace"

    # The test process's own namespace cannot reach the lab: nothing routes into it. (Where the
    # machine's uplink accepts any TCP connection, as here, the connect "succeeds" out there:
    # whatever answers, it is not the lab's server, which sees nothing and echoes nothing.)
    token = f"from the root namespace {os.getpid()}\n".encode()
    with socket.socket() as sock:
        sock.settimeout(0.5)
        try:
            sock.connect((str(a.address), PORT))
            sock.sendall(token)
            reply = sock.recv(100)
        except OSError:
            reply = b""
    assert reply != token

    # And the lab cannot reach out: its hosts know only the lab's subnet.
    for host in lab.hosts.values():
        main = host.run(["ip", "-4", "route", "show", "table", "main"]).stdout.splitlines()
        assert [line.split()[:3] for line in main] == [["10.213.0.0/24", "dev", "eth0"]]
        assert "default" not in host.run(["ip", "route", "show", "table", "all"]).stdout
    with b.socket() as sock:
        sock.settimeout(0.5)
        with pytest.raises(OSError, match="Network is unreachable"):
            sock.connect(("192.0.2.1", 80))  # ENETUNREACH, at once

    assert echo(b, a.address, PORT) == b"hello lab\n"
    assert accepted_from(a, server) == [str(b.address)]  # nothing from outside ever arrived
    assert b.read_sysctl("net.ipv6.conf.all.disable_ipv6") == "1"


def test_iptables_drop_cuts_one_path_and_removing_the_rule_heals_it(make_lab):
    require_lab("iptables")
    lab = make_lab("a", "b", "c")
    a, b, c = lab.hosts["a"], lab.hosts["b"], lab.hosts["c"]
    start_echo_server(a, PORT)
    assert reachable(b, a.address, PORT)
    rule = ["INPUT", "-s", str(b.address), "-p", "tcp", "--dport", str(PORT), "-j", "DROP"]
    a.iptables("-A", *rule)
    assert not reachable(b, a.address, PORT, timeout=0.3)
    assert reachable(c, a.address, PORT)  # only b's path is cut
    a.iptables("-D", *rule)
    assert reachable(b, a.address, PORT)
    assert echo(b, a.address, PORT) == b"hello lab\n"


def test_sysctl_is_per_host(make_lab):
    lab = make_lab("a", "b")
    a, b = lab.hosts["a"], lab.hosts["b"]
    root = Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text()
    vip = lab.spare_address()
    assert str(vip) == "10.213.0.254"
    a.sysctl("net.ipv4.ip_nonlocal_bind", 1)
    assert a.read_sysctl("net.ipv4.ip_nonlocal_bind") == "1"
    assert b.read_sysctl("net.ipv4.ip_nonlocal_bind") == "0"
    assert Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text() == root
    with a.socket() as sock:
        sock.bind((str(vip), PORT))  # a VIP a does not hold yet
    with b.socket() as sock, pytest.raises(OSError, match="Cannot assign"):
        sock.bind((str(vip), PORT))
    with pytest.raises(ValueError, match="per-namespace"):
        a.sysctl("kernel.hostname", "nope")


def test_addresses_follow_a_vip(make_lab):
    lab = make_lab("a", "b")
    a, b = lab.hosts["a"], lab.hosts["b"]
    vip = lab.spare_address()
    assert a.addresses() == [str(a.address)]
    a.run(["ip", "addr", "add", f"{vip}/24", "dev", "eth0"])
    assert a.addresses() == [str(a.address), str(vip)]
    assert str(vip) not in b.addresses()
    a.run(["ip", "addr", "del", f"{vip}/24", "dev", "eth0"])
    b.run(["ip", "addr", "add", f"{vip}/24", "dev", "eth0"])
    assert b.addresses() == [str(b.address), str(vip)]
    assert a.addresses() == [str(a.address)]


# ---------------------------------------------------------------------------------------------
# Teardown


@pytest.mark.parametrize("body_raises", [False, True])
def test_close_stops_every_process_and_removes_every_namespace(tmp_path, body_raises):
    require_lab()
    with _raises(body_raises), Lab(logdir=tmp_path, stop_timeout=0.5) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        polite = a.popen(["sleep", "600"])
        stubborn = a.popen(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
        wait_until(lambda: "ready" in lab.log_of(stubborn).read_text(), 5.0, what="trap set")
        # A daemon: its parent exits at once, so the lab never tracked it.
        started = a.run(["sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"])
        orphan = int(started.stdout)
        sock = b.socket()
        assert _alive(orphan)
        assert lab_namespaces(lab.prefix) == [f"{lab.prefix}-{n}" for n in ("a", "b", "sw")]
        if body_raises:
            raise RuntimeError("the test body failed")
    assert lab.closed
    assert polite.returncode == -15  # SIGTERM was enough
    assert stubborn.returncode == -9  # ignored SIGTERM: SIGKILL after stop_timeout
    wait_until(lambda: not _alive(orphan), 5.0, what=f"the untracked daemon {orphan} gone")
    assert sock.fileno() == -1
    assert lab_namespaces(lab.prefix) == []
    assert not Path(f"/run/ras-lab/{lab.prefix}.lock").exists()
    lab.close()  # idempotent
    with pytest.raises(LabError, match="closed"):
        a.popen(["true"])


def _raises(expected: bool):
    """pytest.raises(RuntimeError) if `expected`, else nothing."""
    if expected:
        return pytest.raises(RuntimeError, match="body failed")
    return contextlib.nullcontext()


def test_a_lab_whose_owner_was_killed_is_swept_by_the_next_one(tmp_path):
    require_lab()
    crash = f"""
import os, signal
from pathlib import Path
from ras.lab import Lab
lab = Lab(logdir=Path({str(tmp_path)!r}))
proc = lab.add_host("a").popen(["sleep", "600"])
print(lab.prefix, proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit
"""
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    prefix, pid = done.stdout.split()
    assert lab_namespaces(prefix) == [f"{prefix}-a", f"{prefix}-sw"]
    assert _alive(int(pid))
    with Lab(logdir=tmp_path / "next"):
        assert lab_namespaces(prefix) == []
        assert not _alive(int(pid))
    assert not Path(f"/run/ras-lab/{prefix}.lock").exists()


def test_two_labs_at_once_do_not_collide(make_lab):
    one, two = make_lab("a", "b"), make_lab("a", "b")
    assert one.prefix != two.prefix
    assert one.hosts["a"].address == two.hosts["a"].address  # same addresses, separate wires
    server_one = start_echo_server(one.hosts["a"], PORT)
    server_two = start_echo_server(two.hosts["a"], PORT)
    assert echo(one.hosts["b"], one.hosts["a"].address, PORT) == b"hello lab\n"
    assert accepted_from(one.hosts["a"], server_one) == [str(one.hosts["b"].address)]
    assert accepted_from(two.hosts["a"], server_two) == []
    one.close()
    assert lab_namespaces(one.prefix) == []
    assert len(lab_namespaces(two.prefix)) == 3
    assert echo(two.hosts["b"], two.hosts["a"].address, PORT) == b"hello lab\n"
    assert accepted_from(two.hosts["a"], server_two) == [str(two.hosts["b"].address)]


def test_seven_host_lab_builds_and_tears_down(tmp_path):
    require_lab()
    started = time.perf_counter()
    lab = Lab(logdir=tmp_path)
    try:
        hosts = lab.add_hosts(*(f"h{i}" for i in range(7)))
        up = time.perf_counter() - started
        assert len({h.address for h in hosts}) == 7
        assert len(lab_namespaces(lab.prefix)) == 8
        procs = [h.popen(["sleep", "600"]) for h in hosts]
    finally:
        started = time.perf_counter()
        lab.close()
        down = time.perf_counter() - started
    assert all(p.returncode == -15 for p in procs)
    assert lab_namespaces(lab.prefix) == []
    print(f"\n7-host lab: up {up * 1000:.0f} ms, down (7 processes inside) {down * 1000:.0f} ms")


# ---------------------------------------------------------------------------------------------
# The harness itself


def test_lab_unavailable_fails_under_ci_rather_than_skip(monkeypatch):
    require_lab()
    monkeypatch.delenv("CI", raising=False)
    assert lab_unavailable() is None
    reason = lab_unavailable(needs=["ras-no-such-program"])
    assert "ras-no-such-program" in (reason or "")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(LabUnavailableError, match="CI is set"):
        lab_unavailable(needs=["ras-no-such-program"])


def test_host_names_and_addresses_are_checked(lab):
    lab.add_host("a", "10.213.0.50")
    with pytest.raises(LabError, match="taken"):
        lab.add_host("b", "10.213.0.50")
    with pytest.raises(ValueError, match="not a host address"):
        lab.add_host("c", "10.9.9.9")
    with pytest.raises(ValueError, match="host name"):
        lab.add_host("much-too-long-name")
    with pytest.raises(LabError, match="already"):
        lab.add_host("a")
    assert str(lab.add_host("d").address) == "10.213.0.10"


def test_a_host_that_cannot_be_built_leaves_the_lab_usable(lab):
    # Something else took the namespace name between our check and our build.
    subprocess.run(["ip", "netns", "add", f"{lab.prefix}-x"], check=True)
    with pytest.raises(CommandError, match="File exists"):
        lab.add_hosts("w", "x")
    assert lab.hosts == {}
    assert lab_namespaces(lab.prefix) == [f"{lab.prefix}-sw"]
    w = lab.add_host("w")
    assert str(w.address) == "10.213.0.10"
    assert w.addresses() == ["10.213.0.10"]


def test_wait_until_names_what_it_waited_for():
    assert wait_until(lambda: 42, 1.0) == 42
    with pytest.raises(WaitTimeout, match=r"the moon: still not true after 0.05 s"):
        wait_until(lambda: None, 0.05, what="the moon")
    with pytest.raises(WaitTimeout, match="ConnectionRefusedError"):
        wait_until(_refuse, 0.05, what="a port", ignore=(OSError,))


def _refuse() -> bool:
    raise ConnectionRefusedError("refused")
