"""TLS contexts for the daemons, from the standard library's ``ssl`` module.

Both sides use the same protocol limits: TLS 1.2 at least; for TLS 1.2 only forward-secret
AEAD suites (``ECDHE+AESGCM:ECDHE+CHACHA20``; TLS 1.3 suites are all of that kind); no
compression; no renegotiation. A server given ``client_ca_file`` requires a client
certificate issued by that CA (mutual TLS, as between the farm's daemons), and OpenSSL checks
that its extendedKeyUsage allows clientAuth. Hand the contexts to ``trio.SSLStream``; read
the peer's name with :func:`ras.pki.peer_name` on ``getpeercert(binary_form=True)``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ras.errors import PKIError

__all__ = ["TLS12_CIPHERS", "client_context", "server_context"]

#: The TLS 1.2 cipher suites allowed: ECDHE key exchange with an AEAD cipher.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise PKIError(f"{exc.filename or cert_file}: no such file") from exc
    except ssl.SSLError as exc:
        raise PKIError(
            f"{cert_file}, {key_file}: cannot load the certificate and key "
            f"(not PEM, or they do not match): {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise PKIError(f"{cert_file}, {key_file}: cannot read: {exc.strerror or exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except FileNotFoundError as exc:
        raise PKIError(f"{ca_file}: no such file") from exc
    except ssl.SSLError as exc:
        raise PKIError(f"{ca_file}: cannot load the CA certificates: {exc.reason or exc}") from exc
    except OSError as exc:
        raise PKIError(f"{ca_file}: cannot read: {exc.strerror or exc}") from exc


def server_context(
    cert_file: Path, key_file: Path, *, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """A server-side TLS context presenting ``cert_file`` (chain, leaf first) and ``key_file``.

    With ``client_ca_file``, clients must present a certificate issued by that CA (mutual
    TLS): a client without one, or with one from another CA, fails the handshake. PKIError
    if a file is missing or unreadable, or the key does not match the certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, cert_file, key_file)
    if client_ca_file is not None:
        _load_ca(ctx, client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca_file: Path,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client-side TLS context that verifies the server against ``ca_file``.

    ``ca_file`` is the farm CA, or a server's self-signed certificate itself. The server's
    name is checked against its certificate's SANs unless ``check_hostname`` is false (the
    chain is verified either way). With ``cert_file`` (and ``key_file``, if the key is not
    in the same file) the client presents that certificate for mutual TLS.
    """
    if key_file is not None and cert_file is None:
        raise PKIError("a client key file was given without its certificate file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca_file)
    if cert_file is not None:
        _load_chain(ctx, cert_file, key_file if key_file is not None else cert_file)
    return ctx
