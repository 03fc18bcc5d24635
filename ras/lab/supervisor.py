"""``ras lab``: a manifest's farm as a long-lived lab, owned by one supervisor process.

Theory of operation
-------------------
``ras lab up`` is the supervisor: it builds the lab (:func:`ras.lab.deployment.deploy`), writes
what the other commands need into ``/run/ras-lab/<name>/state.json``, prints how to log in,
and waits for SIGINT, SIGTERM or SIGHUP; then it stops every process, deletes every namespace
(:meth:`ras.lab.Lab.close`) and removes the state directory. With ``--detach`` a child does
all that in a session of its own, and the command returns once the lab is up.

The other commands find a lab by its state file and never hold it:

- ``list`` and ``status`` read the state files and ``/proc``; ``status`` also asks each
  namespace who holds the VIPs and what the firewalls dropped;
- ``exec`` execs ``ip netns exec <namespace> CMD``: the command runs in the host, with the
  caller's terminal;
- ``down`` sends the supervisor SIGTERM and waits for it to finish; when the supervisor is
  gone (it crashed, or was SIGKILLed), what it left is removed as `ras.lab` sweeps a dead
  lab's namespaces (its lock file is free), and the state directory with it. ``down`` of a
  lab that is not there is not an error: it is clean afterwards either way.

The supervisor's identity is its pid and its start time (``/proc/<pid>/stat``), so a reused
pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ras.errors import ConfigError
from ras.lab._system import NETNS_DIR, listed, run, sweep_stale
from ras.lab.deployment import PUBLIC_NAME, RDP_USER, USER, ManifestFarm, deploy
from ras.lab.manifest import PORTS, ClientMode, Manifest, Role, load_manifest
from ras.lab.netns import Lab, LabError
from ras.lab.network import DROP_COMMENT

__all__ = [
    "STATE_ROOT",
    "LabState",
    "down",
    "exec_argv",
    "find",
    "labs",
    "status_text",
    "up",
    "up_detached",
]

STATE_ROOT = Path("/run/ras-lab")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_STOP_WAIT_S = 30.0
_UP_WAIT_S = 180.0
LISTEN = "127.0.0.1:13389"


@dataclass
class LabState:
    """What ``state.json`` holds about a lab."""

    name: str
    source: str
    summary: str = ""
    pid: int = 0
    pid_start: int = 0
    started: float = 0.0
    ready: bool = False
    prefix: str = ""
    workdir: str = ""
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    vips: dict[str, dict[str, Any]] = field(default_factory=dict)
    daemons: dict[str, int] = field(default_factory=dict)  # name -> pid
    login: str = ""

    @property
    def directory(self) -> Path:
        return STATE_ROOT / self.name

    def alive(self) -> bool:
        """Whether this lab's supervisor still runs."""
        return self.pid > 0 and _start_time(self.pid) == self.pid_start

    def netns(self, host: str) -> str:
        if host not in self.hosts:
            raise ConfigError(
                f"lab {self.name} has no host {host!r} (hosts: {', '.join(self.hosts)})"
            )
        return str(self.hosts[host]["netns"])


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return -1
    return -1 if fields[0] == "Z" else int(fields[19])


def _state_file(name: str) -> Path:
    return STATE_ROOT / name / "state.json"


def _write(state: LabState) -> None:
    path = _state_file(state.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)


def _read(name: str) -> LabState | None:
    try:
        data = json.loads(_state_file(name).read_text())
    except (OSError, ValueError):
        return None
    return LabState(**data)


def labs() -> list[LabState]:
    """Every lab with a state file, up or left behind by a crash."""
    try:
        names = sorted(p.name for p in STATE_ROOT.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    return [s for s in map(_read, names) if s is not None]


def find(name: str | None) -> LabState:
    """The lab called ``name``; without a name, the only lab there is."""
    if name is not None:
        state = _read(name)
        if state is None:
            raise ConfigError(f"no lab {name!r} (ras lab list shows the labs)")
        return state
    found = labs()
    if len(found) != 1:
        which = ", ".join(s.name for s in found) or "none"
        raise ConfigError(f"{len(found)} labs are up ({which}): name one")
    return found[0]


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"lab name {name!r}: 1 to 40 of a-z, 0-9 and '-'")
    return name


# ---------------------------------------------------------------------------------------------
# up


class _Stop(Exception):
    """A signal asked the supervisor to stop."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.signal(s, _raise_stop) for s in wanted}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _claim(name: str, source: str) -> LabState:
    """The state directory of a new lab ``name``: refused while another supervisor holds it,
    taken over (after cleaning up) from a dead one."""
    old = _read(name)
    if old is not None and old.alive() and old.pid != os.getpid():
        raise ConfigError(f"lab {name} is up (supervisor pid {old.pid}): ras lab down {name}")
    if old is not None:
        _clean(old)
    directory = STATE_ROOT / name
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("work", "logs"):
        shutil.rmtree(directory / stale, ignore_errors=True)
    state = LabState(name, source, pid=os.getpid(), pid_start=_start_time(os.getpid()))
    state.started = time.time()
    _write(state)
    return state


def up(
    what: str,
    *,
    name: str | None = None,
    ras: str = "ras",
    out: Any = sys.stderr,
) -> int:
    """Build the lab of manifest or scenario ``what`` and hold it until a signal; 0 when it
    was torn down cleanly. ``ras`` is how the printed commands call ras."""
    manifest = load_manifest(what)
    state = _claim(check_name(name or manifest.name), what)
    state.summary = manifest.summary
    lab: Lab | None = None
    code = 0
    try:
        with _stop_on_signals():
            try:
                first = next(iter(manifest.segments))
                lab = Lab(
                    subnet=str(manifest.segments[first]),
                    segment=first,
                    logdir=state.directory / "logs",
                )
                state.prefix = lab.prefix
                _write(state)  # from here, down finds the namespaces even if we die
                print(f"ras lab: building {state.name} ({lab.prefix}-*) ...", file=out, flush=True)
                farm = deploy(manifest, lab, state.directory / "work")
                _describe(state, farm, ras)
                state.ready = True
                _write(state)
                print(state.login, file=out)
                print(f"Stop with Ctrl-C, or {ras} lab down {state.name} from another shell.",
                      file=out, flush=True)  # fmt: skip
                while True:
                    signal.pause()
            except _Stop as stop:
                print(f"ras lab: {stop}: tearing {state.name} down", file=out, flush=True)
            except (AssertionError, LabError, ConfigError) as exc:
                print(f"ras lab: {state.name} did not come up: {exc}", file=out, flush=True)
                code = 1
            finally:
                with _ignoring_signals():
                    if lab is not None:
                        lab.close()
    finally:
        with _ignoring_signals():
            shutil.rmtree(state.directory, ignore_errors=True)
    print(f"ras lab: {state.name} is down", file=out, flush=True)
    return code


@contextlib.contextmanager
def _ignoring_signals() -> Iterator[None]:
    """Teardown runs to its end: a second Ctrl-C does not leave namespaces behind."""
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in wanted}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def up_detached(what: str, *, name: str | None, ras: str, out: Any = sys.stderr) -> int:
    """``ras lab up --detach``: the supervisor in a session of its own, its output in the
    state directory; return once the lab is up (0) or failed (1, with the log's tail)."""
    manifest = load_manifest(what)  # errors here, at the terminal, not in the log
    lab_name = check_name(name or manifest.name)
    old = _read(lab_name)
    if old is not None and old.alive():
        raise ConfigError(
            f"lab {lab_name} is up (supervisor pid {old.pid}): ras lab down {lab_name}"
        )
    directory = STATE_ROOT / lab_name
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "supervisor.log"
    argv = [sys.executable, "-m", "ras", "lab", "up", what, "--name", lab_name]
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + _UP_WAIT_S
    while time.monotonic() < deadline:
        state = _read(lab_name)
        if state is not None and state.ready and state.pid == proc.pid:
            print(state.login, file=out)
            print(f"Stop with {ras} lab down {lab_name} (the supervisor is pid {proc.pid}, "
                  f"its log {log}).", file=out)  # fmt: skip
            return 0
        if proc.poll() is not None:
            tail = log.read_text(errors="replace") if log.exists() else ""
            print(f"ras lab: the supervisor exited {proc.returncode}:\n{tail}", file=out)
            return 1
        time.sleep(0.1)
    proc.terminate()
    print(f"ras lab: {lab_name} not up in {_UP_WAIT_S:g} s (see {log})", file=out)
    return 1


def _describe(state: LabState, farm: ManifestFarm, ras: str) -> None:
    m = farm.manifest
    state.workdir = str(farm.tmp)
    state.hosts = {
        name: {
            "netns": host.netns,
            "roles": [r.value for r in m.hosts[name].roles],
            "site": m.hosts[name].site,
            "interfaces": {
                i.name: {"segment": i.segment.name, "address": str(i.address)}
                for i in host.interfaces.values()
            },
            "daemons": farm.daemons_of.get(name, []),
        }
        for name, host in farm.hosts.items()
    }
    state.vips = {
        name: {"address": vip.address, "nodes": list(vip.ifaces), "ifaces": dict(vip.ifaces)}
        for name, vip in farm.vips.items()
    }
    state.daemons = {name: proc.pid for name, proc in farm.procs.items()}
    state.login = login_text(state.name, m, farm, ras)


def login_text(name: str, m: Manifest, farm: ManifestFarm, ras: str) -> str:
    """What ``ras lab up`` prints: the hosts, the users, and the commands that log in."""
    work = farm.tmp
    lines = [f"RAS lab {name} is up: {m.summary or m.source}"]
    for host_name, host in farm.hosts.items():
        spec = m.hosts[host_name]
        where = ", ".join(f"{i.address} ({i.segment.name})" for i in host.interfaces.values())
        roles = "+".join(r.value for r in spec.roles)
        lines.append(f"  {host_name:<13} {roles:<22} {where}")
    for vip_name, vip in farm.vips.items():
        lines.append(f"  {vip_name:<13} {'VIP':<22} {vip.address} on {' | '.join(vip.ifaces)}")
    lines += [
        f"  farm user {USER}, password in {farm.password_file}",
        f"  RDP user  {RDP_USER} (on every RDP host), password in {farm.rdp_password_file}",
        f"  the gateways' certificate: {farm.public_cert} (for {PUBLIC_NAME})",
    ]
    client = m.having(Role.CLIENT)[0]
    pw = f"--password-file {farm.password_file}"
    login = f'/u:{RDP_USER} /p:"$(cat {farm.rdp_password_file})" /cert:ignore'
    at = f"{ras} lab exec --lab {name} {client.name} --"
    modes = [mode for mode in client.modes if mode is not ClientMode.RDP]
    if modes:
        mode = ClientMode.GATEWAY_SSL if ClientMode.GATEWAY_SSL in modes else modes[0]
        lines += [
            f"Log in from host {client.name}, in another shell ({mode.value} mode; the other "
            f"modes' configs: {work}/{client.name}-MODE.toml, modes "
            + ", ".join(m.value for m in client.modes) + "):",
            f"  {at} {ras} client --config {farm.client_config(mode)} {pw} launch desktop "
            f"--listen {LISTEN}",
            f"  {at} xfreerdp /v:{LISTEN} {login}",
        ]  # fmt: skip
    if ClientMode.RDP in client.modes:
        rdp = f"{farm.address(client.servers[0])}:{PORTS['gateway_rdp']}"
        lines += [
            "The RDP port, with an .rdp file (routing token):",
            f"  {at} {ras} client --config {farm.client_config(ClientMode.RDP)} {pw} rdp-file "
            f"desktop -o {work}/desktop.rdp --rdp-address {rdp}",
            f"  {at} xfreerdp {work}/desktop.rdp {login}",
        ]
    lines += [
        f"More: {ras} lab status {name}; {ras} lab exec --lab {name} HOST -- CMD; logs in "
        f"{STATE_ROOT / name / 'logs'}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# down, status, exec


def down(name: str | None, *, out: Any = sys.stderr) -> int:
    """Stop lab ``name`` (its supervisor tears it down), or clean up after its crash."""
    state = find(name)
    if state.alive():
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_WAIT_S
        while state.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if state.alive():
            print(f"ras lab: the supervisor {state.pid} did not stop: killing it", file=out)
            os.kill(state.pid, signal.SIGKILL)
            while state.alive():
                time.sleep(0.05)
    else:
        print(f"ras lab: {state.name}'s supervisor is gone: cleaning up after it", file=out)
    left = _clean(state)
    if left:
        print(f"ras lab: namespaces remain: {', '.join(left)}", file=out)
        return 1
    print(f"ras lab: {state.name} is down", file=out)
    return 0


def _clean(state: LabState) -> list[str]:
    """Remove what a dead supervisor left: its namespaces (the sweep of dead labs) and its
    state directory. Returns the namespaces that remain."""
    if state.prefix:
        sweep_stale()  # its lock file is free: its namespaces go, processes and all
    left = listed(state.prefix) if state.prefix else []
    if not left:
        shutil.rmtree(state.directory, ignore_errors=True)
    return left


def exec_argv(name: str | None, host: str, command: list[str]) -> list[str]:
    """The argv that runs ``command`` in ``host`` of lab ``name`` (a shell without one)."""
    state = find(name)
    netns = state.netns(host)
    if not (NETNS_DIR / netns).exists():
        raise ConfigError(f"lab {state.name}'s host {host} is gone (ras lab down {state.name})")
    return ["ip", "netns", "exec", netns, *(command or [os.environ.get("SHELL", "/bin/sh")])]


def status_text(name: str | None) -> str:
    """``ras lab status``: the supervisor, each host's daemons (running or not), who holds each
    VIP, what each firewall dropped."""
    state = find(name)
    if not state.alive():
        return (
            f"lab {state.name}: the supervisor (pid {state.pid}) is gone: ras lab down {state.name}"
        )
    if not state.ready:
        return f"lab {state.name}: starting (supervisor pid {state.pid})"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started))
    lines = [
        f"lab {state.name} ({state.source}): up since {since}, supervisor pid {state.pid}, "
        f"namespaces {state.prefix}-*"
    ]
    for host, info in state.hosts.items():
        where = ", ".join(f"{i['address']} ({i['segment']})" for i in info["interfaces"].values())
        lines.append(f"  {host:<13} {'+'.join(info['roles']):<22} {where}")
        for daemon in info["daemons"]:
            pid = state.daemons.get(daemon, 0)
            running = "running" if _start_time(pid) >= 0 else "not running"
            lines.append(f"      {daemon:<18} pid {pid:<8} {running}")
        if "firewall" in info["roles"]:
            lines.append(f"      dropped {_dropped(info['netns'])} packets no rule allows")
    for vip, info in state.vips.items():
        holders = [
            node
            for node in info["nodes"]
            if info["address"] in _addresses(state.hosts[node]["netns"], info["ifaces"][node])
        ]
        lines.append(f"  VIP {vip} {info['address']}: held by {', '.join(holders) or 'nobody'}")
    return "\n".join(lines)


def _dropped(netns: str) -> str:
    done = run(["ip", "netns", "exec", netns, "iptables", "-w", "5", "-L", "FORWARD", "-v",
                "-n", "-x"], check=False)  # fmt: skip
    for line in done.stdout.splitlines():
        if DROP_COMMENT in line:
            return line.split()[0]
    return "?"


def _addresses(netns: str, iface: str) -> list[str]:
    done = run(["ip", "-n", netns, "-j", "-4", "addr", "show", "dev", iface], check=False)
    try:
        links = json.loads(done.stdout or "[]")
    except ValueError:
        return []
    return [a.get("local", "") for link in links for a in link.get("addr_info", [])]
