"""The client library: a session with a gateway, and tunnels opened with launch tickets.

A :class:`ClientSession` holds one control connection to the gateway for authentication,
the resource list and launches (kept alive with pings). Each tunnel is a new connection that
carries only ``hello`` and ``open_tunnel``, then raw RDP bytes; so every RDP connection gets a
fresh single-use ticket and an RDP client's own reconnects work. Behind a HALB VIP the tunnel
may land on another gateway than the session: any gateway of the farm redeems the ticket.

Failover: :meth:`ClientSession.connect` tries the profile's servers in order (the primary,
then the secondaries) and keeps the first that answers ``hello``. When the session's
connection is lost later (the VIP moved, the gateway died or drained, a keepalive went
unanswered), the session re-establishes itself: the profile's servers in order again, logged
in with the resume token of the first login (no password or second factor), or, if the
broker refuses it, with the credentials given to :meth:`ClientSession.authenticate`. A request
that met the lost connection is sent once more on the new one. A tunnel whose server does not
answer is tried on the profile's other servers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

import trio

from ras import __version__
from ras.client.config import ClientConfig
from ras.errors import AuthError, ErrorCode, PeerError, TransportError
from ras.net.channel import Channel, greet
from ras.net.sniff import PrefixedStream
from ras.net.tls import connect_staggered, connect_tls
from ras.pki import client_context
from ras.protocol import (
    AuthChallenge,
    Authenticate,
    AuthOk,
    AuthResponse,
    Launch,
    LaunchOk,
    ListResources,
    Mode,
    OpenTunnel,
    RdpToken,
    RdpTokenOk,
    Resource,
    ResourceList,
    Resume,
    Role,
    State,
    TunnelOpen,
)  # fmt: skip

__all__ = ["ChallengeHandler", "ClientSession"]

log = logging.getLogger("ras.client")
SOFTWARE = f"ras-client/{__version__}"
ChallengeHandler = Callable[[AuthChallenge], Awaitable[str]]
_RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # between rounds over the servers
_LOGIN_FAILURES = (ErrorCode.AUTH_FAILED, ErrorCode.THROTTLED, ErrorCode.FORBIDDEN)


class ClientSession:
    def __init__(
        self, config: ClientConfig, chan: Channel, server: tuple[str, int] | None = None
    ) -> None:
        self.config = config
        self.server = server or (config.server_host, config.server_port)
        self._chan = chan
        self._lock = trio.Lock()
        self.user: AuthOk | None = None
        self._credentials: tuple[str, str, ChallengeHandler | None] | None = None
        self.reconnects = 0  # how often the session was re-established

    @staticmethod
    async def _connect(config: ClientConfig, server: tuple[str, int]) -> Channel:
        host, port = server
        try:
            with trio.fail_after(config.connect_timeout_s):
                if config.tls:
                    assert config.ca_file is not None
                    ctx = client_context(config.ca_file)
                    stream: trio.abc.Stream = await connect_tls(
                        host,
                        port,
                        ctx,
                        server_hostname=config.server_name or host,
                        connect=connect_staggered,
                    )
                else:
                    stream = await connect_staggered(host, port)
                return await greet(stream, Role.CLIENT, SOFTWARE)
        except trio.TooSlowError:
            raise TransportError(f"no answer from {host}:{port} in time") from None

    @classmethod
    async def connect(cls, config: ClientConfig) -> ClientSession:
        """Open the control connection to the first server of the profile that answers
        (the caller may wrap it in its own deadline too)."""
        failures: list[str] = []
        for server in config.servers:
            try:
                return cls(config, await cls._connect(config, server), server)
            except TransportError as exc:
                log.warning("server unavailable server=%s:%d reason=%s", *server, exc)
                failures.append(f"{server[0]}:{server[1]}: {exc}")
        if len(failures) == 1:
            raise TransportError(failures[0])
        raise TransportError("no server answered (" + "; ".join(failures) + ")")

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._chan.aclose()

    async def _ask(self, chan: Channel, msg: object) -> object:
        try:
            with trio.fail_after(self.config.request_timeout_s):
                return await chan.request(msg)  # type: ignore[arg-type]
        except trio.TooSlowError:
            raise TransportError("the gateway did not answer in time") from None

    async def _request(self, msg: object) -> object:
        """Ask on the session's connection; once logged in, a lost connection is re-established
        and the request sent once more."""
        async with self._lock:
            try:
                return await self._ask(self._chan, msg)
            except PeerError as exc:
                # a refusal on a connection that stays open is the answer; one that closed it
                # (the gateway lost its broker, or timed the session out) is a lost session
                if self.user is None:
                    raise
                if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                    raise
                if not await self._closes_after_error():
                    raise
                log.warning("session lost server=%s:%d reason=%s", *self.server, exc)
            except TransportError as exc:
                if self.user is None:
                    raise
                log.warning("session lost server=%s:%d reason=%s", *self.server, exc)
            await self._reestablish()
            return await self._ask(self._chan, msg)

    async def _closes_after_error(self) -> bool:
        """Whether the connection closes right after the error frame it brought: the gateway
        closes what it fails (its broker died), but the close may arrive after the frame."""
        if self._chan.conn.state is not State.OPEN:
            return True
        with trio.move_on_after(min(2.0, self.config.request_timeout_s)):
            try:
                await self._chan.receive()
            except TransportError:
                return True
        return self._chan.conn.state is not State.OPEN

    async def _login(
        self, chan: Channel, first: Authenticate | Resume, on_challenge: ChallengeHandler | None
    ) -> AuthOk:
        try:
            reply = await self._ask(chan, first)
            while isinstance(reply, AuthChallenge):
                if on_challenge is None:
                    raise AuthError("the server asks for a second factor and none can be given")
                reply = await self._ask(chan, AuthResponse(await on_challenge(reply)))
        except PeerError as exc:
            if exc.code in _LOGIN_FAILURES:
                raise AuthError(exc.error.message, exc.code) from None
            raise
        if not isinstance(reply, AuthOk):
            raise TransportError(
                f"unexpected answer to {first.TYPE}: {getattr(reply, 'TYPE', reply)}"
            )
        return reply

    async def authenticate(
        self, username: str, password: str, on_challenge: ChallengeHandler | None = None
    ) -> AuthOk:
        """Log in; second-factor challenges go to ``on_challenge``. Raises ``AuthError``. The
        credentials are kept (in memory) to log in again if the broker refuses to resume."""
        async with self._lock:
            reply = await self._login(self._chan, Authenticate(username, password), on_challenge)
        self.user = reply
        self._credentials = (username, password, on_challenge)
        return reply

    async def reconnect(self) -> None:
        """Re-establish the session now (the servers in order; resume, else log in again)."""
        async with self._lock:
            await self._reestablish()

    async def _reestablish(self) -> None:
        """One round over the profile's servers; ``TransportError`` or ``AuthError`` if none
        takes the session back. The caller holds the lock."""
        assert self.user is not None, "log in first"
        await self._chan.aclose()
        failures: list[str] = []
        for server in self.config.servers:
            try:
                chan = await self._connect(self.config, server)
            except TransportError as exc:
                failures.append(f"{server[0]}:{server[1]}: {exc}")
                continue
            try:
                self.user = await self._relogin(chan)
            except TransportError as exc:
                await chan.aclose()
                failures.append(f"{server[0]}:{server[1]}: {exc}")
                continue
            except BaseException:
                await chan.aclose()
                raise
            self._chan, self.server = chan, server
            self.reconnects += 1
            log.info("session re-established server=%s:%d user=%s", *server, self.user.user)
            return
        raise TransportError("cannot re-establish the session (" + "; ".join(failures) + ")")

    async def _relogin(self, chan: Channel) -> AuthOk:
        assert self.user is not None
        if self.user.resume_token:
            try:
                return await self._login(chan, Resume(self.user.resume_token), None)
            except AuthError as exc:
                log.info("resume refused reason=%s; logging in again", exc)
        if self._credentials is None:
            raise AuthError("the session cannot be resumed and no password is kept")
        username, password, on_challenge = self._credentials
        return await self._login(chan, Authenticate(username, password), on_challenge)

    async def list_resources(self) -> tuple[Resource, ...]:
        reply = await self._request(ListResources())
        if not isinstance(reply, ResourceList):
            raise TransportError("unexpected answer to list_resources")
        return reply.resources

    async def launch(self, resource: str, mode: Mode | None = None) -> LaunchOk:
        reply = await self._request(Launch(resource, mode or self.config.mode))
        if not isinstance(reply, LaunchOk):
            raise TransportError("unexpected answer to launch")
        return reply

    async def rdp_token(self, resource: str) -> RdpTokenOk:
        """A routing token for ``resource``, for an .rdp file (reusable until it expires)."""
        reply = await self._request(RdpToken(resource))
        if not isinstance(reply, RdpTokenOk):
            raise TransportError("unexpected answer to rdp_token")
        return reply

    async def ping(self, nonce: int) -> None:
        """Ping the gateway and wait for its pong (``TransportError`` if none in time)."""
        async with self._lock:
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    await self._chan.ping(nonce)
            except trio.TooSlowError:
                raise TransportError("the gateway did not answer a ping in time") from None

    async def keepalive(self) -> None:
        """Ping the gateway every ``keepalive_s`` so the session stays open, until cancelled.
        A lost session is re-established, with growing pauses while no server takes it."""
        nonce = 0
        while True:
            await trio.sleep(self.config.keepalive_s)
            nonce += 1
            try:
                await self.ping(nonce)
                continue
            except TransportError as exc:
                log.warning("session lost server=%s:%d reason=%s", *self.server, exc)
            last = _RECONNECT_BACKOFF_S[-1]
            for pause in itertools.chain((0.0, *_RECONNECT_BACKOFF_S), itertools.repeat(last)):
                await trio.sleep(pause)
                try:
                    await self.reconnect()
                    break
                except TransportError as exc:
                    log.warning("reconnect failed reason=%s; next try in a while", exc)

    async def open_tunnel(self, ticket: str) -> trio.abc.Stream:
        """A new connection turned into a raw tunnel to the ticket's host: to the session's
        server, or, if it cannot be reached, the profile's other servers in order (any gateway
        of the farm redeems the ticket). A refusal (``PeerError``) is not tried elsewhere."""
        servers = [self.server, *(s for s in self.config.servers if s != self.server)]
        failures: list[str] = []
        for server in servers:
            try:
                chan = await self._connect(self.config, server)
            except TransportError as exc:
                log.warning("tunnel server unavailable server=%s:%d reason=%s", *server, exc)
                failures.append(f"{server[0]}:{server[1]}: {exc}")
                continue
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    reply = await chan.request(OpenTunnel(ticket))
            except trio.TooSlowError:
                await chan.aclose()
                raise TransportError("the gateway did not answer open_tunnel in time") from None
            except BaseException:
                await chan.aclose()
                raise
            if not isinstance(reply, TunnelOpen):
                await chan.aclose()
                raise TransportError("unexpected answer to open_tunnel")
            return PrefixedStream(chan.stream, chan.into_tunnel())
        if len(failures) == 1:
            raise TransportError(failures[0])
        raise TransportError("no server answered (" + "; ".join(failures) + ")")
