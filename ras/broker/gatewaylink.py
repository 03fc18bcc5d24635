"""What the broker pushes to its gateways and HALBs over their long-lived links: ACME HTTP-01
tokens, the farm's public certificate and (gateways only) each gateway's User Portal settings.

The broker keeps the current state here (the tokens being answered, the latest certificate
and the names it is assigned to), pushes every change to each online gateway's and HALB's
link, and pushes the whole state to one right after it connects, so one that connects late
(or reconnects) is up to date. Tokens go to every link; the certificate only to the names it
is assigned to (none named: every one). A push to a broken link is dropped: the link's own
loop notices the break and the peer gets the state again when it reconnects.
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
    """The online gateways' and HALBs' links and the state pushed to them."""

    def __init__(
        self, portal: Callable[[str], Awaitable[PortalSettingsUpdate]] | None = None
    ) -> None:
        # a gateway with worker processes (``workers = N``) has one link per worker
        self._links: dict[str, list[Channel]] = {}
        self._halbs: set[str] = set()  # names of _links that are HALB nodes
        self._portal = portal  # the portal settings of a gateway (ras.broker.portal)
        self.challenges: dict[str, AcmeChallenge] = {}
        self.certificate: PublicCertificate | None = None
        self.assigned: frozenset[str] = frozenset()  # case-folded names; empty: every one

    @property
    def online(self) -> tuple[str, ...]:
        return tuple(self._links)

    def _gets_certificate(self, name: str) -> bool:
        return not self.assigned or name.casefold() in self.assigned

    async def attach(self, gateway: str, chan: Channel, *, halb: bool = False) -> None:
        """A gateway (or HALB) connected on ``chan``: send it the current state, keep it."""
        self._links.setdefault(gateway, []).append(chan)
        if halb:
            self._halbs.add(gateway)
        state: list[Message] = list(self.challenges.values())
        if self.certificate is not None and self._gets_certificate(gateway):
            state.append(self.certificate)
        if self._portal is not None and not halb:
            state.append(await self._portal(gateway))
        for msg in state:
            await self._push_one(gateway, chan, msg)

    def detach(self, gateway: str, chan: Channel) -> None:
        chans = self._links.get(gateway, [])
        if chan in chans:
            chans.remove(chan)
        if not chans:
            self._links.pop(gateway, None)
            self._halbs.discard(gateway)

    async def publish_acme(self, token: str, key_authorization: str, name: str = "") -> None:
        """Have every gateway and HALB answer the HTTP-01 challenge of ``token`` (for requests
        to ``name`` only, if given; returns once each link took it)."""
        msg = AcmeChallenge(token, key_authorization, name)
        if token not in self.challenges and len(self.challenges) >= MAX_TOKENS:
            raise ValueError(f"more than {MAX_TOKENS} ACME challenges at once")
        self.challenges[token] = msg
        log.info("acme challenge published token=%s to=%s", token, ",".join(self._links) or "-")
        await self._push(msg)

    async def withdraw_acme(self, token: str) -> None:
        if self.challenges.pop(token, None) is not None:
            log.info("acme challenge withdrawn token=%s", token)
            await self._push(AcmeWithdraw(token))

    def set_certificate(self, cert_pem: str, key_pem: str, assigned: tuple[str, ...] = ()) -> None:
        """The certificate for links from now on (pushed to none now)."""
        self.certificate = PublicCertificate(cert_pem, key_pem)
        self.assigned = frozenset(a.casefold() for a in assigned)

    async def distribute_certificate(
        self, cert_pem: str, key_pem: str, assigned: tuple[str, ...] = ()
    ) -> None:
        """Give every gateway and HALB (now and later) a new public certificate and key; with
        ``assigned``, only those so named."""
        self.set_certificate(cert_pem, key_pem, assigned)
        to = [g for g in self._links if self._gets_certificate(g)]
        log.info("public certificate distributed to=%s", ",".join(to) or "-")
        await self._push(PublicCertificate(cert_pem, key_pem), to)

    async def push_portal(self) -> None:
        """Give every online gateway the portal settings that apply to it now."""
        if self._portal is None:
            return
        async with trio.open_nursery() as nursery:
            for gateway, chans in list(self._links.items()):
                if gateway in self._halbs:
                    continue
                update = await self._portal(gateway)
                for chan in chans:
                    nursery.start_soon(self._push_one, gateway, chan, update)

    async def _push(self, msg: Message, to: list[str] | None = None) -> None:
        async with trio.open_nursery() as nursery:
            for gateway, chans in list(self._links.items()):
                if to is not None and gateway not in to:
                    continue
                for chan in list(chans):
                    nursery.start_soon(self._push_one, gateway, chan, msg)

    async def _push_one(self, gateway: str, chan: Channel, msg: Message) -> None:
        try:
            with trio.fail_after(10):
                await chan.send(msg)
        except (TransportError, trio.TooSlowError) as exc:
            log.warning("push failed gateway=%s type=%s reason=%s", gateway, msg.TYPE, exc)
