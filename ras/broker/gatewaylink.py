"""What the broker pushes to its gateways over their long-lived links: ACME HTTP-01 tokens,
the gateways' public certificate and each gateway's User Portal settings.

The broker keeps the current state here (the tokens being answered, the latest certificate),
pushes every change to each online gateway's link, and pushes the whole state to a gateway
right after it registers, so one that connects late (or reconnects) is up to date. A push to a
broken link is dropped: the link's own loop notices the break and the gateway gets the state
again when it reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ras.errors import TransportError
from ras.net.channel import Channel
from ras.protocol import (
    AcmeChallenge,
    AcmeWithdraw,
    Message,
    PortalSettingsUpdate,
    PublicCertificate,
)

__all__ = ["GatewayLinks"]

log = logging.getLogger("ras.broker")
MAX_TOKENS = 100  # ACME orders have a few challenges each; this bounds a runaway client


class GatewayLinks:
    """The online gateways' links and the state pushed to them."""

    def __init__(
        self, portal: Callable[[str], Awaitable[PortalSettingsUpdate]] | None = None
    ) -> None:
        # a gateway with worker processes (``workers = N``) has one link per worker
        self._links: dict[str, list[Channel]] = {}
        self._portal = portal  # the portal settings of a gateway (ras.broker.portal)
        self.challenges: dict[str, AcmeChallenge] = {}
        self.certificate: PublicCertificate | None = None

    @property
    def online(self) -> tuple[str, ...]:
        return tuple(self._links)

    async def attach(self, gateway: str, chan: Channel) -> None:
        """A gateway registered on ``chan``: send it the current state, then keep it."""
        self._links.setdefault(gateway, []).append(chan)
        state: list[Message] = list(self.challenges.values())
        if self.certificate is not None:
            state.append(self.certificate)
        if self._portal is not None:
            state.append(await self._portal(gateway))
        for msg in state:
            await self._push_one(gateway, chan, msg)

    def detach(self, gateway: str, chan: Channel) -> None:
        chans = self._links.get(gateway, [])
        if chan in chans:
            chans.remove(chan)
        if not chans:
            self._links.pop(gateway, None)

    async def publish_acme(self, token: str, key_authorization: str) -> None:
        """Have every gateway answer the HTTP-01 challenge of ``token``."""
        msg = AcmeChallenge(token, key_authorization)
        if token not in self.challenges and len(self.challenges) >= MAX_TOKENS:
            raise ValueError(f"more than {MAX_TOKENS} ACME challenges at once")
        self.challenges[token] = msg
        log.info("acme challenge published token=%s gateways=%d", token, len(self._links))
        await self._push(msg)

    async def withdraw_acme(self, token: str) -> None:
        if self.challenges.pop(token, None) is not None:
            log.info("acme challenge withdrawn token=%s", token)
            await self._push(AcmeWithdraw(token))

    async def distribute_certificate(self, cert_pem: str, key_pem: str) -> None:
        """Give every gateway (now and later) a new public certificate and key."""
        self.certificate = PublicCertificate(cert_pem, key_pem)
        log.info("public certificate distributed gateways=%d", len(self._links))
        await self._push(self.certificate)

    async def push_portal(self) -> None:
        """Give every online gateway the portal settings that apply to it now."""
        if self._portal is None:
            return
        async with trio.open_nursery() as nursery:
            for gateway, chans in list(self._links.items()):
                update = await self._portal(gateway)
                for chan in chans:
                    nursery.start_soon(self._push_one, gateway, chan, update)

    async def _push(self, msg: Message) -> None:
        async with trio.open_nursery() as nursery:
            for gateway, chan in [(g, c) for g, cs in self._links.items() for c in cs]:
                nursery.start_soon(self._push_one, gateway, chan, msg)

    async def _push_one(self, gateway: str, chan: Channel, msg: Message) -> None:
        try:
            with trio.fail_after(10):
                await chan.send(msg)
        except (TransportError, trio.TooSlowError) as exc:
            log.warning("push failed gateway=%s type=%s reason=%s", gateway, msg.TYPE, exc)
