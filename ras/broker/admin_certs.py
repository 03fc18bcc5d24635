"""The admin API's farm certificate: ``/api/certificate`` (docs/admin-api.md).

``GET`` shows it (never a key); ``POST .../self-signed``, ``.../import``, ``.../csr``,
``.../letsencrypt`` and ``.../renew`` change where it comes from; ``PUT .../assign`` names the
gateways and HALBs it is pushed to. An ACME order runs in the background: ``letsencrypt`` and
``renew`` answer 202 with ``attempt``, the number ``renewal.attempts`` reaches when it has
started; it is over once ``renewal.state`` is no longer ``running``.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any

from ras.broker.admin_api import ApiError, ApiRequest, Route, bad_field
from ras.broker.model import check_name
from ras.config import Invalid
from ras.errors import PKIError

if TYPE_CHECKING:
    from ras.broker.certs import FarmCertificates
    from ras.broker.parts import BrokerParts

__all__ = ["cert_routes"]

MAX_NAMES = 100
_DNS_NAME = re.compile(r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def _fields(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise bad_field(key, f"unknown field (known: {', '.join(sorted(allowed))})")


def _names(body: dict[str, Any], key: str = "names", *, required: bool = True) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise bad_field(key, "expected a list of names")
    if required and not value:
        raise bad_field(key, "at least one name is required")
    if len(value) > MAX_NAMES:
        raise bad_field(key, f"more than {MAX_NAMES} names")
    for i, name in enumerate(value):
        if not _DNS_NAME.fullmatch(name):
            raise bad_field(f"{key}[{i}]", f"{name!r} is not a DNS name or address")
    return list(value)


def _text(body: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise bad_field(key, "a non-empty string is required" if required else "expected text")
    return value


def _pki(exc: PKIError | ValueError) -> ApiError:
    return ApiError(400, "bad_certificate", str(exc))


class _CertApi:
    def __init__(self, broker: BrokerParts) -> None:
        self.broker = broker

    @property
    def certs(self) -> FarmCertificates:
        return self.broker.certificates

    async def show(self, request: ApiRequest) -> tuple[int, Any]:
        return 200, self.certs.show()

    async def self_signed(self, request: ApiRequest) -> tuple[int, Any]:
        body = request.json()
        _fields(body, {"names", "days"})
        days = body.get("days", 825)
        if type(days) is not int or not 1 <= days <= 3650:
            raise bad_field("days", "a whole number of days from 1 to 3650")
        try:
            await self.certs.self_signed(_names(body), days)
        except PKIError as exc:
            raise _pki(exc) from None
        return 200, self.certs.show()

    async def import_(self, request: ApiRequest) -> tuple[int, Any]:
        body = request.json()
        _fields(body, {"pem", "pfx_base64", "password"})
        password = _text(body, "password").encode() or None
        if ("pem" in body) == ("pfx_base64" in body):
            raise bad_field("pem", "give one of pem (text) and pfx_base64")
        if "pem" in body:
            data = _text(body, "pem", required=True).encode()
        else:
            try:
                data = base64.b64decode(_text(body, "pfx_base64", required=True), validate=True)
            except binascii.Error:
                raise bad_field("pfx_base64", "is not base64") from None
            if data.lstrip().startswith(b"-----BEGIN"):
                raise bad_field("pfx_base64", "holds PEM: send it as pem")
        try:
            await self.certs.import_(data, password)
        except (PKIError, ValueError) as exc:
            raise _pki(exc) from None
        return 200, self.certs.show()

    async def csr(self, request: ApiRequest) -> tuple[int, Any]:
        body = request.json()
        _fields(body, {"names", "organization"})
        organization = _text(body, "organization") or None
        try:
            csr_pem = await self.certs.csr(_names(body), organization)
        except PKIError as exc:
            raise _pki(exc) from None
        return 200, {"csr_pem": csr_pem}

    async def letsencrypt(self, request: ApiRequest) -> tuple[int, Any]:
        body = request.json()
        _fields(body, {"names", "email", "directory", "agree_tos"})
        if body.get("agree_tos") is not True:
            raise bad_field("agree_tos", "the CA's terms of service must be agreed (true)")
        email = _text(body, "email")
        if email and not _EMAIL.fullmatch(email):
            raise bad_field("email", f"{email!r} is not an e-mail address")
        directory = _text(body, "directory")
        if directory and not directory.startswith(("https://", "http://")):
            raise bad_field("directory", "an https:// URL of the CA's ACME directory")
        attempt = await self.certs.letsencrypt(_names(body), email, directory)
        return 202, self.certs.show() | {"attempt": attempt}

    async def renew(self, request: ApiRequest) -> tuple[int, Any]:
        _fields(request.json(), set())
        try:
            attempt = await self.certs.renew()
        except PKIError as exc:
            raise ApiError(409, "cannot_renew", str(exc)) from None
        if attempt is None:
            return 200, self.certs.show()
        return 202, self.certs.show() | {"attempt": attempt}

    async def assign(self, request: ApiRequest) -> tuple[int, Any]:
        body = request.json()
        _fields(body, {"to"})
        to = body.get("to", [])
        if not isinstance(to, list) or not all(isinstance(n, str) for n in to):
            raise bad_field("to", "a list of gateway and HALB names ([]: every one)")
        for i, name in enumerate(to):
            try:
                check_name(f"to[{i}]", name)
            except Invalid as exc:
                raise bad_field(exc.field, exc.why) from None
        await self.certs.assign(to)
        return 200, self.certs.show()


def cert_routes(broker: BrokerParts) -> list[Route]:
    api = _CertApi(broker)
    return [
        Route("GET", ("certificate",), api.show),
        Route("POST", ("certificate", "self-signed"), api.self_signed),
        Route("POST", ("certificate", "import"), api.import_),
        Route("POST", ("certificate", "csr"), api.csr),
        Route("POST", ("certificate", "letsencrypt"), api.letsencrypt),
        Route("POST", ("certificate", "renew"), api.renew),
        Route("PUT", ("certificate", "assign"), api.assign),
    ]
