"""Fuzz targets for every parser a stranger can reach, and their kept corpus.

One module per target, each with ``fuzz_one(data: bytes) -> None``: it feeds ``data`` to the
real codec (whole, and split in pieces chosen from the data itself, so a run is reproducible)
and checks what came out. The codec's documented refusal (``RemoteProtocolError``, or the
admin API's ``ApiError`` with a 4xx status) is a normal outcome; any other exception, or a
broken invariant (an ``AssertionError``), is a crash. ``DICTIONARY`` lists tokens that help the
engine build valid-looking inputs.

The engine is atheris (libFuzzer, coverage-guided): ``./dev fuzz [TARGET] [--seconds N]`` runs
it (``python -m fuzz``); ``tests/test_fuzz.py`` replays the corpus and makes a short run of each
target inside ``./dev test``. ``corpus/<target>/`` holds the kept seeds: golden samples from the
codec tests, and every input that once crashed a target (named ``crash-<what>``), so that it is
replayed by every test run. This module imports no codec: the engine must import the targets
after it has started instrumenting.
"""

from __future__ import annotations

import importlib
import random
import zlib
from collections.abc import Coroutine, Iterator
from itertools import accumulate
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["CORPUS", "TARGETS", "chunks", "cuts", "load", "run_sync"]

TARGETS = (
    "control",
    "control_body",
    "proxy",
    "x224",
    "rdcleanpath",
    "vrrp",
    "admin_http",
    "admin_json",
    "gateway_http",
    "portal_http",
)
CORPUS = Path(__file__).parent / "corpus"

T = TypeVar("T")


def load(name: str) -> ModuleType:
    """The target module ``name`` (one of ``TARGETS``)."""
    if name not in TARGETS:
        raise ValueError(f"no fuzz target {name!r} (targets: {', '.join(TARGETS)})")
    return importlib.import_module(f"{__name__}.{name}")


def chunks(data: bytes) -> Iterator[bytes]:
    """``data`` cut in pieces whose sizes are drawn from a generator seeded by the data
    itself: one byte at a time (for short data), small pieces, or large ones."""
    rng = random.Random(zlib.crc32(data))
    style = rng.randrange(3)
    if style == 0 and len(data) > 256:
        style = 1
    largest = 1 if style == 0 else 17 if style == 1 else max(1, len(data))
    pos = 0
    while pos < len(data):
        size = rng.randint(1, largest)
        yield data[pos : pos + size]
        pos += size


def cuts(data: bytes, *marks: int) -> list[int]:
    """Where to cut ``data`` to try its prefixes: the piece boundaries of ``chunks(data)``
    (at most 48 of them, evenly spread) and the given ``marks`` that fall inside it."""
    ends = list(accumulate(len(piece) for piece in chunks(data)))
    if len(ends) > 48:
        ends = ends[:: len(ends) // 48 + 1] + ends[-1:]
    return sorted({*ends, *(m for m in marks if 0 <= m <= len(data))})


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (its streams are in memory) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine waited for something: the harness cannot drive it")
