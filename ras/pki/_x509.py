"""Making and reading certificates: the farm CA, daemon certificates, self-signed, CSRs.

Keys are EC P-256. Certificates start an hour in the past (clocks of lab VMs drift) and a
leaf never outlives the CA that signs it. Names given as ``sans`` become IP address entries
when they parse as one and DNS names otherwise (internationalised names as A-labels).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ras.errors import PKIError
from ras.pki._common import (
    CertKey,
    KeyPair,
    certs_to_pem,
    key_to_pem,
    load_certificate,
    load_private_key,
    new_key,
    public_key_der,
    signing_hash,
)

__all__ = [
    "create_ca",
    "describe",
    "issue_certificate",
    "make_csr",
    "peer_name",
    "self_signed_certificate",
]

_BACKDATE = dt.timedelta(hours=1)
_MAX_CN = 64  # ub-common-name (RFC 5280)
_BOTH_EKU = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.SMARTCARD_LOGON: "msSmartcardLogin",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

GeneralName = x509.DNSName | x509.IPAddress


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_days(valid_days: int) -> None:
    if valid_days < 1:
        raise PKIError(f"valid_days must be at least 1, not {valid_days}")


def general_name(name: str) -> GeneralName:
    """A SAN entry: an IP address if ``name`` parses as one, else a DNS name (A-labels)."""
    name = name.strip()
    if not name:
        raise PKIError("empty name in the certificate's names")
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise PKIError(f"not a valid DNS name: {name!r}") from exc
    if any(c.isspace() for c in name) or ".." in name or name.startswith("."):
        raise PKIError(f"not a valid DNS name: {name!r}")
    return x509.DNSName(name.lower())


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[GeneralName] = []
    for name in names:
        entry = general_name(name)
        if entry not in entries:
            entries.append(entry)
    if not entries:
        raise PKIError("a certificate needs at least one name")
    return x509.SubjectAlternativeName(entries)


def _subject(common_name: str, organization: str | None = None) -> x509.Name:
    if not common_name.strip():
        raise PKIError("the common name is empty")
    if len(common_name) > _MAX_CN:
        raise PKIError(f"the common name is longer than {_MAX_CN} characters: {common_name!r}")
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        if len(organization) > _MAX_CN:
            raise PKIError(f"the organization is longer than {_MAX_CN} characters")
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


# Leaves hold EC keys, which only sign (no keyEncipherment as for RSA key exchange).
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a CA brought from elsewhere may lack one
        public = ca_cert.public_key()
        if not isinstance(
            public,
            rsa.RSAPublicKey
            | ec.EllipticCurvePublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ):
            raise PKIError("the CA certificate's key type is not supported") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def open_ca(ca: KeyPair) -> tuple[x509.Certificate, CertKey]:
    """The CA certificate and key of ``ca``, checked to match and to be a CA."""
    cert = load_certificate(ca.cert_pem, what="CA certificate")
    key = load_private_key(ca.key_pem, what="CA key")
    if public_key_der(cert) != public_key_der(key):
        raise PKIError("the CA key does not match the CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PKIError("the CA certificate is not a CA (basicConstraints CA:TRUE is missing)")
    return cert, key


def create_ca(common_name: str = "RAS Farm CA", *, valid_days: int = 3650) -> KeyPair:
    """Make a new farm CA: a self-signed EC P-256 certificate that only signs certificates.

    basicConstraints ``CA:TRUE, pathlen:0`` (critical: it signs leaves, never another CA),
    keyUsage ``keyCertSign, cRLSign`` (critical), subject and authority key identifiers.
    """
    _check_days(valid_days)
    key = new_key()
    name = _subject(common_name)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert_pem=certs_to_pem([cert]), key_pem=key_to_pem(key))


def issue_certificate(
    ca: KeyPair, name: str, *, sans: Sequence[str] = (), valid_days: int = 825
) -> KeyPair:
    """Issue a daemon certificate signed by the farm CA ``ca``.

    Subject ``CN=name``; subjectAltName ``name`` plus ``sans``; extendedKeyUsage serverAuth
    and clientAuth (every daemon is both a TLS server and a TLS client in mutual TLS);
    ``CA:FALSE``; key identifiers. The validity is cut to the CA's own end. The returned
    chain holds the leaf only: peers trust the CA certificate itself.
    """
    _check_days(valid_days)
    ca_cert, ca_key = open_ca(ca)
    key = new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise PKIError("the CA certificate has expired")
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _BACKDATE, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage(_BOTH_EKU), critical=False)
        .add_extension(_san([name, *sans]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, signing_hash(ca_key))
    )
    return KeyPair(cert_pem=certs_to_pem([cert]), key_pem=key_to_pem(key))


def self_signed_certificate(names: Sequence[str], *, valid_days: int = 825) -> KeyPair:
    """A self-signed server certificate: the gateway's and HALB's public one by default.

    Subject ``CN=names[0]``, subjectAltName all of ``names``, extendedKeyUsage serverAuth,
    ``CA:FALSE``. It carries no keyUsage extension, so that OpenSSL (and so Python's ``ssl``)
    accepts it as its own trust anchor: a client that loads this very PEM as its CA file
    verifies the server and checks the host name against the SANs.
    """
    _check_days(valid_days)
    if isinstance(names, str) or not names:
        raise PKIError("a self-signed certificate needs a list of at least one name")
    key = new_key()
    subject = _subject(names[0])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert_pem=certs_to_pem([cert]), key_pem=key_to_pem(key))


def make_csr(names: Sequence[str], *, organization: str | None = None) -> tuple[bytes, bytes]:
    """A certificate signing request for ``names`` and its new key: ``(csr_pem, key_pem)``.

    Subject ``CN=names[0]`` (and ``O=organization`` if given), subjectAltName all of
    ``names``, serverAuth and clientAuth requested. Keep the key: the signed certificate
    comes back alone, and ``import_pem(key_pem + cert_pem)`` joins the two.
    """
    if isinstance(names, str) or not names:
        raise PKIError("a CSR needs a list of at least one name")
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(names[0], organization))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(_BOTH_EKU), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_to_pem(key)


def _describe_key(cert: x509.Certificate) -> str:
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return f"EC {public.curve.name}"
    if isinstance(public, rsa.RSAPublicKey):
        return f"RSA {public.key_size}"
    if isinstance(public, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public).__name__


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for entry in san:
        match entry:
            case x509.DNSName(value=value):
                out.append(f"DNS:{value}")
            case x509.IPAddress(value=value):
                out.append(f"IP:{value}")
            case x509.RFC822Name(value=value):
                out.append(f"email:{value}")
            case x509.UniformResourceIdentifier(value=value):
                out.append(f"URI:{value}")
            case _:
                out.append(str(entry))
    return out


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _eku(cert: x509.Certificate) -> list[str]:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku]


def describe(cert_pem: bytes) -> dict[str, object]:
    """What an administrator wants to know about the first certificate in ``cert_pem``.

    Keys: ``subject`` and ``issuer`` (RFC 4514 strings), ``sans`` (list of ``DNS:``/``IP:``
    strings), ``not_before`` and ``not_after`` (ISO 8601, UTC), ``serial`` (hex),
    ``sha256`` (fingerprint, colon-separated hex), ``is_ca`` (bool), ``key`` (for example
    ``EC secp256r1``), ``extended_key_usage`` (list of names).
    """
    cert = load_certificate(cert_pem, what="certificate")
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": _sans(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "serial": format(cert.serial_number, "x"),
        "sha256": ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        "is_ca": _is_ca(cert),
        "key": _describe_key(cert),
        "extended_key_usage": _eku(cert),
    }


def peer_name(cert_der: bytes) -> str:
    """The name a peer certificate (DER, as ``getpeercert(binary_form=True)`` gives it) is
    issued to: its one subject common name.

    The broker uses it to know which gateway or agent is talking, after the TLS layer has
    verified the certificate against the farm CA. A certificate with no common name, or with
    several, is a PKIError: an identity must not be ambiguous.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise PKIError("the peer certificate is malformed") from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PKIError(f"the peer certificate has {len(cns)} common names, expected one")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
