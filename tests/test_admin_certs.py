"""The farm certificate over the admin API (/api/certificate) on the in-process farm: what an
administrator imports is what the gateway's TLS port presents next; bad input names the field
and changes nothing; no answer holds a key; renew and assign do what they say; the status
warns of an expiry. (ACME itself runs against pebble in tests/test_acme_lab.py.)"""

from __future__ import annotations

import base64
import datetime as dt

from adminkit import call, logged_on, presented, presents, refused, serial_of, with_admin
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from farmkit import farm

from ras.pki import create_ca, export_pfx, self_signed_certificate
from ras.pki._common import load_private_key


async def test_import_pem_and_pfx_reach_the_gateway_and_no_answer_holds_a_key(tmp_path):
    async with farm(tmp_path) as f:
        with_admin(f)
        api = await logged_on(f)
        assert (await call(api, "GET", "certificate"))["source"] == "none"

        pair = self_signed_certificate(["rds.example.com"])
        shown = await call(
            api, "POST", "certificate/import", {"pem": (pair.cert_pem + pair.key_pem).decode()}
        )
        assert shown["source"] == "imported"
        assert shown["sans"] == ["DNS:rds.example.com"]
        await presents(f, serial_of(pair.cert_pem))

        other = self_signed_certificate(["portal.example.com"])
        pfx = base64.b64encode(export_pfx(other, b"pfx pw")).decode()
        err = await refused(
            api, "POST", "certificate/import", {"pfx_base64": pfx, "password": "wrong"}
        )
        assert (err.status, err.code) == (400, "bad_certificate")
        assert "wrong password" in str(err)
        await call(api, "POST", "certificate/import", {"pfx_base64": pfx, "password": "pfx pw"})
        await presents(f, serial_of(other.cert_pem))

        for body in (await call(api, "GET", "certificate"), await call(api, "GET", "status")):
            text = repr(body)
            assert "PRIVATE KEY" not in text
            assert other.key_pem.decode().splitlines()[1] not in text


async def test_bad_input_names_the_field_and_changes_nothing(tmp_path):
    async with farm(tmp_path) as f:
        with_admin(f)
        api = await logged_on(f)
        await call(api, "POST", "certificate/self-signed", {"names": ["rds.example.com"]})
        before = await call(api, "GET", "certificate")
        cases = [
            ("certificate/self-signed", {"names": []}, "names"),
            ("certificate/self-signed", {"names": ["not a name!"]}, "names[0]"),
            ("certificate/self-signed", {"names": ["a.example"], "days": 0}, "days"),
            ("certificate/import", {"pem": "-----BEGIN CERTIFICATE-----\nxx\n"}, None),
            ("certificate/import", {}, "pem"),
            ("certificate/import", {"pfx_base64": "!!!"}, "pfx_base64"),
            ("certificate/letsencrypt", {"names": ["a.example"]}, "agree_tos"),
            ("certificate/letsencrypt",
             {"names": ["a.example"], "agree_tos": True, "email": "nobody"}, "email"),
            ("certificate/letsencrypt",
             {"names": ["a.example"], "agree_tos": True, "directory": "ftp://x"}, "directory"),
            ("certificate/csr", {"names": ["a.example"], "extra": 1}, "extra"),
        ]  # fmt: skip
        for path, body, field in cases:
            err = await refused(api, "POST", path, body)
            assert err.status == 400, (path, body)
            assert err.field == field, (path, body, err.field)
        err = await refused(api, "PUT", "certificate/assign", {"to": ["bad name!"]})
        assert (err.status, err.field) == (400, "to[0]")
        after = await call(api, "GET", "certificate")
        assert after.pop("expires_in_s") <= before.pop("expires_in_s")  # counts down
        assert after == before


async def test_csr_signed_elsewhere_renew_assign_and_expiry_warning(tmp_path):
    async with farm(tmp_path) as f:
        with_admin(f)
        api = await logged_on(f)
        await call(
            api, "POST", "certificate/self-signed", {"names": ["rds.example.com"], "days": 10}
        )
        status = await call(api, "GET", "status")
        assert status["certificate"]["source"] == "self_signed"
        (warning,) = status["warnings"]
        assert warning.startswith("the farm certificate expires in 10.0 days")

        shown = await call(api, "GET", "certificate")
        renewed = await call(api, "POST", "certificate/renew")  # self-signed: a new one at once
        assert renewed["serial"] != shown["serial"]
        assert renewed["sans"] == shown["sans"]
        await presents(f, int(renewed["serial"], 16))

        answer = await call(api, "POST", "certificate/csr", {"names": ["csr.example.com"]})
        csr = x509.load_pem_x509_csr(answer["csr_pem"].encode())
        assert (await call(api, "GET", "certificate"))["csr_pending"] is True
        # imported without its key: only the certificate signed from that CSR is taken
        stranger = self_signed_certificate(["csr.example.com"])
        err = await refused(api, "POST", "certificate/import", {"pem": stranger.cert_pem.decode()})
        assert "does not match the pending CSR" in str(err)
        signed = _sign(csr)
        shown = await call(api, "POST", "certificate/import", {"pem": signed})
        assert shown["source"] == "csr"
        assert shown["csr_pending"] is False
        await presents(f, serial_of(signed))
        err = await refused(api, "POST", "certificate/renew")
        assert (err.status, err.code) == (409, "cannot_renew")

        # assigned to another gateway only: this one keeps what it has, until it is assigned
        await call(api, "PUT", "certificate/assign", {"to": ["elsewhere"]})
        shown = await call(api, "POST", "certificate/self-signed", {"names": ["next.example.com"]})
        addr = f.gateway_addrs["gateway"]["tls"]
        assert (await presented(addr)).serial_number == serial_of(signed)
        assert (await call(api, "PUT", "certificate/assign", {"to": []}))["assigned"] == "all"
        await presents(f, int(shown["serial"], 16))


def _sign(csr: x509.CertificateSigningRequest) -> str:
    """What another CA answers to the broker's CSR: the certificate and the CA's own."""
    ca = create_ca("Someone Else's CA")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    now = dt.datetime.now(dt.UTC)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(san, False)
        .sign(load_private_key(ca.key_pem, None, what="CA key"), hashes.SHA256())  # type: ignore[arg-type]
    )
    return (cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem).decode()
