"""The client's probe loop for the failover benchmark (run inside the client's namespace).

Every ``--interval`` seconds it opens a NEW connection to ADDRESS:PORT and does the control
protocol's opening exchange (preface, hello -> welcome, ping -> pong), each probe a task of its
own, so a probe whose SYN went into the void (the dead master's MAC) does not delay the next.
Each finished probe appends one line to OUT: ``<start> <end> <result>``, times from
``time.monotonic()`` (CLOCK_MONOTONIC: the same clock in every process of the machine, so the
benchmark can compare them with the instant it killed the master). Results: ``ok`` (served by
a gateway through the balancer), ``refused`` (connect failed), ``cut`` (connected, then closed
or reset before the pong), ``timeout``. Runs until killed.
"""

from __future__ import annotations

import argparse
import time
from typing import TextIO

import trio

from ras.errors import ProtocolError
from ras.protocol import Connection, Hello, Ping, Pong, Role, Side, Welcome


async def _exchange(sock: trio.socket.SocketType) -> None:
    conn = Connection(Side.CLIENT)
    await sock.send(conn.send(Hello(Role.CLIENT, "bench-probe")))
    for wanted, after in ((Welcome, Ping(7)), (Pong, None)):
        replies: list[object] = []
        while not any(isinstance(r, wanted) for r in replies):
            data = await sock.recv(4096)
            if not data:
                raise EOFError
            replies += conn.receive_data(data)
        if after is not None:
            await sock.send(conn.send(after))


async def probe(address: str, port: int) -> str:
    """One probe; the caller owns the deadline."""
    sock = trio.socket.socket()
    with sock:
        try:
            await sock.connect((address, port))
        except OSError:
            return "refused"
        try:
            await _exchange(sock)
        except (OSError, EOFError, ProtocolError):
            return "cut"
        return "ok"


async def main(args: argparse.Namespace, out: TextIO) -> None:
    async def one() -> None:
        start = time.monotonic()
        result = "timeout"
        with trio.move_on_after(args.timeout):
            result = await probe(args.address, args.port)
        out.write(f"{start:.6f} {time.monotonic():.6f} {result}\n")

    async with trio.open_nursery() as nursery:
        due = time.monotonic()
        while True:
            nursery.start_soon(one)
            due += args.interval
            now = time.monotonic()
            if due < now - args.interval:  # starved of CPU: do not burst to catch up
                due = now
            await trio.sleep(max(0.0, due - now))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("out")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=3.0)
    arguments = parser.parse_args()
    with open(arguments.out, "a", buffering=1) as log:  # a line per probe, as it ends
        trio.run(main, arguments, log)
