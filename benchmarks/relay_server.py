"""Our relay for the benchmark: the gateway's relay component without the control protocol.

For each ``--map LISTEN:TARGET`` it accepts on 127.0.0.1:LISTEN, terminates TLS when
``--cert``/``--key`` are given (the gateway's ``server_tls``, the lean ``TLSStream``),
connects to 127.0.0.1:TARGET with ``ras.net.tls.connect_tcp`` and calls ``ras.net.relay``.
The garbage collector is tuned as in the daemons (``tune_gc``); every collection's pause is
recorded, and SIGUSR1 writes ``{"gc_pauses_ms": [...], "full_collect_ms": ...}`` (the
latter: a forced full collection, the worst case) to ``--stats``.

With ``--metrics-port`` (the "metrics on" paths), each tunnel is counted as the gateway counts
it (``ras.ops.metrics.tunnel_opened`` when it starts, ``tunnel_closed`` with the relay's byte
totals when it ends) and ``/metrics`` is served on that port (the benchmark scrapes it every
second): what a gateway with ``[metrics]`` adds to a tunnel, and nothing per read.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import ssl
import time
from functools import partial
from pathlib import Path

import trio

from ras.net.fastio import TLSStream, server_tls
from ras.net.listen import accept_loop, open_listeners
from ras.net.relay import RelayStats, relay
from ras.net.tls import connect_tcp
from ras.net.workers import run_workers, tune_gc, worker_index
from ras.ops import metrics
from ras.ops.config import MetricsConfig
from ras.ops.listener import serve_metrics
from ras.pki import server_context

pauses: list[float] = []
_started = [0.0]


def on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        pauses.append((time.perf_counter() - _started[0]) * 1000)


async def serve(
    listen: int,
    target: int,
    ctx: ssl.SSLContext | None,
    reuse_port: bool = False,
    counted: bool = False,
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        front: trio.abc.Stream = stream
        try:
            if ctx is not None:
                tls = server_tls(stream, ctx)
                assert isinstance(tls, TLSStream)
                with trio.fail_after(10):
                    await tls.do_handshake()
                front = tls
            host = await connect_tcp("127.0.0.1", target)
        except Exception:
            await stream.aclose()
            return
        if not counted:
            await relay(front, host)
            return
        started = trio.current_time()
        metrics.tunnel_opened("ticket")
        stats = RelayStats()
        try:
            stats = await relay(front, host)
        finally:
            seconds = trio.current_time() - started
            metrics.tunnel_closed("ticket", stats.a_to_b, stats.b_to_a, seconds)

    listeners = await open_listeners("127.0.0.1", listen, backlog=4096, reuse_port=reuse_port)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, handle, nursery)


async def main(args: argparse.Namespace) -> None:
    ctx = server_context(args.cert, args.key) if args.cert else None
    tune_gc()
    gc.callbacks.append(on_gc)
    async with trio.open_nursery() as nursery:
        counted = args.metrics_port is not None
        if counted:
            await nursery.start(
                partial(serve_metrics, MetricsConfig(), port=args.metrics_port + worker_index())
            )
        for mapping in args.map:
            listen, target = (int(p) for p in mapping.split(":"))
            nursery.start_soon(serve, listen, target, ctx, args.workers > 1, counted)
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            os.write(1, b"ready\n")  # one write: several workers share the pipe
            async for _ in signals:
                natural = list(pauses)  # the collections that happened on their own
                started = time.perf_counter()
                gc.collect()
                full = (time.perf_counter() - started) * 1000
                tracked = len(gc.get_objects())  # not counting the frozen start-up objects
                args.stats.write_text(
                    json.dumps(
                        {"gc_pauses_ms": natural, "full_collect_ms": full, "tracked": tracked}
                    )
                )
                pauses.clear()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--map", action="append", required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument(
        "--metrics-port", type=int, help="count tunnels and serve /metrics here (port + worker)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the ports (SO_REUSEPORT)"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    args = parser.parse_args()

    def one() -> int:
        trio.run(main, args)
        return 0

    raise SystemExit(run_workers(args.workers, one))
