"""``ras broker``, ``ras gateway``, ``ras agent``: run a daemon from its config file."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import ssl
import sys
from pathlib import Path

from ras.agents.agent import Agent
from ras.agents.config import AgentConfig
from ras.broker.config import BrokerConfig
from ras.broker.passwords import hash_password
from ras.broker.server import GC_THRESHOLDS, Broker
from ras.broker.state import open_store
from ras.broker.store import UserRecord
from ras.broker.totp import new_secret, otpauth_uri
from ras.cli.common import (
    EXIT,
    add_metrics_flag,
    daemon_options,
    exit_code_for,
    fail,
    load_config,
    report_error,
    run_daemon,
)
from ras.errors import ConfigError, PKIError, RasError
from ras.gateway.config import GatewayConfig, GatewayMode
from ras.gateway.server import Gateway
from ras.net.workers import run_workers, tune_gc
from ras.pki import peer_name, split_chain

__all__ = ["add_parsers", "check_identity", "read_secret"]

_FMT = argparse.RawDescriptionHelpFormatter


def read_secret(path: Path | None, prompt: str, env_value: str | None = None) -> str:
    """A password from a file (first line), the environment, or an interactive prompt."""
    if path is not None:
        try:
            return path.read_text().splitlines()[0] if path.stat().st_size else ""
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the password file: {exc.strerror}") from None
    if env_value is not None:
        return env_value
    if not sys.stdin.isatty():
        raise ConfigError("no password given: use --password-file or a terminal")
    return getpass.getpass(prompt)


def check_identity(cert_file: Path | None, name: str, *, config_path: Path) -> None:
    """A gateway or agent is who its farm certificate names: the broker refuses any other
    ``name``, so a mismatch is a configuration error at start, not a retry loop later."""
    if cert_file is None:
        return
    try:
        data = cert_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{cert_file}: cannot read the certificate: {exc.strerror}") from None
    try:
        leaf = split_chain(data)[0]
        cert_name = peer_name(ssl.PEM_cert_to_DER_cert(leaf.decode("ascii")))
    except (ValueError, PKIError) as exc:
        raise ConfigError(f"{cert_file}: {exc}") from None
    if cert_name != name:
        raise ConfigError(
            f"{config_path}: key 'name': {name!r} differs from the name in its certificate "
            f"{cert_file}, {cert_name!r}: the broker accepts only the certificate's name "
            f"(set name = {cert_name!r}, or issue a certificate for {name!r})"
        )


def _run_broker(args: argparse.Namespace) -> int:
    try:
        cfg = daemon_options(args, load_config(BrokerConfig, args.config))
        store = open_store(cfg)
        broker = Broker(cfg, store)
    except RasError as exc:
        return fail(exc)
    tune_gc(GC_THRESHOLDS)
    try:
        return run_daemon(broker.serve)
    finally:
        store.close()


def _broker_users(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(BrokerConfig, args.config)
        store = open_store(cfg)
        try:
            if args.action == "user-add":
                password = read_secret(args.password_file, f"password for {args.name}: ")
                if not password:
                    raise RasError("refusing an empty password")
                secret = new_secret() if args.totp else None
                store.put_user(
                    UserRecord(args.name, hash_password(password), tuple(args.group), True, secret)
                )
                print(f"user {args.name} saved")
                if secret is not None:
                    # The enrolment secret is shown once, to the administrator who asked.
                    print("second factor: add this to an authenticator app (TOTP, 30 s, 6 digits):")
                    print(otpauth_uri(secret, args.name))
            elif args.action == "user-del":
                if not store.delete_user(args.name):
                    raise RasError(f"no user {args.name!r}")
                print(f"user {args.name} deleted")
            else:
                for user in store.list_users():
                    groups = ",".join(user.groups) or "-"
                    print(
                        f"{user.name}\tgroups={groups}\tenabled={'yes' if user.enabled else 'no'}"
                    )
        finally:
            store.close()
    except RasError as exc:
        report_error(f"{args.action}: {exc}")
        return exit_code_for(exc) if exit_code_for(exc) != EXIT.FAILED else EXIT.USAGE
    return EXIT.OK


def _run_gateway(args: argparse.Namespace) -> int:
    try:
        config = daemon_options(args, load_config(GatewayConfig, args.config))
        if args.workers is not None:
            config = dataclasses.replace(config, workers=args.workers)
        if config.mode is GatewayMode.NORMAL:
            check_identity(config.cert_file, config.name, config_path=args.config)
        gateway = Gateway(config)
    except RasError as exc:
        return fail(exc)
    tune_gc()
    # SIGTERM drains (drain_timeout_s), a second one stops at once; SIGHUP rereads the
    # public certificate files. With several workers, the parent passes signals on.
    return run_workers(
        config.workers,
        lambda: run_daemon(gateway.serve, stop=gateway.stop, reload=gateway.reload_certificate),
    )


def _run_agent(args: argparse.Namespace) -> int:
    if args.simulate is not None:
        return _simulate_agents(args)
    try:
        config = daemon_options(args, load_config(AgentConfig, args.config))
        check_identity(config.cert_file, config.name, config_path=args.config)
        agent = Agent(config)
    except RasError as exc:
        return fail(exc)

    async def main() -> None:
        await agent.run()

    return run_daemon(main)


def _simulate_agents(args: argparse.Namespace) -> int:
    """``ras agent --simulate N``: N simulated hosts in this process (ras.agents.simulate)."""
    from ras.agents.simulate import Profile, simulate

    if args.simulate < 1:
        report_error("--simulate needs at least 1 host")
        return EXIT.USAGE
    try:
        cfg = load_config(AgentConfig, args.config)
    except RasError as exc:
        return fail(exc)

    async def main() -> None:
        await simulate(
            cfg,
            args.simulate,
            profile=Profile(args.profile),
            seed=args.seed,
            pki_dir=args.pki_dir,
            cache_dir=args.cert_cache,
            ramp_s=args.ramp_s,
        )

    return run_daemon(main)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    broker = sub.add_parser(
        "broker",
        formatter_class=_FMT,
        help="run the Connection Broker, or manage its built-in users",
        description="Run the Connection Broker: gateways and agents connect to it over mutual TLS "
        "(ports gateway_port and agent_port of the config). With an action, manage the built-in "
        "user store instead.",
        epilog="examples:\n  ras broker --config state/broker.toml\n"
        "  ras broker --config state/broker.toml user-add alice --group users --password-file pw\n"
        "  ras broker --config state/broker.toml user-list",
    )
    broker.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/ras/broker.toml"),
        help="broker config file (default: /etc/ras/broker.toml)",
    )
    add_metrics_flag(broker)
    broker.set_defaults(func=_run_broker)
    actions = broker.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser("user-add", help="add or update a built-in user (scrypt hash)")
    add.add_argument("name")
    add.add_argument("--group", action="append", default=[], help="a group (repeatable)")
    add.add_argument(
        "--totp",
        action="store_true",
        help="require a TOTP code too; prints the otpauth:// URI to enrol, once",
    )
    add.add_argument(
        "--password-file", type=Path, help="read the password from this file's first line"
    )
    add.set_defaults(func=_broker_users)
    rm = actions.add_parser("user-del", help="delete a built-in user")
    rm.add_argument("name")
    rm.set_defaults(func=_broker_users)
    ls = actions.add_parser("user-list", help="list the built-in users")
    ls.set_defaults(func=_broker_users)

    gateway = sub.add_parser(
        "gateway",
        formatter_class=_FMT,
        help="run the Secure Gateway",
        description="Run the Secure Gateway: clients connect on its plain and TLS ports; it relays "
        "their requests to the broker and opens tunnels only to the hosts of redeemed tickets "
        '(or, with mode = "forwarding", passes every connection on to the next gateway). '
        "SIGTERM drains: no new connections, open tunnels run on up to drain_timeout_s; a second "
        "SIGTERM stops at once. SIGHUP rereads the public certificate files.",
        epilog="example:\n  ras gateway --config state/gateway.toml",
    )
    gateway.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/ras/gateway.toml"),
        help="gateway config file (default: /etc/ras/gateway.toml)",
    )
    gateway.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the ports through SO_REUSEPORT, one trio loop each; "
        "about one per core (default: the config's workers, 1)",
    )
    add_metrics_flag(gateway)
    gateway.set_defaults(func=_run_gateway)

    agent = sub.add_parser(
        "agent",
        formatter_class=_FMT,
        help="run a host agent",
        description="Run a host agent on an RDP host: it registers the host with the broker over "
        "mutual TLS (its certificate must name the host) and reports CPU, memory and sessions.",
        epilog="examples:\n  ras agent --config state/agent.toml\n"
        "  ras agent --config state/agent.toml --simulate 500 --profile random --seed 7",
    )
    agent.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/ras/agent.toml"),
        help="agent config file (default: /etc/ras/agent.toml)",
    )
    sim = agent.add_argument_group(
        "simulation",
        "Run N simulated hosts (for scale tests and demos) instead of this host's agent: each "
        "is named <name>-0001... after the config's name, gets its own farm certificate (issued "
        "from the CA key in --pki-dir, cached), its own mTLS connection, and reports scripted "
        "load. The rest of the config (broker, kind, max_sessions) is shared.",
    )
    sim.add_argument("--simulate", type=int, metavar="N", help="run N simulated agents")
    sim.add_argument(
        "--profile",
        choices=["steady", "busy", "random"],
        default="steady",
        help="the scripted load (default: steady)",
    )
    sim.add_argument("--seed", type=int, default=0, help="seed of the load scripts (default: 0)")
    sim.add_argument(
        "--pki-dir",
        type=Path,
        help="the farm PKI directory holding ca.pem and ca.key (default: ca_file's folder)",
    )
    sim.add_argument(
        "--cert-cache",
        type=Path,
        help="where the simulated hosts' certificates are kept (default: <pki-dir>/simulated)",
    )
    sim.add_argument(
        "--ramp-s",
        type=float,
        help="spread the agents' connections over this many seconds (default: N/250)",
    )
    add_metrics_flag(agent)
    agent.set_defaults(func=_run_agent)
