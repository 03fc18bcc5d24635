"""``ras client``: log in through a gateway, list resources, launch one."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import trio

from ras.cli.common import EXIT, exit_code_for, load_config, run_daemon
from ras.cli.daemons import read_secret
from ras.client.config import ClientConfig
from ras.client.forwarder import serve_forwarder
from ras.client.session import ClientSession
from ras.config import from_mapping
from ras.errors import ConfigError, RasError
from ras.protocol import AuthChallenge, Mode

__all__ = ["add_parser"]


def _split_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _profile(args: argparse.Namespace) -> ClientConfig:
    base: dict[str, object] = {}
    source = "command line"
    if args.config is not None:
        cfg = load_config(ClientConfig, args.config)
        base = {f: getattr(cfg, f) for f in ClientConfig.__dataclass_fields__}
        base = {k: (str(v) if isinstance(v, Path) else v) for k, v in base.items() if v is not None}
        source = str(args.config)
    if args.server:
        base["server_host"], base["server_port"] = _split_hostport(args.server, "--server")
    if args.mode:
        base["mode"] = args.mode
    if args.ca_file:
        base["ca_file"] = str(args.ca_file.resolve())
    if args.user:
        base["username"] = args.user
    if "server_host" not in base:
        raise ConfigError("no gateway given: use --config PROFILE or --server HOST:PORT")
    return from_mapping(ClientConfig, base, source=source)


async def _ask(challenge: AuthChallenge) -> str:
    def prompt() -> str:
        if challenge.echo:
            return input(f"{challenge.prompt} ")
        import getpass

        return getpass.getpass(f"{challenge.prompt} ")

    return await trio.to_thread.run_sync(prompt)


async def _login(cfg: ClientConfig, args: argparse.Namespace) -> ClientSession:
    if not cfg.username:
        raise ConfigError("no user name: set username in the profile or use --user")
    password = read_secret(
        args.password_file, f"password for {cfg.username}: ", os.environ.get("RAS_PASSWORD")
    )
    session = await ClientSession.connect(cfg)
    try:
        user = await session.authenticate(cfg.username, password, _ask)
    except BaseException:
        await session.aclose()
        raise
    print(
        f"logged in as {user.user} through {cfg.server_host}:{cfg.server_port} ({cfg.mode})",
        file=sys.stderr,
    )
    return session


def _list(args: argparse.Namespace) -> int:
    async def main() -> None:
        cfg = _profile(args)
        async with await _login(cfg, args) as session:
            for res in await session.list_resources():
                print(f"{res.id}\t{res.kind}\t{res.name}")

    return _run(main)


def _launch(args: argparse.Namespace) -> int:
    result = {"code": EXIT.OK}

    async def main() -> None:
        cfg = _profile(args)
        resource = args.resource or cfg.resource
        if not resource:
            raise ConfigError("no resource: name one, or set resource in the profile")
        listen = (cfg.listen_host, cfg.listen_port)
        if args.listen:
            listen = _split_hostport(args.listen, "--listen")
        async with await _login(cfg, args) as session, trio.open_nursery() as nursery:
            nursery.start_soon(session.keepalive)
            host, port = await nursery.start(
                lambda task_status: serve_forwarder(
                    session, resource, host=listen[0], port=listen[1], task_status=task_status
                )
            )
            print(f"resource {resource}: point an RDP client at {host}:{port}", file=sys.stderr)
            if args.listen:
                return  # serve until interrupted
            rdp = shutil.which(args.rdp_command)
            if rdp is None:
                raise ConfigError(f"{args.rdp_command} not found: install it, or use --listen")
            command = [rdp, f"/v:{host}:{port}", *args.passthrough]
            proc = await trio.run_process(command, check=False)
            result["code"] = proc.returncode
            nursery.cancel_scope.cancel()

    code = _run(main)
    return code if code != EXIT.OK else result["code"]


def _run(main: object) -> int:
    try:
        return run_daemon(main)  # type: ignore[arg-type]
    except RasError as exc:  # raised before trio started
        print(f"ras client: {exc}", file=sys.stderr)
        return exit_code_for(exc)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    client = sub.add_parser(
        "client",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="log in through a gateway, list and launch resources",
        description="The RAS client. A profile (--config) names the gateway, the mode and the "
        "user; options override it. The password comes from --password-file, $RAS_PASSWORD or "
        "a prompt; second-factor prompts are asked on the terminal.",
        epilog="examples:\n  ras client --config state/client.toml list\n"
        "  ras client --config state/client.toml launch desktop --listen 127.0.0.1:13389\n"
        "  ras client --config state/client.toml launch desktop -- /u:alice /cert:ignore",
    )
    client.add_argument("--config", type=Path, help="connection profile (TOML)")
    client.add_argument("--server", help="gateway HOST:PORT (overrides the profile)")
    client.add_argument("--mode", choices=[m.value for m in Mode], help="connection mode")
    client.add_argument("--ca-file", type=Path, help="certificate (or CA) to trust for the gateway")
    client.add_argument("--user", help="user name")
    client.add_argument("--password-file", type=Path, help="read the password from this file")
    actions = client.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="list the resources published to you")
    ls.set_defaults(func=_list)
    launch = actions.add_parser(
        "launch",
        usage="ras client launch [-h] [--listen HOST:PORT] [--rdp-command CMD] [resource] "
        "[-- RDP_ARG ...]",
        help="launch a resource: run an RDP client through a local forwarder",
        description="Start a local forwarder for the resource, then the RDP client pointed at "
        "it (/v:127.0.0.1:PORT is added); everything after -- goes to the RDP client as is. "
        "Exits with the RDP client's exit code. With --listen, only the forwarder runs.",
    )
    launch.add_argument("resource", nargs="?", help="resource id (default: the profile's)")
    launch.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="only open the local forwarder here and serve until interrupted",
    )
    launch.add_argument(
        "--rdp-command", default="xfreerdp", help="RDP client to start (default: xfreerdp)"
    )
    launch.set_defaults(func=_launch, takes_passthrough=True)
