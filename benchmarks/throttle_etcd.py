"""What the farm-wide login throttle costs a login: the in-memory counters of one broker
against the counters shared in a local three-member etcd cluster (``ras.lab.etcdcluster``).

Per login the broker makes one ``check`` before the directory, then ``failed`` (a wrong
password) or ``succeeded``. Each is timed ``--rounds`` times, on fresh user names, in one
thread; prints the median and p99 of each, the etcd/memory ratio of the medians and the load
average. Usage (real processes, so under the heavy-test lock)::

    flock /tmp/ras-heavy.lock uv run python benchmarks/throttle_etcd.py [--rounds 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ras.broker.etcd import Etcd
from ras.broker.etcdthrottle import EtcdThrottle
from ras.broker.throttle import LoginThrottle, Throttle
from ras.lab.etcdcluster import etcd_cluster

LIMITS = {
    "max_failures_per_user": 5,
    "max_failures_per_address": 1_000_000,
    "window_s": 900.0,
    "lockout_s": 900.0,
}


def _times(throttle: LoginThrottle, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"check": [], "failed": [], "succeeded": []}
    steps: list[tuple[str, Callable[[str], object]]] = [
        ("check", lambda u: throttle.check(u, "192.0.2.1")),
        ("failed", lambda u: throttle.failed(u, "192.0.2.1")),
        ("succeeded", throttle.succeeded),
    ]
    for i in range(rounds):
        user = f"user{i}"
        for name, step in steps:
            start = time.perf_counter()
            step(user)
            out[name].append(time.perf_counter() - start)
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write the result to this file")
    args = parser.parse_args()
    memory = _times(Throttle(**LIMITS, clock=time.time), args.rounds)
    with tempfile.TemporaryDirectory() as tmp, etcd_cluster(Path(tmp)) as cluster:
        config = cluster.config(prefix="/bench/")
        shared = _times(EtcdThrottle(Etcd(config), config.prefix, **LIMITS), args.rounds)
    result: dict[str, object] = {"rounds": args.rounds, "load_average": os.getloadavg()}
    for name in memory:
        mem, etcd = _summary(memory[name]), _summary(shared[name])
        ratio = etcd["median_ms"] / max(mem["median_ms"], 0.001)
        result[name] = {"memory": mem, "etcd": etcd, "etcd_over_memory": round(ratio, 1)}
        print(
            f"{name:9} memory {mem['median_ms']:8.3f} ms (p99 {mem['p99_ms']:.3f})   "
            f"etcd {etcd['median_ms']:8.3f} ms (p99 {etcd['p99_ms']:.3f})"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
