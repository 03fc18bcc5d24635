"""The farm's public certificate in the broker's store: one :class:`CertificateRecord`.

Synchronous and small (the callers run it in a worker thread): read and write the record,
make or take a certificate from each source (self-signed, imported PEM or PFX, a CSR signed
elsewhere, ACME), and describe it for ``ras admin cert show`` and the status, with the expiry
warning. Every refusal is a ``PKIError`` or an ``Invalid`` naming what is wrong.

Keys at rest: the certificate's key, a pending CSR's key and the ACME account key are PEM in
the broker's store (the SQLite file is created with mode 0600, like the users' hashes and the
ticket key beside them). They are never logged and never in an API answer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from cryptography import x509

from ras.broker.model import CertificateRecord, CertSource
from ras.broker.store import Store
from ras.errors import PKIError
from ras.pki import (
    KeyPair,
    describe,
    import_pem,
    import_pfx,
    make_csr,
    self_signed_certificate,
)

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertStore",
    "expiry",
    "expiry_warning",
    "from_csr",
    "imported",
    "lifetime",
    "names_of",
    "self_signed",
    "show",
    "with_csr",
]

EXPIRY_WARNING_DAYS = 30  # status warns this long before a certificate expires
FARM = "farm"


class CertStore:
    """The record in ``store`` (a new, empty one until something is saved)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def load(self) -> CertificateRecord:
        return self.store.get_object(CertificateRecord, FARM) or CertificateRecord(FARM)

    def save(self, record: CertificateRecord) -> None:
        self.store.put_object(record)


def _replace(record: CertificateRecord, pair: KeyPair, source: CertSource) -> CertificateRecord:
    return dataclasses.replace(
        record, source=source, cert_pem=pair.cert_pem.decode(), key_pem=pair.key_pem.decode()
    )


def self_signed(record: CertificateRecord, names: Sequence[str], days: int) -> CertificateRecord:
    """A new self-signed certificate for ``names``."""
    return _replace(
        record, self_signed_certificate(list(names), valid_days=days), CertSource.SELF_SIGNED
    )


def imported(record: CertificateRecord, data: bytes, password: bytes | None) -> CertificateRecord:
    """A PEM bundle (key and chain), a PFX, or the certificate signed from the pending CSR
    (PEM, chain allowed, no key: it is joined with the CSR's key)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        if b"PRIVATE KEY-----" not in data:
            return from_csr(record, data)
        return _replace(record, import_pem(data, password=password), CertSource.IMPORTED)
    return _replace(record, import_pfx(data, password), CertSource.IMPORTED)


def with_csr(
    record: CertificateRecord, names: Sequence[str], organization: str | None
) -> CertificateRecord:
    """A new certificate signing request (and its key, kept in the record until the signed
    certificate is imported); the certificate in use stays."""
    csr_pem, key_pem = make_csr(list(names), organization=organization)
    return dataclasses.replace(record, csr_pem=csr_pem.decode(), csr_key_pem=key_pem.decode())


def from_csr(record: CertificateRecord, cert_pem: bytes) -> CertificateRecord:
    if not record.csr_key_pem:
        raise PKIError(
            "the PEM data holds no private key and no CSR is pending: import the key with "
            "the certificate (PEM or PFX), or make a CSR first (ras admin cert csr)"
        )
    try:
        pair = import_pem(record.csr_key_pem.encode() + b"\n" + cert_pem)
    except PKIError as exc:
        raise PKIError(f"the certificate does not match the pending CSR: {exc}") from None
    done = _replace(record, pair, CertSource.CSR)
    return dataclasses.replace(done, csr_pem="", csr_key_pem="")


def lifetime(cert_pem: str) -> tuple[float, float]:
    """The leaf's notBefore and notAfter (POSIX seconds)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def names_of(cert_pem: str) -> list[str]:
    """The leaf's DNS names and IP addresses (its subjectAltName)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def expiry(record: CertificateRecord) -> float | None:
    return lifetime(record.cert_pem)[1] if record.cert_pem else None


def expiry_warning(record: CertificateRecord, now: float) -> str:
    """A line for the status when the certificate expires within ``EXPIRY_WARNING_DAYS`` (one
    that ACME renews: once its renewal is due, the last third of its lifetime, if that comes
    later) or has expired; empty otherwise."""
    if not record.cert_pem:
        return ""
    not_before, not_after = lifetime(record.cert_pem)
    threshold = EXPIRY_WARNING_DAYS * 86400.0
    if record.acme_names:
        threshold = min(threshold, (not_after - not_before) / 3)
    left = not_after - now
    when = dt.datetime.fromtimestamp(not_after, dt.UTC).isoformat(timespec="seconds")
    if left <= 0:
        return f"the farm certificate expired at {when}"
    if left <= threshold:
        return f"the farm certificate expires in {_span(left)} ({when})"
    return ""


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"


def show(record: CertificateRecord, now: float) -> dict[str, object]:
    """What ``ras admin cert show`` prints: everything but the keys."""
    out: dict[str, object] = {
        "source": record.source.value,
        "assigned": list(record.assigned) or "all",
        "csr_pending": bool(record.csr_pem),
    }
    if record.cert_pem:
        info = describe(record.cert_pem.encode())
        not_after = expiry(record)
        assert not_after is not None
        out.update(info)
        out["chain_length"] = record.cert_pem.count("BEGIN CERTIFICATE")
        out["expires_in_s"] = round(not_after - now)
        out["warning"] = expiry_warning(record, now)
    if record.csr_pem:
        out["csr_pem"] = record.csr_pem
    if record.acme_names or record.acme_directory:
        out["acme"] = {
            "names": list(record.acme_names),
            "email": record.acme_email,
            "directory": record.acme_directory,
            "account": record.acme_account_url,
        }
    return out
