"""The farm certificate in the broker (ras.broker.certs, ras.broker.certstore): each source,
kept in the store, pushed on change and on connect; ACME renewal at two thirds of the lifetime,
retries that back off, failures that leave the old certificate and show in the warnings.

The ACME client itself is exercised against a real pebble in tests/test_acme_lab.py; here an
``obtain`` that issues from a test CA stands in for the CA, under trio's autojump clock (a
``clock`` that follows it), so days of renewals take milliseconds.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ras.broker.acme import AcmeAccount, AcmeError, new_account_key, obtain
from ras.broker.certs import FarmCertificates
from ras.broker.certstore import lifetime, names_of
from ras.broker.config import BrokerConfig
from ras.broker.gatewaylink import GatewayLinks
from ras.broker.model import CertSource
from ras.broker.store import SQLiteStore
from ras.errors import PKIError
from ras.pki import KeyPair, create_ca, export_pfx, self_signed_certificate
from ras.pki._common import key_to_pem, load_private_key, new_key

DAY = 86400.0
BASE = time.time()


def _clock() -> float:
    return BASE + trio.current_time()


async def _inline(fn, *args):
    """The store and key making run in the test's task: no worker thread for the autojump clock
    clock to leap over."""
    return fn(*args)


def _config(tmp_path: Path) -> BrokerConfig:
    return BrokerConfig(
        database=tmp_path / "broker.sqlite3",
        cert_file=tmp_path / "x.pem",
        key_file=tmp_path / "x.key",
        ca_file=tmp_path / "ca.pem",
    )


def _issue(names: list[str], not_before: float, lifetime_s: float) -> KeyPair:
    """A leaf for ``names`` from a test CA, valid from ``not_before`` for ``lifetime_s``."""
    ca = create_ca("Test ACME CA")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = load_private_key(ca.key_pem, None, what="CA key")
    key = new_key()
    start = dt.datetime.fromtimestamp(not_before, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=lifetime_s))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem
    return KeyPair(chain, key_to_pem(key))


class FakeCA:
    """``obtain`` as the broker calls it: records each call, fails while ``down``."""

    def __init__(self, lifetime_s: float = 90 * DAY) -> None:
        self.lifetime_s = lifetime_s
        self.calls: list[float] = []
        self.down = False
        self.odd: Exception | None = None  # an answer the ACME library chokes on
        self.release: trio.Event | None = None  # an order that waits for this
        self.tokens: list[str] = []

    async def obtain(self, account, names, *, publish, withdraw, on_stage):
        self.calls.append(_clock())
        on_stage("validating")
        if self.release is not None:
            await self.release.wait()
        if self.odd is not None:
            raise self.odd
        if self.down:
            raise AcmeError("cannot reach the ACME CA: connection refused")
        return _issue(list(names), _clock(), self.lifetime_s), "https://ca.test/acct/1"


def _certs(tmp_path: Path, ca: FakeCA, links: GatewayLinks | None = None) -> FarmCertificates:
    store = SQLiteStore(tmp_path / "broker.sqlite3")
    return FarmCertificates(
        _config(tmp_path),
        store,
        links or GatewayLinks(),
        clock=_clock,
        obtain=ca.obtain,
        run_sync=_inline,
    )


async def _settle() -> None:
    await trio.sleep(1)  # autojump: every task runs until it waits


async def test_acme_orders_at_once_then_renews_at_two_thirds_of_the_lifetime(
    tmp_path, nursery, autojump_clock
):
    ca = FakeCA(lifetime_s=90 * DAY)
    links = GatewayLinks()
    certs = _certs(tmp_path, ca, links)
    nursery.start_soon(certs.run)
    attempt = await certs.letsencrypt(["farm.example.com"], "ops@example.com", "")
    assert attempt == 1
    await _settle()
    assert len(ca.calls) == 1
    assert certs.record.source is CertSource.LETSENCRYPT
    first = certs.record.cert_pem
    assert links.certificate is not None
    assert links.certificate.cert_pem == first
    assert names_of(first) == ["farm.example.com"]

    await trio.sleep(59 * DAY)  # before two thirds of 90 days: nothing
    assert len(ca.calls) == 1
    await trio.sleep(1.5 * DAY)
    assert len(ca.calls) == 2
    assert ca.calls[1] - ca.calls[0] == pytest.approx(60 * DAY, abs=2)
    assert certs.record.cert_pem != first
    assert links.certificate.cert_pem == certs.record.cert_pem
    assert certs.warnings() == []


async def test_a_failing_ca_keeps_the_old_certificate_and_retries_with_backoff(
    tmp_path, nursery, autojump_clock
):
    ca = FakeCA(lifetime_s=90 * DAY)
    certs = _certs(tmp_path, ca)
    nursery.start_soon(certs.run)
    await certs.letsencrypt(["farm.example.com"], "", "")
    await _settle()
    good = certs.record.cert_pem
    ca.down = True
    await certs.renew()
    await _settle()
    assert certs.record.cert_pem == good  # still serving
    assert certs.renewal.state == "failed"
    assert "connection refused" in certs.renewal.last_error
    (warning,) = certs.warnings()
    assert "renewal failed 1 time(s)" in warning
    assert "connection refused" in warning

    await trio.sleep(DAY)
    pauses = [round(b - a) for a, b in zip(ca.calls[1:], ca.calls[2:], strict=False)]
    # 300 s doubling to the 6 h ceiling: a CA that is down sees a dozen orders a day
    assert pauses[:8] == [300, 600, 1200, 2400, 4800, 9600, 19200, 21600]
    assert len(ca.calls) - 1 <= 11
    assert certs.record.cert_pem == good

    ca.down = False
    await trio.sleep(21600)
    assert certs.renewal.state == "idle"
    assert certs.renewal.failures == 0
    assert certs.record.cert_pem != good
    assert certs.warnings() == []


async def test_an_unexpected_error_in_an_order_is_a_failure_not_a_dead_broker(
    tmp_path, nursery, autojump_clock
):
    ca = FakeCA()
    ca.odd = KeyError("authorizations")
    certs = _certs(tmp_path, ca)
    nursery.start_soon(certs.run)
    await certs.letsencrypt(["farm.example.com"], "", "")
    await _settle()
    assert certs.renewal.state == "failed"
    assert certs.renewal.last_error == "unexpected error: KeyError: 'authorizations'"
    ca.odd = None
    await trio.sleep(300)  # the loop lives on: the retry comes and succeeds
    assert certs.renewal.state == "idle"
    assert certs.record.source is CertSource.LETSENCRYPT


async def test_asking_again_while_an_order_runs_joins_it(tmp_path, nursery, autojump_clock):
    ca = FakeCA()
    ca.release = trio.Event()
    certs = _certs(tmp_path, ca)
    nursery.start_soon(certs.run)
    first = await certs.letsencrypt(["farm.example.com"], "", "")
    await _settle()
    assert certs.renewal.state == "running"
    assert certs.renewal.stage == "validating"
    assert await certs.renew() == first
    assert await certs.renew() == first
    ca.release.set()
    await _settle()
    assert len(ca.calls) == 1
    assert certs.renewal.attempts == 1
    assert certs.renewal.state == "idle"


async def test_the_certificate_lasts_in_the_store_and_goes_to_links_that_connect_later(
    tmp_path, autojump_clock
):
    ca = FakeCA()
    certs = _certs(tmp_path, ca)
    await certs.self_signed(["farm.example.com", "10.0.0.7"], 30)
    await certs.assign(["gw1", "halb1"])
    again = _certs(tmp_path, ca, links := GatewayLinks())
    assert again.record.source is CertSource.SELF_SIGNED
    assert again.record.cert_pem == certs.record.cert_pem
    assert links.certificate is not None
    assert links.certificate.cert_pem == certs.record.cert_pem
    assert links._gets_certificate("GW1")
    assert not links._gets_certificate("gw2")
    assert again.show()["assigned"] == ["gw1", "halb1"]
    assert "key_pem" not in again.show()
    mode = (tmp_path / "broker.sqlite3").stat().st_mode & 0o777
    assert mode == 0o600


async def test_expiry_within_thirty_days_is_a_warning(tmp_path, autojump_clock):
    certs = _certs(tmp_path, FakeCA())
    await certs.self_signed(["farm.example.com"], 10)
    (warning,) = certs.warnings()
    assert warning.startswith("the farm certificate expires in 10.0 days")
    await certs.self_signed(["farm.example.com"], 365)
    assert certs.warnings() == []


async def test_renewing_a_self_signed_certificate_keeps_its_names_and_lifetime(
    tmp_path, autojump_clock
):
    certs = _certs(tmp_path, FakeCA())
    await certs.self_signed(["farm.example.com", "10.0.0.7"], 30)
    old = certs.record.cert_pem
    assert await certs.renew() is None
    assert certs.record.cert_pem != old
    assert names_of(certs.record.cert_pem) == ["farm.example.com", "10.0.0.7"]
    start, end = lifetime(certs.record.cert_pem)
    assert round((end - start) / DAY) == 30


async def test_imports_pem_pfx_and_a_certificate_signed_from_our_csr(tmp_path, autojump_clock):
    certs = _certs(tmp_path, FakeCA())
    pair = self_signed_certificate(["imported.example.com"])
    await certs.import_(pair.key_pem + pair.cert_pem, None)
    assert certs.record.source is CertSource.IMPORTED
    assert certs.record.cert_pem.encode() == pair.cert_pem

    pfx = export_pfx(pair, b"pfx password")
    with pytest.raises(PKIError, match="wrong password"):
        await certs.import_(pfx, b"nope")
    await certs.import_(pfx, b"pfx password")
    assert certs.record.source is CertSource.IMPORTED

    with pytest.raises(PKIError, match="no CSR is pending"):
        await certs.import_(pair.cert_pem, None)
    with pytest.raises(PKIError, match="renewed by its issuer"):
        await certs.renew()
    csr_pem = await certs.csr(["portal.example.com"], "Example Ltd")
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert certs.record.source is CertSource.IMPORTED  # the one in use stays until then
    ca = create_ca("Someone Else's CA")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    signed = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("portal.example.com")]), False)
        .sign(load_private_key(ca.key_pem, None, what="CA key"), hashes.SHA256())  # type: ignore[arg-type]
    )
    with pytest.raises(PKIError, match="does not match the pending CSR"):
        await certs.import_(pair.cert_pem, None)
    await certs.import_(signed.public_bytes(serialization.Encoding.PEM) + ca.cert_pem, None)
    assert certs.record.source is CertSource.CSR
    assert names_of(certs.record.cert_pem) == ["portal.example.com"]
    assert certs.record.cert_pem.count("BEGIN CERTIFICATE") == 2
    assert certs.record.csr_key_pem == ""  # used: the key is now the certificate's


async def test_an_unreachable_ca_is_one_clear_line(tmp_path):
    """The real ACME client, against a port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    account = AcmeAccount(f"https://127.0.0.1:{port}/dir", new_account_key(), "ops@example.com")
    published: list[str] = []

    async def publish(token: str, key_authorization: str, name: str) -> None:
        published.append(token)

    async def withdraw(token: str) -> None:
        published.remove(token)

    with trio.fail_after(30), pytest.raises(AcmeError) as info:
        await obtain(account, ["farm.example.com"], publish=publish, withdraw=withdraw)
    assert str(info.value) == f"cannot reach the ACME CA: 127.0.0.1:{port}: Connection refused"
    assert published == []
