"""Importing and exporting certificates with their key: PEM bundles and PKCS#12 (PFX).

An administrator brings the gateway's public certificate from elsewhere: a PEM file with the
key and the chain in whatever order the issuing tool wrote them, or a PFX exported from
Windows. Both are normalised to a :class:`KeyPair`: the leaf (the certificate whose public
key is the key's) first, then the chain toward the root, then any other certificate given.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from ras.errors import PKIError
from ras.pki._common import (
    CertKey,
    KeyPair,
    certs_to_pem,
    check_key_type,
    is_cert_label,
    is_key_label,
    key_to_pem,
    load_certificates,
    load_key_block,
    load_private_key,
    pem_blocks,
    public_key_der,
)

__all__ = ["export_pfx", "import_pem", "import_pfx"]

# PBKDF2 rounds for an exported PFX: what OpenSSL 3 uses by default.
_PFX_KDF_ROUNDS = 2048


def _order(key: CertKey, certs: list[x509.Certificate], *, what: str) -> list[x509.Certificate]:
    """The leaf matching ``key`` first, then its issuers in order, then the rest.

    Duplicates are dropped. PKIError if no certificate holds the key's public key.
    """
    unique: list[x509.Certificate] = []
    for cert in certs:
        if cert not in unique:
            unique.append(cert)
    key_id = public_key_der(key)
    leaves = [c for c in unique if public_key_der(c) == key_id]
    if not leaves:
        raise PKIError(f"{what}: the private key matches none of the {len(unique)} certificates")
    chain = [leaves[0]]
    rest = [c for c in unique if c is not leaves[0]]
    while True:
        current = chain[-1]
        if current.issuer == current.subject:
            break
        issuer = next((c for c in rest if c.subject == current.issuer), None)
        if issuer is None:
            break
        chain.append(issuer)
        rest.remove(issuer)
    return chain + rest


def import_pem(data: bytes, *, password: bytes | None = None) -> KeyPair:
    """Read one PEM file holding a private key and a certificate chain, in any order.

    The key may be PKCS#8 or traditional RSA/EC, encrypted (give ``password``) or not. The
    result has the leaf first, then the chain, and the key as unencrypted PKCS#8. PKIError
    with a clear message when the file holds no key, no certificate, several keys, or a key
    that matches no certificate.
    """
    blocks = pem_blocks(data)
    key_blocks = [block for label, block in blocks if is_key_label(label)]
    if not any(is_cert_label(label) for label, _ in blocks) and not key_blocks:
        raise PKIError("not a PEM file: no certificate and no private key found")
    if not key_blocks:
        raise PKIError("no private key found in the PEM data (only certificates)")
    if len(key_blocks) > 1:
        raise PKIError(f"the PEM data holds {len(key_blocks)} private keys, expected one")
    key = load_key_block(key_blocks[0], password, what="PEM data")
    certs = load_certificates(data, what="PEM data")
    ordered = _order(key, certs, what="PEM data")
    return KeyPair(cert_pem=certs_to_pem(ordered), key_pem=key_to_pem(key))


def _load_pkcs12(data: bytes, password: bytes | None) -> pkcs12.PKCS12KeyAndCertificates:
    # A PFX "without a password" is sometimes protected by the empty one (Windows, OpenSSL
    # with -passout pass:), so None also tries b"" before giving up.
    attempts = [password] if password is not None else [None, b""]
    last: Exception | None = None
    for attempt in attempts:
        try:
            return pkcs12.load_pkcs12(data, attempt)
        except ValueError as exc:
            last = exc
    if password is None:
        message = "could not read the PKCS#12 bundle: it needs a password, or it is not PKCS#12"
    else:
        message = "could not read the PKCS#12 bundle: wrong password, or it is not PKCS#12"
    raise PKIError(message) from last


def import_pfx(data: bytes, password: bytes | None) -> KeyPair:
    """Read a PKCS#12 (PFX) bundle: its key, its certificate and any CA certificates.

    PKIError on a wrong password, a file that is not PKCS#12, or a bundle without a key or
    without a certificate matching it.
    """
    bundle = _load_pkcs12(data, password)
    if bundle.key is None:
        raise PKIError("the PKCS#12 bundle holds no private key")
    key = check_key_type(bundle.key, what="PKCS#12 bundle")
    certs = [c.certificate for c in bundle.additional_certs]
    if bundle.cert is not None:
        certs.insert(0, bundle.cert.certificate)
    if not certs:
        raise PKIError("the PKCS#12 bundle holds no certificate")
    ordered = _order(key, certs, what="PKCS#12 bundle")
    return KeyPair(cert_pem=certs_to_pem(ordered), key_pem=key_to_pem(key))


def export_pfx(
    pair: KeyPair,
    password: bytes | None,
    *,
    friendly_name: str = "ras",
    legacy: bool = False,
) -> bytes:
    """Write ``pair`` as a PKCS#12 (PFX) bundle: key, leaf, and the rest of the chain.

    With a password, the bundle is encrypted with AES-256-CBC and PBKDF2 and its MAC uses
    SHA-256, as OpenSSL 3 and Windows 10/Server 2019 and later expect; ``legacy=True``
    uses 3DES and SHA-1 instead, for Windows Server 2016 and older. Without a password the
    bundle is not encrypted: keep it as secret as the key itself.
    """
    if password is not None and not password:
        raise PKIError("the PKCS#12 password is empty: give a password or None")
    key = load_private_key(pair.key_pem, what="key")
    certs = load_certificates(pair.cert_pem, what="certificate chain")
    ordered = _order(key, certs, what="key pair")
    encryption: serialization.KeySerializationEncryption
    if password is None:
        encryption = serialization.NoEncryption()
    elif legacy:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(_PFX_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())
            .build(password)
        )
    else:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(_PFX_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
    try:
        return pkcs12.serialize_key_and_certificates(
            friendly_name.encode("utf-8") or None,
            key,
            ordered[0],
            ordered[1:] or None,
            encryption,
        )
    except ValueError as exc:
        raise PKIError("could not write the PKCS#12 bundle") from exc
