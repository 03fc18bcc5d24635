"""The farm's public certificate at run time: kept, distributed, and renewed.

Theory of operation. :class:`FarmCertificates` holds the current record
(:mod:`ras.broker.certstore`), saves every change to the broker's store and pushes it through
``GatewayLinks`` to every gateway and HALB it is assigned to (each also gets it when its link
comes up). A gateway or HALB writes it over its own certificate files, so it keeps serving the
last one it had while the broker is away. Brokers sharing their state (etcd) each follow the
record (``follow``): a certificate imported or renewed through one broker reaches the gateways
and HALBs linked to any other within seconds, with no restart.

With ACME configured (``letsencrypt``), ``run`` orders a certificate (:mod:`ras.broker.acme`)
when none from ACME is in use, and renews it at two thirds of its lifetime, or at once when
asked (``renew``). A failed attempt changes nothing that serves: the old certificate stays,
the failure is logged and shown in the status, and the next attempt waits
``acme_retry_min_s``, doubling with each failure up to ``acme_retry_max_s``: a CA that is down
or refusing sees a handful of orders a day, never a storm. One attempt runs at a time; asking
again meanwhile joins it.

Times are POSIX seconds from ``clock`` (``time.time``); the waits are trio's, so tests can
drive them with the autojump clock and a ``clock`` that follows it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ras.broker import certstore
from ras.broker.acme import AcmeAccount, AcmeError, new_account_key, obtain
from ras.broker.config import BrokerConfig
from ras.broker.gatewaylink import GatewayLinks
from ras.broker.model import CertificateRecord, CertSource
from ras.broker.store import Store
from ras.errors import PKIError, RasError
from ras.ops.metrics import CERT_EXPIRY
from ras.pki import KeyPair

__all__ = ["FarmCertificates", "Renewal", "renewal_due"]

log = logging.getLogger("ras.broker.certs")


Obtain = Callable[..., Awaitable[tuple[KeyPair, str]]]
RunSync = Callable[..., Awaitable[Any]]


def renewal_due(cert_pem: str) -> float:
    """When a certificate is renewed: at two thirds of its lifetime."""
    not_before, not_after = certstore.lifetime(cert_pem)
    return not_before + (not_after - not_before) * 2 / 3


@dataclass(slots=True)
class Renewal:
    """The ACME side as an administrator sees it."""

    state: str = "idle"  # idle, running, failed
    stage: str = ""  # while running: account, order, publishing, validating, finalizing
    attempts: int = 0  # since the broker started
    failures: int = 0  # in a row
    last_error: str = ""
    last_attempt: float | None = None
    last_success: float | None = None
    next_attempt: float | None = None  # after a failure: when the retry is due

    def to_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        for key in ("last_attempt", "last_success", "next_attempt"):
            if out[key] is not None:
                out[key] = _iso(out[key])
        return out


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")


class FarmCertificates:
    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        links: GatewayLinks,
        *,
        clock: Callable[[], float] = time.time,
        obtain: Obtain = obtain,
        run_sync: RunSync = trio.to_thread.run_sync,
    ) -> None:
        self.config = config
        self._store = certstore.CertStore(store)
        self.links = links
        self.clock = clock
        self._obtain = obtain
        self._run_sync = run_sync  # the store and the key making, off the event loop
        self.record = self._store.load()  # at start-up, before any link: a short read
        self.renewal = Renewal()
        self._wake = trio.Event()
        self._asked = False
        if self.record.cert_pem:
            links.set_certificate(self.record.cert_pem, self.record.key_pem, self.record.assigned)
            CERT_EXPIRY.labels("broker", "public").set(certstore.lifetime(self.record.cert_pem)[1])

    # -- changes from the admin API -----------------------------------------------------------

    async def _install(self, record: CertificateRecord) -> None:
        await self._run_sync(self._store.save, record)
        await self._use(record)

    async def _use(self, record: CertificateRecord) -> None:
        """Serve ``record`` from now on: to the gateways and HALBs if its certificate changed."""
        old = self.record
        self.record = record
        if record.cert_pem and (
            (record.cert_pem, record.key_pem, record.assigned)
            != (old.cert_pem, old.key_pem, old.assigned)
        ):
            not_after = certstore.lifetime(record.cert_pem)[1]
            CERT_EXPIRY.labels("broker", "public").set(not_after)
            log.info(
                "farm certificate installed source=%s expires=%s assigned=%s",
                record.source,
                _iso(not_after),
                ",".join(record.assigned) or "all",
            )
            await self.links.distribute_certificate(
                record.cert_pem, record.key_pem, record.assigned
            )

    async def follow(self, poll_s: float = 1.0) -> None:
        """Serve what another broker of the farm saved (an import, a renewal on the primary):
        re-read the record whenever the store's objects changed (``Store.generation``, kept up
        by ``Store.follow``) and push a changed certificate to this broker's gateways and HALBs.
        Runs until cancelled; a store out of reach keeps the certificate in use."""
        seen = self._generation()
        while True:
            await trio.sleep(poll_s)
            generation = self._generation()
            if generation == seen:
                continue
            try:
                record = await self._run_sync(self._store.load)
            except RasError as exc:
                log.warning("farm certificate not re-read reason=%s", exc)
                continue
            if self._generation() != generation:
                continue  # changed again meanwhile (maybe by this broker): read it next time
            seen = generation
            if record != self.record:
                log.info("farm certificate changed by another broker")
                await self._use(record)

    def _generation(self) -> int:
        return self._store.store.generation

    async def self_signed(self, names: Sequence[str], days: int) -> None:
        record = await self._run_sync(certstore.self_signed, self.record, names, days)
        await self._install(_without_acme(record))

    async def import_(self, data: bytes, password: bytes | None) -> None:
        record = await self._run_sync(certstore.imported, self.record, data, password)
        await self._install(_without_acme(record))

    async def csr(self, names: Sequence[str], organization: str | None) -> str:
        record: CertificateRecord = await self._run_sync(
            certstore.with_csr, self.record, names, organization
        )
        await self._install(record)
        return record.csr_pem

    async def assign(self, names: Sequence[str]) -> None:
        await self._install(dataclasses.replace(self.record, assigned=tuple(names)))

    async def letsencrypt(self, names: Sequence[str], email: str, directory: str) -> int:
        """Use ACME for ``names`` from now on, and order now (the attempt's number)."""
        record = dataclasses.replace(
            self.record,
            acme_names=tuple(names),
            acme_email=email,
            acme_directory=directory or self.config.acme_directory,
        )
        if record.acme_directory != self.record.acme_directory:
            record = dataclasses.replace(record, acme_account_key_pem="", acme_account_url="")
        await self._install(record)
        self.renewal.failures = 0
        self.renewal.next_attempt = None
        return self.ask()

    async def renew(self) -> int | None:
        """Renew now: a new ACME order (its attempt number), or a new self-signed certificate
        for the same names (None). PKIError for a certificate only its issuer can renew."""
        record = self.record
        if record.acme_names:
            return self.ask()
        if record.source is CertSource.SELF_SIGNED:
            names = certstore.names_of(record.cert_pem)
            not_before, not_after = certstore.lifetime(record.cert_pem)
            days = max(1, round((not_after - not_before) / 86400))
            await self.self_signed(names, days)
            return None
        raise PKIError(
            f"a {record.source} certificate is renewed by its issuer: import the new one"
            if record.cert_pem
            else "there is no farm certificate to renew"
        )

    def ask(self) -> int:
        """An ACME attempt as soon as possible; one that is running counts. The number the
        attempt will have (``renewal.attempts`` once it started)."""
        if self.renewal.state == "running":
            return self.renewal.attempts
        self._asked = True
        self._wake.set()
        return self.renewal.attempts + 1

    # -- the renewal loop ---------------------------------------------------------------------

    def next_attempt(self) -> float | None:
        """When the next ACME attempt is due (POSIX time); None: nothing to do."""
        record = self.record
        if not record.acme_names:
            return None
        if self.renewal.failures and self.renewal.next_attempt is not None:
            return self.renewal.next_attempt
        if record.source is not CertSource.LETSENCRYPT or not record.cert_pem:
            return self.clock()
        if set(certstore.names_of(record.cert_pem)) != set(record.acme_names):
            return self.clock()
        return renewal_due(record.cert_pem)

    async def run(self) -> None:
        while True:
            due = None if self._asked else self.next_attempt()
            wake = self._wake
            if not self._asked:
                if due is None:
                    await wake.wait()
                else:
                    with trio.move_on_after(max(0.0, due - self.clock())):
                        await wake.wait()
            if wake.is_set():
                self._wake = trio.Event()
            if self._asked or (due is not None and self.clock() >= due):
                self._asked = False
                await self._attempt()

    async def _attempt(self) -> None:
        record = self.record
        if not record.acme_names:
            return
        renewal = self.renewal
        renewal.state, renewal.last_attempt = "running", self.clock()
        renewal.attempts += 1
        if not record.acme_account_key_pem:
            key = await self._run_sync(new_account_key)
            record = dataclasses.replace(record, acme_account_key_pem=key.decode())
            await self._install(record)
        names = record.acme_names
        account = AcmeAccount(
            record.acme_directory or self.config.acme_directory,
            record.acme_account_key_pem.encode(),
            record.acme_email,
            str(self.config.acme_ca_file) if self.config.acme_ca_file else None,
        )
        log.info("acme order names=%s directory=%s", ",".join(names), account.directory)

        def stage(now: str) -> None:
            renewal.stage = now

        try:
            with trio.fail_after(self.config.acme_order_timeout_s):
                pair, url = await self._obtain(
                    account,
                    names,
                    publish=self.links.publish_acme,
                    withdraw=self.links.withdraw_acme,
                    on_stage=stage,
                )
        except (AcmeError, PKIError, ValueError, trio.TooSlowError) as exc:
            why = str(exc) or f"no certificate within {self.config.acme_order_timeout_s:g} s"
            self._failed(names, why)
            return
        except Exception as exc:  # an answer the ACME library chokes on: not the broker's end
            log.exception("acme order failed with an unexpected error names=%s", ",".join(names))
            self._failed(names, f"unexpected error: {type(exc).__name__}: {exc}")
            return
        current = self.record  # it may have changed meanwhile (an assignment)
        await self._install(
            dataclasses.replace(
                current,
                source=CertSource.LETSENCRYPT,
                cert_pem=pair.cert_pem.decode(),
                key_pem=pair.key_pem.decode(),
                acme_account_url=url,
            )
        )
        renewal.state, renewal.stage, renewal.failures, renewal.last_error = "idle", "", 0, ""
        renewal.last_success, renewal.next_attempt = self.clock(), None

    def _failed(self, names: tuple[str, ...], why: str) -> None:
        """An attempt failed: nothing that serves changes; the next waits longer."""
        renewal = self.renewal
        renewal.failures += 1
        pause = min(
            self.config.acme_retry_max_s,
            self.config.acme_retry_min_s * 2 ** (renewal.failures - 1),
        )
        renewal.state, renewal.stage, renewal.last_error = "failed", "", why
        renewal.next_attempt = self.clock() + pause
        log.error(
            "acme order failed names=%s attempt=%d retry_in=%.0fs reason=%s "
            "(the current certificate keeps serving)",
            ",".join(names), renewal.failures, pause, why,
        )  # fmt: skip

    # -- what the status shows ----------------------------------------------------------------

    def show(self) -> dict[str, object]:
        out = certstore.show(self.record, self.clock())
        if self.record.acme_names:
            due = self.next_attempt()
            out["renewal"] = self.renewal.to_json() | {"due": None if due is None else _iso(due)}
        return out

    def warnings(self) -> list[str]:
        """Lines for the status: an expiry coming or past, a failing renewal."""
        out = []
        expiry = certstore.expiry_warning(self.record, self.clock())
        if expiry:
            out.append(expiry)
        r = self.renewal
        if r.failures:
            when = _iso(r.next_attempt) if r.next_attempt is not None else "?"
            out.append(
                f"certificate renewal failed {r.failures} time(s) in a row: {r.last_error}; "
                f"next attempt at {when}"
            )
        return out


def _without_acme(record: CertificateRecord) -> CertificateRecord:
    """A certificate from another source replaces ACME's renewals (the account stays)."""
    return dataclasses.replace(record, acme_names=())
