"""What every ``ras`` subcommand shares: logging, exit codes, running a daemon under trio."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from ras.config import load
from ras.errors import AuthError, ConfigError, PKIError, RasError, TransportError
from ras.logs import JsonFormatter, LineFormatter
from ras.ops.config import LogFormat, MetricsConfig, parse_listen

__all__ = [
    "EXIT",
    "add_metrics_flag",
    "daemon_options",
    "exit_code_for",
    "fail",
    "load_config",
    "report_error",
    "run_daemon",
    "set_prog",
    "setup_logging",
]

T = TypeVar("T")


class EXIT:
    """Exit codes of the ``ras`` command (also in ``ras --help``)."""

    OK = 0
    FAILED = 1  # a runtime failure (port in use, a peer broke the protocol, ...)
    USAGE = 2  # bad arguments, a bad or missing config file, bad certificate files
    AUTH = 3  # authentication refused
    UNREACHABLE = 4  # the gateway/broker could not be reached or stopped answering
    INTERRUPTED = 130

    HELP = """exit codes:
  0  done (a daemon: stopped by SIGINT/SIGTERM after draining)
  1  runtime failure
  2  bad arguments or configuration (the message names the file and key)
  3  authentication refused
  4  the gateway or broker could not be reached"""


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr, one line per event, every field escaped (:class:`ras.logs.LineFormatter`,
    or with ``fmt="json"`` one JSON object per line, :class:`ras.logs.JsonFormatter`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LineFormatter())
    root = logging.getLogger("ras")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


_prog = ["ras"]


def set_prog(name: str) -> None:
    """What error lines start with: ``ras gateway`` for ``ras gateway ...`` (``ras main``
    sets it from the subcommand)."""
    _prog[0] = name


def report_error(what: object) -> None:
    """An error for the person at the terminal: one line on stderr, ``ras gateway: ...``,
    the same before the daemon starts and after (the message says what failed: the file,
    the address, the field)."""
    print(f"{_prog[0]}: {what}", file=sys.stderr)


def fail(exc: RasError) -> int:
    """Report ``exc`` and return its exit code."""
    report_error(exc)
    return exit_code_for(exc)


def load_config(cls: type[T], path: Path) -> T:
    return load(cls, path)


def add_metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default host 127.0.0.1; "
        "overrides [metrics] port and listen_host of the config; another host needs the "
        "config's TLS and allow keys: docs/operations.md)",
    )


def daemon_options(args: argparse.Namespace, config: T) -> T:
    """A daemon's config with ``--metrics`` applied, and its ``log_format`` in force unless
    ``--log-format`` said otherwise. ConfigError names the flag."""
    listen = getattr(args, "metrics", None)
    if listen:
        try:
            host, port = parse_listen(listen)
            base = getattr(config, "metrics", None) or MetricsConfig()
            metrics = dataclasses.replace(base, listen_host=host, port=port)
        except ValueError as exc:  # Invalid too
            raise ConfigError(f"--metrics {listen}: {exc}") from None
        config = dataclasses.replace(config, metrics=metrics)  # type: ignore[type-var]
    configured = getattr(config, "log_format", LogFormat.TEXT)
    if getattr(args, "log_format", None) is None and configured is LogFormat.JSON:
        setup_logging(args.log_level, "json")
    return config


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, ConfigError | PKIError):
        return EXIT.USAGE
    if isinstance(exc, AuthError):
        return EXIT.AUTH
    if isinstance(exc, TransportError):
        return EXIT.UNREACHABLE
    return EXIT.FAILED


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        ras = [e for e in exc.exceptions if isinstance(_leaf(e), RasError)]
        return _leaf(ras[0]) if ras else exc
    return exc


def run_daemon(
    main: Callable[[], Awaitable[None]],
    *,
    stop: Callable[[], None] | None = None,
    reload: Callable[[], object] | None = None,
) -> int:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives (then cancel it). A RasError
    becomes a one-line message and its exit code; anything else is a bug and propagates.

    With ``stop``, the first SIGINT/SIGTERM calls it instead (a graceful drain: ``main``
    returns when done) and a second one cancels. With ``reload``, SIGHUP calls it."""
    log = logging.getLogger("ras")

    async def runner() -> None:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                wanted = {signal.SIGINT, signal.SIGTERM}
                if reload is not None:
                    wanted.add(signal.SIGHUP)
                draining = False
                with trio.open_signal_receiver(*wanted) as signals:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP and reload is not None:
                            log.info("reloading signal=%s", name)
                            reload()
                            continue
                        if stop is not None and not draining:
                            log.info("draining signal=%s (again to stop at once)", name)
                            draining = True
                            stop()
                            continue
                        log.info("stopping signal=%s", name)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            await main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(runner)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, RasError):
            return fail(leaf)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT.INTERRUPTED
        raise
    return EXIT.OK
