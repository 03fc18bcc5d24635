"""``ras farm``: a whole farm on one machine, on loopback, with embedded defaults."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from pathlib import Path

import trio

from ras.broker.server import GC_THRESHOLDS
from ras.cli.common import exit_code_for, run_daemon
from ras.errors import ConfigError, RasError
from ras.farm import FarmPorts, FarmState, init_farm, run_farm
from ras.net.workers import tune_gc

__all__ = ["add_parser"]

log = logging.getLogger("ras.farm")


def _rdp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdp: {text!r} is not HOST:PORT")
    return host, int(port)


def _init(args: argparse.Namespace) -> FarmState:
    host, port = _rdp(args.rdp)
    ports = FarmPorts(
        gateway_plain=args.gateway_port,
        gateway_tls=args.gateway_tls_port,
        broker_gateways=args.broker_port,
        broker_agents=args.agent_port,
        broker_admin=args.admin_port,
    )
    return init_farm(args.state_dir, rdp_host=host, rdp_port=port, ports=ports)


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
    return f"""
RAS farm is up (state in {rel}/):
  gateway  {at("gateway_plain")} (plain)  {at("gateway_tls")} (TLS)
           its self-signed certificate: {rel}/pki/gateway-public.pem
  broker   {at("broker_gateways")} (gateways, mTLS)  {at("broker_agents")} (agents, mTLS)
  admin    https://{at("broker_admin")} (the admin API, for `ras admin`; an admin
           certificate: {rel}/pki/admin.pem; admin user: admin, password in {rel}/admin.password)
  user     demo, password in {rel}/demo.password
Next, in another shell:
  {ras} client --config {rel}/client.toml {pw} list
  {ras} client --config {rel}/client.toml {pw} launch desktop --listen 127.0.0.1:13389
  xfreerdp /v:127.0.0.1:13389 /u:<user on the RDP host> /cert:ignore
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
        description="A whole farm in one process on 127.0.0.1. The first run makes the state "
        "directory: the farm CA and the daemons' certificates, the gateway's self-signed "
        "certificate, config files, the SQLite state and a demo user; later runs reuse it. "
        "The agent reports the RDP host given by --rdp (xrdp on this machine by default). "
        "Ports are written into the config files on the first run; later runs use the files.",
        epilog="example:\n  ras farm up --state-dir ./state --rdp 127.0.0.1:3389",
    )
    actions = farm.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, text in (
        ("up", _up, "create the state if needed, then run the farm"),
        ("init", _init_only, "only create the state directory"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, default=Path("state"), help="default: ./state")
        p.add_argument(
            "--rdp",
            default="127.0.0.1:3389",
            metavar="HOST:PORT",
            help="the RDP host the farm's agent serves (default: 127.0.0.1:3389)",
        )
        p.add_argument(
            "--gateway-port",
            type=int,
            default=FarmPorts().gateway_plain,
            help=f"gateway plain port (default: {FarmPorts().gateway_plain})",
        )
        p.add_argument(
            "--gateway-tls-port",
            type=int,
            default=FarmPorts().gateway_tls,
            help=f"gateway TLS port (default: {FarmPorts().gateway_tls})",
        )
        p.add_argument(
            "--broker-port",
            type=int,
            default=FarmPorts().broker_gateways,
            help=f"broker port for gateways (default: {FarmPorts().broker_gateways})",
        )
        p.add_argument(
            "--agent-port",
            type=int,
            default=FarmPorts().broker_agents,
            help=f"broker port for agents (default: {FarmPorts().broker_agents})",
        )
        p.add_argument(
            "--admin-port",
            type=int,
            default=FarmPorts().broker_admin,
            help=f"broker admin API port, HTTPS (default: {FarmPorts().broker_admin})",
        )
        p.set_defaults(func=func)
