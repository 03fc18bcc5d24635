"""Failover benchmark: what users of a whole farm live through while a part of it crashes, with
our `ras halb` pair in front and, for comparison, keepalived + haproxy in its place.

The farm is ras/lab/farmlab.py's (broker, agent, gateways gw1..gw3 or forwarders fw1, fw2 in
front of gw1, gw2, a balancer pair halb1/halb2 holding a VIP), every daemon a real process in
its own network-namespace host; an echo server stands in for the RDP host. The failover
harness (`python -m ras.lab.failover`, in the lab's client host) keeps launching through the
VIP (a new tunnel every 20 ms, bytes echoed end to end) and holds long-lived sessions, while
this script kills one component:

- ``halb-crash``: the VIP master dies (SIGKILL of its stack, then its link down);
- ``gateway-crash``: gw1's `ras gateway` gets SIGKILL;
- ``forwarder-crash``: with 2 forwarders in front of 2 gateways, fw1 gets SIGKILL.

Each in gateway, gateway SSL and RDP-port (routing token) mode, `--repeat` times; the victim is
brought back between runs (one lab per case and front). Prints a table of medians; `--json
FILE` writes every run. Needs root, keepalived and haproxy. See benchmarks/README.md.

Every process in the lab runs the committed ``ras`` package (HEAD, checked out into a temporary
directory when the run starts), so a daemon restarted minutes later runs the same code however
the working tree changes meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ras.lab import Lab, lab_unavailable
from ras.lab.daemons import Probe, probe
from ras.lab.farmlab import (
    PLAIN_PORT,
    PUBLIC_NAME,
    RDP_PORT,
    TLS_PORT,
    USER,
    FarmLab,
    build_farm_lab,
    farm_hosts,
    start_echo_server,
)

REPO = Path(__file__).resolve().parent.parent
MODES = ("gateway", "gateway_ssl", "rdp")
FRONT_NAMES = {"ras": "ras halb", "keepalived": "keepalived+haproxy"}


@dataclass(frozen=True)
class Case:
    name: str
    shape: dict[str, int]  # build_farm_lab's gateways= / forwarders=
    fronts: tuple[str, ...]  # where the comparison applies


CASES = {
    c.name: c
    for c in (
        Case("halb-crash", {"gateways": 3, "forwarders": 0}, ("ras", "keepalived")),
        Case("gateway-crash", {"gateways": 3, "forwarders": 0}, ("ras", "keepalived")),
        Case("forwarder-crash", {"gateways": 2, "forwarders": 2}, ("ras",)),
    )
}


class BenchError(Exception):
    """The lab did not reach the state a run needs."""


def _wait(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not after {timeout:g} s")
        time.sleep(0.02)


# -- what the front sees ------------------------------------------------------------------------


def _front_sees_up(fl: FarmLab, backend: str) -> bool:
    """Whether every live balancer node counts ``backend`` as healthy (from its log)."""
    for node in fl.halbs:
        if node in fl.crashed:
            continue
        if fl.front == "ras":
            text = fl.log(node)
            up = text.rfind(f"gateway up name={backend} ")
            if up < 0 or text.rfind(f"gateway down name={backend} ") > up:
                return False
        else:  # haproxy starts with its servers up and says when one goes down or up
            text = fl.log(f"{node}-haproxy")
            for port in (PLAIN_PORT, TLS_PORT, RDP_PORT):
                server = f"Server ras-{port}/{backend} is "
                if text.rfind(server + "DOWN") > text.rfind(server + "UP"):
                    return False
    return True


def _online_count(fl: FarmLab, gateway: str) -> int:
    return fl.log("broker").count(f"gateway online name={gateway} ")


def _ready(fl: FarmLab) -> None:
    """The farm as built: halb1 alone holds the VIP, every backend is healthy on both nodes,
    the VIP serves."""
    _wait(lambda: fl.holders() == [fl.halbs[0]], f"{fl.halbs[0]} alone holds the VIP")
    for backend in fl.forwarders or fl.gateways:
        _wait(partial(_front_sees_up, fl, backend), f"the front sees {backend} up")
    _wait(lambda: probe(fl.client, fl.vip, PLAIN_PORT, 0.5) is Probe.OK, "the VIP serves")


# -- the kills ----------------------------------------------------------------------------------


def _victim(fl: FarmLab, case: str) -> str:
    return {"halb-crash": fl.master(), "gateway-crash": "gw1", "forwarder-crash": "fw1"}[case]


def _kill(fl: FarmLab, case: str, victim: str) -> None:
    if case == "halb-crash":
        fl.crash_node(victim)
    else:
        fl.kill(victim)


def _restore(fl: FarmLab, case: str, victim: str) -> None:
    """Bring the victim back as it was (a rebooted node preempts the VIP again)."""
    online = _online_count(fl, victim) if case == "gateway-crash" else 0
    fl.restart(victim)
    if case == "gateway-crash":
        _wait(lambda: _online_count(fl, victim) > online, f"{victim} online at the broker again")
    if case != "halb-crash":
        _wait(lambda: fl.serves(victim), f"{victim} serves again")
    _ready(fl)


# -- one run ------------------------------------------------------------------------------------


def _harness(fl: FarmLab, mode: str, out: Path, sessions: int) -> subprocess.Popen[bytes]:
    port = TLS_PORT if mode == "gateway_ssl" else PLAIN_PORT
    argv = [
        sys.executable, "-m", "ras.lab.failover",
        "--server", f"{fl.vip}:{port}", "--mode", mode,
        "--ca-file", str(fl.public_cert), "--server-name", PUBLIC_NAME,
        "--rdp", f"{fl.vip}:{RDP_PORT}",
        "--user", USER, "--password-file", str(fl.password_file),
        "--interval-ms", "20", "--sessions", str(sessions),
        "--json", str(out),
    ]  # fmt: skip
    return fl.client.popen(argv)


def one_run(
    fl: FarmLab, case: str, mode: str, args: argparse.Namespace, rng: random.Random, out: Path
) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    proc = _harness(fl, mode, out, args.sessions)
    try:
        time.sleep(args.warmup)  # logged in, launching, sessions held
        if proc.poll() is not None:
            raise BenchError(f"the harness exited early\n{fl.lab.log_tail(proc)}")
        if case == "halb-crash":  # any phase of the master's advert timer
            time.sleep(rng.uniform(0, 0.1))
        victim = _victim(fl, case)
        proc.send_signal(signal.SIGUSR1)  # the kill moment, just before the first SIGKILL
        _kill(fl, case, victim)
        time.sleep(args.seconds)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0 or not out.exists():
        raise BenchError(f"the harness failed ({code})\n{fl.lab.log_tail(proc)}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["victim"] = victim
    if case == "halb-crash":
        report["new_master"] = fl.master()
    started = time.monotonic()
    _restore(fl, case, victim)
    report["restore_s"] = round(time.monotonic() - started, 2)
    return report


def case_runs(
    case: Case, front: str, args: argparse.Namespace, rng: random.Random, tmp: Path
) -> list[dict[str, Any]]:
    """One lab for a case and a front; every mode `--repeat` times, the victim restored
    between runs."""
    runs: list[dict[str, Any]] = []
    logdir = None if args.logdir is None else args.logdir / f"{case.name}-{front}"
    workdir = tmp / f"{case.name}-{front}"
    workdir.mkdir()
    with Lab(logdir=logdir) as lab:
        lab.add_hosts(*farm_hosts(**case.shape))
        start_echo_server(lab.hosts["rdp"], RDP_PORT)
        built = time.monotonic()
        fl = build_farm_lab(lab, workdir, front=front, **case.shape)
        took = time.monotonic() - built
        say(args, f"{case.name} / {FRONT_NAMES[front]}: farm up in {took:.1f} s")
        _ready(fl)
        for rep in range(args.repeat):
            for mode in args.modes:
                report = one_run(fl, case.name, mode, args, rng, workdir / "report.json")
                report.update(case=case.name, front=front, rep=rep + 1)
                runs.append(report)
                say(
                    args,
                    f"  {mode:<12} run {rep + 1}/{args.repeat}: launches {report['launches']}, "
                    f"failed {report['failed']} (after settle {report['failed_after_settle']}), "
                    f"outage {report['longest_outage_s']:.3f} s, settled "
                    f"{_s(report['settled_after_s'])}, cut {report['sessions_cut']}, max "
                    f"reconnects {report['max_reconnects_per_session']}, client "
                    f"re-established {report['client_reconnects']}",
                )
                for failure in report["failures"][:3]:
                    say(args, f"      {failure}")
    return runs


# -- summary and table ---------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f} s"


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = dict.fromkeys((r["case"], r["front"], r["mode"]) for r in runs)
    for case, front, mode in keys:
        mine = [r for r in runs if (r["case"], r["front"], r["mode"]) == (case, front, mode)]
        settled = [r["settled_after_s"] for r in mine if r["settled_after_s"] is not None]
        rows.append(
            {
                "case": case,
                "front": front,
                "mode": mode,
                "runs": len(mine),
                "launches_median": _median([r["launches"] for r in mine]),
                "failed_median": _median([r["failed"] for r in mine]),
                "failed_max": max(r["failed"] for r in mine),
                "failed_after_settle_total": sum(r["failed_after_settle"] for r in mine),
                "longest_outage_s_median": _median([r["longest_outage_s"] for r in mine]),
                "longest_outage_s_max": max(r["longest_outage_s"] for r in mine),
                "settled_after_s_median": _median(settled) if settled else None,
                "settled_after_s_max": max(settled) if settled else None,
                "never_settled": len(mine) - len(settled),
                "sessions": mine[0]["sessions"],
                "sessions_cut_median": _median([r["sessions_cut"] for r in mine]),
                "max_reconnects_per_session": max(r["max_reconnects_per_session"] for r in mine),
                "client_reconnects_median": _median([r["client_reconnects"] for r in mine]),
                "client_reconnects_max": max(r["client_reconnects"] for r in mine),
                "median_launch_ms": _median([r["median_launch_ms"] for r in mine]),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], repeat: int) -> None:
    print(
        f"\nMedians of {repeat} runs (failed after settle: sum over the runs; max reconnects: "
        "the worst session of any run)"
    )
    header = (
        f"{'case':<16}{'front':<20}{'mode':<12}{'launches':>9}{'failed':>8}{'after':>7}"
        f"{'outage s':>10}{'settle s':>10}{'cut':>6}{'max rec':>8}{'client re':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        settled = r["settled_after_s_median"]
        settle = "-" if settled is None else f"{settled:.3f}"
        print(
            f"{r['case']:<16}{FRONT_NAMES[r['front']]:<20}{r['mode']:<12}"
            f"{r['launches_median']:>9g}{r['failed_median']:>8g}{r['failed_after_settle_total']:>7}"
            f"{r['longest_outage_s_median']:>10.3f}{settle:>10}"
            f"{r['sessions_cut_median']:>4g}/{r['sessions']}{r['max_reconnects_per_session']:>8}"
            f"{r['client_reconnects_median']:>10g}"
        )


# -- the run ------------------------------------------------------------------------------------


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _list(parser: argparse.ArgumentParser, flag: str, value: str, allowed: Any) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    if not chosen or not set(chosen) <= set(allowed):
        parser.error(f"{flag}: choose among {', '.join(allowed)}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/failover.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cases", default=",".join(CASES), help="(default: all)")
    p.add_argument("--modes", default=",".join(MODES), help="(default: all)")
    p.add_argument(
        "--fronts",
        default="ras,keepalived",
        help="ras (ras halb) and/or keepalived (keepalived + haproxy, only for the cases where "
        "the comparison applies: halb-crash, gateway-crash)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each case, front and mode (3)")
    p.add_argument("--seconds", type=float, default=5.0, help="load after the kill (5 s)")
    p.add_argument("--warmup", type=float, default=3.0, help="load before the kill (3 s)")
    p.add_argument("--sessions", type=int, default=6, help="long-lived sessions held (6)")
    p.add_argument("--seed", type=int, default=1, help="seed of the HALB kill's phase")
    p.add_argument("--json", type=Path, help="write every run and the summary here")
    p.add_argument("--logdir", type=Path, help="keep every daemon's log here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.cases = _list(p, "--cases", args.cases, list(CASES))
    args.modes = _list(p, "--modes", args.modes, MODES)
    args.fronts = _list(p, "--fronts", args.fronts, list(FRONT_NAMES))
    args.json = args.json and args.json.resolve()  # the run changes directory
    args.logdir = args.logdir and args.logdir.resolve()
    return args


def _snapshot(tmp: Path) -> str:
    """Check out the committed ``ras`` package (HEAD) into ``tmp/code`` and make every process
    started from now on (``python -m ras``, ``python -m ras.lab.failover``) import it: they
    start in that directory, which comes first on ``sys.path`` with ``-m``. The run then
    measures one commit, whatever happens to the working tree meanwhile. Returns the commit."""
    code = tmp / "code"
    code.mkdir()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit, "ras"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    check = [sys.executable, "-c", "import ras.cli.main, ras.lab.failover"]
    done = subprocess.run(check, cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"ras at {commit} does not import:\n{done.stderr}")
    os.chdir(code)
    os.environ["PYTHONPATH"] = str(code)
    return commit


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = lab_unavailable(needs=["keepalived", "haproxy"])
    if reason is not None:
        print(f"failover benchmark: cannot run here: {reason}", file=sys.stderr)
        return 2
    began = time.monotonic()
    results: dict[str, Any] = {
        "command": shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "haproxy": _version(["haproxy", "-v"]),
            "keepalived": _version(["keepalived", "-v"]),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("cases", "modes", "fronts", "repeat", "seconds", "warmup", "sessions", "seed")
        }
        | {"launch_interval_ms": 20, "session_interval_ms": 200, "advert_interval_s": 0.1},
        "errors": [],
    }
    rng = random.Random(args.seed)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ras-failover-bench-") as tmp:
        try:
            results["commit"] = _snapshot(Path(tmp))
        except (BenchError, subprocess.CalledProcessError) as exc:
            print(f"failover benchmark: {exc}", file=sys.stderr)
            return 2
        try:
            for name in args.cases:
                case = CASES[name]
                for front in (f for f in args.fronts if f in case.fronts):
                    try:
                        runs += case_runs(case, front, args, rng, Path(tmp))
                    except (BenchError, AssertionError) as exc:
                        say(args, f"{name} / {FRONT_NAMES[front]}: FAILED: {exc}")
                        results["errors"].append(f"{name} / {front}: {exc}")
        finally:
            os.chdir(REPO)  # out of the copy before it goes
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.monotonic() - began, 1)
    results["summary"] = summarize(runs)
    results["runs"] = runs
    print_table(results["summary"], args.repeat)
    load = results["machine"]
    print(
        f"\nload average at start {_loads(load['load_average_at_start'])}, at end "
        f"{_loads(load['load_average_at_end'])}; {results['seconds']:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if results["errors"] else 0


def _loads(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
