"""The broker's ACME client: an HTTP-01 order from an ACME CA (Let's Encrypt, or pebble in the
tests), with the tokens answered by every gateway and HALB.

Theory of operation. certbot's ``acme`` library (with ``josepy``) speaks the protocol; it is
synchronous (``requests``), so every call that touches the network runs in a worker thread
(``trio.to_thread``) and the event loop never waits on the CA. The steps:

1. account: the stored account key (made on first use, EC P-256) registers with the contact
   e-mail and the terms of service agreed; a key the CA already knows gives its account back;
2. order for the names, with a CSR made from a new key that stays in the broker;
3. per authorization, the HTTP-01 challenge's token, key authorization and name go to ``publish``
   (the broker pushes them to every gateway and HALB and waits until each link took them)
   *before* the challenge is answered, and to ``withdraw`` once the authorization is final,
   whatever happened;
4. the authorizations are polled (short pauses growing to 2 s) until valid or invalid;
5. finalize with the CSR and download the chain (leaf first).

``on_stage`` is told each step (for the status an administrator sees). Errors come out as
:class:`AcmeError` with the CA's problem text; the caller (:mod:`ras.broker.certs`) decides
about retries. The caller owns the deadline (``trio.fail_after`` around :func:`obtain`).
"""

from __future__ import annotations

import datetime as dt
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import requests
import trio
from acme import challenges, client, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from ras import __version__
from ras.errors import RasError
from ras.pki import KeyPair, make_csr

__all__ = ["AcmeAccount", "AcmeError", "new_account_key", "obtain"]

log = logging.getLogger("ras.broker.acme")
USER_AGENT = f"ras-broker/{__version__} (acme-python)"
NETWORK_TIMEOUT_S = 15  # each HTTP request to the CA (requests' own timeout, in its thread)
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 2.0

R = TypeVar("R")
Publish = Callable[[str, str, str], Awaitable[None]]
Withdraw = Callable[[str], Awaitable[None]]


class AcmeError(RasError):
    """The ACME CA refused, failed a challenge, or could not be reached."""


@dataclass(frozen=True, slots=True)
class AcmeAccount:
    """Who orders: the CA's directory URL, the account key (PEM) and the contact."""

    directory: str
    key_pem: bytes = field(repr=False)
    email: str = ""
    ca_file: str | None = None  # trust for the CA's own HTTPS (None: the system's)


def new_account_key() -> bytes:
    """A new EC P-256 account key, PEM (PKCS#8)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def obtain(
    account: AcmeAccount,
    names: Sequence[str],
    *,
    publish: Publish,
    withdraw: Withdraw,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> tuple[KeyPair, str]:
    """Order a certificate for ``names``: ``(chain and key, account URL)``."""
    if not names:
        raise AcmeError("an ACME order needs at least one name")
    on_stage("account")
    acme, account_url = await _run(_register, account)
    csr_pem, key_pem = make_csr(list(names))
    on_stage("order")
    order = await _run(acme.new_order, csr_pem)
    for authz in order.authorizations:
        await _authorize(acme, authz, publish, withdraw, on_stage)
    on_stage("finalizing")
    deadline = dt.datetime.now() + dt.timedelta(seconds=NETWORK_TIMEOUT_S * 4)
    done = await _run(acme.finalize_order, order, deadline)
    chain = done.fullchain_pem
    if not chain or "BEGIN CERTIFICATE" not in chain:
        raise AcmeError("the CA's order is valid but it gave no certificate")
    return KeyPair(chain.encode(), key_pem), account_url


async def _authorize(
    acme: client.ClientV2,
    authz: messages.AuthorizationResource,
    publish: Publish,
    withdraw: Withdraw,
    on_stage: Callable[[str], None],
) -> None:
    name = authz.body.identifier.value
    if authz.body.status == messages.STATUS_VALID:
        log.info("acme authorization already valid name=%s", name)
        return
    challb = next(
        (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None
    )
    if challb is None:
        raise AcmeError(f"the CA offers no HTTP-01 challenge for {name}")
    response, validation = challb.response_and_validation(acme.net.key)
    token = challb.chall.encode("token")
    on_stage("publishing")
    await publish(token, validation, name)
    try:
        on_stage("validating")
        await _run(acme.answer_challenge, challb, response)
        pause = _POLL_FIRST_S
        while True:
            authz, _ = await _run(acme.poll, authz)
            status = authz.body.status
            if status == messages.STATUS_VALID:
                log.info("acme authorization valid name=%s", name)
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                raise AcmeError(f"the CA did not validate {name}: {_challenge_error(authz)}")
            await trio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await withdraw(token)


def _challenge_error(authz: messages.AuthorizationResource) -> str:
    for chall in authz.body.challenges:
        if chall.error is not None:
            return str(chall.error.detail or chall.error.typ)
    return f"authorization {authz.body.status}"


def _register(account: AcmeAccount) -> tuple[client.ClientV2, str]:
    """The client with its account: registered now, or found by its key."""
    key = serialization.load_pem_private_key(account.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AcmeError("the ACME account key is not an EC key")
    jwk = JWKEC(key=key)
    net = client.ClientNetwork(
        jwk,
        alg=ES256,
        user_agent=USER_AGENT,
        verify_ssl=account.ca_file or True,  # type: ignore[arg-type]
        timeout=NETWORK_TIMEOUT_S,
    )
    directory = client.ClientV2.get_directory(account.directory, net)
    acme = client.ClientV2(directory, net)
    contact = (f"mailto:{account.email}",) if account.email else ()
    try:
        regr = acme.new_account(
            messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        )
        log.info("acme account registered url=%s", regr.uri)
    except errors.ConflictError as exc:  # the CA knows this key: its account
        regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        net.account = regr
    return acme, str(regr.uri)


async def _run(fn: Callable[..., R], *args: object) -> R:
    """``fn(*args)`` in a worker thread, its failures as ``AcmeError``."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except messages.Error as exc:
        raise AcmeError(f"the CA refused: {exc.detail or exc.typ}") from exc
    except errors.ValidationError as exc:
        raise AcmeError(f"the CA did not validate the names: {exc}") from exc
    except errors.TimeoutError as exc:
        raise AcmeError("the CA did not finish the order in time") from exc
    except errors.Error as exc:
        raise AcmeError(f"ACME error: {exc}") from exc
    except requests.exceptions.RequestException as exc:
        raise AcmeError(f"cannot reach the ACME CA: {_short(exc)}") from exc


def _short(exc: requests.exceptions.RequestException) -> str:
    """requests' messages nest the whole urllib3 story; where and the OS's reason suffice."""
    url = exc.request.url if exc.request is not None else None
    where = str(urllib.parse.urlsplit(str(url)).netloc) if url else "the CA"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"{where}: no answer in time"
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        inner = todo.pop()
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        if isinstance(inner, OSError) and inner.strerror:
            return f"{where}: {inner.strerror}"
        reason = getattr(inner, "reason", None)
        for nxt in (reason, inner.__cause__, inner.__context__, *inner.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
