"""``ras halb``: run a HALB node, or ask a running one for its status, drain a gateway, reload."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ras.cli.common import EXIT, add_metrics_flag, daemon_options, fail, load_config, run_daemon
from ras.errors import RasError
from ras.halb.config import HalbConfig
from ras.halb.daemon import Halb

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    try:
        config = daemon_options(args, load_config(HalbConfig, args.config))
        halb = Halb(config, config_path=args.config)
    except RasError as exc:
        return fail(exc)
    return run_daemon(halb.serve)


def _admin(args: argparse.Namespace) -> int:
    base = f"http://{args.admin}"
    if args.action == "status":
        req = urllib.request.Request(f"{base}/status")
    elif args.action == "reload":
        req = urllib.request.Request(f"{base}/reload", method="POST", data=b"")
    else:
        req = urllib.request.Request(
            f"{base}/gateways/{args.gateway}/{args.action}", method="POST", data=b""
        )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        print(f"ras halb {args.action}: {json.load(exc).get('error', exc.reason)}", file=sys.stderr)
        return EXIT.USAGE if exc.code in (400, 404) else EXIT.FAILED
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"ras halb {args.action}: cannot reach the admin port {args.admin}: {exc}",
            file=sys.stderr,
        )
        return EXIT.UNREACHABLE
    if args.json or args.action != "status":
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT.OK
    print(
        f"{answer['name']}: {answer['state']}  vips={','.join(answer['vips'])}  "
        f"holding={'yes' if answer['holding_vips'] else 'no'}  master={answer['master'] or '-'}  "
        f"priority={answer['priority']}{_base(answer)}  connections={answer['connections']}"
    )
    for gw in answer["gateways"]:
        health = "up" if gw["healthy"] else "down"
        drain = " draining" if gw["draining"] else ""
        err = f"  ({gw['last_error']})" if gw["last_error"] and not gw["healthy"] else ""
        counts = f"active={gw['active']} total={gw['total']}"
        print(f"  {gw['name']:<16} {gw['host']:<16} {health}{drain}  {counts}{err}")
    return EXIT.OK


def _base(answer: dict[str, object]) -> str:
    """The configured priority, where gateway tracking has lowered the advertised one."""
    base = answer.get("base_priority", answer["priority"])
    return "" if base == answer["priority"] else f" (no healthy gateway; {base} with one)"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    halb = sub.add_parser(
        "halb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a HALB node (VRRP virtual IP + TCP balancing over the gateways)",
        description="Run a High Availability Load Balancer node: the nodes elect a master by "
        "VRRPv3 (RFC 5798, compatible with keepalived), which holds the virtual IPs and balances "
        "TCP connections over the healthy gateways with a PROXY v2 header. While a node has no "
        "healthy gateway it advertises no_gateway_priority (default 1), so the VIPs go to a node "
        "that has one. Needs CAP_NET_ADMIN and CAP_NET_RAW. With an action, talk to a running "
        "node's admin port instead.",
        epilog="examples:\n  ras halb --config /etc/ras/halb.toml\n  ras halb status\n"
        "  ras halb drain gw1\n  ras halb reload",
    )
    halb.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/ras/halb.toml"),
        help="HALB config file (default: /etc/ras/halb.toml)",
    )
    add_metrics_flag(halb)
    halb.set_defaults(func=_run)
    actions = halb.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (
        ("status", "state, VIPs and gateways of a running node"),
        ("reload", "re-read the gateway list from the config file"),
        ("drain", "send no new connections to a gateway"),
        ("undrain", "send connections to a drained gateway again"),
    ):
        p = actions.add_parser(name, help=text)
        if name in ("drain", "undrain"):
            p.add_argument("gateway", help="gateway name")
        p.add_argument(
            "--admin",
            default="127.0.0.1:31006",
            metavar="HOST:PORT",
            help="the node's admin port (default: 127.0.0.1:31006)",
        )
        p.add_argument("--json", action="store_true", help="print the raw JSON")
        p.set_defaults(func=_admin)
