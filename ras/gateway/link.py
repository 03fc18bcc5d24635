"""A normal gateway's connections to its broker, all mutual TLS with the farm certificate.

- :class:`BrokerClient` opens the connections that serve clients: one per client session
  that logs in, lists or launches, and one per RDP-port connection while it lasts (the login
  state and the route's session affinity live at the broker, on that connection;
  ``client_session`` names the client first), and a small pool (``ras.gateway.brokerpool``)
  on which tickets are redeemed.
- :class:`BrokerLink` is the long-lived link: it registers the gateway, keeps it alive with
  pings and takes what the broker pushes (ACME tokens, a new public certificate, the User
  Portal's settings). When it closes, the broker marks the gateway offline.
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from ras import __version__
from ras.errors import ErrorCode, PeerError, TransportError
from ras.gateway.brokerpool import RedeemPool
from ras.gateway.config import GatewayConfig
from ras.net.acme import Challenges
from ras.net.channel import Channel, greet
from ras.net.publictls import PublicTLS
from ras.net.tasks import fatal_refusal, race, reconnecting
from ras.net.tls import Connect, connect_tcp, connect_tls
from ras.pki import client_context
from ras.portal import Portal
from ras.protocol import (
    AcmeChallenge,
    AcmeWithdraw,
    ClientSession,
    Error,
    GatewayRegister,
    Ping,
    Pong,
    PortalSettingsUpdate,
    PublicCertificate,
    RedeemTicket,
    Registered,
    Role,
    TicketOk,
)  # fmt: skip

__all__ = ["SOFTWARE", "BrokerClient", "BrokerLink"]

log = logging.getLogger("ras.gateway")
SOFTWARE = f"ras-gateway/{__version__}"
Peer = tuple[str, int]


class BrokerClient:
    """Opens connections to the broker; the caller owns the deadlines."""

    def __init__(self, config: GatewayConfig, *, connect: Connect = connect_tcp) -> None:
        assert config.ca_file is not None  # the config checks both
        assert config.cert_file is not None
        self.config = config
        self._dial = connect
        self._tls = client_context(
            config.ca_file, cert_file=config.cert_file, key_file=config.key_file
        )
        # tickets are redeemed on a few long-lived broker connections (ras.gateway.brokerpool)
        self.redeemer = RedeemPool(self.open)

    async def open(self) -> Channel:
        """A connection with hello/welcome done, nothing else said yet."""
        cfg = self.config
        stream = await connect_tls(cfg.broker_host, cfg.broker_port, self._tls, connect=self._dial)
        return await greet(stream, Role.GATEWAY, SOFTWARE)

    async def open_session(self, client: Peer) -> Channel:
        """A connection for one client (its login state or its route lives at the broker, on
        this connection): ``client_session`` first."""
        chan = await self.open()
        try:
            await chan.send(ClientSession(client[0], client[1]))
        except BaseException:
            await chan.aclose()
            raise
        return chan

    async def redeem(self, ticket: str, client: Peer) -> TicketOk:
        """Redeem a ticket for ``client`` on a pooled connection; ``PeerError`` if the broker
        refuses it."""
        try:
            granted = await self.redeemer.request(RedeemTicket(ticket, client[0]))
        except PeerError as exc:
            log.warning("tunnel refused client=%s:%d reason=%s", *client, exc)
            raise
        if not isinstance(granted, TicketOk):
            raise TransportError(f"broker answered redeem_ticket with {granted.TYPE}")
        return granted

    async def aclose(self) -> None:
        await self.redeemer.aclose()


class BrokerLink:
    """The long-lived link; ``run`` keeps it up (reconnecting) until cancelled."""

    def __init__(
        self,
        broker: BrokerClient,
        challenges: Challenges,
        certificate: PublicTLS,
        portal: Portal | None = None,
    ) -> None:
        self.config = broker.config
        self.portal = portal
        self._broker = broker
        self.challenges = challenges
        self.certificate = certificate
        self.registered = trio.Event()

    async def run(self) -> None:
        cfg = self.config

        def down() -> None:
            self.registered = trio.Event()

        try:
            await reconnecting(
                self._session,
                log=log,
                on_down=down,
                what=f"gateway broker={cfg.broker_host}:{cfg.broker_port}",
            )
        finally:
            down()

    async def _session(self) -> None:
        """One life of the link: register, then ping and take pushes until it breaks."""
        cfg = self.config
        # A refusal (FORBIDDEN: another certificate name, the agents' port) ends the daemon:
        # retrying would be refused the same way forever.
        refused = partial(fatal_refusal, f"broker {cfg.broker_host}:{cfg.broker_port}")
        with refused(), trio.fail_after(cfg.broker_timeout_s):
            chan = await self._broker.open()
        async with chan:
            with refused(), trio.fail_after(cfg.broker_timeout_s):
                reply = await chan.request(
                    GatewayRegister(cfg.name, cfg.public_host, cfg.public_port)
                )
            if not isinstance(reply, Registered):
                raise TransportError(f"broker answered gateway_register with {reply.TYPE}")
            log.info("registered with broker=%s:%d", cfg.broker_host, cfg.broker_port)
            self.challenges.clear()  # the broker sends the current ones again
            self.registered.set()
            heard = [trio.current_time()]
            # The broker drops a link silent for its host_timeout_s, and says how often it
            # wants to hear from its daemons (report_interval_s): ping at least that often.
            # Pinging only every link_ping_interval_s, a broker with a short timeout (the
            # lab's 5 s) dropped and re-registered every gateway every few seconds.
            every = min(cfg.link_ping_interval_s, reply.report_interval_s)
            await race(
                partial(self._pings, chan, heard, every), partial(self._incoming, chan, heard)
            )

    async def _pings(self, chan: Channel, heard: list[float], every: float) -> None:
        cfg = self.config
        nonce = 0
        while True:
            await trio.sleep(every)
            if trio.current_time() - heard[0] > cfg.broker_timeout_s:
                raise TransportError(f"the broker was silent for {cfg.broker_timeout_s:g}s")
            nonce += 1
            await chan.send(Ping(nonce))

    async def _incoming(self, chan: Channel, heard: list[float]) -> None:
        while True:
            msg = await chan.receive()
            heard[0] = trio.current_time()
            match msg:
                case Ping() | Pong():
                    await chan.answer_ping(msg)
                case AcmeChallenge():
                    self.challenges.add(msg)
                case AcmeWithdraw():
                    self.challenges.withdraw(msg.token)
                case PublicCertificate():
                    await self.certificate.install(msg.cert_pem, msg.key_pem)
                case PortalSettingsUpdate() if self.portal is not None:
                    self.portal.apply(msg.settings)
                case Error():
                    raise PeerError(msg)
                case _:
                    await chan.fail(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not sent on a link")
                    raise TransportError(f"the broker sent {msg.TYPE} on the link")
