"""The admin API's reports: ``GET /api/reports?from=&to=&by=`` (docs/admin-api.md).

``GET /api/reports`` is the farm's report: with several brokers on etcd, this broker's figures
and every other broker's, merged (``ras.broker.farmreport``). ``GET /api/reports/part`` is
this broker's own figures in mergeable form, what another broker of the farm asks for with
its farm certificate (an admin may ask too).

Sessions launched and logins over a time range, grouped by host, gateway, resource, user or
day, from what the broker recorded (``ras.broker.history``). ``from`` and ``to`` take ISO 8601
dates and times (UTC unless they carry an offset), Unix times or ages (``24h``, ``7d``); the
default is the last 24 hours, by host.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from ras.broker.admin_api import ApiRequest, Route, bad_field
from ras.broker.history import GROUPS
from ras.ops.reports import report_range

if TYPE_CHECKING:
    from ras.broker.farmreport import FarmReports

__all__ = ["PART", "report_routes"]

PART = ("reports", "part")  # asked by the farm's other brokers


def report_routes(reports: FarmReports) -> list[Route]:
    def arguments(request: ApiRequest) -> tuple[float, float, str]:
        query = request.query
        unknown = set(query) - {"from", "to", "by"}
        if unknown:
            raise bad_field(sorted(unknown)[0], "unknown parameter (known: from, to, by)")
        by = query.get("by") or "host"
        if by not in GROUPS:
            raise bad_field("by", f"{by!r} is not one of: {', '.join(GROUPS)}")
        try:
            start, end = report_range(query.get("from", ""), query.get("to", ""), time.time())
        except ValueError as exc:
            name, _, why = str(exc).partition(": ")
            raise bad_field(name, why) from None
        return start, end, by

    async def report(request: ApiRequest) -> tuple[int, Any]:
        return 200, await reports.report(*arguments(request))

    async def part(request: ApiRequest) -> tuple[int, Any]:
        return 200, await trio.to_thread.run_sync(reports.history.part, *arguments(request))

    return [Route("GET", ("reports",), report), Route("GET", PART, part)]
