"""A few long-lived mutual-TLS connections from a gateway to its broker, for ticket redemption.

Opening a tunnel used to cost a new mutual-TLS connection to the broker (a full handshake with
client certificate, hello/welcome, ``client_session``) just to redeem one ticket: that, not the
relay, capped the rate of new tunnels. Redemptions carry no per-user state, so the gateway
keeps a small pool of connections on which every request is a ``redeem_ticket`` naming the
client's address (the gateway is trusted by its farm certificate to say it, as it is in
``client_session``); the broker still checks the ticket's gateway against the certificate of
the connection it arrives on, its client address, its expiry and that it is used once.

A connection serves one request at a time; at most ``size`` are open. One that breaks is
closed and, if it had served before (it may have gone stale: the broker restarted, or a
firewall forgot it), the request is tried once more on a fresh one; one idle for longer than
``idle_s`` is closed rather than trusted. The pool has no task of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ras.errors import PeerError, TransportError
from ras.net.channel import Channel
from ras.protocol import Message, RedeemTicket

__all__ = ["IDLE_S", "SIZE", "RedeemPool"]

SIZE = 8  # connections at most: a redemption is a short round trip, this many are plenty
IDLE_S = 30.0  # a connection idle longer is closed, not reused (the broker drops them at 120 s)


class RedeemPool:
    """``connect`` opens one redemption connection (TLS, hello/welcome); the caller owns
    deadlines around ``request``."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Channel]],
        *,
        size: int = SIZE,
        idle_s: float = IDLE_S,
    ) -> None:
        self._connect = connect
        # (connection, when it was last used), oldest first
        self._idle: list[tuple[Channel, float]] = []
        self._turns = trio.Semaphore(size)
        self.size = size
        self.idle_s = idle_s
        self.open = 0  # connections open now, idle or in use

    async def request(self, msg: RedeemTicket) -> Message:
        """Send ``msg`` on a pooled connection and return the answer; an ``error`` answer
        raises ``PeerError``, a broken connection ``TransportError``."""
        async with self._turns:
            chan, reused = await self._take()
            try:
                return await self._ask(chan, msg)
            except TransportError as exc:
                if not reused or isinstance(exc, PeerError):
                    raise
            # the connection had gone stale while it waited: once more on a fresh one
            chan = await self._open()
            return await self._ask(chan, msg)

    async def _ask(self, chan: Channel, msg: RedeemTicket) -> Message:
        try:
            reply = await chan.request(msg)
        except PeerError as exc:
            if exc.code < 200:  # 1xx: the broker found a protocol error and closed
                await self._close(chan)
            else:  # a refusal (TICKET_INVALID): the connection serves on
                self._idle.append((chan, trio.current_time()))
            raise
        except BaseException:  # broken, or cancelled halfway: its state is unknown
            await self._close(chan)
            raise
        self._idle.append((chan, trio.current_time()))
        return reply

    async def _take(self) -> tuple[Channel, bool]:
        """The most recently used idle connection, or a new one (True if reused)."""
        now = trio.current_time()
        while self._idle and now - self._idle[0][1] > self.idle_s:  # oldest first
            chan, _ = self._idle.pop(0)
            await self._close(chan)
        if self._idle:
            return self._idle.pop()[0], True
        return await self._open(), False

    async def _open(self) -> Channel:
        chan = await self._connect()
        self.open += 1
        return chan

    async def _close(self, chan: Channel) -> None:
        self.open -= 1
        await chan.aclose()

    async def aclose(self) -> None:
        """Close the idle connections (the gateway stops; tests count file descriptors)."""
        idle, self._idle = self._idle, []
        for chan, _ in idle:
            await self._close(chan)
