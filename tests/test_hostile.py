"""Hostile clients against a real gateway: no request reaches anything but the ticket's host,
and thousands of tunnels leave no file descriptor or task behind.

(tests/test_tunnel_security.py covers garbage, replayed, expired, other-gateway and
client-bound tickets; this adds tickets edited or forged to name other places, requests that
name places in other ways, and the leak check.)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time

import pytest
import trio
from farmkit import PASSWORD, USER, Listener, add_gateway, farm

from ras.broker.tickets import TicketAuthority
from ras.client.session import ClientSession
from ras.errors import ErrorCode
from ras.net.channel import Channel, PeerError
from ras.net.sniff import PrefixedStream
from ras.protocol import Hello, Mode, OpenTunnel, Role, Side, TunnelOpen, Welcome, encode_v2

# Places a tunnel must never go to (none of them is the ticket's host).
FORBIDDEN = [
    ("127.0.0.1", 22),
    ("::1", 3389),
    ("169.254.169.254", 80),  # link-local (cloud metadata)
    ("fe80::1", 3389),
    ("10.0.0.1", 3389),
    ("192.168.1.1", 445),
    ("172.16.0.1", 3389),
    ("localhost", 3389),
    ("evil.example.com", 3389),  # a name that resolves elsewhere
]


class V6Listener(Listener):
    """A decoy on ::1."""

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="::1")
        self.port = listeners[0].socket.getsockname()[1]

        async def handle(stream: trio.SocketStream) -> None:
            self.connections += 1
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


@pytest.fixture
async def peers(nursery: trio.Nursery) -> tuple[Listener, Listener, Listener]:
    """(the RDP host, a decoy on 127.0.0.1, a decoy on ::1)."""
    host, decoy, decoy6 = Listener(), Listener(), V6Listener()
    for listener in (host, decoy, decoy6):
        await nursery.start(listener.serve)
    return host, decoy, decoy6


def _edit(ticket: str, **changes: object) -> str:
    prefix, body, mac = ticket.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{prefix}.{edited}.{mac}"


async def _ticket(cfg) -> str:
    async with await ClientSession.connect(cfg) as session:
        await session.authenticate(USER, PASSWORD)
        return (await session.launch("desktop")).ticket


async def _refused(cfg, ticket: str) -> ErrorCode:
    async with await ClientSession.connect(cfg) as session:
        with pytest.raises(PeerError) as info:
            await session.open_tunnel(ticket)
    return info.value.code


async def test_edited_and_forged_tickets_naming_other_places(tmp_path, peers, caplog):
    caplog.set_level(logging.INFO)
    host, decoy, decoy6 = peers
    places = [*FORBIDDEN, ("127.0.0.1", decoy.port), ("::1", decoy6.port), ("127.0.0.1", 1)]
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)]) as f:
        cfg = f.client_config(mode=Mode.GATEWAY)
        genuine = await _ticket(cfg)
        foreign = TicketAuthority(os.urandom(32))
        with trio.fail_after(180):  # hang guard
            for where, port in places:
                edited = _edit(genuine, host=where, port=port)
                forged, _ = foreign.issue(
                    user=USER,
                    resource="desktop",
                    host=where,
                    port=port,
                    gateway="gateway",
                    client="127.0.0.1",
                    now=time.time(),
                    ttl_s=60,
                )
                for ticket in (edited, forged, _edit(genuine, port=port)):
                    assert await _refused(cfg, ticket) is ErrorCode.TICKET_INVALID, where
            # the genuine ticket still opens exactly one tunnel, to its host
            tunnel = await ClientSession(cfg, None).open_tunnel(genuine)  # type: ignore[arg-type]
            await tunnel.aclose()
    assert (host.connections, decoy.connections, decoy6.connections) == (1, 0, 0)
    # no connection was even tried anywhere else (a try would log "tunnel failed")
    assert not any("tunnel failed" in r.getMessage() for r in caplog.records)


async def test_other_ways_of_naming_a_place_reach_nothing(tmp_path, peers, caplog):
    host, decoy, decoy6 = peers
    async with (
        farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f,
        trio.open_nursery() as nursery,
    ):
        await add_gateway(f, nursery, "gateway", trusted_proxies=("127.0.0.1",))
        plain = f.gateway_addrs["gateway"]["plain"]
        requests = [
            f"CONNECT 127.0.0.1:{decoy.port} HTTP/1.1\r\nHost: 127.0.0.1:{decoy.port}\r\n\r\n",
            f"GET http://127.0.0.1:{decoy.port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ]
        with trio.fail_after(30):
            for request in requests:
                async with await trio.open_tcp_stream(*plain) as stream:
                    await stream.send_all(request.encode())
                    reply = b""
                    while data := await stream.receive_some():
                        reply += data
                assert reply.startswith(b"HTTP/1.1 301")
                assert b"location: https://localhost/" in reply.lower()
            # an X.224 request whose cookie names the decoy, on the plain port
            cookie = f"Cookie: msts=127.0.0.1:{decoy.port}\r\n".encode()
            x224 = bytes([3, 0, 0, 11 + len(cookie), 6 + len(cookie), 0xE0, 0, 0, 0, 0, 0])
            async with await trio.open_tcp_stream(*plain) as stream:
                await stream.send_all(x224 + cookie)
                with contextlib.suppress(trio.BrokenResourceError):  # closed unread: a reset
                    assert await stream.receive_some() == b""
            # a PROXY v2 header whose destination is the decoy: only the source is used
            header = encode_v2(("127.0.0.1", 4000), ("127.0.0.1", decoy.port))
            stream = await trio.open_tcp_stream(*plain)
            await stream.send_all(header)
            async with Channel(stream, Side.CLIENT) as chan:
                await chan.send(Hello(Role.CLIENT, "test"))
                assert isinstance(await chan.receive(), Welcome)
                with pytest.raises(PeerError):
                    await chan.request(OpenTunnel(f"127.0.0.1:{decoy.port}"))
        nursery.cancel_scope.cancel()
    assert (host.connections, decoy.connections, decoy6.connections) == (0, 0, 0)


# -- many tunnels leave nothing behind ---------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())  # type: ignore[arg-type]


# The issue's 10,000. On 2 shared cores the gateway, broker, RDP host and clients of this one
# process make about 270 ticketed tunnels a second (redeemed on the gateway's pooled broker
# connections), so about 40 s; RAS_HOSTILE_TUNNELS sets another count.
TUNNELS = int(os.environ.get("RAS_HOSTILE_TUNNELS", "10000"))


async def test_many_short_tunnels_leave_no_fds_or_tasks(tmp_path, nursery):
    host = Listener()
    await nursery.start(host.serve)
    async with farm(tmp_path, rdp_hosts=[("host1", "127.0.0.1", host.port)], gateways=()) as f:
        # one test client makes all the connections: lift its per-address rate limit
        gw = await add_gateway(
            f, nursery, "gateway", max_new_per_ip_per_s=1e9, max_new_per_ip_burst=10**9
        )
        plain = f.gateway_addrs["gateway"]["plain"]
        with trio.fail_after(20):
            while not gw.registered.is_set():  # noqa: ASYNC110 (polling another task's state)
                await trio.sleep(0.02)
        # Test-only fast path: tickets straight from the in-process broker's authority (each
        # is still redeemed once at the broker over mutual TLS by the gateway).
        tickets = [
            f.broker.tickets.issue(
                user=USER,
                resource="desktop",
                host="127.0.0.1",
                port=host.port,
                gateway="gateway",
                client="127.0.0.1",
                now=time.time(),
                ttl_s=600,
            )[0]
            for _ in range(TUNNELS)
        ]

        async def one(ticket: str) -> None:
            stream = await trio.open_tcp_stream(*plain)
            chan = Channel(stream, Side.CLIENT)
            async with chan:
                await chan.send(Hello(Role.CLIENT, "test"))
                assert isinstance(await chan.receive(), Welcome)
                assert isinstance(await chan.request(OpenTunnel(ticket)), TunnelOpen)
                tunnel = PrefixedStream(chan.stream, chan.into_tunnel())
                await tunnel.send_all(b"ping")
                got = b""
                while len(got) < 4:
                    got += await tunnel.receive_some()
                await tunnel.send_eof()
                while await tunnel.receive_some():
                    pass

        async def worker(queue: list[str]) -> None:
            while queue:
                await one(queue.pop())

        # a first round warms every cache, then the baseline is taken. The gateway's pool of
        # redemption connections to the broker (at most gw.redeemer.size, each an fd at both
        # ends and a task at the broker) is bounded, not a leak: it is emptied before each count.
        await worker([tickets.pop() for _ in range(20)])
        await gw.redeemer.aclose()
        await trio.sleep(0.2)
        fds, tasks = _fds(), _tasks()
        started = time.monotonic()
        with trio.fail_after(600):
            async with trio.open_nursery() as workers:
                for _ in range(32):
                    workers.start_soon(worker, tickets)
            assert 0 < gw.redeemer.open <= gw.redeemer.size
            await gw.redeemer.aclose()
            # the gateway finishes its side of the last tunnels, the broker its redemptions
            while len(gw.tunnels) or _fds() > fds or _tasks() > tasks:
                await trio.sleep(0.05)
                if time.monotonic() - started > 590:
                    break
        elapsed = time.monotonic() - started
        print(f"{TUNNELS - 20} tunnels in {elapsed:.1f}s ({(TUNNELS - 20) / elapsed:.0f}/s)")
        assert _fds() <= fds
        assert _tasks() <= tasks
        assert gw.limits.held == 0
        assert len(gw.tunnels) == 0
    assert host.connections == TUNNELS
