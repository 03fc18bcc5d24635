"""How many log lines a farm writes when nobody uses it: per process, per level, per minute.

Brings up a shipped lab scenario (default ``dmz-two-firewalls``: a HALB pair in front of two
forwarding gateways, in front of two normal gateways, a broker and an RDP host) with every
daemon at its default settings (``--log-level info``, default health intervals), lets it
settle, then counts the lines each process writes during a window, by the timestamps the lines
carry, and tears the lab down. Needs root (network namespaces) and the lab's peers.

    flock /tmp/ras-heavy.lock .venv/bin/python benchmarks/log_volume.py --json out.json

It prints INFO lines per minute for each process and for the farm, and the most frequent INFO
messages (their first two words), which is where to look when a figure is high.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

LAB_ROOT = Path("/run/ras-lab")


def _stamp(line: str) -> float | None:
    head = line.split(" ", 1)[0]
    try:
        when = dt.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return when.replace(tzinfo=dt.UTC).timestamp()


def count(logs: Path, start: float, end: float) -> dict[str, object]:
    per_process: dict[str, collections.Counter[str]] = {}
    messages: collections.Counter[str] = collections.Counter()
    for path in sorted(logs.glob("*.log")):
        levels: collections.Counter[str] = collections.Counter()
        for line in path.read_text(errors="replace").splitlines():
            when = _stamp(line)
            if when is None or not start <= when < end:
                continue
            parts = line.split(" ", 4)
            if len(parts) < 4:
                continue
            levels[parts[2]] += 1
            if parts[2] == "INFO" and len(parts) == 5:
                messages[" ".join(parts[4].split(" ")[:2])] += 1
            elif parts[2] == "INFO":
                messages[parts[3]] += 1
        per_process[path.stem] = levels
    minutes = (end - start) / 60
    info = {name: levels["INFO"] / minutes for name, levels in per_process.items()}
    return {
        "window_s": end - start,
        "info_per_minute": {k: round(v, 1) for k, v in sorted(info.items())},
        "info_per_minute_total": round(sum(info.values()), 1),
        "levels": {name: dict(levels) for name, levels in per_process.items()},
        "top_info": messages.most_common(12),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="dmz-two-firewalls")
    parser.add_argument("--name", default="logvol")
    parser.add_argument("--settle-s", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=120.0)
    parser.add_argument("--label", default="", help="what this run measures (kept in the JSON)")
    parser.add_argument("--json", type=Path, help="append the result to this file (a JSON list)")
    args = parser.parse_args()
    ras = [sys.executable, "-m", "ras"]
    subprocess.run([*ras, "lab", "up", args.scenario, "--name", args.name, "--detach"], check=True)
    try:
        time.sleep(args.settle_s)
        start = time.time()
        time.sleep(args.window_s)
        end = time.time()
        result = count(LAB_ROOT / args.name / "logs", start, end)
    finally:
        subprocess.run([*ras, "lab", "down", args.name], check=False)
    now = dt.datetime.now(dt.UTC).isoformat()
    result.update(scenario=args.scenario, label=args.label, when=now)
    print(f"{args.scenario}: INFO lines per minute over {args.window_s:.0f} s, by process")
    for name, rate in result["info_per_minute"].items():  # type: ignore[attr-defined]
        print(f"  {name:32} {rate:8.1f}")
    print(f"  {'total':32} {result['info_per_minute_total']:8.1f}")
    print("most frequent INFO messages:", result["top_info"])
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        runs.append(result)
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
