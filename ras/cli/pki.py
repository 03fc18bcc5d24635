"""``ras pki``: the farm CA and certificates from the command line.

Subcommands: ``init`` (create or show the farm CA), ``issue`` (a daemon certificate from
the CA), ``self-signed``, ``csr``, ``import`` (PEM bundle or PFX to a normalised chain and
key), ``export`` (to PFX) and ``show``. Each handler returns an exit code: 0 when done, 2
on bad input or a file that cannot be read or written, with a one-line message on stderr
naming the file. Key material and passwords are never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ras.errors import PKIError
from ras.pki import (
    FarmPKI,
    describe,
    export_pfx,
    import_pem,
    import_pfx,
    make_csr,
    self_signed_certificate,
    split_chain,
    write_atomic,
    write_key_pair,
)

__all__ = ["add_parser"]

DEFAULT_DIR = Path("state/pki")

Handler = Callable[[argparse.Namespace], int]


class _Fail(Exception):
    """A one-line error for stderr, already naming the file."""


def _fail(command: str, message: str) -> int:
    print(f"ras pki {command}: {message}", file=sys.stderr)
    return 2


def _guard(command: str, handler: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (_Fail, PKIError) as exc:
            return _fail(command, str(exc))

    return run


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Fail(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _password(path: Path | None) -> bytes | None:
    """The password in ``path`` (its first line); None without a file or for an empty one."""
    if path is None:
        return None
    data = _read(path)
    lines = data.splitlines()
    return lines[0] if lines and lines[0] else None


def _check_outputs(force: bool, *paths: Path) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise _Fail(f"{path}: already exists (use --force to replace it)")


def _text(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _print_pair(cert_pem: bytes, cert_path: Path, key_path: Path) -> None:
    chain = split_chain(cert_pem)
    info = describe(chain[0])
    print(f"certificate: {cert_path} ({len(chain)} in chain) {info['subject']}")
    print(f"  sans: {_text(info['sans'])}")
    print(f"  not after: {info['not_after']}  sha256: {info['sha256']}")
    print(f"key: {key_path} (mode 0600)")


def _init(args: argparse.Namespace) -> int:
    pki = FarmPKI(args.dir)
    existed = pki.has_ca()
    pair = pki.init_ca(args.cn)
    info = describe(pair.cert_pem)
    verb = "existing" if existed else "created"
    print(f"farm CA ({verb}): {pki.ca_path} {info['subject']}")
    print(f"  not after: {info['not_after']}  sha256: {info['sha256']}")
    print(f"key: {pki.ca_key_path} (mode 0600; keep it on the broker's host only)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    pki = FarmPKI(args.dir)
    pki.load_ca()  # never create a CA by accident: `init` does that
    cert_path, key_path = pki.paths(args.name)
    before = _read(cert_path) if cert_path.exists() else None
    cert_path, key_path = pki.ensure(args.name, args.san)
    after = _read(cert_path)
    if before == after:
        print(f"kept the current certificate for {args.name}: it fits")
    _print_pair(after, cert_path, key_path)
    return 0


def _self_signed(args: argparse.Namespace) -> int:
    _check_outputs(args.force, args.out_cert, args.out_key)
    pair = self_signed_certificate(args.names, valid_days=args.days)
    write_key_pair(pair, args.out_cert, args.out_key)
    _print_pair(pair.cert_pem, args.out_cert, args.out_key)
    return 0


def _csr(args: argparse.Namespace) -> int:
    _check_outputs(args.force, args.out_csr, args.out_key)
    csr_pem, key_pem = make_csr(args.names, organization=args.org)
    write_atomic(args.out_key, key_pem, mode=0o600)
    write_atomic(args.out_csr, csr_pem)
    print(f"request: {args.out_csr} for {', '.join(args.names)}")
    print(f"key: {args.out_key} (mode 0600; keep it to join the signed certificate)")
    return 0


def _import(args: argparse.Namespace) -> int:
    data = _read(args.file)
    password = _password(args.password_file)
    try:
        if args.pfx or b"-----BEGIN" not in data:
            pair = import_pfx(data, password)
        else:
            pair = import_pem(data, password=password)
    except PKIError as exc:
        raise _Fail(f"{args.file}: {exc}") from exc
    _check_outputs(args.force, args.out_cert, args.out_key)
    write_key_pair(pair, args.out_cert, args.out_key)
    _print_pair(pair.cert_pem, args.out_cert, args.out_key)
    return 0


def _export(args: argparse.Namespace) -> int:
    cert_pem = _read(args.cert)
    key_pem = _read(args.key) if args.key != args.cert else b""
    password = _password(args.password_file)
    if args.password_file is not None and password is None:
        raise _Fail(f"{args.password_file}: the password file is empty")
    try:
        pair = import_pem(key_pem + cert_pem)
    except PKIError as exc:
        raise _Fail(f"{args.cert}, {args.key}: {exc}") from exc
    _check_outputs(args.force, args.out)
    data = export_pfx(pair, password, friendly_name=args.name, legacy=args.legacy)
    write_atomic(args.out, data, mode=0o600)
    how = "encrypted" if password is not None else "NOT encrypted (no --password-file)"
    print(f"wrote {args.out}: PKCS#12, {len(split_chain(pair.cert_pem))} certificates, {how}")
    return 0


def _show(args: argparse.Namespace) -> int:
    data = _read(args.file)
    try:
        chain = split_chain(data)
    except PKIError as exc:
        raise _Fail(f"{args.file}: {exc}") from exc
    for i, cert_pem in enumerate(chain, 1):
        if len(chain) > 1:
            print(f"certificate {i} of {len(chain)}")
        for key, value in describe(cert_pem).items():
            print(f"  {key.replace('_', ' ')}: {_text(value)}")
    return 0


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"the farm PKI directory (default: ./{DEFAULT_DIR})",
    )


def _force_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace existing output files")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pki`` subcommand and its subcommands to the ``ras`` parser."""
    pki = subparsers.add_parser(
        "pki",
        help="the farm CA and certificates",
        description="Create the farm CA, issue, import, export and inspect certificates.",
    )
    sub = pki.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create the farm CA (or show the existing one)")
    _dir_option(p)
    p.add_argument("--cn", default="RAS Farm CA", help="the CA's common name")
    p.set_defaults(func=_guard("init", _init))

    p = sub.add_parser("issue", help="issue a daemon certificate from the farm CA")
    p.add_argument("name", help="the daemon's name (certificate CN and first SAN)")
    _dir_option(p)
    p.add_argument(
        "--san", action="append", default=[], metavar="NAME", help="another DNS name or IP"
    )
    p.set_defaults(func=_guard("issue", _issue))

    p = sub.add_parser("self-signed", help="make a self-signed server certificate")
    p.add_argument("names", nargs="+", metavar="NAME", help="DNS names or IPs; the first is CN")
    p.add_argument("--out-cert", type=Path, required=True, metavar="FILE")
    p.add_argument("--out-key", type=Path, required=True, metavar="FILE")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    _force_option(p)
    p.set_defaults(func=_guard("self-signed", _self_signed))

    p = sub.add_parser("csr", help="make a certificate signing request and its key")
    p.add_argument("names", nargs="+", metavar="NAME", help="DNS names or IPs; the first is CN")
    p.add_argument("--out-csr", type=Path, required=True, metavar="FILE")
    p.add_argument("--out-key", type=Path, required=True, metavar="FILE")
    p.add_argument("--org", help="the organization (O) of the subject")
    _force_option(p)
    p.set_defaults(func=_guard("csr", _csr))

    p = sub.add_parser("import", help="import a PEM bundle (key + chain) or a PFX")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--password-file", type=Path, metavar="FILE", help="the password, one line")
    p.add_argument("--pfx", action="store_true", help="FILE is PKCS#12 (found out if not PEM)")
    p.add_argument("--out-cert", type=Path, required=True, metavar="FILE")
    p.add_argument("--out-key", type=Path, required=True, metavar="FILE")
    _force_option(p)
    p.set_defaults(func=_guard("import", _import))

    p = sub.add_parser("export", help="export a certificate chain and its key as a PFX")
    p.add_argument("--cert", type=Path, required=True, metavar="FILE")
    p.add_argument("--key", type=Path, required=True, metavar="FILE")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.pfx")
    p.add_argument("--password-file", type=Path, metavar="FILE", help="the password, one line")
    p.add_argument("--name", default="ras", help="the friendly name in the PFX")
    p.add_argument(
        "--legacy", action="store_true", help="3DES/SHA-1, for Windows Server 2016 and older"
    )
    _force_option(p)
    p.set_defaults(func=_guard("export", _export))

    p = sub.add_parser("show", help="describe the certificates in a PEM file")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=_guard("show", _show))
