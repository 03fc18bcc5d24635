"""A normal gateway's connections to its broker, all mutual TLS with the farm certificate.

- :class:`BrokerClient` opens the connections that serve clients: one per client session
  that logs in, lists or launches, and one per RDP-port connection while it lasts (the login
  state and the route's session affinity live at the broker, on that connection;
  ``client_session`` names the client first), and a small pool (``ras.gateway.brokerpool``)
  on which tickets are redeemed.
- :class:`BrokerLink` is the long-lived link: it registers the gateway, keeps it alive with
  pings and takes what the broker pushes (ACME tokens, a new public certificate, the User
  Portal's settings). When it closes, the broker marks the gateway offline.

With several brokers (``brokers``), new connections go to the first broker in priority order
that answers (``ras.net.brokers.BrokerChoice``), and the gateway keeps one link to *each*
broker, so that every broker knows it online (HALBs ask any of them) and any may push to it.
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
from ras.net.brokers import BrokerChoice
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

__all__ = ["SOFTWARE", "BrokerClient", "BrokerLink", "Registrations"]

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
        self.brokers = BrokerChoice(config.broker_list)
        # tickets are redeemed on a few long-lived broker connections (ras.gateway.brokerpool)
        self.redeemer = RedeemPool(self.open)

    async def open(self) -> Channel:
        """A connection with hello/welcome done, nothing else said yet, to the first broker
        by priority that answers within ``broker_failover_s``."""
        return await self.brokers.connect(self.open_at, attempt_s=self.config.broker_failover_s)

    async def open_at(self, host: str, port: int) -> Channel:
        """A connection to the broker at ``host``:``port``, hello/welcome done."""
        stream = await connect_tls(host, port, self._tls, connect=self._dial)
        try:
            return await greet(stream, Role.GATEWAY, SOFTWARE)
        except BaseException:
            await stream.aclose()
            raise

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

    async def redeem(self, ticket: str, client: Peer, *, web: bool = False) -> TicketOk:
        """Redeem a ticket (``web``: a web launch token) for ``client`` on a pooled connection;
        ``PeerError`` if the broker refuses it."""
        try:
            granted = await self.redeemer.request(RedeemTicket(ticket, client[0], web))
        except PeerError as exc:
            log.warning("tunnel refused client=%s:%d reason=%s", *client, exc)
            raise
        if not isinstance(granted, TicketOk):
            raise TransportError(f"broker answered redeem_ticket with {granted.TYPE}")
        return granted

    async def aclose(self) -> None:
        await self.redeemer.aclose()


class Registrations:
    """How many of the gateway's links are registered; ``event`` is set while one is."""

    def __init__(self) -> None:
        self.count = 0
        self.event = trio.Event()

    def up(self) -> None:
        self.count += 1
        self.event.set()

    def down(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.event = trio.Event()


class BrokerLink:
    """The long-lived link to the broker at ``address`` (default: the first of the config);
    ``run`` keeps it up (reconnecting) until cancelled."""

    def __init__(
        self,
        broker: BrokerClient,
        challenges: Challenges,
        certificate: PublicTLS,
        portal: Portal | None = None,
        *,
        address: tuple[str, int] | None = None,
        registrations: Registrations | None = None,
    ) -> None:
        self.config = broker.config
        self.portal = portal
        self._broker = broker
        self.address = address or broker.config.broker_list[0]
        self.challenges = challenges
        self.certificate = certificate
        self.registered = trio.Event()
        self._registrations = registrations or Registrations()

    async def run(self) -> None:
        def down() -> None:
            if self.registered.is_set():
                self._registrations.down()
            self.registered = trio.Event()

        try:
            await reconnecting(
                self._session,
                log=log,
                on_down=down,
                what=f"gateway broker={self.address[0]}:{self.address[1]}",
            )
        finally:
            down()

    async def _session(self) -> None:
        """One life of the link: register, then ping and take pushes until it breaks."""
        cfg = self.config
        # A refusal (FORBIDDEN: another certificate name, the agents' port) ends the daemon:
        # retrying would be refused the same way forever.
        host, port = self.address
        refused = partial(fatal_refusal, f"broker {host}:{port}")
        with refused(), trio.fail_after(cfg.broker_timeout_s):
            chan = await self._broker.open_at(host, port)
        async with chan:
            with refused(), trio.fail_after(cfg.broker_timeout_s):
                reply = await chan.request(
                    GatewayRegister(cfg.name, cfg.public_host, cfg.public_port)
                )
            if not isinstance(reply, Registered):
                raise TransportError(f"broker answered gateway_register with {reply.TYPE}")
            log.info("registered with broker=%s:%d", host, port)
            if len(cfg.broker_list) == 1:
                self.challenges.clear()  # the broker sends the current ones again
            self.registered.set()
            self._registrations.up()
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
