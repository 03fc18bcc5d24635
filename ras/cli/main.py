"""The ``ras`` command: one subcommand per daemon, plus the client, the PKI and the farm."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ras import __version__
from ras.cli import admin, daemons, farm, halb, lab, pki
from ras.cli.client import add_parser as add_client
from ras.cli.common import EXIT, set_prog, setup_logging

__all__ = ["main"]

DESCRIPTION = """\
Services of a Remote Application Server farm: a Connection Broker, a Secure Gateway, host
agents and a client, speaking the RASCP control protocol (docs/protocol.md).

Start here: `ras farm up` runs a whole one-machine farm on loopback and prints what to run next.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ras",
        description=DESCRIPTION,
        epilog=EXIT.HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ras {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text (time logger LEVEL message) or one JSON object each "
        "(default: the daemon config's log_format, text)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    daemons.add_parsers(sub)
    add_client(sub)
    pki.add_parser(sub)
    farm.add_parser(sub)
    halb.add_parser(sub)
    admin.add_parser(sub)
    lab.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to a program ras starts (the RDP client), never to ras.
    passthrough: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if passthrough and not getattr(args, "takes_passthrough", False):
        parser.error("arguments after -- are only for `ras client launch`")
    args.passthrough = passthrough
    setup_logging(args.log_level, args.log_format or "text")
    set_prog(f"ras {args.command}")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
