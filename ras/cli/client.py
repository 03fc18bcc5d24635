"""``ras client``: profiles, log in through a gateway, list resources, launch one, export .rdp."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ras.cli.common import EXIT, fail, load_config, run_daemon
from ras.cli.daemons import read_secret
from ras.client.config import ClientConfig, split_hostport
from ras.client.forwarder import serve_forwarder
from ras.client.profiles import Profiles, check_name, default_path, load_profiles, save_profiles
from ras.client.programs import Program
from ras.client.rdpclient import rdp_command
from ras.client.rdpfile import render_rdp_file
from ras.client.session import ClientSession
from ras.config import from_mapping
from ras.errors import ConfigError, RasError
from ras.protocol import AuthChallenge, Mode

__all__ = ["add_parser"]
_MODES = [m.value for m in Mode if m is not Mode.WEB]  # web: the browser's, not a client's

_FIELDS = ClientConfig.__dataclass_fields__


def _hostport(text: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST`` / ``PORT`` where a default fills the gap)."""
    try:
        host, port = split_hostport(text, default_port or 0)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if port == 0:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT")
    return host, port


def _listen_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` for --listen; a bare port listens on 127.0.0.1."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return _hostport(text, "--listen")


def _as_mapping(cfg: ClientConfig) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in _FIELDS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _profiles(args: argparse.Namespace) -> Profiles:
    return load_profiles(args.profiles or default_path())


def _profile(args: argparse.Namespace) -> ClientConfig:
    """The profile to use: --config FILE, else --profile NAME (or the default profile) from
    the profiles file; then the command-line options over it."""
    base: dict[str, object] = {}
    source = "command line"
    if args.config is not None:
        base = _as_mapping(load_config(ClientConfig, args.config))
        source = str(args.config)
    else:
        profiles = _profiles(args)
        # a profile named, or the default one unless --server says where to go instead
        if args.profile is not None or (profiles.profiles and not args.server):
            base = _as_mapping(profiles.get(args.profile))
            source = f"{profiles.path} (profile {args.profile or profiles.default or '-'})"
    if args.server:
        base["server_host"], base["server_port"] = _hostport(args.server, "--server", 443)
    if args.secondary:
        base["secondary_servers"] = list(args.secondary)
    if args.mode:
        base["mode"] = args.mode
    if args.ca_file:
        base["ca_file"] = str(args.ca_file.resolve())
    if args.user:
        base["username"] = args.user
    if "server_host" not in base:
        raise ConfigError(
            "no gateway given: use --profile NAME (see 'ras client profile add'), "
            "--config FILE or --server HOST:PORT"
        )
    return from_mapping(ClientConfig, base, source=source)


async def _ask(challenge: AuthChallenge) -> str:
    def prompt() -> str:
        if challenge.echo:
            return input(f"{challenge.prompt} ")
        import getpass

        return getpass.getpass(f"{challenge.prompt} ")

    return await trio.to_thread.run_sync(prompt)


def _password(cfg: ClientConfig, args: argparse.Namespace) -> str:
    if not cfg.username:
        raise ConfigError("no user name: set username in the profile or use --user")
    return read_secret(
        args.password_file, f"password for {cfg.username}: ", os.environ.get("RAS_PASSWORD")
    )


async def _login(
    cfg: ClientConfig, args: argparse.Namespace, password: str | None = None
) -> ClientSession:
    if password is None:
        password = _password(cfg, args)
    session = await ClientSession.connect(cfg)
    try:
        user = await session.authenticate(cfg.username, password, _ask)
    except BaseException:
        await session.aclose()
        raise
    host, port = session.server
    print(f"logged in as {user.user} through {host}:{port} ({cfg.mode})", file=sys.stderr)
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
            listen = _listen_address(args.listen)
        rdp = None
        if not args.listen:
            rdp = shutil.which(args.rdp_command)
            if rdp is None:
                raise ConfigError(f"{args.rdp_command} not found: install it, or use --listen")
        password = _password(cfg, args)  # asked once: the farm's and, with SSO, the host's
        async with await _login(cfg, args, password) as session, trio.open_nursery() as nursery:
            name = await _check_published(session, resource)  # before anything listens or starts
            first = None
            if rdp is not None:  # what the launch starts and whether SSO applies, up front
                first = await session.launch(resource)
            nursery.start_soon(session.keepalive)
            host, port = await nursery.start(
                lambda task_status: serve_forwarder(
                    session,
                    resource,
                    host=listen[0],
                    port=listen[1],
                    first=first,
                    task_status=task_status,
                )
            )
            shown = f"[{host}]" if ":" in host else host
            print(f"resource {resource}: point an RDP client at {shown}:{port}", file=sys.stderr)
            if rdp is None or first is None:
                return  # --listen: serve until interrupted
            sso = None
            if first.single_sign_on and not args.no_sso:
                sso = (session.user.user if session.user else cfg.username, password)
            command = rdp_command(
                rdp, f"{shown}:{port}", Program.from_launch(first, name), args.passthrough,
                sso=sso,
            )  # fmt: skip
            if command.single_sign_on:
                print("single sign-on: the RDP host gets your farm credentials", file=sys.stderr)
            proc = await trio.run_process(command.argv, stdin=command.stdin or b"", check=False)
            result["code"] = proc.returncode
            nursery.cancel_scope.cancel()

    code = _run(main)
    return code if code != EXIT.OK else result["code"]


async def _check_published(session: ClientSession, resource: str) -> str:
    """A resource that is not published to this user is a bad argument (exit 2), told now:
    not when an RDP client connects and fails like a wrong RDP password would. Returns the
    resource's name."""
    published = await session.list_resources()
    found = next((r for r in published if r.id == resource), None)
    if found is None:
        user = session.user.user if session.user is not None else "you"
        ids = ", ".join(r.id for r in published) or "none"
        raise ConfigError(f"no resource {resource!r} is published to {user} (yours: {ids})")
    return found.name


def _rdp_file(args: argparse.Namespace) -> int:
    async def main() -> None:
        cfg = _profile(args)
        resource = args.resource or cfg.resource
        if not resource:
            raise ConfigError("no resource: name one, or set resource in the profile")
        async with await _login(cfg, args) as session:
            granted = await session.rdp_token(resource)
            gateway = session.server[0]
        host, port = (gateway, 3389)
        if args.rdp_address:
            host, port = _hostport(args.rdp_address, "--rdp-address", 3389)
        text = render_rdp_file(
            host=host, port=port, token=granted.token, username=cfg.username,
            program=Program.from_launch(granted, resource),
        )  # fmt: skip
        _write_private(args.output, text)
        hours = granted.expires_in_s / 3600
        print(
            f"wrote {args.output}: {resource} through {host}:{port}, valid for {hours:.1f} h "
            f"(open it with mstsc, or: xfreerdp {args.output} /u:USER)",
            file=sys.stderr,
        )

    return _run(main)


def _write_private(path: Path, text: str) -> None:
    """The file holds a bearer token: readable by its owner only."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None


def _profile_add(args: argparse.Namespace) -> int:
    def run() -> None:
        profiles = _profiles(args)
        name = check_name(args.name)
        if name in profiles.profiles and not args.replace:
            raise ConfigError(f"{profiles.path}: profile {name!r} exists (use --replace)")
        host, port = _hostport(args.p_server, "--server", 443)
        data: dict[str, object] = {
            "server_host": host,
            "server_port": port,
            "secondary_servers": list(args.p_secondary or ()),
            "mode": args.p_mode,
        }
        for key, value in (
            ("ca_file", args.p_ca_file and str(args.p_ca_file.resolve())),
            ("server_name", args.server_name),
            ("username", args.p_user),
            ("resource", args.resource),
        ):
            if value:
                data[key] = value
        if args.p_listen:
            data["listen_host"], data["listen_port"] = _listen_address(args.p_listen)
        profiles.profiles[name] = from_mapping(
            ClientConfig, data, source=f"profile {name!r} (command line)"
        )
        if args.default or not profiles.default:
            profiles.default = name
        save_profiles(profiles)
        print(f"profile {name} saved in {profiles.path}", file=sys.stderr)

    return _run_sync(run)


def _profile_list(args: argparse.Namespace) -> int:
    def run() -> None:
        profiles = _profiles(args)
        for name, cfg in profiles.profiles.items():
            mark = "*" if name == profiles.default else " "
            servers = ",".join(f"{h}:{p}" for h, p in cfg.servers)
            print(
                f"{mark} {name}\t{cfg.mode}\t{servers}\t{cfg.username or '-'}\t"
                f"{cfg.resource or '-'}"
            )

    return _run_sync(run)


def _profile_remove(args: argparse.Namespace) -> int:
    def run() -> None:
        profiles = _profiles(args)
        if args.name not in profiles.profiles:
            raise ConfigError(f"{profiles.path}: no profile {args.name!r}")
        del profiles.profiles[args.name]
        if profiles.default == args.name:
            profiles.default = next(iter(profiles.profiles), "")
        save_profiles(profiles)
        print(f"profile {args.name} removed from {profiles.path}", file=sys.stderr)

    return _run_sync(run)


def _run_sync(run: Callable[[], None]) -> int:
    try:
        run()
    except RasError as exc:
        return fail(exc)
    return EXIT.OK


def _run(main: Callable[[], Awaitable[None]]) -> int:
    try:
        return run_daemon(main)
    except RasError as exc:  # raised before trio started
        return fail(exc)


def _add_profile_parsers(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    profile = actions.add_parser(
        "profile",
        help="add, list or remove connection profiles",
        description="Connection profiles live in one file (--profiles, default "
        "~/.config/ras/profiles.toml). The default profile is used when no --profile, "
        "--config or --server is given.",
    )
    ops = profile.add_subparsers(dest="op", metavar="OP", required=True)
    add = ops.add_parser(
        "add",
        help="add (or --replace) a profile",
        description="Save a profile: the primary gateway (--server), secondary gateways tried "
        "in order when the ones before cannot be reached (--secondary, repeatable), the mode "
        "and the rest.",
    )
    add.add_argument("name", help="profile name (letters, digits, . _ -)")
    add.add_argument("--server", dest="p_server", required=True, metavar="HOST[:PORT]",
                     help="primary gateway (port 443 if not given)")  # fmt: skip
    add.add_argument("--secondary", dest="p_secondary", action="append", metavar="HOST[:PORT]",
                     help="a secondary gateway, tried in order (repeatable)")  # fmt: skip
    add.add_argument("--mode", dest="p_mode", choices=_MODES,
                     default=Mode.GATEWAY_SSL.value, help="mode (default gateway_ssl)")  # fmt: skip
    add.add_argument("--ca-file", dest="p_ca_file", type=Path,
                     help="certificate (or CA) to trust (TLS modes)")  # fmt: skip
    add.add_argument("--server-name", help="TLS name to check (default: each server's host)")
    add.add_argument("--user", dest="p_user", help="user name")
    add.add_argument("--resource", help="default resource for launch and rdp-file")
    add.add_argument("--listen", dest="p_listen", metavar="[HOST:]PORT",
                     help="local forwarder for launch (default 127.0.0.1:any)")  # fmt: skip
    add.add_argument("--default", action="store_true", help="make it the default profile")
    add.add_argument("--replace", action="store_true", help="replace a profile of that name")
    add.set_defaults(func=_profile_add)
    ls = ops.add_parser("list", help="list the profiles (* marks the default)")
    ls.set_defaults(func=_profile_list)
    rm = ops.add_parser("remove", help="remove a profile")
    rm.add_argument("name", help="profile name")
    rm.set_defaults(func=_profile_remove)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    client = sub.add_parser(
        "client",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="log in through a gateway, list and launch resources",
        description="The RAS client. A profile names the gateways (a primary and secondaries, "
        "tried in order), the mode and the user: --profile NAME from the profiles file "
        "(default: its default profile), or --config FILE (one profile); options override it. "
        "The password comes from --password-file, $RAS_PASSWORD or a prompt; second-factor "
        "prompts are asked on the terminal.",
        epilog="examples:\n"
        "  ras client profile add work --server gw1.example.com --secondary gw2.example.com \\\n"
        "      --ca-file farm-ca.pem --user alice --resource desktop\n"
        "  ras client list\n"
        "  ras client launch desktop --listen 13389\n"
        "  ras client launch desktop -- /u:alice /cert:ignore\n"
        "  ras client rdp-file desktop -o desktop.rdp\n"
        "  ras client --config state/client.toml list",
    )
    client.add_argument("--profiles", type=Path, metavar="PATH",
                        help="profiles file (default ~/.config/ras/profiles.toml)")  # fmt: skip
    client.add_argument("--profile", metavar="NAME", help="profile to use (default: the default)")
    client.add_argument("--config", type=Path, help="a single connection profile (TOML)")
    client.add_argument("--server", metavar="HOST[:PORT]",
                        help="gateway HOST:PORT (overrides the profile)")  # fmt: skip
    client.add_argument("--secondary", action="append", metavar="HOST[:PORT]",
                        help="secondary gateway, tried in order (repeatable)")  # fmt: skip
    client.add_argument("--mode", choices=_MODES, help="connection mode")
    client.add_argument("--ca-file", type=Path, help="certificate (or CA) to trust for the gateway")
    client.add_argument("--user", help="user name")
    client.add_argument("--password-file", type=Path, help="read the password from this file")
    actions = client.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="list the resources published to you")
    ls.set_defaults(func=_list)
    launch = actions.add_parser(
        "launch",
        usage="ras client launch [-h] [--listen [HOST:]PORT] [--rdp-command CMD] [resource] "
        "[-- RDP_ARG ...]",
        help="launch a resource: run an RDP client through a local forwarder",
        description="Start a local forwarder for the resource, then the RDP client pointed at "
        "it (/v:127.0.0.1:PORT is added); everything after -- goes to the RDP client as is. "
        "Each RDP connection to the forwarder (the RDP client's own reconnects too) gets a "
        "fresh launch and ticket. Exits with the RDP client's exit code. With --listen, only "
        "the forwarder runs. A published application, document or folder starts alone, as "
        "the host understands it (xfreerdp /shell: for xrdp hosts, /app: RemoteApp for "
        "Windows hosts). Single sign-on: where the resource allows it, xfreerdp logs in to "
        "the host with your farm user name and password (given on its standard input, never "
        "on a command line), so you type your password once.",
    )
    launch.add_argument("resource", nargs="?", help="resource id (default: the profile's)")
    launch.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        help="only open the local forwarder here (a bare port: 127.0.0.1) and serve until "
        "interrupted",
    )
    launch.add_argument(
        "--rdp-command", default="xfreerdp", help="RDP client to start (default: xfreerdp)"
    )
    launch.add_argument(
        "--no-sso",
        action="store_true",
        help="do not log in to the RDP host with your farm credentials (single sign-on is on "
        "where the resource allows it and no /u: or /p: is given to the RDP client)",
    )
    launch.set_defaults(func=_launch, takes_passthrough=True)
    rdp_file = actions.add_parser(
        "rdp-file",
        help="export an .rdp file for mstsc (the gateway's RDP port and a routing token)",
        description="Log in, ask the broker for a routing token for the resource and write an "
        ".rdp file: full address = the gateway's RDP port, loadbalanceinfo = "
        "'Cookie: msts=TOKEN'. The token is bound to you, the resource and the gateway you "
        "logged in through, and works (also for the RDP client's reconnects) until it "
        "expires. The file is a key: it is written readable by you only.",
    )
    rdp_file.add_argument("resource", nargs="?", help="resource id (default: the profile's)")
    rdp_file.add_argument("-o", "--output", type=Path, required=True, help="the .rdp file")
    rdp_file.add_argument(
        "--rdp-address",
        metavar="HOST[:PORT]",
        help="the gateway's RDP port as the RDP client reaches it (default: the gateway "
        "logged in through, port 3389)",
    )
    rdp_file.set_defaults(func=_rdp_file)
    _add_profile_parsers(actions)
