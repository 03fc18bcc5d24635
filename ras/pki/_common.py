"""Shared pieces of the PKI: the key pair value, PEM parsing, key checks.

Every function here raises :class:`~ras.errors.PKIError` (never a ``ValueError`` of the
library underneath) and never puts key material or passwords into an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ras.errors import PKIError

#: The private key types a certificate of ours may hold (all can sign, go in a PKCS#12 bundle
#: and be used by the ``ssl`` module).
CertKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----",
    re.DOTALL,
)
_CERT_LABELS = frozenset({b"CERTIFICATE", b"X509 CERTIFICATE"})
_KEY_LABELS = frozenset(
    {
        b"PRIVATE KEY",
        b"ENCRYPTED PRIVATE KEY",
        b"RSA PRIVATE KEY",
        b"EC PRIVATE KEY",
    }
)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate chain and its private key, both PEM.

    ``cert_pem`` holds the leaf certificate first, then any intermediates; ``key_pem`` is the
    leaf's private key as unencrypted PKCS#8. The key is left out of ``repr()`` so that a
    ``KeyPair`` in a log line never leaks it.
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Return the ``(label, block)`` of each PEM block in ``data``, in file order."""
    return [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def is_key_label(label: bytes) -> bool:
    """Whether a PEM label names a private key."""
    return label in _KEY_LABELS


def is_cert_label(label: bytes) -> bool:
    """Whether a PEM label names a certificate."""
    return label in _CERT_LABELS


def load_certificates(data: bytes, *, what: str = "PEM data") -> list[x509.Certificate]:
    """Every certificate in PEM ``data``; PKIError if there is none or one is malformed."""
    certs: list[x509.Certificate] = []
    for label, block in pem_blocks(data):
        if not is_cert_label(label):
            continue
        try:
            cert = x509.load_pem_x509_certificate(block)
            cert.extensions  # noqa: B018  (parsed lazily: find a malformed one here)
        except ValueError as exc:
            raise PKIError(f"{what}: certificate {len(certs) + 1} is malformed") from exc
        certs.append(cert)
    if not certs:
        raise PKIError(f"{what}: no certificate found")
    return certs


def load_certificate(data: bytes, *, what: str = "PEM data") -> x509.Certificate:
    """The first certificate in PEM ``data``."""
    return load_certificates(data, what=what)[0]


def check_key_type(key: PrivateKeyTypes, *, what: str) -> CertKey:
    """Narrow a loaded private key to the types a certificate may hold."""
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        return key
    raise PKIError(f"{what}: unsupported private key type {type(key).__name__}")


def load_key_block(block: bytes, password: bytes | None, *, what: str) -> CertKey:
    """Load one PEM private key block, encrypted or not.

    A password given for an unencrypted key is ignored; an encrypted key without a password
    or with a wrong one is a PKIError saying so.
    """
    encrypted = b"ENCRYPTED" in block.split(b"\n", 2)[0] or b"Proc-Type: 4,ENCRYPTED" in block
    try:
        key = serialization.load_pem_private_key(block, password if encrypted else None)
    except TypeError as exc:
        raise PKIError(f"{what}: the private key is encrypted and no password was given") from exc
    except ValueError as exc:
        if encrypted:
            raise PKIError(f"{what}: wrong password for the encrypted private key") from exc
        raise PKIError(f"{what}: the private key is malformed") from exc
    except UnsupportedAlgorithm as exc:
        raise PKIError(f"{what}: the private key uses an unsupported algorithm") from exc
    return check_key_type(key, what=what)


def load_private_key(
    data: bytes, password: bytes | None = None, *, what: str = "PEM data"
) -> CertKey:
    """The one private key in PEM ``data``; PKIError if there is none or more than one."""
    blocks = [block for label, block in pem_blocks(data) if is_key_label(label)]
    if not blocks:
        raise PKIError(f"{what}: no private key found")
    if len(blocks) > 1:
        raise PKIError(f"{what}: holds {len(blocks)} private keys, expected one")
    return load_key_block(blocks[0], password, what=what)


def split_chain(cert_pem: bytes) -> list[bytes]:
    """Each certificate of a PEM chain as its own PEM, in file order (PKIError if none)."""
    certs = load_certificates(cert_pem, what="certificate chain")
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def key_to_pem(key: CertKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certs_to_pem(certs: list[x509.Certificate]) -> bytes:
    """Certificates as concatenated PEM, in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def public_key_der(obj: x509.Certificate | CertKey) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate or of a private key, to compare keys."""
    public = obj.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signing_hash(key: CertKey) -> hashes.SHA256 | None:
    """The hash to sign with: SHA-256, or none for Ed25519/Ed448 (which hash internally)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: fast to make, accepted by every TLS stack and RDP client."""
    return ec.generate_private_key(ec.SECP256R1())
