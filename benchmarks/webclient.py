"""Web client against the native path: what a browser's RDP session costs the gateway.

The gateway side runs in this process with the gateway's own code: the TLS port's lean TLS
(``ras.net.fastio.server_tls``) and the tunnel registry's relay (``ras.gateway.tunnels``). A
native session (gateway SSL mode) is TLS from the client, relayed to the host's plain TCP (the
RDP TLS inside is the client's, opaque to the gateway). A web session is TLS from the browser,
a WebSocket upgrade (``ras.net.websocket``), an RDCleanPath request, the X.224 exchange and
TLS to the host as its client (``ras.net.rdptls``), then WebSocket messages <-> TLS. The load
(clients and stand-in RDP hosts) runs in a child process, so the CPU measured here is the
gateway's alone.

Two figures per path, in one run:
- memory per open idle tunnel (RSS growth / tunnels), hence tunnels per GiB of gateway memory;
- CPU per active session: each session sends 64 bytes every 50 ms (input) and the host answers
  each with ``--frame`` bytes (screen updates), for ``--seconds``; CPU milliseconds of the
  gateway per session-second, median of ``--rounds`` rounds, paths interleaved.

    uv run python benchmarks/webclient.py [--sessions 50] [--idle 500] [--rounds 3]

Timings depend on the machine and its load (printed); compare the ratio, not figures from
different runs. No test asserts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from ras.gateway.tunnels import TunnelInfo, Tunnels, Via
from ras.net.fastio import server_tls
from ras.net.rdptls import rdp_tls, unverified_context
from ras.net.websocket import accept
from ras.pki import FarmPKI, server_context
from ras.protocol.rdcleanpath import CleanPathPdu, encode_pdu, parse_pdu
from ras.protocol.x224 import encode_connection_request, parse_connection_request

CONFIRM = bytes.fromhex("030000130ed000001234000200080002000000")
UPGRADE = (
    b"GET /webclient/connect HTTP/1.1\r\nhost: gw\r\nupgrade: websocket\r\n"
    b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
    b"sec-websocket-key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n"
)


# -- the gateway side (this process) ---------------------------------------------------------


async def gateway(
    ctx: ssl.SSLContext,
    native_host: int,
    web_host: int,
    *,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    tunnels = Tunnels()
    info = TunnelInfo(Via.TICKET, ("127.0.0.1", 0), ("127.0.0.1", 0), "gw", ("gw",), True)

    async def native(stream: trio.SocketStream) -> None:
        tls = server_tls(stream, ctx)
        await tls.do_handshake()
        host = await trio.open_tcp_stream("127.0.0.1", native_host)
        await tunnels.run(info, tls, host)

    async def web(stream: trio.SocketStream) -> None:
        tls = server_tls(stream, ctx)
        await tls.do_handshake()
        head = b""
        while b"\r\n\r\n" not in head:
            head += await tls.receive_some(4096)
        lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        ws = await accept(tls, headers)
        data = b""
        while (got := parse_pdu(data)) is None:
            data += await ws.receive_some(4096)
        request = got[0]
        assert request.x224 is not None
        host = await trio.open_tcp_stream("127.0.0.1", web_host)
        confirm, host_tls = await rdp_tls(host, request.x224, unverified_context())
        assert host_tls is not None
        chain = (host_tls.getpeercert(binary_form=True) or b"",)
        await ws.send_all(encode_pdu(CleanPathPdu.response("127.0.0.1", confirm.data, chain)))
        await tunnels.run(dataclasses.replace(info, via=Via.WEB), ws, host_tls)

    listeners = []
    ports: list[int] = []
    for handler in (native, web):
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        ports.append(listener.socket.getsockname()[1])
        listeners.append((handler, listener))
    async with trio.open_nursery() as nursery:
        for handler, listener in listeners:
            nursery.start_soon(trio.serve_listeners, handler, [listener])
        task_status.started(ports)


# -- the load (a child process): clients and stand-in hosts ----------------------------------


async def _host(stream: trio.abc.Stream, frame: int) -> None:
    """A stand-in RDP host after the handshake: a frame for every input message."""
    try:
        while data := await stream.receive_some(65536):
            for _ in range(max(1, len(data) // 64)):
                await stream.send_all(bytes(frame))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        pass


async def _web_host(stream: trio.SocketStream, ctx: ssl.SSLContext, frame: int) -> None:
    data = b""
    while (request := parse_connection_request(data)) is None:
        data += await stream.receive_some(4096)
    assert request is not None
    await stream.send_all(CONFIRM)
    tls = trio.SSLStream(stream, ctx, server_side=True)
    await _host(tls, frame)


async def _client(port: int, web: bool, cctx: ssl.SSLContext) -> trio.abc.Stream:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(raw, cctx, server_hostname="localhost")
    await tls.do_handshake()
    if not web:
        return tls
    from wsproto.connection import Connection, ConnectionType  # the browser's side
    from wsproto.events import BytesMessage

    await tls.send_all(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await tls.receive_some(4096)
    ws = Connection(ConnectionType.CLIENT, trailing_data=head.split(b"\r\n\r\n", 1)[1])
    request = CleanPathPdu.request(encode_connection_request(), "h", "w1.token")
    await tls.send_all(ws.send(BytesMessage(data=encode_pdu(request))))
    answer = b""
    while parse_pdu(answer, max_size=1 << 16) is None:
        ws.receive_data(await tls.receive_some(65536))
        answer += b"".join(e.data for e in ws.events() if isinstance(e, BytesMessage))
    return _WsClient(tls, ws)


class _WsClient(trio.abc.Stream):
    """The browser's binary messages as a stream (client side, masked frames)."""

    def __init__(self, tls: trio.abc.Stream, ws: object) -> None:
        self.tls, self.ws = tls, ws

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        from wsproto.events import BytesMessage

        await self.tls.send_all(self.ws.send(BytesMessage(data=bytes(data))))  # type: ignore[attr-defined]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        from wsproto.events import BytesMessage

        while True:
            got = b"".join(e.data for e in self.ws.events() if isinstance(e, BytesMessage))  # type: ignore[attr-defined]
            if got:
                return got
            data = await self.tls.receive_some(65536)
            if not data:
                return b""
            self.ws.receive_data(data)  # type: ignore[attr-defined]

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.tls.aclose()


async def _session(stream: trio.abc.Stream, until: float, frame: int) -> None:
    async def read() -> None:
        while await stream.receive_some(65536):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        while trio.current_time() < until:
            await stream.send_all(bytes(64))
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def load(conn: object, cert: str, key: str, ports: list[int], args: argparse.Namespace) -> None:
    async def main() -> None:
        sctx = server_context(Path(cert), Path(key))
        cctx = ssl.create_default_context()
        cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
        async with trio.open_nursery() as nursery:
            plain = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
            tls = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
            nursery.start_soon(trio.serve_listeners, lambda s: _host(s, args.frame), plain)
            nursery.start_soon(trio.serve_listeners, lambda s: _web_host(s, sctx, args.frame), tls)
            conn.send((plain[0].socket.getsockname()[1], tls[0].socket.getsockname()[1]))  # type: ignore[attr-defined]
            gw_ports = conn.recv()  # type: ignore[attr-defined]
            held: list[trio.abc.Stream] = []
            while (order := conn.recv()) is not None:  # type: ignore[attr-defined]
                if order == "more":
                    continue
                what, web, count = order
                port = gw_ports[1 if web else 0]
                streams = []
                for _ in range(count):
                    streams.append(await _client(port, web, cctx))
                if what == "idle":
                    conn.send("open")  # type: ignore[attr-defined]
                    held.extend(streams)
                    continue
                else:
                    conn.send("open")  # type: ignore[attr-defined]
                    until = trio.current_time() + args.seconds
                    async with trio.open_nursery() as sessions:
                        for s in streams:
                            sessions.start_soon(_session, s, until, args.frame)
                for s in streams:
                    await s.aclose()
                conn.send("done")  # type: ignore[attr-defined]
            for s in held:
                await s.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- the run ----------------------------------------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="active sessions per round")
    parser.add_argument("--idle", type=int, default=500, help="idle tunnels for the memory")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frame", type=int, default=8192, help="bytes the host answers")
    parser.add_argument("--memory-only", choices=("native", "web"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ras-bench-web-"))
    pki = FarmPKI(tmp)
    pki.init_ca()
    cert, key = pki.ensure_self_signed("gw", ("localhost",))
    ctx = server_context(cert, key)
    mine, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(
        target=load, args=(theirs, str(cert), str(key), [], args), daemon=True
    )
    child.start()
    native_host, web_host = mine.recv()
    results: dict[str, dict[str, list[float]]] = {
        p: {"rss": [], "cpu": []} for p in ("native", "web")
    }

    only = args.memory_only

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(gateway, ctx, native_host, web_host)
            mine.send(ports)
            if only:  # a fresh process per path: freed memory of another path is not reused
                web = only == "web"
                mine.send(("idle", web, args.idle))  # warm-up batch, held open
                await trio.to_thread.run_sync(mine.recv)
                rss = _rss_kib()
                mine.send("more")
                mine.send(("idle", web, args.idle))
                await trio.to_thread.run_sync(mine.recv)
                await trio.sleep(0.5)
                results[only]["rss"].append((_rss_kib() - rss) / args.idle)
            for _ in range(0 if only else args.rounds):
                for path, web in (("native", False), ("web", True)):
                    mine.send(("active", web, args.sessions))
                    await trio.to_thread.run_sync(mine.recv)
                    cpu = _cpu()
                    await trio.to_thread.run_sync(mine.recv)
                    spent = _cpu() - cpu
                    results[path]["cpu"].append(1000 * spent / (args.sessions * args.seconds))
            mine.send(None)
            nursery.cancel_scope.cancel()

    trio.run(run)
    child.join(10)
    if only:
        print(f"rss {results[only]['rss'][0]:.2f}")
        return
    for path in ("native", "web"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-only", path, f"--idle={args.idle}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        results[path]["rss"].append(float(out.split("rss ")[-1]))
    load1, load5, _ = os.getloadavg()
    print(f"load average {load1:.2f} {load5:.2f}; {os.cpu_count()} CPUs; "
          f"{args.sessions} active sessions x {args.seconds:.0f} s, {args.idle} idle tunnels, "
          f"frames of {args.frame} bytes every 50 ms per session")  # fmt: skip
    print(f"{'path':8} {'KiB/idle tunnel':>16} {'tunnels/GiB':>12} {'CPU ms/session-s':>17}")
    med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in results.items()}
    for path, m in med.items():
        per_gib = (1 << 20) / m["rss"] if m["rss"] > 0 else float("inf")
        print(f"{path:8} {m['rss']:16.1f} {per_gib:12.0f} {m['cpu']:17.2f}")
    print(f"web/native: memory x{med['web']['rss'] / max(med['native']['rss'], 0.01):.2f}, "
          f"CPU x{med['web']['cpu'] / max(med['native']['cpu'], 0.001):.2f}")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
