"""Run sibling tasks until the first one ends, without leaking exception groups."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["race"]


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
