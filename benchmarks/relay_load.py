"""Load generator of the relay benchmark: one case, one process, one JSON line on stdout.

It runs on trio with the lean streams of ``ras.net.fastio`` (raw sockets; TLS through
``ssl.SSLObject``, as a client), so it costs about what the relay costs; the benchmark runs
several of these processes at once. ``--tls`` speaks TLS to the relay (no certificate
check: the farm's self-signed certificate). Cases: bulk, echo, cps, idle, rdp, users.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import ssl
import statistics
import struct
import sys
import time

import trio

from ras.net.fastio import TLSStream

FRAME = struct.Struct("!H")
STAMP = struct.Struct("!QI")
CHUNK = bytes(262144)


def tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


CTX = tls_context()


async def connect(port: int, tls: bool) -> trio.abc.HalfCloseableStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    if not tls:
        return tcp
    stream = TLSStream(tcp.socket, CTX, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def exactly(stream: trio.abc.ReceiveStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def bulk(a: argparse.Namespace) -> dict[str, object]:
    totals: list[int] = []

    async def one() -> None:
        s = await connect(a.port, a.tls)
        sent = 0
        end = trio.current_time() + a.seconds
        while trio.current_time() < end:
            await s.send_all(CHUNK)
            sent += len(CHUNK)
        await s.send_eof()
        with trio.move_on_after(10):
            reply = await exactly(s, 8, bytearray())
            sent = struct.unpack("!Q", reply)[0]
        totals.append(sent)
        await s.aclose()

    started = time.monotonic()
    async with trio.open_nursery() as n:
        for _ in range(a.streams):
            n.start_soon(one)
    return {"bytes": sum(totals), "seconds": time.monotonic() - started}


async def echo(a: argparse.Namespace) -> dict[str, object]:
    s = await connect(a.port, a.tls)
    msg = bytes(100)
    buf = bytearray()
    times = []
    for i in range(a.count + 200):
        t = time.perf_counter_ns()
        await s.send_all(msg)
        await exactly(s, 100, buf)
        if i >= 200:  # warm-up
            times.append((time.perf_counter_ns() - t) / 1000)
    await s.aclose()
    times.sort()
    return {"median_us": statistics.median(times), "p99_us": times[int(len(times) * 0.99)]}


async def cps(a: argparse.Namespace) -> dict[str, object]:
    ok = errors = 0
    end = trio.current_time() + a.seconds

    async def worker() -> None:
        nonlocal ok, errors
        while trio.current_time() < end:
            try:
                s = await connect(a.port, a.tls)
                await s.send_all(b"x")
                await exactly(s, 1, bytearray())
                await s.aclose()
                ok += 1
            except (OSError, trio.BrokenResourceError, EOFError):
                errors += 1

    async with trio.open_nursery() as n:
        for _ in range(a.concurrency):
            n.start_soon(worker)
    return {"ok": ok, "errors": errors, "seconds": a.seconds}


async def idle(a: argparse.Namespace) -> dict[str, object]:
    streams = []
    sem = trio.Semaphore(64)

    async def one() -> None:
        async with sem:
            s = await connect(a.port, a.tls)
            await s.send_all(b"x")
            await exactly(s, 1, bytearray())
            streams.append(s)

    async with trio.open_nursery() as n:
        for _ in range(a.count):
            n.start_soon(one)
    print(json.dumps({"open": len(streams)}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    for s in streams:
        await s.aclose()
    return {"open": len(streams)}


async def rdp(a: argparse.Namespace) -> dict[str, object]:
    counts: list[int] = []
    end = trio.current_time() + a.seconds

    async def one() -> None:
        s = await connect(a.port, a.tls)
        buf = bytearray()
        got = 0
        with trio.move_on_at(end):
            while True:
                size = FRAME.unpack(await exactly(s, 2, buf))[0]
                await exactly(s, size, buf)
                got += 1
                if got % 8 == 0:
                    await s.send_all(b"ack!")
        counts.append(got)
        await s.aclose()

    async with trio.open_nursery() as n:
        for _ in range(a.streams):
            n.start_soon(one)
    return {"messages": sum(counts), "seconds": a.seconds}


async def users(a: argparse.Namespace) -> dict[str, object]:
    """Sessions of the users port: latency of each message, losses (sequence gaps)."""
    lat: list[float] = []
    lost = failed = 0
    rng = random.Random()
    start_at = trio.current_time() + a.ramp
    end = start_at + a.seconds

    async def one(delay: float) -> None:
        nonlocal lost, failed
        await trio.sleep(delay)
        try:
            s = await connect(a.port, a.tls)
        except (OSError, trio.BrokenResourceError):
            failed += 1
            return
        buf = bytearray()
        last = None

        async def up() -> None:
            while True:
                await trio.sleep(0.5)
                await s.send_all(bytes(100))

        try:
            async with trio.open_nursery() as n:
                n.start_soon(up)
                with trio.move_on_at(end):
                    while True:
                        size = FRAME.unpack(await exactly(s, 2, buf))[0]
                        body = await exactly(s, size, buf)
                        sent_ns, seq = STAMP.unpack_from(body)
                        now = trio.current_time()
                        if now >= start_at:
                            lat.append((time.monotonic_ns() - sent_ns) / 1e6)
                        if last is not None and seq != last + 1:
                            lost += seq - last - 1
                        last = seq
                n.cancel_scope.cancel()
        except Exception:  # the session broke (also inside a group)
            failed += 1
        await s.aclose()

    async with trio.open_nursery() as n:
        for _ in range(a.count):
            n.start_soon(one, rng.random() * a.ramp * 0.8)
    lat.sort()
    return {
        "messages": len(lat),
        "lost": lost,
        "failed": failed,
        "p50_ms": lat[len(lat) // 2] if lat else None,
        "p99_ms": lat[int(len(lat) * 0.99)] if lat else None,
    }


CASES = {"bulk": bulk, "echo": echo, "cps": cps, "idle": idle, "rdp": rdp, "users": users}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=CASES)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--ramp", type=float, default=3)
    a = p.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    cpu = time.process_time()
    result = trio.run(CASES[a.case], a)
    result["client_cpu_s"] = time.process_time() - cpu
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
