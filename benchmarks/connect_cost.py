"""CPU per upstream connection: `trio.open_tcp_stream` (what `ras.net.tls.connect_tcp`, and so
the HALB balancer, uses for every forwarded connection) against a plain trio socket connect.

On loopback, in one process (the accepting side, which only closes, counts in both), in
interleaved blocks of 1000 connect+close. Prints the median CPU microseconds per connection
of each. Usage: ``uv run python benchmarks/connect_cost.py [--blocks 10]``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

import trio


async def plain(host: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def happy_eyeballs(host: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


async def main(blocks: int) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await stream.aclose()

    ways: dict[str, Callable[[str, int], Awaitable[trio.SocketStream]]] = {
        "trio.open_tcp_stream": happy_eyeballs,
        "plain socket connect": plain,
    }
    costs: dict[str, list[float]] = {name: [] for name in ways}
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        for _ in range(blocks):
            for name, connect in ways.items():
                cpu = time.process_time()
                for _ in range(1000):
                    stream = await connect("127.0.0.1", port)
                    await stream.aclose()
                costs[name].append((time.process_time() - cpu) / 1000 * 1e6)
        nursery.cancel_scope.cancel()
    for name, values in costs.items():
        print(f"{name:<22} median {statistics.median(values):5.0f} us CPU per connect+close")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10, help="blocks of 1000 per way (10)")
    trio.run(main, parser.parse_args().blocks)
