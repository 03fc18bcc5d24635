"""Report queries: the time range and grouping of ``GET /api/reports`` and ``ras admin
report`` (the data is ``ras.broker.history``). Pure: the clock is an argument."""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["DEFAULT_SPAN_S", "parse_time", "report_range"]

DEFAULT_SPAN_S = 86400.0
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float) -> float:
    """A Unix time from ISO 8601 (``2026-12-03``, ``2026-12-03T14:00``, with or without an
    offset; UTC when none), a Unix time in seconds, or an age (``90m``, ``24h``, ``7d``: that
    long before ``now``). ValueError says what it takes."""
    text = text.strip()
    relative = _RELATIVE.match(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give an ISO 8601 date or time (UTC unless it has an "
            "offset), a Unix time, or an age such as 24h or 7d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def report_range(start: str, end: str, now: float) -> tuple[float, float]:
    """``(from, to)`` of a report: ``to`` defaults to now, ``from`` to a day before ``to``.
    ValueError (naming ``from`` or ``to``) if either is not a time or they are reversed."""
    try:
        stop = parse_time(end, now) if end else now
    except ValueError as exc:
        raise ValueError(f"to: {exc}") from None
    try:
        begin = parse_time(start, now) if start else stop - DEFAULT_SPAN_S
    except ValueError as exc:
        raise ValueError(f"from: {exc}") from None
    if begin >= stop:
        raise ValueError("from: must be before to")
    return begin, stop
