"""The ACME HTTP-01 answers a gateway gives on its plain port, for the tokens its broker handed
it (``acme_challenge`` / ``acme_withdraw`` on the link). Bounded: at most ``MAX_TOKENS``."""

from __future__ import annotations

import logging

from ras.protocol import AcmeChallenge

__all__ = ["CHALLENGE_PREFIX", "Challenges"]

log = logging.getLogger("ras.gateway")
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
MAX_TOKENS = 100


class Challenges:
    """token -> key authorization, as the broker says."""

    def __init__(self) -> None:
        self._answers: dict[str, str] = {}

    def add(self, msg: AcmeChallenge) -> None:
        if msg.token not in self._answers and len(self._answers) >= MAX_TOKENS:
            # the oldest challenge is the one most likely over already
            self._answers.pop(next(iter(self._answers)))
        self._answers[msg.token] = msg.key_authorization
        log.info("acme challenge token=%s", msg.token)

    def withdraw(self, token: str) -> None:
        if self._answers.pop(token, None) is not None:
            log.info("acme challenge withdrawn token=%s", token)

    def clear(self) -> None:
        self._answers.clear()

    def answer(self, target: str) -> str | None:
        """The key authorization for a request target, or None (not a challenge we know)."""
        if not target.startswith(CHALLENGE_PREFIX):
            return None
        return self._answers.get(target[len(CHALLENGE_PREFIX) :])

    def __contains__(self, token: str) -> bool:
        return token in self._answers
