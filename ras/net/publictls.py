"""The gateway's public certificate: the one its TLS port presents, reloaded and replaced live.

New TLS connections get the context current at their handshake; open ones keep theirs. A pair
that does not load, or whose key does not match, is logged and the current one kept.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import trio

from ras.errors import PKIError
from ras.pki import server_context

__all__ = ["PublicTLS"]

log = logging.getLogger("ras.gateway")


class PublicTLS:
    """``public_cert_file`` and ``public_key_file`` as a server context (None: none given)."""

    def __init__(self, cert_file: Path | None, key_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context: ssl.SSLContext | None = None
        if cert_file is not None and key_file is not None:
            self.context = server_context(cert_file, key_file)

    def reload(self) -> bool:
        """Read the certificate and key files again (SIGHUP)."""
        if self.cert_file is None or self.key_file is None:
            return False
        try:
            self.context = server_context(self.cert_file, self.key_file)
        except PKIError as exc:
            log.error("public certificate not reloaded reason=%s", exc)
            return False
        log.info("public certificate reloaded file=%s", self.cert_file)
        return True

    async def install(self, cert_pem: str, key_pem: str) -> bool:
        """Take a certificate the broker distributed: checked, written over the files (so a
        restart keeps it), presented to new TLS connections."""
        if self.cert_file is None or self.key_file is None:
            log.warning("public certificate ignored reason=no public_cert_file configured")
            return False
        try:
            context = await trio.to_thread.run_sync(
                _write_certificate, self.cert_file, self.key_file, cert_pem, key_pem
            )
        except (PKIError, OSError) as exc:
            log.error("public certificate from the broker refused reason=%s", exc)
            return False
        self.context = context
        log.info("public certificate installed file=%s", self.cert_file)
        return True


def _write_certificate(
    cert_file: Path, key_file: Path, cert_pem: str, key_pem: str
) -> ssl.SSLContext:
    """Write the pair next to the files, check it loads and matches, then move it in place."""
    new_cert = cert_file.with_name(cert_file.name + ".new")
    new_key = key_file.with_name(key_file.name + ".new")
    fd = os.open(new_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key_pem)
    new_cert.write_text(cert_pem)
    try:
        server_context(new_cert, new_key)
    except PKIError:
        new_cert.unlink(missing_ok=True)
        new_key.unlink(missing_ok=True)
        raise
    os.replace(new_key, key_file)
    os.replace(new_cert, cert_file)
    return server_context(cert_file, key_file)
