"""Logins: the throttle, the directory, the second factor, resume tokens.

A login goes: throttle (refused before the directory is asked), the directory (built-in or
LDAP), the second factor the rules name (TOTP or RADIUS, in challenge rounds over the client's
connection). A logged-in client gets a resume token, with which it may log in again after a
lost connection without typing anything, from the same address, while the directory still
knows the user.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import trio

from ras.broker import policy
from ras.broker.catalog import Catalog, User
from ras.broker.config import BrokerConfig
from ras.broker.directory import Directory, DirectoryUnavailable
from ras.broker.history import History
from ras.broker.model import Factor
from ras.broker.radius import Accept, Challenge, RadiusClient, RadiusUnavailable
from ras.broker.store import Store
from ras.broker.throttle import LoginThrottle, call, wait_text
from ras.broker.tickets import ResumeTokens
from ras.broker.totp import verify_totp
from ras.errors import ErrorCode, RasError, RemoteProtocolError, TicketError
from ras.net.channel import Channel
from ras.ops.metrics import BROKER_LOGINS
from ras.protocol import AuthChallenge, Authenticate, AuthResponse, Logout, Resume

__all__ = ["MAX_CHALLENGE_ROUNDS", "Login"]

log = logging.getLogger("ras.broker")

MAX_CHALLENGE_ROUNDS = 5
# A refused login's result in ras_broker_logins_total (anything else: failed).
_OUTCOMES = {ErrorCode.THROTTLED: "throttled", ErrorCode.UNAVAILABLE: "unavailable"}
_PROMPT_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]+")


class Login:
    """Authenticates users (``authenticate``, ``resume``) and issues resume tokens."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        catalog: Catalog,
        directory: Directory,
        throttle: LoginThrottle,
        radius: RadiusClient | None,
        resume: ResumeTokens,
        history: History | None = None,
    ) -> None:
        self.config = config
        self.history = history
        self.store = store
        self.catalog = catalog
        self.directory = directory
        self.throttle = throttle
        self.radius = radius
        self.resume_tokens = resume

    async def authenticate(
        self, chan: Channel, msg: Authenticate, client: str, gateway: str
    ) -> User | tuple[ErrorCode, str]:
        """Throttle, password, then the second factor the rules name (challenge rounds);
        counted by result and factor and recorded for reports."""
        factor = ["password"]  # the factor the rules asked for, once known
        result = await self._authenticate(chan, msg, client, gateway, factor)
        self._count(result, factor[0], msg.username, gateway)
        return result

    def _count(
        self, result: User | tuple[ErrorCode, str], factor: str, username: str, gateway: str
    ) -> None:
        if isinstance(result, User):
            outcome, username = "ok", result.name
        else:
            outcome = _OUTCOMES.get(result[0], "failed")
        BROKER_LOGINS.labels(outcome, factor).inc()
        if self.history is not None:
            self.history.login(user=username, gateway=gateway, result=outcome, factor=factor)

    async def _authenticate(
        self, chan: Channel, msg: Authenticate, client: str, gateway: str, used: list[str]
    ) -> User | tuple[ErrorCode, str]:
        where = f"client={client} gateway={gateway}"
        try:
            lock = await call(self.throttle, self.throttle.check, msg.username, client)
        except RasError as exc:  # the farm's counters (etcd) out of reach: deny, never allow
            log.error("auth unavailable user=%s %s reason=throttle: %s", msg.username, where, exc)
            return ErrorCode.UNAVAILABLE, (
                "the farm's failed-login counters cannot be reached; try again later"
            )
        if lock is not None:  # refused before the directory is asked anything
            log.warning(
                "auth throttled user=%s %s locked=%s retry_in=%.0fs",
                msg.username, where, lock.what, lock.retry_after_s,
            )  # fmt: skip
            return ErrorCode.THROTTLED, (
                f"too many failed logins; try again in {wait_text(lock.retry_after_s)}"
            )
        try:
            with trio.fail_after(self.config.request_timeout_s):
                identity = await self.directory.authenticate(msg.username, msg.password)
        except (DirectoryUnavailable, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, DirectoryUnavailable) else "no answer in time"
            log.error("auth unavailable user=%s %s reason=directory: %s", msg.username, where, why)
            return ErrorCode.UNAVAILABLE, "the directory cannot be reached; try again later"
        if identity is None:
            return await self._failed(msg.username, where, "unknown user or wrong password", client)
        cfg = self.catalog.configured()
        groups = policy.groups_of(identity.name, identity.groups, cfg.groups)
        record = await trio.to_thread.run_sync(self.store.get_user, identity.name)
        secret = record.totp_secret if record is not None and record.enabled else None
        factor, rule = policy.factor_for(
            (*self.catalog.config_rules, *cfg.rules), identity.name, groups, client, gateway,
            has_totp=secret is not None,
        )  # fmt: skip
        if factor is not Factor.NONE:
            used[0] = str(factor)
        if factor is Factor.TOTP:
            if secret is None:
                return await self._failed(
                    identity.name, where, f"needs TOTP ({rule}), none enrolled", client
                )
            why = await self._totp(chan, identity.name, secret)
        elif factor is Factor.RADIUS:
            try:
                why = await self._radius_rounds(chan, identity.name, client)
            except RadiusUnavailable as exc:
                log.error(
                    "auth unavailable user=%s %s reason=radius: %s", identity.name, where, exc
                )
                return ErrorCode.UNAVAILABLE, "the second-factor server cannot be reached"
        else:
            why = ""
        if why:
            return await self._failed(identity.name, where, why, client)
        try:
            typed = {msg.username.casefold(): msg.username, identity.name.casefold(): identity.name}
            for name in typed.values():  # the name as typed and the directory's, once each
                await call(self.throttle, self.throttle.succeeded, name)
        except RasError as exc:  # the failures stay counted until their window ends
            log.warning("auth failures not cleared user=%s %s reason=%s", identity.name, where, exc)
        factors = "password" if factor is Factor.NONE else f"password+{factor}"
        log.info(
            "auth ok user=%s %s factors=%s source=%s rule=%s",
            identity.name, where, factors, identity.source, rule,
        )  # fmt: skip
        return User(identity.name, groups)

    def resume_token(self, user: User, client: str) -> tuple[str, User]:
        """A token to log in again after a lost connection ("" when resume is off), and the
        user bound to its login (a resumed login keeps its id: one logout revokes them all)."""
        if self.config.resume_ttl_s <= 0:
            return "", user
        token, claims = self.resume_tokens.issue(
            user=user.name,
            client=client,
            now=time.time(),
            ttl_s=self.config.resume_ttl_s,
            login=user.login,
        )
        return token, dataclasses.replace(user, login=claims.id)

    async def logged_out(self, user: User) -> bool:
        """Whether ``user``'s login has ended at a logout (on any broker sharing the store)."""
        if not user.login:
            return False
        return await trio.to_thread.run_sync(self.store.was_redeemed, _revoked(user.login))

    async def resume(self, msg: Resume, client: str, gateway: str) -> User | tuple[ErrorCode, str]:
        """Log in again with a resume token: genuine, unexpired, from the same client address,
        and the user still known to the directory and enabled (its groups read again)."""
        result = await self._resume(msg, client, gateway)
        self._count(result, "resume", "-", gateway)
        return result

    async def _resume(self, msg: Resume, client: str, gateway: str) -> User | tuple[ErrorCode, str]:
        where = f"client={client} gateway={gateway}"
        try:
            claims = self.resume_tokens.verify(msg.token, now=time.time())
            if claims.client != client:
                raise TicketError(f"it was issued to client {claims.client}")
            if await trio.to_thread.run_sync(self.store.was_redeemed, _revoked(claims.id)):
                raise TicketError("it was revoked at logout")
            with trio.fail_after(self.config.request_timeout_s):
                identity = await self.directory.lookup(claims.user)
            if identity is None:
                raise TicketError(f"user {claims.user} is unknown or disabled now")
        except TicketError as exc:
            log.warning("resume refused %s reason=%s", where, exc)
            return ErrorCode.AUTH_FAILED, "the session cannot be resumed; log in again"
        except (DirectoryUnavailable, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, DirectoryUnavailable) else "no answer in time"
            log.error("resume unavailable user=%s %s reason=directory: %s", claims.user, where, why)
            return ErrorCode.UNAVAILABLE, "the directory cannot be reached; try again later"
        except RasError as exc:  # a shared store (etcd) out of reach: deny, never allow
            log.error("resume unavailable user=%s %s reason=state: %s", claims.user, where, exc)
            return ErrorCode.UNAVAILABLE, "the farm's state cannot be reached; try again later"
        groups = policy.groups_of(identity.name, identity.groups, self.catalog.configured().groups)
        log.info(
            "auth ok user=%s %s factors=resume source=%s", identity.name, where, identity.source
        )
        return User(identity.name, groups, login=claims.id)

    async def logout(self, msg: Logout, user: User, client: str, gateway: str) -> None:
        """End a login: its resume token, if named and genuinely this user's from this client,
        is revoked on every broker sharing the store (until it would have expired anyway)."""
        where = f"client={client} gateway={gateway}"
        if msg.resume_token:
            try:
                claims = self.resume_tokens.verify(msg.resume_token, now=time.time())
            except TicketError as exc:  # forged or expired: nothing to revoke
                log.info("logout user=%s %s resume_token=not revoked (%s)", user.name, where, exc)
            else:
                if (claims.user, claims.client) != (user.name, client):
                    log.warning(
                        "logout user=%s %s resume_token=not revoked (another login's)",
                        user.name, where,
                    )  # fmt: skip
                else:
                    try:
                        await trio.to_thread.run_sync(
                            self.store.redeem_once, _revoked(claims.id), claims.expires
                        )
                    except RasError as exc:  # etcd out of reach: say so, the login still ends
                        log.error(
                            "logout user=%s %s resume_token=not revoked (state: %s)",
                            user.name, where, exc,
                        )  # fmt: skip
        log.info("logout user=%s %s", user.name, where)

    async def _failed(self, user: str, where: str, why: str, client: str) -> tuple[ErrorCode, str]:
        try:
            lock = await call(self.throttle, self.throttle.failed, user, client)
        except RasError as exc:  # refused anyway; say the failure went uncounted
            log.error("auth failure not counted user=%s %s reason=%s", user, where, exc)
            lock = None
        locked = f" now locked={lock.what} for={lock.retry_after_s:.0f}s" if lock else ""
        log.warning("auth failed user=%s %s reason=%s%s", user, where, why, locked)
        return ErrorCode.AUTH_FAILED, "wrong user name or password"

    async def _answer(self, chan: Channel, prompt: str, echo: bool) -> str:
        """One challenge round: show ``prompt``, return what the user typed."""
        prompt = _PROMPT_CONTROL.sub(" ", prompt).strip()[:512] or "Answer:"
        await chan.send(AuthChallenge(prompt, echo))
        with trio.fail_after(self.config.challenge_timeout_s):
            answer = await chan.receive_reply()
        if not isinstance(answer, AuthResponse):
            await chan.fail(ErrorCode.UNEXPECTED, "expected auth_response")
            raise RemoteProtocolError("expected auth_response", ErrorCode.UNEXPECTED)
        return answer.answer

    async def _totp(self, chan: Channel, user: str, secret: bytes) -> str:
        """Why the TOTP round failed ("" if it passed)."""
        code = await self._answer(chan, "Verification code from your authenticator app:", True)
        step = verify_totp(secret, code, time.time())
        if step is None:
            return "wrong one-time code"
        if not await trio.to_thread.run_sync(self.store.use_totp_step, user, step):
            return "one-time code already used"
        return ""

    async def _radius_rounds(self, chan: Channel, user: str, client: str) -> str:
        """Why the RADIUS rounds failed ("" if the server accepted). The first answer (the
        code the user types) is the RADIUS password; Access-Challenges are further rounds."""
        if self.radius is None:  # a rule from the admin API on a broker with no [radius]
            raise RadiusUnavailable("a factor rule needs RADIUS but broker.toml has no [radius]")
        answer = await self._answer(chan, "Verification code:", False)
        state: bytes | None = None
        for _ in range(MAX_CHALLENGE_ROUNDS):
            result = await self.radius.authenticate(
                user, answer, state=state, calling_station=client
            )
            if isinstance(result, Accept):
                return ""
            if not isinstance(result, Challenge):
                return "RADIUS server rejected the code"
            answer = await self._answer(chan, result.prompt, result.echo)
            state = result.state
        return f"more than {MAX_CHALLENGE_ROUNDS} RADIUS challenge rounds"


def _revoked(resume_id: str) -> str:
    """The id under which a logged-out resume token is recorded (beside redeemed tickets)."""
    return f"resume-revoked.{resume_id}"
