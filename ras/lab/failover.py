"""The failover harness: what users live through while a part of the farm dies.

Run on a client host (``python -m ras.lab.failover ...``, in a lab host through ``ip netns
exec``), it drives the farm the way users do, all at once:

- a steady stream of **launches**: in the gateway modes, one logged-in client session (with its
  keepalive and its re-establishment after a lost connection) launches, opens a tunnel on a new
  connection, sends a few bytes and reads them back from the echoing RDP host, closes; on the
  RDP port, a native-client connection with the routing token in its X.224 cookie does the
  same;
- **long-lived sessions**: tunnels that stay open and carry a small message every
  ``--session-interval-ms``; a session whose tunnel breaks is *cut*, and reconnects (a fresh
  launch and tunnel, as an RDP client's auto-reconnect does) until it carries bytes again.

With ``--probe rdp`` the RDP host is a real RDP server instead of an echo server: a launch is
good when the server answers an X.224 Connection Request (no cookie through a tunnel, the
routing token on the RDP port) with a Connection Confirm, proof that the path reaches a live
RDP server (long-lived sessions need the echo).

The controller kills a component (HALB master, a gateway, a forwarder) and sends the harness
SIGUSR1 at that moment; on SIGTERM, or after ``--seconds`` or ``--launches``, the harness writes
its report as JSON: launches and failed launches (before and after the farm *settled*, i.e.
after the first good launch that followed the kill), the longest outage (the longest time with
no good launch), sessions cut and their reconnects, and how often the client session itself
was re-established. The lab tests assert on it and ``benchmarks/failover.py`` tabulates it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

from ras.client.config import ClientConfig
from ras.client.session import ClientSession
from ras.errors import RasError
from ras.logs import LineFormatter
from ras.net.channel import aclose_quietly
from ras.net.tls import connect_tcp
from ras.protocol import Mode
from ras.protocol.x224 import encode_connection_request

__all__ = ["Report", "main"]

log = logging.getLogger("ras.lab.failover")
_PAYLOAD = bytes(range(48))


@dataclass
class Report:
    mode: str
    launches: int = 0
    failed: int = 0
    failed_after_settle: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, with their time
    longest_outage_s: float = 0.0
    median_launch_ms: float = 0.0
    sessions: int = 0
    sessions_cut: int = 0
    session_reconnects: int = 0
    max_reconnects_per_session: int = 0
    session_bytes: int = 0
    client_reconnects: int = 0
    kill_at_s: float | None = None
    # from the kill to the end of the first good launch that started after it (one already
    # under way at the kill may still succeed without saying anything about the farm after it)
    settled_after_s: float | None = None
    seconds: float = 0.0


class _Run:
    def __init__(self, args: argparse.Namespace, config: ClientConfig) -> None:
        self.args = args
        self.config = config
        self.report = Report(args.mode, sessions=args.sessions)
        self.start = time.monotonic()
        self.last_good = self.start
        self.durations: list[float] = []
        self.per_session: list[int] = [0] * args.sessions
        self.done = trio.Event()
        self.after_settle = 0  # good launches since the farm settled
        self.session: ClientSession | None = None
        self.token = ""

    def now(self) -> float:
        return time.monotonic() - self.start

    def good(self, seconds: float) -> None:
        now = time.monotonic()
        r = self.report
        started = now - seconds - self.start
        r.longest_outage_s = max(r.longest_outage_s, now - self.last_good)
        self.last_good = now
        r.launches += 1
        if r.launches == 1:  # what a caller waits for before it kills anything
            log.info("first launch ok at %.3fs", self.now())
        self.durations.append(seconds)
        if r.kill_at_s is not None and r.settled_after_s is None and started >= r.kill_at_s:
            r.settled_after_s = round(self.now() - r.kill_at_s, 3)
        if r.settled_after_s is not None:
            self.after_settle += 1
            if self.args.after_settle and self.after_settle > self.args.after_settle:
                self.done.set()
        if self.args.launches and r.launches >= self.args.launches:
            self.done.set()

    def bad(self, why: str, started: float) -> None:
        """A failed launch; ``started``: when it began (time.monotonic()). It counts as after
        the settling only if it began after it: one stuck since the kill fails later."""
        r = self.report
        r.launches += 1
        r.failed += 1
        if (
            r.kill_at_s is not None
            and r.settled_after_s is not None
            and started - self.start >= r.kill_at_s + r.settled_after_s
        ):
            r.failed_after_settle += 1
        if len(r.failures) < 20:
            r.failures.append(f"{self.now():.3f}s {why}")
        log.warning("launch failed reason=%s", why)

    # -- one launch ---------------------------------------------------------------------------

    async def _tunnel(self) -> trio.abc.Stream:
        if self.args.mode == "rdp":
            stream = await connect_tcp(self.args.rdp_host, self.args.rdp_port)
            request = encode_connection_request(f"Cookie: msts={self.token}")
            await stream.send_all(request)
            return stream if self.args.probe == "rdp" else _Skip(stream, len(request))
        assert self.session is not None
        launched = await self.session.launch(self.config.resource)
        return await self.session.open_tunnel(launched.ticket)

    async def launch_once(self) -> None:
        started = time.monotonic()
        try:
            with trio.fail_after(self.args.launch_timeout_s):
                stream = await self._tunnel()
                try:
                    if self.args.probe == "rdp":
                        if self.args.mode != "rdp":  # through a tunnel: ours, without a cookie
                            await stream.send_all(encode_connection_request())
                        await _connection_confirm(stream)
                    else:
                        await _echo(stream, _PAYLOAD)
                finally:
                    await aclose_quietly(stream)
        except (RasError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.bad(f"{type(exc).__name__}: {exc}", started)
            return
        self.good(time.monotonic() - started)

    async def launches(self) -> None:
        interval = self.args.interval_ms / 1000
        while True:
            await self.launch_once()
            await trio.sleep(interval)

    # -- long-lived sessions ------------------------------------------------------------------

    async def long_session(self, index: int) -> None:
        interval = self.args.session_interval_ms / 1000
        message = f"session {index} keeps talking ".encode()
        first = True
        while True:
            try:
                with trio.fail_after(self.args.launch_timeout_s):
                    stream = await self._tunnel()
            except (RasError, OSError, trio.BrokenResourceError, trio.TooSlowError):
                await trio.sleep(0.1)
                continue
            if not first:
                self.report.session_reconnects += 1
                self.per_session[index] += 1
            first = False
            try:
                while True:
                    with trio.fail_after(self.args.launch_timeout_s):
                        await _echo(stream, message)
                    self.report.session_bytes += len(message)
                    await trio.sleep(interval)
            except (RasError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.report.sessions_cut += 1
                log.warning("session %d cut at %.3fs reason=%s", index, self.now(), exc)
            finally:
                await aclose_quietly(stream)

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> Report:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            # the RDP port needs a routing token, which a logged-in session asks for
            session = self.session = await self._login()
            nursery.start_soon(session.keepalive)
            if self.args.mode == "rdp":
                self.token = (await session.rdp_token(self.config.resource)).token
            for i in range(self.args.sessions):
                nursery.start_soon(self.long_session, i)
            nursery.start_soon(self.launches)
            with trio.move_on_after(self.args.seconds if self.args.seconds else math.inf):
                await self.done.wait()
            nursery.cancel_scope.cancel()
        if self.session is not None:
            self.report.client_reconnects = self.session.reconnects
            await self.session.aclose()
        r = self.report
        r.seconds = round(self.now(), 3)
        r.longest_outage_s = round(r.longest_outage_s, 3)
        r.max_reconnects_per_session = max(self.per_session, default=0)
        if self.durations:
            ordered = sorted(self.durations)
            r.median_launch_ms = round(ordered[len(ordered) // 2] * 1000, 2)
        return r

    async def _login(self) -> ClientSession:
        with trio.fail_after(30):
            session = await ClientSession.connect(self.config)
            await session.authenticate(self.config.username, self.args.password)
        return session

    def mark_kill(self, signum: int, frame: object) -> None:
        """SIGUSR1, a plain handler installed before the run starts (a kill marked while the
        harness still logs in must not end it): only attributes change here."""
        self.report.kill_at_s = round(self.now(), 3)
        self.report.settled_after_s = None
        self.after_settle = 0

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                self.done.set()


class _Skip(trio.abc.Stream):
    """A stream whose first ``n`` received bytes (the echoed Connection Request) are dropped."""

    def __init__(self, stream: trio.abc.Stream, n: int) -> None:
        self._stream = stream
        self._skip = n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()  # type: ignore[attr-defined]

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            data = await self._stream.receive_some(max_bytes)
            if not data or self._skip == 0:
                return data
            taken = min(self._skip, len(data))
            self._skip -= taken
            if taken < len(data):
                return data[taken:]

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _echo(stream: trio.abc.Stream, payload: bytes) -> None:
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        data = await stream.receive_some(65536)
        if not data:
            raise RasError("the tunnel closed before the echo came back")
        got += data
    if got != payload:
        raise RasError("the echo came back changed")


async def _connection_confirm(stream: trio.abc.Stream) -> None:
    """Read an X.224 Connection Confirm (TPKT version 3, TPDU code 0xD0) from an RDP server."""
    got = b""
    while len(got) < 4 or len(got) < int.from_bytes(got[2:4], "big"):
        data = await stream.receive_some(4096)
        if not data:
            raise RasError("the RDP server closed without a Connection Confirm")
        got += data
        if got[:1] != b"\x03" or (len(got) >= 6 and got[5] & 0xF0 != 0xD0):
            raise RasError(f"not an X.224 Connection Confirm: {got[:8].hex()}")
        if len(got) >= 4 and int.from_bytes(got[2:4], "big") < 7:
            raise RasError(f"a TPKT length of {int.from_bytes(got[2:4], 'big')}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ras.lab.failover",
        description="Launch and hold sessions through a farm while a part of it is killed "
        "(SIGUSR1 marks the kill); write a JSON report.",
    )
    p.add_argument("--server", required=True, help="HOST:PORT of the VIP or gateway")
    p.add_argument(
        "--secondary", action="append", default=[], help="HOST:PORT tried next (repeatable)"
    )
    p.add_argument(
        "--probe",
        choices=["echo", "rdp"],
        default="echo",
        help="what answers on the RDP host: an echo server, or a real RDP server",
    )
    p.add_argument("--mode", choices=["gateway", "gateway_ssl", "rdp"], default="gateway")
    p.add_argument("--ca-file", help="the gateways' public certificate (gateway_ssl)")
    p.add_argument("--server-name", default="", help="the name in that certificate")
    p.add_argument("--rdp", default="", help="HOST:PORT of the RDP port (mode rdp)")
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True)
    p.add_argument("--resource", default="desktop")
    p.add_argument("--launches", type=int, default=0, help="stop after this many launches")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long")
    p.add_argument(
        "--after-settle",
        type=int,
        default=0,
        metavar="N",
        help="stop once N launches have succeeded after the farm settled from the kill",
    )
    p.add_argument("--interval-ms", type=float, default=20.0, help="pause between launches")
    p.add_argument("--sessions", type=int, default=0, help="long-lived sessions to hold")
    p.add_argument("--session-interval-ms", type=float, default=200.0)
    p.add_argument("--launch-timeout-s", type=float, default=5.0)
    p.add_argument("--keepalive-s", type=float, default=1.0)
    p.add_argument("--json", required=True, help="write the report here")
    args = p.parse_args(argv)
    if args.probe == "rdp" and args.sessions:
        p.error("--sessions needs --probe echo (a session's bytes come back from the echo)")
    if args.mode == "rdp":
        host, _, port = args.rdp.rpartition(":")
        if not host:
            p.error("--rdp HOST:PORT is needed with --mode rdp")
        args.rdp_host, args.rdp_port = host, int(port)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())  # one line per event, fields escaped
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args.password = Path(args.password_file).read_text().strip()
    host, _, port = args.server.rpartition(":")
    mode = Mode.GATEWAY_SSL if args.mode == "gateway_ssl" else Mode.GATEWAY
    config = ClientConfig(
        server_host=host,
        server_port=int(port),
        secondary_servers=tuple(args.secondary),
        mode=mode,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        server_name=args.server_name,
        username=args.user,
        resource=args.resource,
        connect_timeout_s=2.0,
        request_timeout_s=args.launch_timeout_s,
        keepalive_s=args.keepalive_s,
    )
    run = _Run(args, config)
    signal.signal(signal.SIGUSR1, run.mark_kill)
    report = trio.run(run.run)
    if report.kill_at_s is not None:
        log.info("kill marked at %.3fs", report.kill_at_s)
    text = json.dumps(asdict(report), indent=1)
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
