"""HALB benchmark: our `ras halb` against keepalived + haproxy, side by side, in a
network-namespace lab (client, gw1, gw2, n1, n2). Needs root, keepalived and haproxy.

1. Failover seen by a client: a probe loop in the client opens a new connection through
   VIP:8080 every 10 ms (control-protocol hello/ping/pong, served by a `ras gateway`) while the
   master n1 (priority 150; n2 has 100) dies (SIGKILL of its processes, then its link down) or
   stops gracefully (SIGTERM). Failover time = from the kill (or the signal) to the end of the
   first successful probe started after it. Same advert interval for both stacks.
2. Connections per second through the VIP (n1 alone): a load generator in the client keeps C
   connections in flight per process (connect, a tiny HTTP/1.0 request, the reply, close)
   against fast haproxy backends on gw1/gw2, through our balancer or haproxy (`mode tcp`,
   `balance leastconn`, `send-proxy-v2`, `nbthread 1`), and straight to the backends (no
   balancer: the ceiling of the client and backends on this machine); with the CPU the
   balancer process used.

Prints a table; --json FILE writes every run. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lab import (
    DIRECT_PORT,
    FAST_PORT,
    HAPROXY,
    HERE,
    KEEPALIVED,
    SERVICE_PORT,
    Bench,
    BenchError,
    Stack,
    http_probe,
    machine_cpu,
    process_cpu_s,
    wait_for,
)

from ras.lab import Lab, lab_unavailable
from ras.pki import FarmPKI

IMPLS = {"ras": "ras halb", "haproxy": "keepalived+haproxy"}
VRID = 51


# -- failover --------------------------------------------------------------------------------------


def _settle(bench: Bench, vip: str, probes: Any, stacks: dict[str, Stack], advert_s: float) -> None:
    """Wait until n1 alone holds the VIP, probes through it succeed, and it stays so."""
    for _ in range(5):
        for name, stack in stacks.items():
            for proc in stack.procs:
                if proc.poll() is not None:
                    raise BenchError(f"{name}: a process exited\n{bench.lab.log_tail(proc)}")
        wait_for(
            lambda: bench.holders(vip) == ["n1"],
            60,
            "n1 alone holds the VIP",
            step=0.05,
            last=lambda: f"holders {bench.holders(vip)}",
        )
        since = time.monotonic()
        wait_for(
            lambda: probes.steady_since(since, 20),  # noqa: B023
            30,
            "probes through n1 succeed",
        )
        time.sleep(2 * advert_s + 0.3)
        if bench.holders(vip) == ["n1"] and probes.steady_since(since, 20):
            return
    raise BenchError("the VIP did not settle on n1")


def failover_case(
    ctx: Context, impl: str, advert_s: float, modes: list[str], reps: int
) -> list[dict[str, Any]]:
    """One lab for one stack and advert interval; `reps` runs of each mode, n1 restored
    (link up, stack restarted, preempting n2) between runs."""
    results = []
    with ctx.lab(f"failover-{impl}-{advert_s}") as lab:
        Bench.hosts_for(lab)
        bench = Bench(lab, ctx.tmp, ctx.pki)
        vip = str(lab.spare_address())
        bench.start_gateways()
        start = bench.start_ras if impl == "ras" else bench.start_keepalived_haproxy
        options = {
            "vip": vip,
            "vrid": VRID,
            "advert_s": advert_s,
            "port": SERVICE_PORT,
            "backend_port": SERVICE_PORT,
        }
        stacks = {"n2": start("n2", 100, **options), "n1": start("n1", 150, **options)}
        _, probes = bench.start_probe(vip, SERVICE_PORT)
        for mode in modes:
            runs: list[float] = []
            error = None
            try:
                for rep in range(reps):
                    _settle(bench, vip, probes, stacks, advert_s)
                    # The settling ends at a fixed phase of n1's advert timer; a crash comes at
                    # any phase, and the phase moves the failover time by up to one interval.
                    time.sleep(ctx.rng.uniform(0, advert_s))
                    if mode == "crash":
                        instant = bench.kill_node(stacks["n1"])
                    else:
                        instant = bench.stop_node(stacks["n1"])
                    _, end_s = wait_for(
                        lambda: probes.first_ok_after(instant),  # noqa: B023
                        30,
                        "a successful probe after the failure",
                    )
                    runs.append(end_s - instant)
                    ctx.say(
                        f"  {IMPLS[impl]:<19} {mode:<8} advert {advert_s:>4} s "
                        f"run {rep + 1}/{reps}: {end_s - instant:.3f} s"
                    )
                    if mode == "crash":
                        bench.revive("n1", vip)
                    stacks["n1"] = start("n1", 150, **options)
            except BenchError as exc:
                error = str(exc)
                ctx.say(f"  {IMPLS[impl]} {mode} advert {advert_s}: FAILED: {exc}")
            results.append(
                {
                    "impl": impl,
                    "mode": mode,
                    "advert_s": advert_s,
                    "runs_s": [round(r, 4) for r in runs],
                    **_spread(runs),
                    "error": error,
                }
            )
            if error is not None:
                break
    return results


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median_s": None, "min_s": None, "max_s": None}
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
    }


# -- connections per second ------------------------------------------------------------------------


def cps_case(
    ctx: Context,
    rounds: int,
    seconds: float,
    clients: int,
    concurrency: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    with ctx.lab("cps") as lab:
        Bench.hosts_for(lab)
        bench = Bench(lab, ctx.tmp, ctx.pki)
        vip_ras, vip_haproxy = str(lab.spare_address()), str(lab.spare_address())
        bench.start_gateways()
        bench.start_fast_backends()
        options = {"advert_s": 1.0, "port": FAST_PORT, "backend_port": FAST_PORT}
        stacks = {
            "ras": bench.start_ras("n1", 150, vip=vip_ras, vrid=VRID, profile=profile, **options),
            "haproxy": bench.start_keepalived_haproxy(
                "n1", 150, vip=vip_haproxy, vrid=VRID + 1, **options
            ),
        }
        targets = {
            "direct": [f"{h.address}:{DIRECT_PORT}" for h in bench.gateways.values()],
            "ras": [f"{vip_ras}:{FAST_PORT}"],
            "haproxy": [f"{vip_haproxy}:{FAST_PORT}"],
        }
        for vip in (vip_ras, vip_haproxy):
            wait_for(lambda: bench.holders(vip, ["n1"]), 30, f"n1 holds {vip}", step=0.05)  # noqa: B023
            wait_for(
                lambda: http_probe(bench.client, vip, FAST_PORT),  # noqa: B023
                30,
                f"a reply through {vip}:{FAST_PORT}",
                step=0.05,
            )
        backends = [bench.procs[f"{g}-fast"].pid for g in bench.gateways]
        runs: list[dict[str, Any]] = []
        for r in range(rounds):
            order = ["direct", "ras", "haproxy"] if r % 2 == 0 else ["direct", "haproxy", "ras"]
            for path in order:
                balancer = stacks[path].balancer.pid if path in stacks else None
                run = _load(bench, targets[path], balancer, backends, seconds, clients, concurrency)
                run.update(path=path, round=r + 1)
                runs.append(run)
                cpu = "" if balancer is None else f", balancer CPU {run['balancer_cpu_pct']:.0f}%"
                ctx.say(
                    f"  round {r + 1}/{rounds} {path:<8} {run['cps']:>8.0f} conn/s "
                    f"(errors {run['errors']}{cpu}, machine busy {run['machine_busy_pct']:.0f}%)"
                )
    if profile is not None:  # written when the lab stopped our balancer
        _profile_report(profile)
    return {"runs": runs, "summary": _cps_summary(runs)}


def _profile_report(profile: Path) -> None:
    """The profile of our balancer under load, as text beside the stats file."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(profile), stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    text = profile.with_suffix(profile.suffix + ".txt")
    text.write_text(out.getvalue())
    print(f"profile of ras halb under load: {profile} (text: {text})", file=sys.stderr)


def _load(
    bench: Bench,
    targets: list[str],
    balancer: int | None,
    backends: list[int],
    seconds: float,
    clients: int,
    concurrency: int,
) -> dict[str, Any]:
    start = time.monotonic() + 1.0  # the load generators start together, after their imports
    argv = [sys.executable, str(HERE / "_loadgen.py"), "--concurrency", str(concurrency)]
    argv += ["--start", f"{start:.6f}", "--seconds", str(seconds)]
    for target in targets:
        argv += ["--target", target]
    gens = [bench.client.popen(argv) for _ in range(clients)]
    time.sleep(max(0.0, start - time.monotonic()))

    def snapshot() -> dict[str, float]:
        snap = {"gens": sum(process_cpu_s(p.pid) for p in gens)}
        snap["backends"] = sum(process_cpu_s(pid) for pid in backends)
        if balancer is not None:
            snap["balancer"] = process_cpu_s(balancer)
        snap["busy"], snap["steal"], snap["total"] = machine_cpu()
        snap["at"] = time.monotonic()
        return snap

    before = snapshot()
    time.sleep(max(0.0, start + seconds - time.monotonic()))
    after = snapshot()
    reports = []
    for gen in gens:
        gen.wait(seconds + 30)
        lines = bench.lab.log_of(gen).read_text().strip().splitlines()
        if gen.returncode != 0 or not lines:
            raise BenchError(f"load generator failed\n{bench.lab.log_tail(gen)}")
        reports.append(json.loads(lines[-1]))
    wall = after["at"] - before["at"]

    def pct(key: str) -> float:
        return round(100 * (after[key] - before[key]) / wall, 1)

    errors: dict[str, int] = {}
    for report in reports:
        for kind, count in report["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    medians = [r["median_ms"] for r in reports if r["median_ms"] is not None]
    p99s = [r["p99_ms"] for r in reports if r["p99_ms"] is not None]
    result = {
        "cps": round(sum(r["ok"] for r in reports) / seconds, 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "latency_median_ms": round(statistics.median(medians), 3) if medians else None,
        "latency_p99_ms": max(p99s) if p99s else None,
        "clients_cpu_pct": pct("gens"),
        "backends_cpu_pct": pct("backends"),
        "machine_busy_pct": round(
            100 * (after["busy"] - before["busy"]) / (after["total"] - before["total"]), 1
        ),
        "machine_steal_pct": round(
            100 * (after["steal"] - before["steal"]) / (after["total"] - before["total"]), 1
        ),
    }
    if balancer is not None:
        result["balancer_cpu_pct"] = pct("balancer")
    return result


def _cps_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for path in ("direct", "ras", "haproxy"):
        mine = [r for r in runs if r["path"] == path]
        cps = [r["cps"] for r in mine]
        entry: dict[str, Any] = {
            "cps_median": round(statistics.median(cps), 1),
            "cps_min": min(cps),
            "cps_max": max(cps),
            "errors": sum(r["errors"] for r in mine),
            "latency_median_ms": statistics.median(r["latency_median_ms"] or 0 for r in mine),
            "clients_cpu_pct_median": statistics.median(r["clients_cpu_pct"] for r in mine),
            "backends_cpu_pct_median": statistics.median(r["backends_cpu_pct"] for r in mine),
            "machine_busy_pct_median": statistics.median(r["machine_busy_pct"] for r in mine),
            "machine_steal_pct_median": statistics.median(r["machine_steal_pct"] for r in mine),
        }
        if path != "direct":
            cpu = [r["balancer_cpu_pct"] for r in mine]
            entry["balancer_cpu_pct_median"] = statistics.median(cpu)
            # Connections per CPU-second of the balancer: what it costs, whatever the load.
            entry["conn_per_cpu_s_median"] = round(
                statistics.median(r["cps"] / max(r["balancer_cpu_pct"], 0.1) * 100 for r in mine)
            )
        summary[path] = entry
    ras, haproxy = summary["ras"], summary["haproxy"]
    summary["ratio_cps_ras_over_haproxy"] = round(ras["cps_median"] / haproxy["cps_median"], 3)
    summary["ratio_conn_per_cpu_s_ras_over_haproxy"] = round(
        ras["conn_per_cpu_s_median"] / haproxy["conn_per_cpu_s_median"], 3
    )
    return summary


# -- the run ---------------------------------------------------------------------------------------


class Context:
    def __init__(self, tmp: Path, logdir: Path | None, verbose: bool, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tmp = tmp
        self.pki = FarmPKI(tmp / "pki")
        self.logdir = logdir
        self.verbose = verbose

    @contextlib.contextmanager
    def lab(self, name: str) -> Iterator[Lab]:
        logdir = None if self.logdir is None else self.logdir / name
        with Lab(logdir=logdir) as lab:
            yield lab

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)


def _fmt(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["median_s"] is None:
        return "failed" if entry else "-"
    return f"{entry['median_s']:.3f} [{entry['min_s']:.3f}-{entry['max_s']:.3f}]"


def print_tables(results: dict[str, Any]) -> None:
    failover = results.get("failover")
    if failover:
        print("\nFailover seen by a client (s): median [min-max] over runs")
        print(f"{'case':<26}{'ras halb':<26}{'keepalived+haproxy':<26}")
        keys = sorted({(f["mode"], f["advert_s"]) for f in failover}, key=lambda k: (k[0], k[1]))
        for mode, advert in keys:
            row = {f["impl"]: f for f in failover if (f["mode"], f["advert_s"]) == (mode, advert)}
            label = f"{mode}, advert {advert} s"
            print(f"{label:<26}{_fmt(row.get('ras')):<26}{_fmt(row.get('haproxy')):<26}")
    cps = results.get("cps")
    if cps:
        s = cps["summary"]
        print("\nConnections per second through the VIP: median [min-max] over rounds")
        header = (
            f"{'path':<22}{'conn/s':<24}{'balancer CPU':<14}{'conn/CPU-s':<12}"
            f"{'clients CPU':<13}{'backends CPU':<14}{'machine busy':<13}{'errors':<7}"
        )
        print(header)
        names = {"direct": "direct (no balancer)", "ras": "ras halb", "haproxy": "haproxy"}
        for path, name in names.items():
            e = s[path]
            spread = f"{e['cps_median']:.0f} [{e['cps_min']:.0f}-{e['cps_max']:.0f}]"
            bal = f"{e['balancer_cpu_pct_median']:.0f}%" if path != "direct" else "-"
            per = f"{e['conn_per_cpu_s_median']}" if path != "direct" else "-"
            print(
                f"{name:<22}{spread:<24}{bal:<14}{per:<12}"
                f"{e['clients_cpu_pct_median']:.0f}%{'':<9}{e['backends_cpu_pct_median']:.0f}%"
                f"{'':<10}{e['machine_busy_pct_median']:.0f}%{'':<9}{e['errors']}"
            )
        print(
            f"ratio ras/haproxy: conn/s {s['ratio_cps_ras_over_haproxy']:.2f}, "
            f"conn per balancer CPU-second {s['ratio_conn_per_cpu_s_ras_over_haproxy']:.2f}"
        )
        print(f"(CPU: % of one core; machine busy: % of all {os.cpu_count()} cores)")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/halb.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (2 runs a case, 1 round of 2 s)"
    )
    parser.add_argument("--json", type=Path, help="write every measurement to this JSON file")
    parser.add_argument(
        "--parts",
        default="failover,cps",
        help="which parts to run: failover, cps or both (default: failover,cps)",
    )
    parser.add_argument("--reps", type=int, help="runs of each failover case (default 5)")
    parser.add_argument(
        "--adverts",
        default="0.1,1",
        help="advert intervals in seconds, for both stacks (default: 0.1,1)",
    )
    parser.add_argument(
        "--modes", default="crash,graceful", help="failover modes (default: crash,graceful)"
    )
    parser.add_argument(
        "--impls", default="ras,haproxy", help="stacks to measure (default: ras,haproxy)"
    )
    parser.add_argument("--rounds", type=int, help="rate rounds, each path once (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds of load per path (default 5)")
    parser.add_argument("--clients", type=int, default=2, help="load processes (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="connections in flight per process (32)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the random crash phase (default 1)"
    )
    parser.add_argument("--logdir", type=Path, help="keep the lab processes' logs here")
    parser.add_argument(
        "--profile-ras",
        type=Path,
        metavar="FILE",
        help="run our balancer under cProfile in the rate test (slows it: a diagnosis, not a "
        "measurement); stats to FILE, text to FILE.txt",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.parts = [p for p in args.parts.split(",") if p]
    args.adverts = [float(a) for a in args.adverts.split(",") if a]
    args.modes = [m for m in args.modes.split(",") if m]
    args.impls = [i for i in args.impls.split(",") if i]
    for what, values, allowed in (
        ("--parts", args.parts, {"failover", "cps"}),
        ("--modes", args.modes, {"crash", "graceful"}),
        ("--impls", args.impls, set(IMPLS)),
    ):
        if not set(values) <= allowed:
            parser.error(f"{what}: choose among {', '.join(sorted(allowed))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = lab_unavailable(needs=["keepalived", "haproxy"])
    if reason is not None:
        print(f"halb benchmark: cannot run here: {reason}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "command": shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "haproxy": _version([HAPROXY, "-v"]),
            "keepalived": _version([KEEPALIVED, "-v"]),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("reps", "adverts", "modes", "impls", "rounds", "seconds", "clients", "seed")
        }
        | {"concurrency": args.concurrency, "probe_interval_s": 0.01},
    }
    with tempfile.TemporaryDirectory(prefix="ras-halb-bench-") as tmp:
        ctx = Context(Path(tmp), args.logdir, not args.quiet, args.seed)
        if "failover" in args.parts:
            ctx.say("failover:")
            failover: list[dict[str, Any]] = []
            for advert in args.adverts:
                for impl in args.impls:
                    failover += _guarded(
                        ctx,
                        lambda: failover_case(ctx, impl, advert, args.modes, args.reps),  # noqa: B023
                        [],
                    )
            results["failover"] = failover
        if "cps" in args.parts:
            ctx.say("connections per second:")
            results["cps"] = _guarded(
                ctx,
                lambda: cps_case(
                    ctx, args.rounds, args.seconds, args.clients, args.concurrency, args.profile_ras
                ),
                None,
            )
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _guarded(ctx: Context, part: Callable[[], Any], default: Any) -> Any:
    try:
        return part()
    except BenchError as exc:
        ctx.say(f"  FAILED: {exc}")
        return default


if __name__ == "__main__":
    sys.exit(main())
