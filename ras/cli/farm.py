"""``ras farm``: a whole farm on one machine, on loopback, with embedded defaults."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import textwrap
from pathlib import Path

import trio

from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig
from ras.broker.server import GC_THRESHOLDS
from ras.cli.common import exit_code_for, run_daemon
from ras.config import load
from ras.errors import ConfigError, RasError
from ras.farm import FarmPorts, FarmState, init_farm, run_farm
from ras.gateway.config import GatewayConfig
from ras.net.workers import tune_gc

__all__ = ["add_parser"]

log = logging.getLogger("ras.farm")


def _rdp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdp: {text!r} is not HOST:PORT")
    return host, int(port)


# flag -> (FarmPorts field, state file, key in it)
_PORT_FLAGS = {
    "gateway_port": ("gateway_plain", "gateway.toml", "plain_port"),
    "gateway_tls_port": ("gateway_tls", "gateway.toml", "tls_port"),
    "gateway_rdp_port": ("gateway_rdp", "gateway.toml", "rdp_port"),
    "broker_port": ("broker_gateways", "broker.toml", "gateway_port"),
    "agent_port": ("broker_agents", "broker.toml", "agent_port"),
    "admin_port": ("broker_admin", "broker.toml", "admin_port"),
    "demo_rdp_port": ("demo_rdp", "", ""),
}


def _init(args: argparse.Namespace) -> FarmState:
    given = {flag: getattr(args, flag) for flag in _PORT_FLAGS if getattr(args, flag) is not None}
    ports = FarmPorts(**{_PORT_FLAGS[flag][0]: value for flag, value in given.items()})
    rdp = None if args.rdp is None else _rdp(args.rdp)
    existed = (args.state_dir / "agent.toml").exists()
    state = init_farm(
        args.state_dir,
        rdp_host=None if rdp is None else rdp[0],
        rdp_port=3389 if rdp is None else rdp[1],
        ports=ports,
    )
    if existed:
        _refuse_conflicts(state, given, rdp)
    return state


def _refuse_conflicts(state: FarmState, given: dict[str, int], rdp: tuple[str, int] | None) -> None:
    """Flags that an existing state already settles differently: refused, never ignored. The
    files are read as the daemons read them (a key left out is its default)."""
    wrong: list[str] = []
    gateway = load(GatewayConfig, state.gateway_toml)
    configs = {"gateway.toml": gateway, "broker.toml": load(BrokerConfig, state.broker_toml)}
    for flag, value in given.items():
        _, name, key = _PORT_FLAGS[flag]
        if not name:  # --demo-rdp-port: the demo host's port is the agent's RDP port
            current = state.demo_rdp_port()
            if current is not None and current != value:
                wrong.append(f"--demo-rdp-port {value}: the farm's demo RDP host is on {current}")
            continue
        current = getattr(configs[name], key)
        if key == "rdp_port" and not gateway.rdp_lb_enabled:
            wrong.append(f"--gateway-rdp-port {value}: {name} has no RDP port (rdp_lb_enabled)")
        elif current != value:
            wrong.append(f"--{flag.replace('_', '-')} {value}: {name} has {key} = {current}")
    if rdp is not None:
        agent = load(AgentConfig, state.agent_toml)
        current_rdp = (agent.rdp_host, agent.rdp_port)
        if current_rdp != rdp:
            wrong.append(
                f"--rdp {rdp[0]}:{rdp[1]}: agent.toml has rdp_host = {current_rdp[0]!r}, "
                f"rdp_port = {current_rdp[1]}"
            )
    if wrong:
        raise ConfigError(
            f"the farm in {state.directory} was made with other settings ("
            + "; ".join(wrong)
            + "): edit those files, or start a new farm with --state-dir"
        )


def _command_name() -> str:
    """How the user can run `ras` from here: plain `ras` if it is on PATH, else its path."""
    script = Path(sys.executable).parent / "ras"
    found = shutil.which("ras")
    if found is not None and Path(found).resolve() == script.resolve():
        return "ras"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _next_steps(state: FarmState, addrs: dict[str, tuple[str, int]]) -> str:
    rel = state.directory
    with contextlib.suppress(ValueError):
        rel = state.directory.relative_to(Path.cwd())

    def at(key: str) -> str:
        host, port = addrs.get(key, ("-", 0))
        return f"{host}:{port}"

    pw = f"--password-file {rel}/demo.password"
    admin = (
        f"--url https://{at('broker_admin')} --ca-file {rel}/pki/ca.pem "
        f"--cert {rel}/pki/admin.pem --key {rel}/pki/admin.key"
    )
    ras = _command_name()
    if "demo_rdp" in addrs:
        rdp_host = (
            f"  RDP host {at('demo_rdp')}, a demo desktop (its own user: demo, password in "
            f"{rel}/demo-rdp.password)\n"
        )
        rdp_login = f'/u:demo /p:"$(cat {rel}/demo-rdp.password)"'
    else:
        rdp_host = ""
        rdp_login = "/u:<a user of your RDP host>"
    if "gateway_rdp" in addrs:
        gateway_rdp = f"           {at('gateway_rdp')} (RDP: the portal's .rdp files name it)\n"
        portal_rdp = ", or Download .rdp file for your RDP client"
    else:  # a farm made before the farm's gateway had an RDP port (docs/portal.md)
        gateway_rdp = (
            f"           no RDP port: the portal offers no .rdp files (to add one, put "
            f"rdp_lb_enabled = true and rdp_port = {FarmPorts().gateway_rdp} in "
            f"{rel}/gateway.toml)\n"
        )
        portal_rdp = ""
    return f"""
RAS farm is up (state in {rel}/):
  gateway  {at("gateway_plain")} (plain)  {at("gateway_tls")} (TLS)
{gateway_rdp}           its self-signed certificate: {rel}/pki/gateway-public.pem
  broker   {at("broker_gateways")} (gateways, mTLS)  {at("broker_agents")} (agents, mTLS)
  admin    https://{at("broker_admin")} (the admin API, for `ras admin`; an admin
           certificate: {rel}/pki/admin.pem; admin user: admin, password in {rel}/admin.password)
  user     demo (the farm's), password in {rel}/demo.password
{rdp_host}The User Portal, in a browser (user demo; the certificate is self-signed):
  https://{at("gateway_tls")}/  (Open in browser{portal_rdp})
Log in to the desktop through the gateway, in another shell:
  {ras} client --config {rel}/client.toml {pw} launch desktop --listen 127.0.0.1:13389
  xfreerdp /v:127.0.0.1:13389 {rdp_login} /cert:ignore
More:
  {ras} client --config {rel}/client.toml {pw} list
  {ras} admin {admin} host list
  {ras} admin {admin} session list
Stop with Ctrl-C.
"""


def _up(args: argparse.Namespace) -> int:
    try:
        state = _init(args)
    except RasError as exc:
        print(f"ras farm: {exc}", file=sys.stderr)
        return exit_code_for(exc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(run_farm, state)
            print(_next_steps(state, addrs), file=sys.stderr, flush=True)

    tune_gc(GC_THRESHOLDS)  # the broker's: the farm's largest heap
    return run_daemon(main)


def _init_only(args: argparse.Namespace) -> int:
    try:
        state = _init(args)
    except RasError as exc:
        print(f"ras farm: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    print(f"farm state ready in {state.directory}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    farm = sub.add_parser(
        "farm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a one-machine farm (broker, gateway, agent) on loopback",
        description=textwrap.fill(
            "A whole farm in one process on 127.0.0.1. The first run makes the state "
            "directory: the farm CA and the daemons' certificates, the gateway's self-signed "
            "certificate, config files, the SQLite state and a demo user; later runs reuse it. "
            "Without --rdp the farm's RDP host is a demo desktop on this machine (Xvfb mirrored by "
            "freerdp-shadow-cli with NLA, RDP user 'demo'); with --rdp HOST:PORT, your own RDP "
            "host. The User Portal (https on the gateway's TLS port) opens a desktop in the "
            "browser or downloads an .rdp file for it: the file names the gateway's RDP port "
            "(--gateway-rdp-port), where native RDP clients come in with the file's routing token. "
            "Ports and the RDP host are written into the config files on the first run; a "
            "later run with a flag that differs from them is refused, naming the file and key.",
            78,
            break_on_hyphens=False,
        ),
        epilog="examples:\n  ras farm up\n  ras farm up --state-dir ./state2 --rdp 10.0.0.5:3389",
    )
    actions = farm.add_subparsers(dest="action", metavar="ACTION", required=True)
    defaults = FarmPorts()
    for name, func, text in (
        ("up", _up, "create the state if needed, then run the farm"),
        ("init", _init_only, "only create the state directory"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, default=Path("state"), help="default: ./state")
        p.add_argument(
            "--rdp",
            metavar="HOST:PORT",
            help="your RDP host, served by the farm's agent (default: the demo RDP host)",
        )
        for flag, what, default in (
            ("--gateway-port", "gateway plain port", defaults.gateway_plain),
            ("--gateway-tls-port", "gateway TLS port", defaults.gateway_tls),
            ("--gateway-rdp-port", "gateway RDP port, for .rdp files", defaults.gateway_rdp),
            ("--broker-port", "broker port for gateways", defaults.broker_gateways),
            ("--agent-port", "broker port for agents", defaults.broker_agents),
            ("--admin-port", "broker admin API port, HTTPS", defaults.broker_admin),
            ("--demo-rdp-port", "the demo RDP host's port", defaults.demo_rdp),
        ):
            p.add_argument(flag, type=int, metavar="PORT", help=f"{what} (default: {default})")
        p.set_defaults(func=func)
