"""``ras admin report``: sessions, their time and logins over a time range, per host, gateway,
resource, user or day (``GET /api/reports``; docs/operations.md, "Reports")."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from ras.cli.adminclient import AdminClient

__all__ = ["add_report_parser", "render"]

GROUPS = ("host", "gateway", "resource", "user", "day")
RESULTS = ("ok", "failed", "throttled", "unavailable")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration(seconds: float | None) -> str:
    """``h:mm:ss`` ("-" for none)."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def render(report: dict[str, Any]) -> str:
    """The report as a table (what ``--json`` gives as the API's JSON)."""
    by = str(report["by"])
    with_logins = by in ("gateway", "user", "day")
    head = [by, "sessions", "users", "ended", "session time", "mean"]
    head += [f"logins {r}" for r in RESULTS] if with_logins else []
    rows = []
    for row in report["rows"]:
        logins = row.get("logins", {})
        line = [str(row[by]), str(row["sessions"]), str(row["users"]), str(row["ended"])]
        line += [duration(row["session_s"]), duration(row["mean_s"])]
        line += [str(logins.get(r, 0)) for r in RESULTS] if with_logins else []
        rows.append(line)
    totals = report["totals"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = [f"from {_when(report['from'])} to {_when(report['to'])}, by {by}"]
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if not rows:
        out.append("(nothing in this range)")
    logins = ", ".join(f"{r} {totals['logins'].get(r, 0)}" for r in RESULTS)
    out.append(
        f"total: {totals['sessions']} sessions, {totals['users']} users, {totals['ended']} "
        f"ended, session time {duration(totals['session_s'])} (mean "
        f"{duration(totals['mean_s'])}); logins: {logins}"
    )
    brokers = report.get("brokers")
    if brokers is not None:
        text = f"brokers: {', '.join(brokers['included']) or '-'}"
        missing = brokers["missing"]
        if missing:
            text += "; NOT INCLUDED: " + ", ".join(f"{m['name']} ({m['why']})" for m in missing)
        out.append(text)
    return "\n".join(out)


def _report(api: AdminClient, a: argparse.Namespace) -> Any:
    query = {"by": a.by, "from": a.since or "", "to": a.until or ""}
    result = api.request("GET", "reports", query=query)
    if a.json:
        return result
    print(render(result))
    return None


def add_report_parser(sub: Any) -> None:
    text = (
        "sessions launched and logins over a time range, per host, gateway, resource, user "
        "or day (UTC), from what the broker recorded"
    )
    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help=text,
        description=text + ". FROM and TO take ISO 8601 dates or times (UTC unless they "
        "carry an offset), Unix times, or ages such as 24h and 7d. Per group: the sessions "
        "launched, distinct users, how many of those sessions have ended and their total and "
        "mean time (h:mm:ss). With several brokers the report covers every broker's history; "
        "its last line names the brokers included and any it could not ask.",
        epilog="examples:\n  ras admin report --by gateway --from 7d\n"
        "  ras admin report --by day --from 2026-12-01 --to 2026-12-08",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--by", choices=GROUPS, default="host", help="group by (default: host)")
    p.add_argument("--from", dest="since", metavar="FROM", help="start (default: TO - 24h)")
    p.add_argument("--to", dest="until", metavar="TO", help="end (default: now)")
    p.set_defaults(command_fn=_report, kind_path="reports")
