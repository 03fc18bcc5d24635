"""The farm's certificates in a directory, and atomic writes of key files.

Layout of a :class:`FarmPKI` directory (mode 0700)::

    ca.pem        the farm CA certificate: every daemon trusts it
    ca.key        its key (0600): only the broker's host should hold it
    <name>.pem    a daemon's certificate (leaf first)
    <name>.key    its key (0600)

Every file is written to a temporary file in the same directory, synced, then renamed over
the old one, so a reader never sees half a file. A pair is renamed key first, so a crash
between the two leaves an old certificate with a new key, which the next ``ensure`` sees
(the key matches no certificate) and repairs. The CA is never overwritten.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from ras.errors import PKIError
from ras.pki._common import (
    KeyPair,
    load_certificate,
    load_private_key,
    public_key_der,
)
from ras.pki._x509 import (
    create_ca,
    general_name,
    issue_certificate,
    open_ca,
    self_signed_certificate,
)

__all__ = ["FarmPKI", "write_atomic", "write_key_pair"]

# Certificates this close to their end are issued again by ``ensure``.
_RENEW_BEFORE = dt.timedelta(days=30)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _temp_file(path: Path, data: bytes, mode: int) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write each ``(path, data, mode)`` to a temporary file, then rename them in order."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            try:
                temps.append((_temp_file(path, data, mode), path))
            except OSError as exc:
                raise PKIError(f"{path}: cannot write: {exc.strerror or exc}") from exc
        for tmp, path in temps:
            try:
                tmp.replace(path)
            except OSError as exc:
                raise PKIError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    for directory in {path.parent for path, _, _ in files}:
        _sync_dir(directory)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename).

    ``mode`` is set on the file before any byte is written: use 0o600 for a private key.
    PKIError naming the file if it cannot be written.
    """
    _write_files([(path, data, mode)])


def write_key_pair(pair: KeyPair, cert_path: Path, key_path: Path) -> None:
    """Write a certificate chain (mode 0644) and its key (mode 0600), each atomically.

    The key is renamed into place first. When both paths are the same file, it holds the
    key then the chain, with mode 0600.
    """
    if Path(cert_path).resolve() == Path(key_path).resolve():
        _write_files([(key_path, pair.key_pem + pair.cert_pem, 0o600)])
    else:
        _write_files([(key_path, pair.key_pem, 0o600), (cert_path, pair.cert_pem, 0o644)])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PKIError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _names_of(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san)


class FarmPKI:
    """The farm's certificates in a directory.

    Default layout: ``<dir>/ca.pem``, ``<dir>/ca.key`` (mode 0600), ``<dir>/<name>.pem``,
    ``<dir>/<name>.key`` (mode 0600). Keys are written atomically. The CA is created once and
    never overwritten; daemon certificates are issued when missing and issued again when
    they no longer fit (see :meth:`ensure`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"FarmPKI({str(self.directory)!r})"

    @property
    def ca_path(self) -> Path:
        """The farm CA certificate, the file every daemon trusts."""
        return self.directory / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        """The farm CA key."""
        return self.directory / "ca.key"

    def has_ca(self) -> bool:
        """Whether the directory holds a CA (certificate or key)."""
        return self.ca_path.exists() or self.ca_key_path.exists()

    def paths(self, name: str) -> tuple[Path, Path]:
        """The certificate and key paths for ``name``; PKIError for a name unfit as a file."""
        if not _SAFE_NAME.fullmatch(name) or name.lower() == "ca":
            raise PKIError(
                f"{name!r} cannot name a certificate file: use letters, digits, '.', '-', '_' "
                "(and not 'ca')"
            )
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"

    def _mkdir(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PKIError(f"{self.directory}: cannot create: {exc.strerror or exc}") from exc

    def load_ca(self) -> KeyPair:
        """The farm CA; PKIError if it is missing, incomplete or inconsistent."""
        if not self.ca_path.exists() and not self.ca_key_path.exists():
            raise PKIError(f"{self.directory}: no farm CA here (run `ras pki init` first)")
        for path in (self.ca_path, self.ca_key_path):
            if not path.exists():
                raise PKIError(f"{path}: missing while its CA pair is present; not overwriting")
        pair = KeyPair(cert_pem=_read(self.ca_path), key_pem=_read(self.ca_key_path))
        try:
            open_ca(pair)
        except PKIError as exc:
            raise PKIError(f"{self.directory}: {exc}") from exc
        return pair

    def init_ca(self, common_name: str = "RAS Farm CA") -> KeyPair:
        """Create the farm CA if the directory has none, else load the one there.

        An existing CA is never overwritten, even with another common name.
        """
        if self.has_ca():
            return self.load_ca()
        self._mkdir()
        pair = create_ca(common_name)
        _write_files(
            [(self.ca_key_path, pair.key_pem, 0o600), (self.ca_path, pair.cert_pem, 0o644)]
        )
        return pair

    def _current(self, name: str) -> x509.Certificate | None:
        """The certificate on disk for ``name`` if it is readable and matches its key."""
        cert_path, key_path = self.paths(name)
        if not cert_path.exists() or not key_path.exists():
            return None
        try:
            cert = load_certificate(_read(cert_path), what=str(cert_path))
            key = load_private_key(_read(key_path), what=str(key_path))
        except PKIError:
            return None
        if public_key_der(cert) != public_key_der(key):
            return None
        return cert

    @staticmethod
    def _fits(cert: x509.Certificate, names: Sequence[str]) -> bool:
        if cert.not_valid_after_utc - _RENEW_BEFORE < dt.datetime.now(dt.UTC):
            return False
        wanted = {general_name(n) for n in names}
        return wanted <= _names_of(cert)

    def ensure(self, name: str, sans: Sequence[str] = ()) -> tuple[Path, Path]:
        """The certificate and key paths of daemon ``name``, issuing the pair if needed.

        The CA is created first if the directory has none. A certificate is issued when
        missing, unreadable, not matching its key, not issued by this CA, not issued to
        ``CN=name``, missing one of ``name`` and ``sans``, or within 30 days of its end;
        otherwise it is left alone.
        """
        cert_path, key_path = self.paths(name)
        ca = self.init_ca()
        ca_cert = load_certificate(ca.cert_pem, what=str(self.ca_path))
        cert = self._current(name)
        if cert is not None:
            try:
                cert.verify_directly_issued_by(ca_cert)
                issued_here = True
            except (ValueError, TypeError, InvalidSignature):
                issued_here = False
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            named = [a.value for a in cns] == [name]  # the identity peer_name() reads
            if issued_here and named and self._fits(cert, [name, *sans]):
                return cert_path, key_path
        write_key_pair(issue_certificate(ca, name, sans=sans), cert_path, key_path)
        return cert_path, key_path

    def ensure_self_signed(self, name: str, names: Sequence[str]) -> tuple[Path, Path]:
        """The paths of a self-signed certificate ``name`` for ``names``, made if needed.

        It is made when missing or not matching its key, and made again when it is
        self-signed and misses one of ``names`` or is within 30 days of its end. A
        certificate that is not self-signed (imported, or from ACME) is never replaced.
        """
        cert_path, key_path = self.paths(name)
        current = self._current(name)
        if current is not None:
            cert = current
            if cert.issuer != cert.subject or self._fits(cert, names):
                return cert_path, key_path
        elif cert_path.exists():
            try:
                cert = load_certificate(_read(cert_path), what=str(cert_path))
            except PKIError:
                pass
            else:
                if cert.issuer != cert.subject:
                    raise PKIError(
                        f"{cert_path}: not self-signed and without a matching key in "
                        f"{key_path}; not replacing it"
                    )
        self._mkdir()
        write_key_pair(self_signed_certificate(names), cert_path, key_path)
        return cert_path, key_path
