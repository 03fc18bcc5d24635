"""The client library: a session with a gateway, and tunnels opened with launch tickets.

A :class:`ClientSession` holds one control connection to the gateway for authentication,
the resource list and launches (kept alive with pings). Each tunnel is a new connection that
carries only ``hello`` and ``open_tunnel``, then raw RDP bytes; so every RDP connection gets a
fresh single-use ticket and an RDP client's own reconnects work.

Failover: :meth:`ClientSession.connect` tries the profile's servers in order (the primary,
then the secondaries) and keeps the first that answers ``hello``. Tunnels go to that same
server, since a ticket can only be redeemed through the gateway that issued it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

import trio

from ras import __version__
from ras.client.config import ClientConfig
from ras.errors import AuthError, ErrorCode, TransportError
from ras.net.channel import Channel, PeerError, greet
from ras.net.sniff import PrefixedStream
from ras.net.tls import connect_tcp, connect_tls
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
    Ping,
    RdpToken,
    RdpTokenOk,
    Resource,
    ResourceList,
    Role,
    TunnelOpen,
)  # fmt: skip

__all__ = ["ChallengeHandler", "ClientSession"]

log = logging.getLogger("ras.client")
SOFTWARE = f"ras-client/{__version__}"
ChallengeHandler = Callable[[AuthChallenge], Awaitable[str]]


class ClientSession:
    def __init__(
        self, config: ClientConfig, chan: Channel, server: tuple[str, int] | None = None
    ) -> None:
        self.config = config
        self.server = server or (config.server_host, config.server_port)
        self._chan = chan
        self._lock = trio.Lock()
        self.user: AuthOk | None = None

    @staticmethod
    async def _connect(config: ClientConfig, server: tuple[str, int]) -> Channel:
        host, port = server
        try:
            with trio.fail_after(config.connect_timeout_s):
                if config.tls:
                    assert config.ca_file is not None
                    ctx = client_context(config.ca_file)
                    stream: trio.abc.Stream = await connect_tls(
                        host, port, ctx, server_hostname=config.server_name or host
                    )
                else:
                    stream = await connect_tcp(host, port)
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

    async def _request(self, msg: object) -> object:
        async with self._lock:
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    return await self._chan.request(msg)  # type: ignore[arg-type]
            except trio.TooSlowError:
                raise TransportError("the gateway did not answer in time") from None

    async def authenticate(
        self, username: str, password: str, on_challenge: ChallengeHandler | None = None
    ) -> AuthOk:
        """Log in; second-factor challenges go to ``on_challenge``. Raises ``AuthError``."""
        try:
            reply = await self._request(Authenticate(username, password))
            while isinstance(reply, AuthChallenge):
                if on_challenge is None:
                    raise AuthError("the server asks for a second factor and none can be given")
                reply = await self._request(AuthResponse(await on_challenge(reply)))
        except PeerError as exc:
            if exc.code in (ErrorCode.AUTH_FAILED, ErrorCode.THROTTLED, ErrorCode.FORBIDDEN):
                raise AuthError(exc.error.message, exc.code) from None
            raise
        if not isinstance(reply, AuthOk):
            raise TransportError(
                f"unexpected answer to authenticate: {getattr(reply, 'TYPE', reply)}"
            )
        self.user = reply
        return reply

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
        await self._request(Ping(nonce))

    async def keepalive(self) -> None:
        """Ping the gateway every ``keepalive_s`` so the session stays open, until cancelled."""
        nonce = 0
        while True:
            await trio.sleep(self.config.keepalive_s)
            nonce += 1
            await self.ping(nonce)

    async def open_tunnel(self, ticket: str) -> trio.abc.Stream:
        """A new connection to the session's gateway, turned into a raw tunnel to the ticket's
        host."""
        chan = await self._connect(self.config, self.server)
        try:
            with trio.fail_after(self.config.request_timeout_s):
                reply = await chan.request(OpenTunnel(ticket))
        except BaseException:
            await chan.aclose()
            raise
        if not isinstance(reply, TunnelOpen):
            await chan.aclose()
            raise TransportError("unexpected answer to open_tunnel")
        return PrefixedStream(chan.stream, chan.into_tunnel())
