"""The far end of the relay benchmark (the "RDP host"), one trio process, plain TCP.

Ports from ``--base``: +0 echo (everything back), +1 sink (reads to the end of stream, answers
the byte count as 8 bytes, closes), +2 rdp-like (bursts of 8 messages of 200-1400 bytes, one
send each; at most 4 bursts ahead of the client's 4-byte acks), +3 users (one message of
200-1400 bytes every 100 ms per session carrying a sequence number and the send time, the
client's small messages read and dropped). Messages are framed with a 2-byte length.
"""

from __future__ import annotations

import argparse
import random
import struct
import time

import trio

from ras.net.workers import tune_gc

FRAME = struct.Struct("!H")
STAMP = struct.Struct("!QI")  # monotonic_ns, sequence
PAYLOAD = bytes(random.Random(1).randbytes(1400))


def message(size: int, head: bytes = b"") -> bytes:
    return FRAME.pack(size) + head + PAYLOAD[: size - len(head)]


async def echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(262144):
        await stream.send_all(data)


async def sink(stream: trio.SocketStream) -> None:
    total = 0
    buf = bytearray(262144)
    sock = stream.socket
    while True:
        n = await sock.recv_into(buf)
        if not n:
            break
        total += n
    await stream.send_all(struct.pack("!Q", total))


async def rdp_like(stream: trio.SocketStream) -> None:
    rng = random.Random()
    credit = trio.Semaphore(4)

    async with trio.open_nursery() as nursery:

        async def acks() -> None:
            while data := await stream.receive_some(4096):
                for _ in range(len(data) // 4):
                    credit.release()
            nursery.cancel_scope.cancel()

        nursery.start_soon(acks)
        while True:
            await credit.acquire()
            for _ in range(8):
                await stream.send_all(message(rng.randint(200, 1400)))


async def users(stream: trio.SocketStream) -> None:
    rng = random.Random()

    async def drain() -> None:
        while await stream.receive_some(4096):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        seq = 0
        next_at = trio.current_time() + rng.random() * 0.1
        while True:
            await trio.sleep_until(next_at)
            next_at += 0.1
            seq += 1
            head = STAMP.pack(time.monotonic_ns(), seq)
            await stream.send_all(message(rng.randint(200, 1400), head))


async def main(base: int) -> None:
    tune_gc()

    def guarded(fn):
        async def run(stream: trio.SocketStream) -> None:
            try:
                await fn(stream)
            except Exception:
                pass
            finally:
                await stream.aclose()

        return run

    async with trio.open_nursery() as nursery:
        for offset, fn in enumerate((echo, sink, rdp_like, users)):
            listeners = await trio.open_tcp_listeners(base + offset, host="127.0.0.1", backlog=4096)
            nursery.start_soon(trio.serve_listeners, guarded(fn), listeners)
        print("ready", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=int, required=True)
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    trio.run(main, parser.parse_args().base)
