"""``ras admin cert``: the farm's public certificate, the one every gateway and HALB presents
(docs/certificates.md): show, self-signed, import, csr, letsencrypt, renew, assign."""

from __future__ import annotations

import argparse
import base64
import time
from pathlib import Path
from typing import Any

from ras.cli.adminclient import AdminApiError, AdminClient
from ras.errors import RasError

__all__ = ["add_cert_parser"]

PATH = "certificate"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RasError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _names(a: argparse.Namespace) -> list[str]:
    return [n.strip() for value in a.name for n in value.split(",") if n.strip()]


def _wait(api: AdminClient, answer: dict[str, Any], a: argparse.Namespace) -> Any:
    """Until the ACME attempt the answer names has run; its failure is an error."""
    attempt = answer.get("attempt")
    if a.no_wait or not isinstance(attempt, int):
        return answer
    deadline = time.monotonic() + a.wait_s
    while True:
        shown = api.request("GET", PATH)
        renewal = shown.get("renewal") or {}
        if renewal.get("attempts", 0) >= attempt and renewal.get("state") != "running":
            break
        if time.monotonic() > deadline:
            raise AdminApiError(
                504, "timeout", f"the ACME order was still running after {a.wait_s:g} s"
            )
        time.sleep(0.5)
    if renewal.get("state") == "failed":
        raise AdminApiError(
            502,
            "acme_failed",
            f"the ACME order failed: {renewal.get('last_error')}; the certificate in use "
            f"stays; next attempt at {renewal.get('next_attempt')}",
        )
    return shown


def _show(api: AdminClient, a: argparse.Namespace) -> Any:
    return api.request("GET", PATH)


def _self_signed(api: AdminClient, a: argparse.Namespace) -> Any:
    return api.request("POST", f"{PATH}/self-signed", {"names": _names(a), "days": a.days})


def _import(api: AdminClient, a: argparse.Namespace) -> Any:
    data = _read(a.file)
    body: dict[str, Any] = {}
    if data.lstrip().startswith(b"-----BEGIN"):
        body["pem"] = data.decode("ascii", "replace")
    else:
        body["pfx_base64"] = base64.b64encode(data).decode()
    if a.password_file is not None:
        lines = _read(a.password_file).splitlines()
        if lines and lines[0]:
            body["password"] = lines[0].decode()
    return api.request("POST", f"{PATH}/import", body)


def _csr(api: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"names": _names(a)}
    if a.organization:
        body["organization"] = a.organization
    answer = api.request("POST", f"{PATH}/csr", body)
    if a.out is not None:
        a.out.write_text(answer["csr_pem"])
        return {"csr": str(a.out), "next": "have it signed, then: ras admin cert import CERT"}
    print(answer["csr_pem"], end="")
    return {"next": "have it signed, then: ras admin cert import CERT"}


def _letsencrypt(api: AdminClient, a: argparse.Namespace) -> Any:
    if not a.agree_tos:
        raise AdminApiError(400, "usage", "--agree-tos: read and agree to the CA's terms first")
    body: dict[str, Any] = {"names": _names(a), "email": a.email or "", "agree_tos": True}
    if a.directory:
        body["directory"] = a.directory
    return _wait(api, api.request("POST", f"{PATH}/letsencrypt", body), a)


def _renew(api: AdminClient, a: argparse.Namespace) -> Any:
    return _wait(api, api.request("POST", f"{PATH}/renew", {}), a)


def _assign(api: AdminClient, a: argparse.Namespace) -> Any:
    to = [] if a.all else [n.strip() for v in a.to or [] for n in v.split(",") if n.strip()]
    if not a.all and not to:
        raise AdminApiError(400, "usage", "give --to NAME[,NAME] or --all")
    return api.request("PUT", f"{PATH}/assign", {"to": to})


def _leaf(sub: Any, name: str, fn: Any, text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    p.set_defaults(command_fn=fn, kind_path=PATH)
    return p


def _name_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name",
        action="append",
        required=True,
        metavar="NAME[,NAME]",
        help="a DNS name (or address) the certificate is for; the first is its subject",
    )


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="return once the order has started")
    p.add_argument("--wait-s", type=float, default=300.0, help="wait this long for the order (300)")


def add_cert_parser(sub: Any) -> None:
    cert = sub.add_parser(
        "cert",
        help="the farm's public certificate (gateways, HALB)",
        description="The farm's public certificate: kept by the broker, pushed to every "
        "gateway and HALB (or those it is assigned to), renewed by ACME. See "
        "docs/certificates.md.",
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    _leaf(cert, "show", _show, "the certificate, its source, expiry and renewal")
    p = _leaf(cert, "self-signed", _self_signed, "make a new self-signed certificate")
    _name_option(p)
    p.add_argument("--days", type=int, default=825, help="valid this many days (825)")
    p = _leaf(
        cert,
        "import",
        _import,
        "import a PEM bundle (key and chain), a PFX, or the certificate signed from "
        "the pending CSR",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--password-file", type=Path, help="the key's or PFX's password (first line)")
    p = _leaf(cert, "csr", _csr, "make a CSR (the key stays in the broker) to have signed")
    _name_option(p)
    p.add_argument("--organization", help="O= in the subject")
    p.add_argument("--out", type=Path, help="write the CSR here (default: print it)")
    p = _leaf(
        cert,
        "letsencrypt",
        _letsencrypt,
        "use Let's Encrypt (or another ACME CA) for these names from now on: order now, "
        "renew at two thirds of the lifetime",
    )
    _name_option(p)
    p.add_argument("--email", help="the account's contact (expiry notices from the CA)")
    p.add_argument("--directory", help="the CA's ACME directory URL (default: the broker's)")
    p.add_argument("--agree-tos", action="store_true", help="agree to the CA's terms of service")
    _wait_options(p)
    p = _leaf(cert, "renew", _renew, "renew now (ACME or self-signed)")
    _wait_options(p)
    p = _leaf(cert, "assign", _assign, "push the certificate to these gateways and HALBs only")
    p.add_argument("--to", action="append", metavar="NAME[,NAME]", help="gateway or HALB names")
    p.add_argument("--all", action="store_true", help="every gateway and HALB (the default)")
