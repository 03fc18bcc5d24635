"""A lab of hosts on Ethernet segments, each host a Linux network namespace.

Theory of operation
-------------------
Everything here is synchronous and drives ``ip`` (iproute2) with ``subprocess``; trio code
calls it from fixtures or through ``trio.to_thread.run_sync``. Needs root (CAP_SYS_ADMIN and
CAP_NET_ADMIN), which may be the root of a user namespace.

- A segment is a bridge inside a namespace of its own, ``<prefix>-sw``; never in the root
  namespace, whose interfaces and routes are never touched. The lab's first segment (its
  ``subnet``) is bridge ``br0``; `Lab.add_segment` adds more (bridge ``b-<name>``), each an
  Ethernet of its own: the switch namespace has no address, so nothing passes between its
  bridges. Each host ``<prefix>-<name>`` gets ``eth0``, the far end of a veth pair created from
  inside the switch namespace, an address of its segment's subnet and so only the subnet's
  route; `Lab.attach` gives a host (a router, a firewall) ``eth1``, ``eth2``... on other
  segments, and `Lab.add_routes` routes between segments through such a host. No default
  route anywhere, so no packet can leave the lab, and none can come in. IPv6 is off in every
  lab namespace (before any interface exists, so no link-local addresses, no neighbour
  discovery or MLD chatter). Multicast snooping and STP are off on the bridges: VRRP's
  multicast reaches every port and a port forwards the moment it is up.
- Speed comes from few processes: ``add_hosts(*names)`` creates every namespace in one
  ``ip -batch``, sets sysctls from one thread (no process), wires every veth in one batch in
  the switch, then configures the hosts with one ``ip -n`` each, all at once. A 7-host lab is
  up in 50-120 ms and down in 10-25 ms on a 2-CPU machine.
- Each lab has a prefix of its own (``rl<pid>n<counter>`` unless given) and holds an exclusive
  ``flock`` on ``/run/ras-lab/<prefix>.lock`` while it lives. A lab whose owner died without
  closing it (SIGKILL, a killed CI run) leaves namespaces and an unlocked lock file behind; the
  next lab created anywhere on the machine removes them ("sweeps").
- Programs run in a host through ``ip netns exec``, which execs: the pid tracked is the
  program's own. ``Lab.close()`` sends every tracked process SIGTERM, waits, SIGKILLs what is
  left; then SIGKILLs whatever still runs in a lab namespace (what ``ip netns pids`` lists:
  daemons' children, double forks), because ``ip netns del`` leaves a namespace with
  processes inside alive; then deletes the namespaces and checks with ``ip netns list`` that
  nothing with the prefix remains. An ``atexit`` hook closes labs nobody closed.
- Network-namespace membership is per thread. ``Host.call`` runs a function in a short-lived
  thread that has ``setns()`` into the host (through ctypes: ``os.setns`` is Python 3.12+), so
  the calling process can make sockets inside a host (a socket keeps the namespace it was made
  in) and read or write the host's ``/proc/sys/net``. It does not see the host's
  ``/sys/class/net``, which follows the mount namespace, not the thread's network namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from ras.lab._system import (
    PATH,
    CommandError,
    LabError,
    LabUnavailableError,
    P,
    T,
    call_in_netns,
    child_env,
    disable_ipv6,
    in_each_netns,
    ip_batch,
    ip_batches,
    kill_all_in,
    lab_namespaces,
    listed,
    lock,
    remove,
    run,
    sweep_stale,
    sysctl_path,
    unlock,
    write_sysctls,
)

__all__ = [
    "CommandError",
    "Host",
    "Interface",
    "Lab",
    "LabError",
    "LabUnavailableError",
    "Segment",
    "lab_namespaces",
    "lab_unavailable",
]


_INSTALL_HINT = "run scripts/install-peers as root"

IFACE = "eth0"
_BRIDGE = "br0"
_SWITCH = "sw"
_FIRST_AUTO_HOST = 10  # auto addresses: .10, .11, ...; spare_address(): .254, .253, ...

# No "-" in a prefix: a namespace's prefix is what comes before its first "-".
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,31}")
# "v-<host>" and "b-<segment>" fit IFNAMSIZ (15 + NUL)
_HOST_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,12}")
_counter = itertools.count()
_port_counter = itertools.count()  # switch-side names of the veths of further interfaces
_log_counter = itertools.count()


# ---------------------------------------------------------------------------------------------
# Availability


def lab_unavailable(*, needs: Iterable[str] = ()) -> str | None:
    """Return None if labs can run here, else the reason to skip a test that needs one.

    ``needs`` names further programs the test runs in the lab (``ping``, ``keepalived``...).
    Not root, not Linux or no ``ip``: a reason. Otherwise (root and ``ip`` there) under CI
    (the ``CI`` environment variable set) a missing program or namespaces that cannot be made
    are not a reason to skip but a failure: this raises `LabUnavailableError`.
    """
    if not sys.platform.startswith("linux"):
        return "network-namespace labs need Linux"
    if os.geteuid() != 0:
        return "network-namespace labs need root (or root in a user namespace)"
    if shutil.which("ip", path=PATH) is None:
        return f"network-namespace labs need ip (iproute2): {_INSTALL_HINT}"
    problems = []
    missing = [name for name in needs if shutil.which(name, path=PATH) is None]
    if missing:
        problems.append(f"programs missing for the lab: {', '.join(missing)} ({_INSTALL_HINT})")
    if (failure := _probe()) is not None:
        problems.append(f"cannot build a network-namespace lab here: {failure}")
    if not problems:
        return None
    reason = "; ".join(problems)
    if os.environ.get("CI"):
        raise LabUnavailableError(f"{reason}; CI is set, so this is a failure, not a skip")
    return reason


@functools.cache
def _probe() -> str | None:
    """Build and tear down a one-host lab, once per process."""
    try:
        with Lab() as lab:
            lab.add_hosts("probe")
    except (LabError, OSError) as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# The lab


_open_labs: list[Lab] = []


@dataclass(frozen=True, slots=True)
class Segment:
    """An Ethernet segment of a lab: a bridge in the switch namespace, and its subnet."""

    name: str
    subnet: ipaddress.IPv4Network
    bridge: str


@dataclass(frozen=True, slots=True)
class Interface:
    """A host's interface ``name`` on ``segment``, with ``address``."""

    name: str
    segment: Segment
    address: ipaddress.IPv4Address


def _subnet(text: str) -> ipaddress.IPv4Network:
    subnet = ipaddress.IPv4Network(text)
    if subnet.prefixlen > 24:
        raise ValueError(f"lab subnet {text} is smaller than a /24")
    return subnet


class Lab:
    """Ethernet segments in a namespace of their own, and the hosts on them.

    ``Lab(prefix=None, subnet="10.213.0.0/24", segment="lan")``: the first segment, where hosts
    go unless told otherwise; `add_segment` adds more. A context manager, or call `close()`.
    ``logdir`` keeps the output of the processes started in the hosts (default: a temporary
    directory removed by `close()`); ``stop_timeout`` is how long `close()` waits for them
    after SIGTERM before SIGKILL. Not thread-safe: build and close it from one thread.
    """

    def __init__(
        self,
        prefix: str | None = None,
        subnet: str = "10.213.0.0/24",
        *,
        segment: str = "lan",
        logdir: Path | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        self.subnet = _subnet(subnet)
        if prefix is not None and not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"lab prefix {prefix!r}: lower-case letters and digits, 1 to 32")
        _check_name("segment", segment)
        self.segment = Segment(segment, self.subnet, _BRIDGE)
        self.segments: dict[str, Segment] = {segment: self.segment}
        self.hosts: dict[str, Host] = {}
        self.stop_timeout = stop_timeout
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._spares: dict[str, set[ipaddress.IPv4Address]] = {segment: set()}
        self._closed = False
        sweep_stale()
        self.prefix, self._lock_fd = self._claim(prefix)
        self.switch = f"{self.prefix}-{_SWITCH}"
        self._own_logdir = False
        self.logdir = logdir or Path()
        _open_labs.append(self)
        try:
            if logdir is None:
                self.logdir = Path(tempfile.mkdtemp(prefix=f"ras-lab-{self.prefix}-"))
                self._own_logdir = True
            else:
                logdir.mkdir(parents=True, exist_ok=True)
            run(["ip", "netns", "add", self.switch])
            call_in_netns(self.switch, disable_ipv6)
            bridge = f"link add {_BRIDGE} type bridge stp_state 0 mcast_snooping 0"
            ip_batch([bridge, f"link set {_BRIDGE} up"], netns=self.switch)
        except BaseException:
            self.close()
            raise

    def _claim(self, prefix: str | None) -> tuple[str, int]:
        if prefix is not None:
            held = lock(prefix)
            if held is None:
                raise LabError(f"lab prefix {prefix!r} is in use by a live lab")
            fd, existed = held
            if (found := listed(prefix)) and existed:  # a crashed lab of the same prefix
                remove(found)
                found = listed(prefix)
            if found:
                unlock(prefix, fd, remove=not existed)
                raise LabError(f"namespaces {', '.join(found)} exist and are not a lab's")
            return prefix, fd
        for _ in range(1000):
            candidate = f"rl{os.getpid()}n{next(_counter)}"
            held = lock(candidate)
            if held is None:
                continue
            fd, existed = held
            if (found := listed(candidate)) and existed:  # a dead process with our pid
                remove(found)
                found = listed(candidate)
            if not found:
                return candidate, fd
            unlock(candidate, fd, remove=not existed)
        raise LabError("no free lab prefix")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.hosts)} hosts"
        return f"Lab(prefix={self.prefix!r}, subnet={str(self.subnet)!r}, {state})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    # -- segments

    def add_segment(self, name: str, subnet: str) -> Segment:
        """Add segment `name` (a bridge ``b-<name>`` of its own) with `subnet`, which must not
        overlap another segment's."""
        self._check_open()
        _check_name("segment", name)
        net = _subnet(subnet)
        if name in self.segments:
            raise LabError(f"lab {self.prefix} has a segment {name} already")
        for other in self.segments.values():
            if net.overlaps(other.subnet):
                raise ValueError(f"segment {name}: {net} overlaps {other.name}'s {other.subnet}")
        segment = Segment(name, net, f"b-{name}")
        bridge = f"link add {segment.bridge} type bridge stp_state 0 mcast_snooping 0"
        ip_batch([bridge, f"link set {segment.bridge} up"], netns=self.switch)
        self.segments[name] = segment
        self._spares[name] = set()
        return segment

    def _segment(self, segment: str | Segment | None) -> Segment:
        name = self.segment.name if segment is None else getattr(segment, "name", segment)
        try:
            return self.segments[str(name)]
        except KeyError:
            raise LabError(f"lab {self.prefix} has no segment {name}") from None

    # -- hosts

    def add_host(
        self,
        name: str,
        address: str | ipaddress.IPv4Address | None = None,
        *,
        segment: str | Segment | None = None,
    ) -> Host:
        """Add host `name` (namespace ``<prefix>-<name>``) with `address` on ``eth0``, on
        `segment` (default: the lab's first).

        Without `address` the host gets the next free of .10, .11, ... of the subnet.
        """
        return self._add([(name, address)], self._segment(segment))[0]

    def add_hosts(self, *names: str, segment: str | Segment | None = None) -> list[Host]:
        """Add several hosts with automatic addresses at once (faster than one by one)."""
        return self._add([(name, None) for name in names], self._segment(segment))

    def _add(
        self,
        specs: Sequence[tuple[str, str | ipaddress.IPv4Address | None]],
        segment: Segment,
    ) -> list[Host]:
        self._check_open()
        hosts: list[Host] = []
        for name, address in specs:
            _check_name("host", name)
            if name in self.hosts or any(host.name == name for host in hosts):
                raise LabError(f"lab {self.prefix} has a host {name} already")
            chosen = self._allocate(address, {host.address for host in hosts}, segment)
            hosts.append(Host(self, name, f"{self.prefix}-{name}", chosen, segment))
        namespaces = [host.netns for host in hosts]
        wires = []
        for host in hosts:
            veth = f"v-{host.name}"
            wires.append(f"link add {veth} type veth peer name {IFACE} netns {host.netns}")
            wires.append(f"link set {veth} master {segment.bridge} up")
        plen = segment.subnet.prefixlen
        configs = {
            host.netns: [
                "link set lo up",
                f"addr add {host.address}/{plen} dev {IFACE}",
                f"link set {IFACE} up",
            ]
            for host in hosts
        }
        try:
            ip_batch(f"netns add {netns}" for netns in namespaces)
            in_each_netns(namespaces, disable_ipv6)  # before eth0 exists: no link-local
            ip_batch(wires, netns=self.switch)
            ip_batches(configs)
        except BaseException:
            remove(namespaces)  # the veth pairs go with them
            raise
        self.hosts.update((host.name, host) for host in hosts)
        return hosts

    def attach(
        self,
        host: Host,
        segment: str | Segment,
        address: str | ipaddress.IPv4Address | None = None,
    ) -> Interface:
        """Give `host` one more interface (``eth1``, ``eth2``...) on `segment`, with `address`
        (default: the segment's next free of .10, .11, ...). A host on several segments routes
        between them only where ``net.ipv4.ip_forward`` is set in it."""
        self._check_open()
        seg = self._segment(segment)
        if any(iface.segment == seg for iface in host.interfaces.values()):
            raise LabError(f"{host.name} is on segment {seg.name} already")
        chosen = self._allocate(address, set(), seg)
        iface = Interface(f"eth{len(host.interfaces)}", seg, chosen)
        port = f"w{next(_port_counter)}"  # unique in the switch; its alias says whose it is
        ip_batch(
            [
                f"link add {port} type veth peer name {iface.name} netns {host.netns}",
                f"link set {port} alias {host.name}:{iface.name}",
                f"link set {port} master {seg.bridge} up",
            ],
            netns=self.switch,
        )
        ip_batch(
            [f"addr add {chosen}/{seg.subnet.prefixlen} dev {iface.name}",
             f"link set {iface.name} up"],
            netns=host.netns,
        )  # fmt: skip
        host.interfaces[iface.name] = iface
        return iface

    def add_routes(
        self, routes: Mapping[Host, Sequence[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]]]
    ) -> None:
        """Route, in each host, each network through a gateway address: one ``ip`` per host,
        all at once."""
        self._check_open()
        ip_batches(
            {
                host.netns: [f"route add {net} via {via}" for net, via in pairs]
                for host, pairs in routes.items()
                if pairs
            }
        )

    def _allocate(
        self,
        address: str | ipaddress.IPv4Address | None,
        pending: set[ipaddress.IPv4Address],
        segment: Segment,
    ) -> ipaddress.IPv4Address:
        subnet = segment.subnet
        taken = self._taken(segment) | pending
        if address is None:
            first = subnet.network_address + _FIRST_AUTO_HOST
            for candidate in subnet.hosts():
                if candidate >= first and candidate not in taken:
                    return candidate
            raise LabError(f"no free address left in {subnet}")
        chosen = ipaddress.IPv4Address(address)
        if chosen not in subnet or chosen in (subnet.network_address, subnet.broadcast_address):
            raise ValueError(
                f"{chosen} is not a host address of segment {segment.name}'s subnet {subnet}"
            )
        if chosen in taken:
            raise LabError(f"{chosen} is taken in lab {self.prefix}")
        return chosen

    def _taken(self, segment: Segment) -> set[ipaddress.IPv4Address]:
        on = {
            iface.address
            for host in self.hosts.values()
            for iface in host.interfaces.values()
            if iface.segment == segment
        }
        return on | self._spares[segment.name]

    def spare_address(self, segment: str | Segment | None = None) -> ipaddress.IPv4Address:
        """An address of `segment` (default: the lab's first) that no host has and none will
        get (for a VIP): from the top down, .254, .253, ..."""
        seg = self._segment(segment)
        taken = self._taken(seg)
        candidate = seg.subnet.broadcast_address - 1
        while candidate in taken:
            candidate -= 1
        if int(candidate) - int(seg.subnet.network_address) < _FIRST_AUTO_HOST:
            raise LabError(f"no spare address left in {seg.subnet}")
        self._spares[seg.name].add(candidate)
        return candidate

    # -- processes

    def _track(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self._procs.append(proc)
        self._logs[proc.pid] = log

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path:
        """The file a process started by `Host.popen` writes its stdout and stderr to."""
        return self._logs[proc.pid]

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 25) -> str:
        """The last lines of a process's output, for an error message."""
        path = self.log_of(proc)
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            return f"--- {path}: unreadable ({exc.strerror})"
        return f"--- last lines of {path}:\n" + "\n".join(text.splitlines()[-lines:])

    # -- teardown

    def close(self) -> None:
        """Stop the processes, delete the namespaces, check that nothing with the prefix
        remains (`LabError` if something does). Idempotent."""
        if self._closed:
            return
        with contextlib.ExitStack() as steps:  # callbacks run last first, each one regardless
            steps.callback(self._finish)
            steps.callback(self._delete_namespaces)
            steps.callback(kill_all_in, listed(self.prefix))
            steps.callback(self._stop_tracked)
            steps.callback(self._close_sockets)

    def _close_sockets(self) -> None:
        # A socket keeps its namespace (and the veth in it) alive after the name is deleted.
        for sock in list(self._sockets):
            sock.close()

    def _stop_tracked(self) -> None:
        running = [proc for proc in self._procs if proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        self._procs.clear()

    def _delete_namespaces(self) -> None:
        if names := listed(self.prefix):
            ip_batch((f"netns del {name}" for name in names), force=True)

    def _finish(self) -> None:
        remaining = lab_namespaces(self.prefix)
        if self._lock_fd >= 0:
            # Left there if namespaces remain, so that the next lab sweeps them.
            unlock(self.prefix, self._lock_fd, remove=not remaining)
            self._lock_fd = -1
        if remaining:
            raise LabError(f"lab {self.prefix}: namespaces remain: {', '.join(remaining)}")
        self._closed = True
        with contextlib.suppress(ValueError):
            _open_labs.remove(self)
        if self._own_logdir:
            shutil.rmtree(self.logdir, ignore_errors=True)


@atexit.register
def _close_open_labs() -> None:
    # Labs nobody closed (no `with`, or the interpreter leaving in a hurry), newest first.
    while _open_labs:
        lab = _open_labs.pop()
        try:
            lab.close()
        except Exception as exc:  # keep closing the others
            print(f"ras.lab: could not close {lab!r}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Hosts


def _check_name(what: str, name: str) -> None:
    if not _HOST_RE.fullmatch(name) or name == _SWITCH:
        raise ValueError(
            f"{what} name {name!r}: 1 to 13 of a-z, 0-9 and '-', not starting with '-', "
            f"not {_SWITCH!r}"
        )


class Host:
    """One host of a `Lab`: network namespace `netns`, interface `iface` (``eth0``), `address`
    on it; `interfaces` has every interface, further ones added by `Lab.attach`."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        netns: str,
        address: ipaddress.IPv4Address,
        segment: Segment | None = None,
    ) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns
        self.address = address
        self.iface = IFACE
        self.interfaces = {IFACE: Interface(IFACE, segment or lab.segment, address)}

    def address_on(self, segment: str | Segment) -> ipaddress.IPv4Address:
        """This host's address on `segment` (`LabError` if it is not on it)."""
        name = getattr(segment, "name", segment)
        for iface in self.interfaces.values():
            if iface.segment.name == name:
                return iface.address
        raise LabError(f"{self.name} is not on segment {name}")

    def iface_on(self, segment: str | Segment) -> str:
        """The name of this host's interface on `segment`."""
        name = getattr(segment, "name", segment)
        for iface in self.interfaces.values():
            if iface.segment.name == name:
                return iface.name
        raise LabError(f"{self.name} is not on segment {name}")

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, address={str(self.address)!r})"

    def popen(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in this host, stdout and stderr appended to `log` (default: a file in
        the lab's `logdir`, see `Lab.log_of`). `env` is added to this process's environment.
        The lab stops the process when it closes."""
        self.lab._check_open()
        if log is None:
            log = self.lab.logdir / f"{self.name}-{Path(argv[0]).name}-{next(_log_counter)}.log"
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.netns, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_env(env),
                    # Out of the caller's process group: a terminal's Ctrl-C reaches the caller
                    # only, which then stops its processes in order.
                    start_new_session=True,
                )
        except OSError as exc:
            raise LabError(f"cannot start {shlex.join(argv)} in {self.netns}: {exc}") from exc
        self.lab._track(proc, log)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in this host to completion, output captured as text; `CommandError` if
        `check` and it fails, `LabError` if it outlives `timeout`."""
        self.lab._check_open()
        done = run(
            ["ip", "netns", "exec", self.netns, *argv],
            input=input,
            check=False,
            timeout=timeout,
            env=env,
        )
        if check and done.returncode != 0:
            raise CommandError(argv, done.returncode, done.stdout, done.stderr)
        return done

    def iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``iptables ARGS`` in this host (e.g. ``"-A", "INPUT", ..., "-j", "DROP"``)."""
        return self.run(["iptables", "-w", "5", *args], check=check)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call `fn` in a short-lived thread inside this host's network namespace.

        What `fn` creates there (sockets) stays there; what it looks up by interface name
        (``socket.if_nametoindex("eth0")``) is this host's. Not ``/sys/class/net``.
        """
        self.lab._check_open()
        return call_in_netns(self.netns, fn, *args, **kwargs)

    def socket(
        self,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket made inside this host, for the calling process (trio:
        ``trio.socket.from_stdlib_socket``). The lab closes it when it closes."""
        try:
            sock = self.call(socket.socket, family, type, proto)
        except OSError as exc:
            raise LabError(f"cannot make a socket in {self.netns}: {exc}") from exc
        self.lab._sockets.add(sock)
        return sock

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a per-namespace sysctl (``net.*``) in this host, e.g.
        ``sysctl("net.ipv4.ip_nonlocal_bind", 1)``."""
        sysctl_path(key)  # ValueError before any thread
        self.call(write_sysctls, {key: str(value)})

    def read_sysctl(self, key: str) -> str:
        """The value of a per-namespace sysctl (``net.*``) in this host."""
        path = sysctl_path(key)
        return self.call(path.read_text).strip()

    def addresses(self, iface: str = IFACE) -> list[str]:
        """The IPv4 addresses on `iface` now (a VIP shows up here while this host holds it)."""
        self.lab._check_open()
        out = run(["ip", "-n", self.netns, "-j", "-4", "addr", "show", "dev", iface]).stdout
        return [
            info["local"]
            for link in json.loads(out or "[]")
            for info in link.get("addr_info", [])
            if info.get("family") == "inet"
        ]
