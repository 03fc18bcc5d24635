"""``ras lab``: a farm from a topology manifest in network namespaces (ras/lab/supervisor.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ras.cli.common import EXIT, fail
from ras.errors import RasError
from ras.lab.manifest import load_manifest, scenario_names
from ras.lab.netns import lab_unavailable
from ras.lab.supervisor import down, exec_argv, labs, status_text, up, up_detached

__all__ = ["add_parser"]


def _ras() -> str:
    """How the printed commands call ras: plain `ras` if that is this one, else its path."""
    script = Path(sys.executable).parent / "ras"
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and Path(folder, "ras").exists():
            return "ras" if Path(folder, "ras").resolve() == script.resolve() else str(script)
    return str(script)


def _usable() -> int | None:
    reason = lab_unavailable()
    if reason is not None:
        print(f"ras lab: {reason}", file=sys.stderr)
        return EXIT.FAILED
    return None


def _up(args: argparse.Namespace) -> int:
    if (code := _usable()) is not None:
        return code
    try:
        if args.detach:
            return up_detached(args.manifest, name=args.name, ras=_ras())
        return up(args.manifest, name=args.name, ras=_ras())
    except RasError as exc:
        return fail(exc)


def _down(args: argparse.Namespace) -> int:
    try:
        return down(args.name)
    except RasError as exc:
        return fail(exc)


def _list(args: argparse.Namespace) -> int:
    running = labs()
    print("labs:" if running else "labs: none up")
    for state in running:
        how = (
            "up"
            if state.ready and state.alive()
            else "starting"
            if state.alive()
            else ("supervisor gone: ras lab down " + state.name)
        )
        print(f"  {state.name:<20} {how:<10} {len(state.hosts):>2} hosts  {state.source}")
    print("scenarios (ras lab up NAME):")
    for name in scenario_names():
        print(f"  {name:<20} {load_manifest(name).summary}")
    return EXIT.OK


def _status(args: argparse.Namespace) -> int:
    try:
        print(status_text(args.name))
    except RasError as exc:
        return fail(exc)
    return EXIT.OK


def _exec(args: argparse.Namespace) -> int:
    try:
        argv = exec_argv(args.lab, args.host, args.passthrough)
    except RasError as exc:
        return fail(exc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # the command's exit code is ours


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = sub.add_parser(
        "lab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="build a farm from a topology manifest in network namespaces (root)",
        description="A whole farm on one machine as on a network: hosts in network "
        "namespaces, segments joined by firewalls that pass only the flows the manifest "
        "allows, every daemon a process with its own certificate and config, a demo desktop "
        "on every RDP host. MANIFEST is a TOML file or a shipped scenario (ras lab list). "
        "docs/lab.md has the format and the scenarios.",
        epilog="examples:\n  ras lab up halb-pair\n  ras lab exec client -- ping -c1 10.213.2.254"
        "\n  ras lab status\n  ras lab down halb-pair",
    )
    actions = lab.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "up", help="build the lab and hold it until Ctrl-C or `ras lab down` (or --detach)"
    )
    p.add_argument("manifest", metavar="MANIFEST|SCENARIO")
    p.add_argument("--name", help="the lab's name (default: the manifest's)")
    p.add_argument(
        "-d", "--detach", action="store_true", help="run the lab in the background; return when up"
    )
    p.set_defaults(func=_up)
    p = actions.add_parser("down", help="stop a lab (also after its supervisor crashed)")
    p.add_argument("name", nargs="?", help="default: the only lab")
    p.set_defaults(func=_down)
    p = actions.add_parser("list", help="the labs up, and the shipped scenarios")
    p.set_defaults(func=_list)
    p = actions.add_parser("status", help="a lab's hosts, daemons, VIPs and firewall drops")
    p.add_argument("name", nargs="?", help="default: the only lab")
    p.set_defaults(func=_status)
    p = actions.add_parser("exec", help="run a command in a lab host: exec HOST -- CMD ...")
    p.add_argument("host")
    p.add_argument("--lab", help="the lab (default: the only lab)")
    p.set_defaults(func=_exec, takes_passthrough=True)
