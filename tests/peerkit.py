"""A real peer that is not installed: a skip where tests run by hand, a failure in CI.

`./dev test` installs every peer (scripts/install-peers), so a missing one in CI (the `CI`
environment variable set) is a missing install step, never a reason to skip."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["skip_or_fail", "skips"]


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI, fail it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


def skips(reason: str | None) -> bool:
    """For ``pytest.mark.skipif``: skip for ``reason`` (None: nothing missing), except under
    CI, where the test runs and fails on what is missing."""
    return reason is not None and not os.environ.get("CI")
