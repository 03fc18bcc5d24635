"""Relay benchmark: direct loopback, haproxy, socat and our relay, plain and TLS, in one run.

Processes: ``relay_peer.py`` (the far end: echo, sink, RDP-like and "users" ports), haproxy
2.6 (``mode tcp``, ``nbthread 1``; plain and ``ssl crt`` frontends), socat (``fork``, plain
only), and ``relay_server.py`` (our relay component, plain and TLS with a self-signed
certificate from ``ras.pki``), and ``ras-tls-w2`` (the same with ``--workers 2``). The load
comes from ``relay_load.py`` processes; the plain echo and new-tunnel cases use the C
generator and echo peer of ``relay_cload.c``, and "users per gateway" the C TLS client and
peer of ``relay_cusers.c`` (both built with gcc at the start). Each case runs
on every path in turn; the table gives each figure and its ratio to haproxy (plain paths to
haproxy, TLS paths to haproxy's TLS termination), and the CPU seconds the relay process used
in the case. See benchmarks/README.md.

    uv run python benchmarks/relay.py --quick              # smoke run, < 60 s
    uv run python benchmarks/relay.py --json results/relay.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
PEER = 23000
ECHO, SINK, RDP, USERS, CECHO, CUSERS = range(6)  # C*: the C echo and users peers
PORTS = 6
#: path name -> (first port, TLS?)
PATHS = {
    "direct": (PEER, False),
    "haproxy": (23100, False),
    "socat": (23120, False),
    "ras": (23130, False),
    "ras-w2": (23150, False),
    "haproxy-tls": (23110, True),
    "ras-tls": (23140, True),
    "ras-tls-w2": (23160, True),
    "ras-m": (23170, False),  # ras with metrics on: tunnels counted, /metrics scraped each second
    "ras-tls-m": (23180, True),
}
METRICS_PORTS = {"ras-m": 23190, "ras-tls-m": 23191}
#: metrics on -> off, for the on/off ratios of the same run
METRICS_OFF = {"ras-m": "ras", "ras-tls-m": "ras-tls"}
BASELINE = {"direct": None, "haproxy": None, "socat": "haproxy", "ras": "haproxy",
            "ras-w2": "haproxy",
            "haproxy-tls": None, "ras-tls": "haproxy-tls", "ras-tls-w2": "haproxy-tls",
            "ras-m": "haproxy", "ras-tls-m": "haproxy-tls"}  # fmt: skip


def haproxy_config(pem: Path) -> str:
    lines = [
        "global", "  nbthread 1", "  maxconn 9980", "defaults", "  mode tcp",
        "  timeout connect 5s", "  timeout client 1h", "  timeout server 1h",
    ]  # fmt: skip
    for base, tls in ((23100, False), (23110, True)):
        for i in range(PORTS):
            name = f"p{base + i}"
            bind = f"  bind 127.0.0.1:{base + i}" + (f" ssl crt {pem}" if tls else "")
            lines += [f"frontend f{name}", bind, f"  default_backend b{name}"]
            lines += [f"backend b{name}", f"  server s 127.0.0.1:{PEER + i}"]
    return "\n".join(lines) + "\n"


def _scrape(stop: threading.Event) -> None:
    """Scrape the metrics-on relays every second, as a Prometheus would."""
    while not stop.wait(1.0):
        for port in METRICS_PORTS.values():
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def with_children(pids: list[int]) -> list[int]:
    """``pids`` and their child processes (the workers of a ``--workers`` relay)."""
    out = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in with_children(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def build_cload(tmp: Path) -> str | None:
    """Compile relay_cload.c (the C load generator and echo peer); None without gcc."""
    exe = tmp / "relay_cload"
    try:
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "relay_cload.c")], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no C load generator ({exc}); echo and cps use relay_load.py", flush=True)
        return None
    return str(exe)


def build_cusers(tmp: Path) -> str | None:
    """Compile relay_cusers.c (the C users generator and peer, OpenSSL); None if that fails."""
    exe = tmp / "relay_cusers"
    cmd = ["gcc", "-O2", "-o", str(exe), str(HERE / "relay_cusers.c"), "-lssl", "-lcrypto"]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no C users generator ({exc}); users uses relay_load.py", flush=True)
        return None
    return str(exe)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.results: dict[str, dict[str, dict[str, object]]] = {}
        self.cload = build_cload(tmp)
        self.cusers = build_cusers(tmp)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        from ras.pki import FarmPKI

        pki = FarmPKI(self.tmp / "pki")
        pki.init_ca()
        cert, key = pki.ensure_self_signed("gateway-public", ("localhost", "127.0.0.1"))
        pem = self.tmp / "haproxy.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
        (self.tmp / "haproxy.cfg").write_text(haproxy_config(pem))
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}

        def start(name: str, cmd: list[str], wait_ready: bool = False) -> None:
            out = subprocess.PIPE if wait_ready else subprocess.DEVNULL
            proc = subprocess.Popen(cmd, stdout=out, env=env)
            self.procs.setdefault(name, []).append(proc)
            if wait_ready:
                assert proc.stdout is not None
                line = proc.stdout.readline().strip()
                assert line == b"ready", f"{name} did not start: {line!r}"

        try:
            start("direct", [PY, str(HERE / "relay_peer.py"), "--base", str(PEER)], True)
            start("haproxy", ["haproxy", "-f", str(self.tmp / "haproxy.cfg"), "-db"])
            self.procs["haproxy-tls"] = self.procs["haproxy"]
            if self.cload:
                start("cecho", [self.cload, "server", str(PEER + CECHO)], True)
            if self.cusers:
                start("cusers", [self.cusers, "peer", str(PEER + CUSERS)], True)
            for i in range(PORTS):
                start(
                    "socat",
                    ["socat", f"TCP-LISTEN:{23120 + i},bind=127.0.0.1,fork,reuseaddr,"
                     "backlog=4096,nodelay", f"TCP:127.0.0.1:{PEER + i},nodelay"],
                )  # fmt: skip
            maps = [f"--map={23130 + i}:{PEER + i}" for i in range(PORTS)]
            server = [PY, str(HERE / "relay_server.py"), *maps, f"--stats={self.tmp}/ras.json"]
            start("ras", server, True)
            maps2 = [f"--map={23150 + i}:{PEER + i}" for i in range(PORTS)]
            server2 = [PY, str(HERE / "relay_server.py"), *maps2, "--workers=2",
                       f"--stats={self.tmp}/ras-w2.json"]  # fmt: skip
            start("ras-w2", server2, True)
            tls_maps = [f"--map={23140 + i}:{PEER + i}" for i in range(PORTS)]
            start(
                "ras-tls",
                [PY, str(HERE / "relay_server.py"), *tls_maps, f"--cert={cert}", f"--key={key}",
                 f"--stats={self.tmp}/ras-tls.json"],
                True,
            )  # fmt: skip
            tls_maps2 = [f"--map={23160 + i}:{PEER + i}" for i in range(PORTS)]
            start(
                "ras-tls-w2",
                [PY, str(HERE / "relay_server.py"), *tls_maps2, f"--cert={cert}", f"--key={key}",
                 "--workers=2", f"--stats={self.tmp}/ras-tls-w2.json"],
                True,
            )  # fmt: skip
            start(
                "ras-m",
                [PY, str(HERE / "relay_server.py"),
                 *(f"--map={23170 + i}:{PEER + i}" for i in range(PORTS)),
                 f"--metrics-port={METRICS_PORTS['ras-m']}", f"--stats={self.tmp}/ras-m.json"],
                True,
            )  # fmt: skip
            start(
                "ras-tls-m",
                [PY, str(HERE / "relay_server.py"),
                 *(f"--map={23180 + i}:{PEER + i}" for i in range(PORTS)),
                 f"--cert={cert}", f"--key={key}", f"--metrics-port={METRICS_PORTS['ras-tls-m']}",
                 f"--stats={self.tmp}/ras-tls-m.json"],
                True,
            )  # fmt: skip
            scraping = threading.Event()
            scraper = threading.Thread(target=_scrape, args=(scraping,), daemon=True)
            scraper.start()
            time.sleep(1)
            yield
        finally:
            with contextlib.suppress(NameError):
                scraping.set()
            for procs in self.procs.values():
                for proc in procs:
                    if proc.poll() is None:
                        proc.terminate()
            for procs in self.procs.values():
                for proc in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)

    def relay_pids(self, path: str) -> list[int]:
        return [p.pid for p in self.procs.get(path, [])] if path != "direct" else []

    def load(self, path: str, case: str, procs: int, *extra: str) -> list[dict[str, object]]:
        port, tls = PATHS[path]
        offset = {"bulk": SINK, "echo": ECHO, "cps": ECHO, "idle": ECHO, "rdp": RDP,
                  "users": USERS}[case]  # fmt: skip
        cmd = [PY, str(HERE / "relay_load.py"), case, f"--port={port + offset}", *extra]
        if tls:
            cmd.append("--tls")
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        children = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env) for _ in range(procs)]
        out = []
        for child in children:
            stdout, _ = child.communicate(timeout=600)
            out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        return out

    def record(self, case: str, path: str, value: dict[str, object]) -> None:
        self.results.setdefault(case, {})[path] = value
        print(f"  {case:10} {path:12} {json.dumps(value)}", flush=True)

    def measured(self, case: str, path: str, fn) -> None:
        pids = self.relay_pids(path)
        cpu = cpu_seconds(pids)
        try:
            value = fn()
        except Exception as exc:  # one broken case must not lose the rest of the run
            value = {"error": repr(exc)}
        if pids:
            value["relay_cpu_s"] = round(cpu_seconds(pids) - cpu, 2)
        self.record(case, path, value)

    # -- cases

    def bulk(self, path: str, streams: int) -> dict[str, object]:
        procs = 2 if streams > 1 else 1
        per = str(max(1, streams // procs))
        runs = self.load(path, "bulk", procs, f"--streams={per}", f"--seconds={self.args.seconds}")
        total = sum(int(r["bytes"]) for r in runs)  # type: ignore[call-overload]
        secs = max(float(r["seconds"]) for r in runs)  # type: ignore[arg-type]
        return {"MBps": round(total / secs / 1e6, 1)}

    def cload_run(self, path: str, *args: str) -> list[dict[str, object]]:
        """The C load generator against ``path``'s C-echo port: (1 process, JSON)."""
        assert self.cload is not None
        port = PATHS[path][0] + CECHO
        out = subprocess.run([self.cload, args[0], str(port), *args[1:]], capture_output=True,
                             check=True, timeout=600)  # fmt: skip
        return [json.loads(out.stdout.decode().strip().splitlines()[-1])]

    def use_c(self, path: str) -> bool:
        return self.cload is not None and not PATHS[path][1]

    def echo(self, path: str) -> dict[str, object]:
        if self.use_c(path):
            run = self.cload_run(path, "echo", str(self.args.echo_count))[0]
        else:
            run = self.load(path, "echo", 1, f"--count={self.args.echo_count}")[0]
        value = {"median_us": round(run["median_us"], 1), "p99_us": round(run["p99_us"], 1)}  # type: ignore[arg-type]
        value["loadgen"] = "C" if self.use_c(path) else "python"
        return value

    def cps(self, path: str) -> dict[str, object]:
        if self.use_c(path):
            runs = self.cload_run(path, "cps", "32", str(self.args.seconds))
        else:
            runs = self.load(path, "cps", 2, "--concurrency=16", f"--seconds={self.args.seconds}")
        ok = sum(int(r["ok"]) for r in runs)  # type: ignore[call-overload]
        value: dict[str, object] = {
            "per_s": round(ok / self.args.seconds),
            "errors": sum(int(r["errors"]) for r in runs),  # type: ignore[call-overload]
        }
        if self.use_c(path):
            value["loadgen"] = "C"
            value["loadgen_cpu_s"] = runs[0]["cpu_s"]
        else:
            value["loadgen"] = "python"
        return value

    def rdp(self, path: str) -> dict[str, object]:
        runs = self.load(path, "rdp", 2, "--streams=8", f"--seconds={self.args.seconds}")
        msgs = sum(int(r["messages"]) for r in runs)  # type: ignore[call-overload]
        return {"msgs_per_s": round(msgs / self.args.seconds)}

    def idle(self, path: str) -> dict[str, object]:
        (pid,) = self.relay_pids(path)[:1]
        port, tls = PATHS[path]
        cmd = [PY, str(HERE / "relay_load.py"), "idle", f"--port={port + ECHO}",
               f"--count={self.args.idle}"] + (["--tls"] if tls else [])  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        before = rss_kib(pid)
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        assert child.stdin is not None
        opened = json.loads(child.stdout.readline())["open"]
        time.sleep(1)
        after = rss_kib(pid)
        value: dict[str, object] = {
            "tunnels": opened,
            "KiB_per_tunnel": round((after - before) / max(1, opened), 1),
        }
        if path.startswith("ras"):
            stats = self.tmp / f"{path}.json"
            stats.unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)
            for _ in range(100):
                if stats.exists() and stats.stat().st_size:
                    break
                time.sleep(0.1)
            gcs = json.loads(stats.read_text())
            value["gc_max_natural_pause_ms"] = round(max(gcs["gc_pauses_ms"], default=0.0), 1)
            value["gc_full_collect_ms"] = round(gcs["full_collect_ms"], 1)
            value["tracked_per_tunnel"] = round(gcs["tracked"] / max(1, opened), 1)
        child.stdin.write(b"\n")
        child.stdin.flush()
        child.communicate(timeout=120)
        return value

    def users(self, path: str) -> dict[str, object]:
        return self.users_c(path) if self.cusers else self.users_python(path)

    def users_c(self, path: str) -> dict[str, object]:
        """Ramps N with relay_cusers (client and peer in C); stops at the first failed level.

        A level passes with every session connected, no sequence gap, no session broken or
        stalled, nothing dropped by the peer and p99 under 50 ms. Each level records the CPU
        seconds of the relay, the generator and the peer, so the limit is visible.
        """
        assert self.cusers is not None
        (peer,) = self.procs["cusers"]
        port = PATHS[path][0] + CUSERS
        pids = self.relay_pids(path)
        best = 0
        levels: list[dict[str, object]] = []
        for n in self.args.users:
            relay_cpu, peer_cpu = cpu_seconds(pids), cpu_seconds([peer.pid])
            self.peer_report(peer)  # resets the peer's counters
            cmd = [self.cusers, "users", str(port), str(n), str(self.args.users_rate),
                   str(self.args.users_seconds), "tls" if PATHS[path][1] else "plain"]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, check=True, timeout=600)
            run = json.loads(out.stdout.decode().strip().splitlines()[-1])
            sent = self.peer_report(peer)
            bad = int(run["failed"]) + int(run["lost"]) + int(run["stalled"])
            bad += int(sent["overflow"]) + n - int(run["connected"])
            ok = bad == 0 and run["messages"] > 0 and float(run["p99_ms"]) < 50
            level = {
                "sessions": n, "ok": ok, **{k: run[k] for k in (
                    "connected", "failed", "lost", "stalled", "messages", "p50_ms", "p99_ms",
                    "max_ms", "connect_s")},
                "peer_overflow": sent["overflow"], "peer_late_max_ms": sent["late_max_ms"],
                "relay_cpu_s": round(cpu_seconds(pids) - relay_cpu, 2),
                "loadgen_cpu_s": run["cpu_s"],
                "peer_cpu_s": round(cpu_seconds([peer.pid]) - peer_cpu, 2),
                "load_avg": os.getloadavg()[0],
            }  # fmt: skip
            levels.append(level)
            print(f"    users {path} {json.dumps(level)}", flush=True)
            if not ok:
                break
            best = n
        return {"users": best, "loadgen": "C", "levels": levels}

    @staticmethod
    def peer_report(peer: subprocess.Popen[bytes]) -> dict[str, object]:
        """The C peer's counters since the last report (SIGUSR1, one JSON line back)."""
        assert peer.stdout is not None
        peer.send_signal(signal.SIGUSR1)
        return json.loads(peer.stdout.readline())

    def users_python(self, path: str) -> dict[str, object]:
        best = 0
        levels: list[dict[str, object]] = []
        for n in self.args.users:
            runs = self.load(
                path, "users", 2, f"--count={n // 2}", f"--seconds={self.args.users_seconds}"
            )
            lat = [r for r in runs if r["p99_ms"] is not None]
            p99 = max(float(r["p99_ms"]) for r in lat) if lat else None  # type: ignore[arg-type]
            lost = sum(int(r["lost"]) + int(r["failed"]) for r in runs)  # type: ignore[call-overload]
            ok = lost == 0 and p99 is not None and p99 < 50
            levels.append({"sessions": n, "p99_ms": p99 and round(p99, 1), "lost": lost, "ok": ok})
            print(f"    users {path} {levels[-1]}", flush=True)
            if not ok:
                break
            best = n
        return {"users": best, "levels": levels}


FIGURE = {"bulk1": "MBps", "bulk16": "MBps", "echo": "median_us", "cps": "per_s",
          "rdp": "msgs_per_s", "idle": "KiB_per_tunnel", "users": "users"}  # fmt: skip


def ratios(results: dict[str, dict[str, dict[str, object]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for case, paths in results.items():
        key = FIGURE[case]
        for path, value in paths.items():
            base = BASELINE.get(path)
            if base is None or base not in paths:
                continue
            mine, theirs = value.get(key), paths[base].get(key)
            if isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs:
                out.setdefault(case, {})[path] = round(mine / theirs, 2)
    return out


def metrics_ratios(results: dict[str, dict[str, dict[str, object]]]) -> dict[str, dict[str, float]]:
    """Each case's figure with metrics on over the same figure with them off."""
    out: dict[str, dict[str, float]] = {}
    for case, paths in results.items():
        key = FIGURE[case]
        for on, off in METRICS_OFF.items():
            if on in paths and off in paths:
                mine, theirs = paths[on].get(key), paths[off].get(key)
                if isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs:
                    out.setdefault(case, {})[on] = round(mine / theirs, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a smoke run (< 60 s)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput case and path")
    p.add_argument(
        "--idle",
        type=int,
        default=9_900,
        help="idle tunnels for the memory case (2 fds each: the hard fd limit here is 20,000)",
    )
    p.add_argument("--echo-count", type=int, default=5000)
    p.add_argument(
        "--users",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[500, 1000, 2000, 3000, 4000, 6000],
        help="session counts to try",
    )
    p.add_argument(
        "--users-seconds",
        type=float,
        default=10.0,
        help="measured seconds per level (after the ramp and 2 s of settling)",
    )
    p.add_argument("--users-rate", type=float, default=300.0,
                   help="new sessions (TLS handshakes) a second while ramping up")  # fmt: skip
    p.add_argument("--cases", default="bulk1,bulk16,echo,cps,rdp,idle,users")
    p.add_argument("--paths", default=",".join(PATHS), help="paths to measure (direct first)")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.idle, args.echo_count = 1.0, 500, 500
        args.users, args.users_seconds = [200], 2.0
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    cases = args.cases.split(",")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        with bench.running():
            for path in args.paths.split(","):
                print(f"== {path}", flush=True)
                tls = PATHS[path][1]
                if "bulk1" in cases:
                    bench.measured("bulk1", path, lambda path=path: bench.bulk(path, 1))
                if "bulk16" in cases:
                    bench.measured("bulk16", path, lambda path=path: bench.bulk(path, 16))
                if "echo" in cases:
                    bench.measured("echo", path, lambda path=path: bench.echo(path))
                if "cps" in cases:
                    bench.measured("cps", path, lambda path=path: bench.cps(path))
                if "rdp" in cases:
                    bench.measured("rdp", path, lambda path=path: bench.rdp(path))
                if "idle" in cases and path not in (
                    "direct",
                    "socat",
                    "ras-w2",
                    "ras-tls-w2",
                    "ras-m",
                    "ras-tls-m",
                ):
                    bench.measured("idle", path, lambda path=path: bench.idle(path))
                if "users" in cases and tls:
                    bench.measured("users", path, lambda path=path: bench.users(path))
    summary = ratios(bench.results)
    print("\nratios to haproxy (TLS paths to haproxy's TLS termination):")
    for case, by_path in summary.items():
        print(f"  {case:8} " + "  ".join(f"{k}={v}" for k, v in by_path.items()))
    on_off = metrics_ratios(bench.results)
    if on_off:
        print("metrics on / off (ras-m / ras, ras-tls-m / ras-tls; same run; echo: latency):")
        for case, by_path in on_off.items():
            print(f"  {case:8} " + "  ".join(f"{k}={v}" for k, v in by_path.items()))
        summary["metrics_on_off"] = on_off  # type: ignore[assignment]
    echo = bench.results.get("echo", {})
    if "direct" in echo:
        base = float(echo["direct"]["median_us"])  # type: ignore[arg-type]
        added = {
            k: round(float(v["median_us"]) - base, 1) for k, v in echo.items() if "median_us" in v
        }  # type: ignore[arg-type]
        print(f"  added echo latency (median us over direct): {added}")
        summary["added_latency_us"] = added
    print(f"took {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        report = {"args": settings, "results": bench.results, "ratios": summary}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
