"""Task patterns: siblings until the first ends (no exception groups), reconnect loops."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import trio

from ras.errors import ConfigError, ErrorCode, PeerError, RasError

__all__ = ["fatal_refusal", "race", "reconnecting"]


async def race(*fns: Callable[[], Awaitable[object]]) -> None:
    """Run ``fns`` concurrently; when one returns or raises, cancel the others. The first
    exception (if any) is re-raised as itself, not wrapped in an ``ExceptionGroup``."""
    errors: list[BaseException] = []

    async def one(fn: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
        try:
            await fn()
        except trio.Cancelled:
            raise
        except Exception as exc:
            errors.append(exc)
        finally:
            scope.cancel()

    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(one, fn, nursery.cancel_scope)
    if errors:
        raise errors[0]


@contextlib.contextmanager
def fatal_refusal(peer: str) -> Iterator[None]:
    """Inside: the peer's FORBIDDEN answer becomes a ``ConfigError`` (which ends
    ``reconnecting``): it refuses who we are, and will refuse it again on every retry."""
    try:
        yield
    except PeerError as exc:
        if exc.code is not ErrorCode.FORBIDDEN:
            raise
        raise ConfigError(
            f"{peer} refuses us: {exc.error.message} (check name, cert_file and the port)"
        ) from None


async def reconnecting(
    session: Callable[[], Awaitable[object]],
    *,
    log: logging.Logger,
    what: str,
    max_backoff_s: float = 10.0,
    on_down: Callable[[], None] = lambda: None,
) -> None:
    """Run ``session`` (one connection's life) again and again until cancelled. After it
    fails, wait 0.5 s, doubling up to ``max_backoff_s``; a session that lasted longer than
    ``max_backoff_s`` starts the backoff over. ``on_down`` runs each time a session ends.
    A ``ConfigError`` is not retried: it ends the loop."""
    backoff = 0.5
    while True:
        started = trio.current_time()
        try:
            await session()
            reason = "closed"
        except ConfigError:
            raise  # a mistake in the configuration: retrying cannot mend it
        except (RasError, trio.TooSlowError) as exc:
            reason = str(exc) or "timed out"
        on_down()
        if trio.current_time() - started > max_backoff_s:
            backoff = 0.5
        log.warning("link down what=%s reason=%s retry_in=%.1fs", what, reason, backoff)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)
